"""Toy multimodal-reward tasks: FlowRL keeps every mode where GRPO collapses onto a few.

Every answer is a two-digit number 10..99 followed by EOS: 90 answers, few enough to teacher-force
all of them and read off the policy's exact distribution, with no sampling noise. Each prompt has
several equally correct answers (the modes): "a two-digit number that leaves remainder 3 when
divided by 5" has 18 (13, 18, ..., 98). A tiny random Qwen2 (built here, tokenizer included) first
learns the answer format (warm_start), which gives π_ref; then GRPO and FlowRL train from the same
weights with flowrl_min's own trainer, and we compare each policy with FlowRL's target
    p*(y|x) = π_ref(y|x) · 1[y correct] / π_ref(correct|x)
(exp(β·r̂)·π_ref restricted to the reward's support: every correct answer has the same r̂).

    python toy_tasks.py                   # 3 seeds: table, histograms, toy_modes.png, .json
    python toy_tasks.py train             # one flowrl_min run on the tiny model, offline, ~10 s
    python toy_tasks.py train --algo grpo # any flowrl_min flag works after `train`
    python toy_tasks.py --task numbers --model DIR   # the same on a pretrained chat model
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import signal
import statistics
import sys
import time

if __name__ == "__main__":  # Ctrl-C while the libraries load: exit at once (130), no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import tokenizers as tk
import torch
import transformers
from datasets import Dataset

import flowrl_min as fm

ANSWERS = [str(n) for n in range(10, 100)]  # the whole answer space of the toy tasks
# (m, r): the correct answers are n with n % m == r: 13, 18, 23, ..., 98 (18 modes)
PROMPTS = [(5, 3)]
# π_ref's preference for correct answers: π_ref(correct) ≈ 18·4 / (18·4 + 72) = 0.5
BOOST = 4.0
# `--task lengths`: correct answers of two lengths, 3 and 8 (a digit + EOS) and 13 ... 98 (two
# digits + EOS); the warm start draws each one-digit correct answer SHORT_BOOST times as often
# as a wrong one, so that π_ref puts about 40% of its correct mass on them (2·24 / (2·24 + 18·4))
LENGTHS = "Name a number below 100 that leaves remainder 3 when divided by 5."
SHORT_BOOST = 24.0

# `--task numbers`, for a pretrained chat model (README: Figure 1 on a real LLM): questions it
# answers with a bare number, each with 10-22 correct two-digit answers, chosen by measuring π_ref
# (Qwen2.5-Coder-0.5B-Instruct puts 97-98% of its mass on "0" ... "99", right 36-67% of the time).
NUMBER_SPACE = [str(n) for n in range(100)]
NUMBER_RULES = {
    "Name a two-digit prime number.": lambda n: all(n % d for d in range(2, 10) if d < n),
    "Name a two-digit multiple of 7.": lambda n: n % 7 == 0,
    "Name a two-digit number divisible by 9.": lambda n: n % 9 == 0,
    "Name a two-digit multiple of 4.": lambda n: n % 4 == 0,
}
REPLY = " Reply with the number only."

# the tiny model: Qwen2's split regex and chat template, so digits are single tokens and the
# tokenizer saves and reloads with AutoTokenizer like any other
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# flowrl_min's defaults for the tiny model: it trains fast, at a large learning rate
TINY = {"model": "tiny", "dataset": "modes", "steps": 200, "lr": 3e-4, "logz_lr": 1e-2,
        "max_new_tokens": 4, "grad_ckpt": False,
        "dtype": "float32"}  # fp32 pinned: the exact tables reproduce on any CPU

def question(m: int, r: int) -> str:
    return f"Name a two-digit number that leaves remainder {r} when divided by {m}."

def build_tiny_model(seed: int) -> tuple[transformers.PreTrainedModel,
                                         transformers.PreTrainedTokenizerFast]:
    """A random 2-layer Qwen2 (about 0.1M parameters) and a byte-level BPE tokenizer trained
    here on a fixed corpus: the toy question and 200 arithmetic questions."""
    corpus = [question(*PROMPTS[0]), LENGTHS] + list(fm.arith_dataset(200, seed)["question"])
    tok = tk.Tokenizer(tk.models.BPE())
    tok.normalizer = tk.normalizers.NFC()
    split = tk.pre_tokenizers.Split(tk.Regex(QWEN2_SPLIT), "isolated")
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = tk.decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = tk.trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus + ["user assistant system"], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML, padding_side="left")
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return transformers.Qwen2ForCausalLM(config), tokenizer

def correct_set(answer: str) -> list[bool]:
    """Which of ANSWERS are correct for a prompt whose answer field is 'm:r'. (90,)"""
    m, r = map(int, answer.split(":"))
    return [int(a) % m == r for a in ANSWERS]

def modes_reward(completion: str, answer: str) -> float:
    """1.0 for a two-digit number with the asked remainder, else 0.0."""
    got = re.fullmatch(r"\s*(\d\d)\s*", completion)
    m, r = map(int, answer.split(":"))
    return float(got is not None and int(got.group(1)) % m == r)

def graded_reward(completion: str, answer: str) -> float:
    """Modes of unequal reward: a correct number ending in 8 scores 1.0, one ending in 3, 0.5."""
    return modes_reward(completion, answer) * (1.0 if completion.strip().endswith("8") else 0.5)

def numbers_reward(completion: str, answer: str) -> float:
    """1.0 for exactly one of the correct strings (answer: '11,13,...'): strict, in NUMBER_SPACE."""
    return float(completion in answer.split(","))

def task_prompts(task: str) -> list[tuple[str, list[str], list[bool]]]:
    """Each prompt of a task: its question, the answer space, and which answers are correct."""
    if task == "numbers":
        return [(q + REPLY, NUMBER_SPACE, [len(a) == 2 and rule(int(a)) for a in NUMBER_SPACE])
                for q, rule in NUMBER_RULES.items()]
    if task == "lengths":
        return [(LENGTHS, NUMBER_SPACE, [int(a) % 5 == 3 for a in NUMBER_SPACE])]
    return [(question(m, r), ANSWERS, correct_set(f"{m}:{r}")) for m, r in PROMPTS]

def make_task(name: str) -> tuple[Dataset, Dataset, fm.RewardFn]:
    """The task's prompts (train = held-out: the point is the distribution per prompt), reward."""
    prompts = task_prompts(name)
    answers = [",".join(a for a, ok in zip(space, correct) if ok) for _, space, correct in prompts]
    if name in ("modes", "graded"):  # their rewards read 'm:r'
        answers = [f"{m}:{r}" for m, r in PROMPTS]
    ds = Dataset.from_dict({"question": [q for q, _, _ in prompts], "answer": answers})
    return ds, ds, {"modes": modes_reward, "graded": graded_reward}.get(name, numbers_reward)

def answer_batch(tokenizer, q: str, space: list[str] = ANSWERS) -> tuple[torch.Tensor, ...]:
    """The prompt's ids (P,), and every answer + EOS right-padded: ids and mask (A, T)."""
    text = fm.format_prompt(tokenizer, q)
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    eos = [tokenizer.eos_token_id]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + eos for a in space]
    T = max(map(len, answers))
    ids = torch.tensor([a + [tokenizer.pad_token_id] * (T - len(a)) for a in answers])
    return prompt, ids, torch.tensor([[1.0] * len(a) + [0.0] * (T - len(a)) for a in answers])

@torch.inference_mode()
def answer_logprobs(model, tokenizer, q: str, space: list[str] = ANSWERS) -> torch.Tensor:
    """Exact log π(a + EOS | x) for every answer a, in one teacher-forced forward. (A,)"""
    prompt, ids, mask = (x.to(model.device) for x in answer_batch(tokenizer, q, space))
    model.eval()
    logp, _ = fm.sequence_logprobs(model, [prompt], [0] * len(ids), ids, mask, 1.0)
    return torch.where(mask.bool(), logp, 0.0).sum(-1).cpu()

def mode_metrics(logp: torch.Tensor, ref_logp: torch.Tensor,
                 correct: torch.Tensor) -> dict[str, float]:
    """Exact metrics of a policy against p* = π_ref restricted to the correct answers.

    mass: π(answer space), the rest is outside the format; accuracy: π(correct); modes_covered:
    correct answers holding at least half their share under p*; entropy: of π restricted to the
    correct answers (max: log n_modes); kl_target: KL(p* ‖ π_θ)."""
    p = logp.exp()
    target = torch.softmax(ref_logp.masked_fill(~correct, -math.inf), 0)
    acc = p[correct].sum()
    q = p[correct] / acc  # π restricted to the correct set
    t = target[correct]
    return {"mass": p.sum().item(), "accuracy": acc.item(),
            "modes_covered": int((q >= 0.5 * t).sum()), "n_modes": int(correct.sum()),
            "kl_target": (t * (t.log() - logp[correct])).sum().item(),
            "entropy": -(q * q.log()).sum().item(), "max_entropy": math.log(int(correct.sum()))}

def task_logprobs(model, tokenizer, task: str) -> list[torch.Tensor]:
    """Exact log π(a | x) of every answer, for each prompt of the task. [(A,)]"""
    return [answer_logprobs(model, tokenizer, q, space) for q, space, _ in task_prompts(task)]

def task_metrics(logps: list[torch.Tensor], ref_logps: list[torch.Tensor],
                 task: str) -> dict[str, float]:
    """mode_metrics averaged over the task's prompts (modes_covered and n_modes summed); on
    `graded` also high_share, the share of the correct mass on its best answers (ending in 8), on
    `lengths` short_share, the share of the correct mass on the one-digit answers."""
    share = {"graded": ("high_share", lambda a: a.endswith("8")),
             "lengths": ("short_share", lambda a: len(a) == 1)}
    per = []
    for (q, space, correct), logp, ref in zip(task_prompts(task), logps, ref_logps):
        correct = torch.tensor(correct)
        per.append(mode_metrics(logp, ref, correct))
        if task in share:
            name, pick = share[task]
            part = correct & torch.tensor([pick(a) for a in space])
            per[-1][name] = (logp[part].exp().sum() / logp[correct].exp().sum()).item()
    summed = ("modes_covered", "n_modes")
    return {k: (sum if k in summed else statistics.mean)(d[k] for d in per) for k in per[0]}

def warm_start(model, tokenizer, seed: int, steps: int = 150, lr: float = 3e-3,
               boost: float = BOOST, task: str = "modes") -> None:
    """Supervised pre-training (not RL) that gives the random tiny model a prior π_ref: answers
    drawn from the whole answer space, each correct one `boost` times as often (a one-digit one,
    SHORT_BOOST), so π_ref solves the prompt some of the time, like a pretrained LLM, with mass
    on every mode."""
    g = torch.Generator().manual_seed(seed)
    prompts = task_prompts(task)
    batches = [[x.to(model.device) for x in answer_batch(tokenizer, q, space)]
               for q, space, _ in prompts]
    weights = [torch.tensor([SHORT_BOOST if ok and len(a) == 1 else 1 + (boost - 1) * ok
                             for a, ok in zip(space, correct)]) for _, space, correct in prompts]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for (prompt, ids, mask), wts in zip(batches, weights):
            pick = torch.multinomial(wts, 16, replacement=True, generator=g)
            logp, _ = fm.sequence_logprobs(model, [prompt], [0] * len(pick), ids[pick],
                                           mask[pick], 1.0)
            loss = loss - fm.masked_mean(logp, mask[pick]) / len(batches)
        opt.zero_grad()
        loss.backward()
        opt.step()

def initial_model(name: str, seed: int, task: str = "modes"):
    """π_ref, tokenizer, on the GPU if any: the tiny model warm-started, or a pretrained one."""
    device = fm.pick_device("")
    if name != "tiny":
        model, tokenizer = fm.load_model(name)
        return model.to(device), tokenizer
    torch.manual_seed(seed)
    model, tokenizer = build_tiny_model(seed)
    model.to(device)
    warm_start(model, tokenizer, seed, task=task)
    return model, tokenizer

def load_tiny(cfg: fm.Config) -> tuple:
    """flowrl_min.main's loader for `toy_tasks.py train`: the warm-started tiny model, a task."""
    if cfg.model != "tiny" or cfg.dataset not in ("modes", "graded", "lengths"):
        fm.die("toy_tasks.py train runs the tiny model on --dataset modes, graded or lengths; "
               "for a pretrained model or another dataset use python flowrl_min.py")
    return (*initial_model("tiny", cfg.seed, cfg.dataset), *make_task(cfg.dataset))

def train_tiny(argv: list[str]) -> list[dict]:
    """`python toy_tasks.py train [flags]`: flowrl_min's own main() on the tiny model."""
    return fm.main(argv, TINY, load_tiny)

def run(task: str, algo: str, model, tokenizer, ref_logps: list[torch.Tensor], seed: int,
        flags: list[str], every: int = 10, model_name: str = "tiny") -> list[dict]:
    """Train one algorithm with flowrl_min.train from the given (warm-started or pretrained)
    weights; exact metrics every few steps (step 0 is π_ref itself, from ref_logps)."""
    # --model only picks flowrl_min's defaults for it (learning rates, checkpointing)
    defaults = TINY if model_name == "tiny" else {}
    cfg = fm.parse_args([*VARIANTS[algo], "--dataset", task, "--seed", str(seed), "--eval-every",
                         "0", "--model", model_name, "--out", f"toy_out/{task}-{algo}-seed{seed}",
                         "--overwrite", *flags], defaults)
    if cfg.lora_r:  # the adapters' random init: the same for every algorithm and run order
        torch.manual_seed(seed)
        fm.add_lora(model, cfg.lora_r, cfg.lora_alpha)
    train_ds, eval_ds, reward_fn = make_task(task)
    def track(step: int, policy) -> dict:
        if step % every == 0 or step == cfg.steps:
            return task_metrics(task_logprobs(policy, tokenizer, task), ref_logps, task)
        return {}
    torch.manual_seed(seed)
    history = fm.train(cfg, model, tokenizer, train_ds, eval_ds, reward_fn, on_step=track)
    return [{"step": 0, **task_metrics(ref_logps, ref_logps, task)}] + history

def fixed_point(history: list[dict], ref_logp: torch.Tensor, tokenizer, group_size: int,
                beta: float, token_sums: bool) -> dict[str, float]:
    """What δ = 0 predicts for a `lengths` run, from its own numbers: log Z (mean of its last 10
    steps), β·r̂ of a correct answer at its final accuracy p (r̂ = √((1−p)/p·(G−1)/G): a group of
    G with pG correct), κ = β·r̂ − log Z, and π(y) ∝ π_ref(y)·exp(|y|·κ) over the correct
    answers (|y|: tokens, EOS included; 1 for all with token sums): its one-digit share."""
    q, space, correct = task_prompts("lengths")[0]
    correct, short = torch.tensor(correct), torch.tensor([len(a) == 1 for a in space])
    tokens = answer_batch(tokenizer, q, space)[2].sum(-1)
    if token_sums:
        tokens = torch.ones_like(tokens)
    log_z = statistics.mean(m["log_z"] for m in history[-10:])
    p = history[-1]["accuracy"]
    kappa = beta * math.sqrt((1 - p) / p * (group_size - 1) / group_size) - log_z
    target = (ref_logp + tokens * kappa).masked_fill(~correct, -math.inf).softmax(0)
    return {"log_z": log_z, "kappa": kappa, "predicted_short_share": target[short].sum().item()}

def seed_mean(runs: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """The steps that record `key`, and its mean over the seeds' runs at each."""
    rows = [[m for m in run if key in m] for run in runs]
    return [m["step"] for m in rows[0]], [statistics.mean(m[key] for m in at) for at in zip(*rows)]

def stopped(runs: list[list[dict]], key: str) -> dict:
    """The rule for a converged run: the seeds' mean of `key` changed over the last 20% of the
    steps by less than the spread (pstdev) between the seeds' final values."""
    steps, mean = seed_mean(runs, key)
    first = next(i for i, s in enumerate(steps) if s >= 0.8 * steps[-1])
    change = abs(mean[-1] - mean[first])
    spread = statistics.pstdev([m for m in run if key in m][-1][key] for run in runs)
    return {"key": key, "change": change, "spread": spread, "stopped": change < spread}

def histogram(dists: dict[str, torch.Tensor], space: list[str], width: int = 30) -> str:
    """A terminal histogram of answer distributions side by side, a row per answer any holds."""
    rows = [i for i in range(len(space)) if max(float(d[i]) for d in dists.values()) >= 0.005]
    top = max(float(d.max()) for d in dists.values())
    lines = ["ans " + "".join(f"{k:<{width + 7}}" for k in dists)]
    for i in rows:
        bars = [f"{'#' * round(float(d[i]) / top * width):<{width}} {float(d[i]):.3f} "
                for d in dists.values()]
        lines.append(f"{space[i]:>3} " + "".join(bars))
    return "\n".join(lines)

def plot(path: str, dists: dict[str, torch.Tensor], curves: dict[str, list[list[dict]]],
         title: str, correct: torch.Tensor, space: list[str]) -> None:
    """Target vs the methods: the mass on each correct answer (and on all wrong ones together),
    and modes covered (on `lengths`: the one-digit share) and KL over training steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [2.4, 1, 1]})
    names = [a for a, ok in zip(space, correct.tolist()) if ok] + ["all\nwrong"]
    x, w = torch.arange(len(names)).float(), 0.84 / len(dists)
    color = {"target p*": "tab:gray", "grpo": "tab:red", "flowrl": "tab:blue",
             "flowrl-sum": "tab:green", "flowrl-group": "tab:orange"}
    label = {"target p*": "target p* (π_ref on the correct answers)", "grpo": "GRPO",
             "flowrl": "FlowRL", "flowrl-sum": "FlowRL, token sums (no 1/|y|)",
             "flowrl-group": "FlowRL, closed-form log Z"}
    for j, (name, d) in enumerate(dists.items()):
        # "all wrong": the wrong answers and whatever lies outside the answer space
        heights = torch.cat([d[correct], 1 - d[correct].sum(0, keepdim=True)])
        ax[0].bar(x + (j - (len(dists) - 1) / 2) * w, heights.numpy(), w, label=label[name],
                  color=color[name])
    ax[0].set_xticks(x.numpy(), names, fontsize=8)
    ax[0].set(title="first prompt: probability of each correct answer after training (seed 0)",
              xlabel="answer", ylabel="probability")
    ax[0].legend()
    middle = "short_share" if "short_share" in curves[next(iter(curves))][0][0] else "modes_covered"
    for algo, runs in curves.items():
        for k, key in ((1, middle), (2, "kl_target")):
            ax[k].plot(*seed_mean(runs, key), label=label[algo], color=color[algo], linewidth=2)
        has_pred = any("predicted_short_share" in m for m in runs[0])
        if middle == "short_share" and has_pred and algo != "flowrl-sum":  # its own = p*
            ax[1].plot(*seed_mean(runs, "predicted_short_share"), color=color[algo], ls=":",
                       label=f"{label[algo]}: δ = 0 predicts")
    # the curves count the modes of every prompt of the task; the bars show the first prompt only
    n_modes = next(iter(curves.values()))[0][0]["n_modes"]
    ax[1].set(title=f"modes covered (of {n_modes}, all prompts), mean over seeds",
              xlabel="training step", ylim=(0, n_modes + 1))
    if middle == "short_share":
        ax[1].axhline(float(dists["target p*"][correct][:2].sum()), color="tab:gray", ls="--",
                      label="p* (seed 0)")
        ax[1].set(title="share of the correct mass on 3 and 8, mean over seeds", ylim=(0, 1))
    ax[2].set(title="KL(p* ‖ π_θ), mean over seeds", xlabel="training step", yscale="log")
    ax[1].legend()
    ax[2].legend()
    fig.suptitle(title)
    fig.text(0.5, 0.01, "A correct answer is a covered mode when the policy gives it at least "
             "half of its probability under p*. Exact numbers: every answer is teacher-forced, "
             "no sampling.", ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)

KEYS = ("mass", "accuracy", "modes_covered", "n_modes", "kl_target", "entropy", "max_entropy",
        "high_share", "short_share", "log_z", "kappa", "predicted_short_share")
# the methods a toy run compares: flowrl_min's flags for each
VARIANTS = {"grpo": ["--algo", "grpo"], "flowrl": ["--algo", "flowrl"],
            "flowrl-sum": ["--no-length-norm"], "flowrl-group": ["--log-z", "group"]}
# per-model defaults: (the tiny random model, a pretrained model); README: how each was chosen
DEFAULTS = {"steps": (200, 40), "lr": (3e-4, 3e-5), "group_size": (16, 8), "lora_r": (0, 16)}

def parse_toy_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The toy's flags; any other flag goes to FlowRL's run (e.g. --no-length-norm)."""
    p = argparse.ArgumentParser(description="FlowRL vs GRPO on a toy multimodal reward, exact "
                                "metrics (`train`: one flowrl_min run on the tiny model instead)",
                                allow_abbrev=False)
    p.add_argument("--task", default="modes", choices=["modes", "graded", "lengths", "numbers"],
                   help="modes: 18 equally correct answers; graded: correct answers of two "
                        "reward levels; lengths: correct answers of 1 and 2 digits; numbers: four "
                        "questions for a pretrained chat model (default: modes)")
    p.add_argument("--model", default="tiny", help="'tiny' (random, warm-started here) or a "
                   "pretrained chat model (default: tiny)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: mean and spread "
                   "(default: 3)")
    p.add_argument("--steps", type=int, help="rollout batches per run (default: 200; 40 for "
                   "--model)")
    p.add_argument("--beta", type=float, default=1.0,
                   help="FlowRL's β (README: why 1, not the paper's 15, here) (default: 1.0)")
    p.add_argument("--group-size", type=int, help="G: samples per prompt (default: 16; 8 for "
                   "--model)")
    p.add_argument("--lr", type=float, help="learning rate of both (default: 3e-4; 3e-5 for "
                   "--model)")
    p.add_argument("--lora-r", type=int, help="LoRA rank for both, 0: full fine-tuning "
                   "(default: 0; 16 for --model)")
    p.add_argument("--plot", help="the figure ('' for none; default: toy_out/toy_TASK.png, "
                   "on graded toy_out/toy_graded_betaB.png)")
    p.add_argument("--json", help="the results ('' for none; default: as --plot, .json)")
    p.add_argument("--algos", default="grpo,flowrl", help="which to train, comma-separated, of "
                   + ", ".join(VARIANTS) + " (default: grpo,flowrl)")
    args, flowrl_flags = p.parse_known_args(argv)
    if set(args.algos.split(",")) - set(VARIANTS):
        fm.die(f"--algos {args.algos}: choose from {', '.join(VARIANTS)}")
    if (args.task == "numbers") == (args.model == "tiny"):
        fm.die("--task numbers is for a pretrained chat model (--model DIR), and a pretrained "
               "model needs --task numbers: the tiny model's tasks are modes, graded and lengths")
    for name, (tiny, pretrained) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.model == "tiny" else pretrained)
    # named after the task (and β where it changes the target): runs never overwrite each other
    stem = f"toy_out/toy_{args.task}" + (f"_beta{args.beta:g}" if args.task == "graded" else "")
    args.plot = stem + ".png" if args.plot is None else args.plot
    args.json = stem + ".json" if args.json is None else args.json
    return args, flowrl_flags

def main(argv: list[str] | None = None) -> dict | list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return train_tiny(argv[1:])
    args, flowrl_flags = parse_toy_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    flags = ["--steps", str(args.steps), "--group-size", str(args.group_size), "--lr",
             str(args.lr), "--lora-r", str(args.lora_r), "--max-new-tokens", "4", "--dtype",
             "float32"]
    # the tiny model packs all 64 rollouts in one forward; a real model keeps the trainer's
    # default, and moves within a few steps: exact metrics every 5 steps, not 10
    every = 10 if args.model == "tiny" else 5
    curves: dict[str, list[list[dict]]] = {a: [] for a in args.algos.split(",")}
    q0, space, correct0 = task_prompts(args.task)[0]
    correct0 = torch.tensor(correct0)
    dists = {}
    walls = {a: [] for a in curves}  # seconds per run, exact metrics included
    for seed in range(args.seeds):
        # π_ref and its exact log-probs: per seed for the tiny model (its warm start), else once
        if seed == 0 or args.model == "tiny":
            model, tokenizer = initial_model(args.model, seed, args.task)
            ref_logps = task_logprobs(model, tokenizer, args.task)
        if seed == 0:
            dists["target p*"] = torch.softmax(ref_logps[0].masked_fill(~correct0, -math.inf), 0)
        for algo, runs in curves.items():
            policy = copy.deepcopy(model)  # the same initial weights for both
            extra = ["--beta", str(args.beta), *flowrl_flags] if algo != "grpo" else []
            start = time.perf_counter()
            runs.append(run(args.task, algo, policy, tokenizer, ref_logps, seed, flags + extra,
                            every, args.model))
            walls[algo].append(time.perf_counter() - start)
            if args.task == "lengths" and algo != "grpo":  # δ = 0's prediction every 50 steps
                for i, m in enumerate(runs[-1]):  # and at the end, from the run so far
                    if m["step"] and (m["step"] % 50 == 0 or i == len(runs[-1]) - 1):
                        m |= fixed_point(runs[-1][:i + 1], ref_logps[0], tokenizer,
                                         args.group_size, args.beta, algo == "flowrl-sum")
            if seed == 0:
                dists[algo] = answer_logprobs(policy, tokenizer, q0, space).exp()
            del policy
    final = {algo: [run[-1] for run in runs] for algo, runs in curves.items()}
    keys = [k for k in KEYS if any(k in ms[0] for ms in final.values())]
    key = "short_share" if args.task == "lengths" else "kl_target"  # judged stopped by
    first = next(iter(curves.values()))
    summary = {"ref": {k: statistics.mean(r[0][k] for r in first)
                       for k in keys if k in first[0][0]}}
    for algo, ms in final.items():
        own = [k for k in keys if k in ms[0]]
        summary[algo] = {k: statistics.mean(m[k] for m in ms) for k in own}
        summary[algo]["spread"] = {k: statistics.pstdev(m[k] for m in ms) for k in own}
        summary[algo]["per_seed"] = [{k: m[k] for k in own} for m in ms]
        summary[algo]["wall_s"] = walls[algo]
        summary[algo]["stopped"] = stopped(curves[algo], key)
        summary[algo]["curves"] = [[{k: m[k] for k in ["step", *keys] if k in m} for m in run
                                    if "kl_target" in m] for run in curves[algo]]
    summary["config"] = {**vars(args), "flowrl_flags": flowrl_flags,
                         "prompts": [q for q, _, _ in task_prompts(args.task)]}
    print(f"\n{args.task}: {args.seeds} seed(s) x {args.steps} steps, G={args.group_size}, "
          f"lr={args.lr}, LoRA r={args.lora_r}, FlowRL beta={args.beta} {' '.join(flowrl_flags)}; "
          "mean ± spread over seeds, exact (every answer teacher-forced)")
    if args.task == "graded":
        print("graded: modes_covered and kl_target are against p* = π_ref on the correct answers "
              "(the pass/fail target), not the β-dependent one; high_share shows what β does")
    ref_label = "pi_ref, seed 0" if args.seeds == 1 else f"pi_ref, mean of {args.seeds}"
    print(f"{'metric':<22}{ref_label:>16}" + "".join(f"{a:>20}" for a in curves))
    for k in keys:
        cells = [f"{summary[a][k]:.3f} ± {summary[a]['spread'][k]:.3f}" if k in summary[a]
                 else "-" for a in curves]
        ref = f"{summary['ref'][k]:.3f}" if k in summary["ref"] else "-"
        print(f"{k:<22}{ref:>16}" + "".join(f"{c:>20}" for c in cells))
    print(f"{key} over the last 20% of steps: moved / seed spread / stopped: " + ", ".join(
        f"{a} {st['change']:.4f} / {st['spread']:.4f} / {'yes' if st['stopped'] else 'no'}"
        for a, st in ((a, summary[a]["stopped"]) for a in curves)))
    print(f"\nanswer distributions after training (seed 0), {q0!r}:\n" + histogram(dists, space))
    for path in (args.json, args.plot):
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    if args.plot:
        what = f"task {args.task}"
        if args.model != "tiny":
            what += f", {os.path.basename(os.path.normpath(args.model))}, LoRA r={args.lora_r}"
        title = (f"\"{q0}\": which correct answers does each method keep? "
                 f"(FlowRL β = {args.beta}, {args.seeds} seed(s), {what})")
        plot(args.plot, dists, curves, title, correct0, space)
        print(f"figure: {args.plot}")
    return summary

if __name__ == "__main__":
    main()
