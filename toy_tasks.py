"""Toy multimodal-reward tasks: FlowRL keeps every mode where GRPO collapses onto a few.

Every answer is a two-digit number 10..99 followed by EOS: 90 answers, few enough to teacher-force all of
them and read off the policy's exact distribution, with no sampling noise. Each prompt has several
equally correct answers (the modes): "a two-digit number that leaves remainder 3 when divided by 5"
has 18 (13, 18, ..., 98). The tiny model first learns the answer format (warm_start), which gives π_ref;
then GRPO and FlowRL train from the same weights with flowrl_min's own trainer, and we compare each policy with FlowRL's target
    p*(y|x) = π_ref(y|x) · 1[y correct] / π_ref(correct|x)
(exp(β·r̂)·π_ref restricted to the reward's support: every correct answer has the same r̂ in a group).

    python toy_tasks.py                      # 3 seeds: table, histograms, toy_modes.png, toy_modes.json
    python toy_tasks.py --seeds 1 --steps 60
    python flowrl_min.py --dataset modes     # the same task in the main trainer
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics

import torch
from datasets import Dataset

import flowrl_min as fm

ANSWERS = [str(n) for n in range(10, 100)]  # the whole answer space
PROMPTS = [(5, 3)]  # (m, r): the correct answers are n with n % m == r: 13, 18, 23, ..., 98 (18 modes)
BOOST = 4.0  # π_ref's preference for correct answers: π_ref(correct) ≈ 18·4 / (18·4 + 72) = 0.5


def question(m: int, r: int) -> str:
    return f"Name a two-digit number that leaves remainder {r} when divided by {m}."


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
    """Modes of unequal reward: a correct number ending in 8 scores 1.0, one ending in 3 scores 0.5."""
    return modes_reward(completion, answer) * (1.0 if completion.strip().endswith("8") else 0.5)


def make_task(name: str) -> tuple[Dataset, Dataset, fm.RewardFn]:
    """The task's prompts (train = held-out: the point is the distribution per prompt) and reward."""
    ds = Dataset.from_dict({"question": [question(m, r) for m, r in PROMPTS],
                            "answer": [f"{m}:{r}" for m, r in PROMPTS]})
    return ds, ds, {"modes": modes_reward, "graded": graded_reward}[name]


def answer_batch(tokenizer, q: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompt's ids (P,), and every answer + EOS right-padded: ids and mask (A, T)."""
    prompt = tokenizer(fm.format_prompt(tokenizer, q), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in ANSWERS]
    T = max(map(len, answers))
    ids = torch.tensor([a + [tokenizer.pad_token_id] * (T - len(a)) for a in answers])
    return prompt, ids, torch.tensor([[1.0] * len(a) + [0.0] * (T - len(a)) for a in answers])


@torch.inference_mode()
def answer_logprobs(model, tokenizer, q: str) -> torch.Tensor:
    """Exact log π(a + EOS | x) for every answer a, in one teacher-forced forward. (A,)"""
    prompt, ids, mask = (x.to(model.device) for x in answer_batch(tokenizer, q))
    model.eval()
    logp, _ = fm.sequence_logprobs(model, [prompt], [0] * len(ids), ids, mask, 1.0)
    return torch.where(mask.bool(), logp, 0.0).sum(-1).cpu()


def mode_metrics(logp: torch.Tensor, ref_logp: torch.Tensor, correct: torch.Tensor) -> dict[str, float]:
    """Exact metrics of a policy against p* = π_ref restricted to the correct answers, renormalised.

    accuracy: π(correct); modes_covered: correct answers holding at least half their share under p*;
    entropy: of π restricted to the correct answers (max: log n_modes); kl_target: KL(p* ‖ π_θ)."""
    p, target = logp.exp(), torch.softmax(ref_logp.masked_fill(~correct, -math.inf), 0)
    acc = p[correct].sum()
    q = p[correct] / acc  # π restricted to the correct set
    t = target[correct]
    return {"accuracy": acc.item(), "modes_covered": int((q >= 0.5 * t).sum()), "n_modes": int(correct.sum()),
            "kl_target": (t * (t.log() - logp[correct])).sum().item(),
            "entropy": -(q * q.log()).sum().item(), "max_entropy": math.log(int(correct.sum()))}


def task_metrics(model, tokenizer, ref_logps: list[torch.Tensor]) -> dict[str, float]:
    """mode_metrics averaged over the task's prompts (modes_covered and n_modes summed), plus high_share:
    the share of the correct mass on the answers `graded` rewards most (those ending in 8)."""
    per = []
    for (m, r), ref in zip(PROMPTS, ref_logps):
        logp, correct = answer_logprobs(model, tokenizer, question(m, r)), torch.tensor(correct_set(f"{m}:{r}"))
        high = correct & torch.tensor([a.endswith("8") for a in ANSWERS])
        per.append({**mode_metrics(logp, ref, correct), "high_share": (logp[high].exp().sum() / logp[correct].exp().sum()).item()})
    return {k: (sum if k in ("modes_covered", "n_modes") else statistics.mean)(d[k] for d in per) for k in per[0]}


def warm_start(model, tokenizer, seed: int, steps: int = 150, lr: float = 3e-3, boost: float = BOOST) -> None:
    """Supervised pre-training (not RL) that gives the random tiny model a prior π_ref: answers drawn from
    the whole answer space, each correct one `boost` times as often, so π_ref reads the prompt and
    solves it some of the time, like a pretrained LLM, while spreading its mass over every mode."""
    g = torch.Generator().manual_seed(seed)
    batches = [[x.to(model.device) for x in answer_batch(tokenizer, question(m, r))] for m, r in PROMPTS]
    weights = [1 + (boost - 1) * torch.tensor(correct_set(f"{m}:{r}"), dtype=torch.float) for m, r in PROMPTS]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for (prompt, ids, mask), wts in zip(batches, weights):
            pick = torch.multinomial(wts, 16, replacement=True, generator=g)
            logp, _ = fm.sequence_logprobs(model, [prompt], [0] * len(pick), ids[pick], mask[pick], 1.0)
            loss = loss - fm.masked_mean(logp, mask[pick]) / len(batches)
        opt.zero_grad()
        loss.backward()
        opt.step()


def run(task: str, algo: str, model, tokenizer, seed: int, flags: list[str], every: int = 10) -> list[dict]:
    """Train one algorithm with flowrl_min.train from the given (warm-started) weights; exact metrics every
    few steps (step 0 is π_ref itself)."""
    cfg = fm.parse_args(["--algo", algo, "--dataset", task, "--seed", str(seed), "--eval-every", "0",
                         "--out", f"toy_out/{task}-{algo}-seed{seed}", "--overwrite", *flags])
    ref_logps = [answer_logprobs(model, tokenizer, question(m, r)) for m, r in PROMPTS]
    train_ds, eval_ds, reward_fn = make_task(task)

    def track(step: int, policy) -> dict:
        return task_metrics(policy, tokenizer, ref_logps) if step % every == 0 or step == cfg.steps else {}

    torch.manual_seed(seed)
    return [{"step": 0, **task_metrics(model, tokenizer, ref_logps)}] + fm.train(
        cfg, model, tokenizer, train_ds, eval_ds, reward_fn, on_step=track)


def histogram(dists: dict[str, torch.Tensor], width: int = 30) -> str:
    """A terminal histogram of answer distributions side by side, one row per answer any of them holds."""
    rows = [i for i in range(len(ANSWERS)) if max(float(d[i]) for d in dists.values()) >= 0.005]
    top = max(float(d.max()) for d in dists.values())
    head = "ans " + "".join(f"{k:<{width + 7}}" for k in dists)
    lines = [head] + [f"{ANSWERS[i]:>3} " + "".join(
        f"{'#' * round(float(d[i]) / top * width):<{width}} {float(d[i]):.3f} " for d in dists.values()) for i in rows]
    return "\n".join(lines)


def plot(path: str, dists: dict[str, torch.Tensor], curves: dict[str, list[list[dict]]], title: str,
         correct: torch.Tensor) -> None:
    """Target vs GRPO vs FlowRL: the mass on each correct answer (and on all wrong ones together), and
    modes covered and KL over training steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [2.4, 1, 1]})
    names = [a for a, ok in zip(ANSWERS, correct.tolist()) if ok] + ["all\nwrong"]
    x, w = torch.arange(len(names)).float(), 0.28
    color = {"target p*": "tab:gray", "grpo": "tab:red", "flowrl": "tab:blue"}
    label = {"target p*": "target p* (π_ref on the correct answers)", "grpo": "GRPO", "flowrl": "FlowRL"}
    for j, (name, d) in enumerate(dists.items()):
        heights = torch.cat([d[correct], d[~correct].sum(0, keepdim=True)])
        ax[0].bar(x + (j - 1) * w, heights.numpy(), w, label=label[name], color=color[name])
    ax[0].set_xticks(x.numpy(), names, fontsize=8)
    ax[0].set(title="probability of each correct answer after training (seed 0)", xlabel="answer",
              ylabel="probability")
    ax[0].legend()
    for algo, runs in curves.items():
        steps = [m["step"] for m in runs[0] if "kl_target" in m]
        for k, key in ((1, "modes_covered"), (2, "kl_target")):
            per_seed = [[m[key] for m in run if "kl_target" in m] for run in runs]
            mean = [statistics.mean(v) for v in zip(*per_seed)]
            ax[k].plot(steps, mean, label=label[algo], color=color[algo], linewidth=2)
    n_modes = int(correct.sum())
    ax[1].set(title=f"modes covered (of {n_modes}), mean over seeds", xlabel="training step", ylim=(0, n_modes + 1))
    ax[2].set(title="KL(p* ‖ π_θ), mean over seeds", xlabel="training step", yscale="log")
    ax[1].legend()
    ax[2].legend()
    fig.suptitle(title)
    fig.text(0.5, 0.01, "A correct answer is a covered mode when the policy gives it at least half of its "
             "probability under p*. Exact numbers: every answer is teacher-forced, no sampling.",
             ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)


KEYS = ("accuracy", "modes_covered", "n_modes", "kl_target", "entropy", "max_entropy", "high_share")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="FlowRL vs GRPO on a toy multimodal reward, with exact metrics",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="modes", choices=["modes", "graded"],
                   help="modes: 18 equally correct answers; graded: correct answers of two reward levels")
    p.add_argument("--seeds", type=int, default=3, help="repeat over seeds 0..N-1, report mean and spread")
    p.add_argument("--steps", type=int, default=200, help="rollout batches per run")
    p.add_argument("--beta", type=float, default=1.0,
                   help="FlowRL's β (README: why 1, not the paper's 15, here)")
    p.add_argument("--group-size", type=int, default=16, help="G: samples per prompt")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of both algorithms")
    p.add_argument("--plot", default="toy_out/toy_modes.png",
                   help="the figure ('' for none; the README's copy: --plot toy_modes.png)")
    p.add_argument("--json", default="toy_out/toy_modes.json",
                   help="the results ('' for none; the README's copy: --json toy_modes.json)")
    p.add_argument("--algos", default="grpo,flowrl", help="which to train, comma-separated")
    args, flowrl_flags = p.parse_known_args(argv)  # any other flag goes to FlowRL's run (e.g. --no-length-norm)
    fm.transformers.logging.set_verbosity_error()
    fm.transformers.logging.disable_progress_bar()
    flags = ["--steps", str(args.steps), "--group-size", str(args.group_size), "--lr", str(args.lr), "--micro-batch", "64"]
    curves: dict[str, list[list[dict]]] = {a: [] for a in args.algos.split(",")}
    dists = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model, tokenizer = fm.build_tiny_model(seed)
        warm_start(model, tokenizer, seed)
        for algo, runs in curves.items():
            policy = copy.deepcopy(model)  # the same initial weights for both
            extra = ["--beta", str(args.beta), *flowrl_flags] if algo == "flowrl" else []
            runs.append(run(args.task, algo, policy, tokenizer, seed, flags + extra))
            if seed == 0:
                dists[algo] = answer_logprobs(policy, tokenizer, question(*PROMPTS[0])).exp()
        if seed == 0:
            ref = answer_logprobs(model, tokenizer, question(*PROMPTS[0]))
            correct = torch.tensor(correct_set(f"{PROMPTS[0][0]}:{PROMPTS[0][1]}"))
            dists = {"target p*": torch.softmax(ref.masked_fill(~correct, -math.inf), 0), **dists}
    final = {algo: [run[-1] for run in runs] for algo, runs in curves.items()}
    summary = {"ref": {k: statistics.mean(r[0][k] for r in next(iter(curves.values()))) for k in KEYS}}
    for algo, ms in final.items():
        summary[algo] = {k: statistics.mean(m[k] for m in ms) for k in KEYS}
        summary[algo]["spread"] = {k: statistics.pstdev(m[k] for m in ms) for k in KEYS}
        summary[algo]["per_seed"] = [{k: m[k] for k in KEYS} for m in ms]
    summary["config"] = {**vars(args), "flowrl_flags": flowrl_flags, "prompts": PROMPTS}
    print(f"\n{args.task}: {args.seeds} seed(s) x {args.steps} steps, G={args.group_size}, lr={args.lr}, "
          f"FlowRL beta={args.beta} {' '.join(flowrl_flags)}; mean ± spread over seeds, exact (every answer teacher-forced)")
    print(f"{'metric':<16}{'pi_ref (step 0)':>18}" + "".join(f"{a:>20}" for a in curves))
    for k in KEYS:
        cells = [f"{summary['ref'][k]:.3f}"] + [f"{summary[a][k]:.3f} ± {summary[a]['spread'][k]:.3f}" for a in curves]
        print(f"{k:<16}" + "".join(f"{c:>20}" if i else f"{c:>18}" for i, c in enumerate(cells)))
    print("\nanswer distributions after training (seed 0):\n" + histogram(dists))
    for path in (args.json, args.plot):
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    if args.plot:
        m, r = PROMPTS[0]
        title = (f"\"{question(m, r)}\": which correct answers does each method keep? "
                 f"(FlowRL β = {args.beta}, {args.seeds} seed(s), task {args.task})")
        plot(args.plot, dists, curves, title, torch.tensor(correct_set(f"{m}:{r}")))
        print(f"figure: {args.plot}")
    return summary


if __name__ == "__main__":
    main()
