"""FlowRL, minimal: reward-distribution matching RL for LLMs (Zhu et al., arXiv 2509.15207).

GRPO and PPO maximise reward and collapse onto one dominant mode. FlowRL instead matches the target
    p*(y|x) ∝ exp(β·r̂(x,y)) · π_ref(y|x)
by minimising, for each of the G responses y_i sampled per prompt x (trajectory balance, Eq. 5-6):
    δ_i = log Z_φ(x) + (1/|y_i|) Σ_t log π_θ(y_i,t|x,y_i,<t) − β·r̂_i − (1/|y_i|) Σ_t log π_ref(y_i,t|x,y_i,<t)
    L   = mean_i  w_i · δ_i²,      w_i = clip(exp Σ_t (log π_θ − log π_old), 1−ε, 1+ε)  (detached)
with r̂ the group-normalised reward, log Z_φ a 3-layer MLP on the policy's prompt hidden states,
β = 15, ε = 0.2. The GRPO baseline shares everything here but the loss (--algo grpo).

    pip install -r requirements.txt
    python flowrl_min.py                          # tiny Qwen2 on the toy `modes` task, offline, ~1 min CPU
    python flowrl_min.py --algo grpo              # the GRPO baseline, everything else identical
    python flowrl_min.py --model Qwen2.5-0.5B     # a real model (hub id or local dir) on `arith`
    python toy_tasks.py                           # FlowRL keeps every mode, GRPO collapses (figure)
    pytest -q
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction


def exit_quietly(signum: int, frame) -> None:
    """Ctrl-C or SIGTERM before training has anything to save: one line, status 128 + signal number."""
    print(f"\nstopped by {signal.Signals(signum).name} before the first step finished: nothing to save",
          file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    # torch and transformers take seconds to import: a Ctrl-C meanwhile is one line, not a traceback
    signal.signal(signal.SIGINT, exit_quietly)
    signal.signal(signal.SIGTERM, exit_quietly)

import datasets
import torch
import transformers
from datasets import Dataset, load_dataset
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import PreTrainedModel

RewardFn = Callable[[str, str], float]
LORA_LR = 2e-5  # default --lr with --lora-r (README: how it was chosen)
TOY_TASKS = ("modes", "graded")


# ----------------------------------------------------------------------------- config
def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = opt("tiny", "'tiny' (random Qwen2, offline), a hub id (bare 'Qwen2.5-0.5B' means Qwen/...) or a local dir")
    dataset: str = opt("auto", "auto | modes | graded | arith | gsm8k | a .jsonl/.json/.csv/.parquet file (question, answer)")
    algo: str = opt("flowrl", "FlowRL, or the GRPO baseline with everything else identical")
    steps: int = opt(None, "rollout batches (default: 200 on the tiny model, 50 otherwise)")
    prompts: int = opt(4, "prompts per rollout batch")
    group_size: int = opt(8, "G: responses sampled per prompt")
    max_new_tokens: int = opt(None, "response length limit (default: 4 on toy tasks, 128 otherwise)")
    temperature: float = opt(1.0, "sampling temperature; log-probs use logits / temperature too")
    top_p: float = opt(1.0, "nucleus sampling; keep 1.0 so samples come from the π whose log-probs we train")
    beta: float = opt(15.0, "β: reward temperature of the target distribution")
    clip_low: float = opt(0.8, "lower clip of the importance weight w (paper: 1-ε)")
    clip_high: float = opt(1.2, "upper clip of w (paper: 1+ε; official code: inf; newest veRL: 10)")
    length_norm: bool = opt(True, "divide log-prob sums by |y| (--no-length-norm for the ablation)")
    clip_eps: float = opt(0.2, "GRPO ratio clip ε")
    kl_coef: float = opt(0.001, "GRPO k3 KL-to-reference coefficient")
    clip_c: float = opt(3.0, "GRPO dual clip: for Â < 0 the per-token loss is at most −c·Â (veRL clip_ratio_c)")
    lr: float = opt(None, "policy learning rate (default: 1e-6 as in the paper; 3e-4 on the tiny model)")
    logz_lr: float = opt(None, "log Z head learning rate (default: the policy's; 1e-2 on the tiny model)")
    weight_decay: float = opt(0.1, "AdamW weight decay")
    warmup_steps: int = opt(10, "linear learning-rate warm-up, in optimiser steps")
    epochs: int = opt(1, "passes over each rollout batch")
    mini_batches: int = opt(1, "optimiser steps per pass (w ≠ 1 from the second one on)")
    micro_batch: int = opt(32, "responses per packed forward/backward, with their prompts (gradient accumulation)")
    micro_tokens: int = opt(512, "tokens per packed forward/backward, prompts included (veRL: "
                            "ppo_max_token_len_per_gpu); a longer response gets a forward of its own")
    grad_ckpt: bool = opt(None, "activation checkpointing in the update: far less memory for one more "
                          "forward of the layers (default: on, off for the tiny model)")
    lora_r: int = opt(0, "LoRA rank on every attention and MLP projection, 0 for full fine-tuning; π_ref "
                      "is then the base model with the adapters off (needs: pip install peft)")
    lora_alpha: float = opt(None, "LoRA α; the adapter's output is scaled by α / r (default: 2·r)")
    eval_every: int = opt(25, "evaluate every N steps (0: only at the end)")
    eval_prompts: int = opt(16, "held-out prompts per evaluation")
    eval_k: int = opt(8, "samples per held-out prompt (mean accuracy and pass@k)")
    out: str = opt("out", "output directory: metrics.jsonl and checkpoint/")
    overwrite: bool = opt(False, "replace a run already in --out")
    resume: bool = opt(False, "continue the run in --out from its checkpoint: weights, log Z, optimiser, "
                       "step, data order and random state (flags that change the run are refused)")
    save_every: int = opt(0, "also save the checkpoint every N steps (0: at the end, or when stopped)")
    seed: int = opt(0, "seed for weights, data order and sampling")
    check_batch: str = opt("", "a torch.save'd dict of tensors: print our losses and gradients for it, then exit")


# --help shows the flags in these groups, each starting at the named field
HELP_GROUPS = {"model": "model, data and batch", "max_new_tokens": "sampling",
               "beta": "FlowRL objective", "clip_eps": "GRPO baseline", "lr": "optimisation",
               "eval_every": "evaluation and output"}
CHOICES = {"algo": ["flowrl", "grpo"]}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and a close match for a mistyped flag."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flags = ["--" + f.name.replace("_", "-") for f in fields(Config)]
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], flags, n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
        die(f"{message}; see --help")


def build_parser(defaults: bool = True) -> ArgumentParser:
    """One flag per Config field, in HELP_GROUPS; defaults=False leaves out the flags not given."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p
    for f in fields(Config):
        if f.name in HELP_GROUPS:
            group = p.add_argument_group(HELP_GROUPS[f.name])
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"]
        if f.default is not None and f.default != "":
            help += f" (default: {f.default})"
        default = f.default
        if not defaults:
            default = argparse.SUPPRESS
        if f.type == "bool":
            group.add_argument(flag, default=default, help=help, action=argparse.BooleanOptionalAction)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            group.add_argument(flag, default=default, help=help, type=kind, choices=CHOICES.get(f.name))
    return p


def parse_args(argv: list[str] | None = None) -> Config:
    """Flags into a Config; the defaults that depend on the model or task are filled in here."""
    p = build_parser()
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.resume:
        cfg = resumed_config(argv, cfg.out)
    fill_defaults(cfg)
    has_run = os.path.exists(os.path.join(cfg.out, "metrics.jsonl"))
    checks = [(cfg.group_size >= 2, "--group-size must be at least 2: group normalisation needs 2 responses"),
              (min(cfg.steps, cfg.prompts, cfg.max_new_tokens, cfg.epochs, cfg.mini_batches,
                   cfg.micro_batch, cfg.micro_tokens) > 0,
               ("--steps, --prompts, --max-new-tokens, --epochs, --mini-batches, --micro-batch and "
                "--micro-tokens must be positive")),
              (cfg.lr > 0 and cfg.logz_lr > 0, "--lr and --logz-lr must be positive"),
              (cfg.clip_c > 1, "--clip-c must be greater than 1 (veRL asserts the same)"),
              (cfg.lora_r >= 0, "--lora-r must be 0 (full fine-tuning) or a positive rank"),
              (cfg.temperature > 0 and 0 < cfg.top_p <= 1, "--temperature must be > 0 and --top-p in (0, 1]"),
              (cfg.eval_k > 0 and cfg.eval_prompts > 0, "--eval-k and --eval-prompts must be positive"),
              (not os.path.isfile(cfg.out), f"--out {cfg.out} is an existing file; give a directory path"),
              (cfg.save_every >= 0, "--save-every must be 0 (off) or a number of steps"),
              (cfg.overwrite or cfg.check_batch or cfg.resume or not has_run,
               f"--out {cfg.out} already holds a run; pass another --out, or --overwrite to replace it")]
    for ok, msg in checks:
        if not ok:
            die(msg)
    return cfg


# what a run is: --resume refuses to change these (the rest, e.g. --steps, may change)
RUN_IDENTITY = ("model", "dataset", "algo", "group_size", "prompts", "seed", "lora_r", "beta",
                "max_new_tokens", "temperature", "top_p")


def resumed_config(argv: list[str] | None, out: str) -> Config:
    """The saved run's config with the flags given now on top; a flag that changes RUN_IDENTITY is an error."""
    saved_path = os.path.join(out, "checkpoint", "flowrl_config.json")
    if not os.path.isfile(os.path.join(out, "checkpoint", "trainer_state.pt")):
        die(f"--resume: {out} holds no checkpoint of a flowrl_min run to continue (no "
            f"{out}/checkpoint/trainer_state.pt); start a new run without --resume")
    try:
        with open(saved_path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        die(f"--resume: cannot read {saved_path} ({type(e).__name__}); start a new run without --resume")
    # parse again with no defaults: only the flags given on this command line remain
    given = vars(build_parser(defaults=False).parse_args(argv))
    for k in RUN_IDENTITY:
        if k in given and given[k] != saved.get(k):
            die(f"--resume: --{k.replace('_', '-')} {given[k]} contradicts the saved run's {saved.get(k)}; "
                "resume without it, or start a new run in another --out")
    known = {f.name for f in fields(Config)}
    return Config(**{**{k: v for k, v in saved.items() if k in known}, **given})


def fill_defaults(cfg: Config) -> None:
    """The defaults that depend on the model (the tiny one trains fast and small) or the task."""
    tiny = cfg.model == "tiny"
    if cfg.dataset == "auto":
        cfg.dataset = "modes" if tiny else "arith"
    lr = LORA_LR if cfg.lora_r else 1e-6
    # flag: (its default for a pretrained model, for the tiny model)
    by_model = {"steps": (50, 200), "lr": (lr, 3e-4), "grad_ckpt": (True, False)}
    for name, (pretrained, small) in by_model.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, small if tiny else pretrained)
    if cfg.logz_lr is None:
        cfg.logz_lr = 1e-2 if tiny else cfg.lr
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = 4 if cfg.dataset in TOY_TASKS else 128
    if cfg.lora_alpha is None:
        cfg.lora_alpha = 2.0 * cfg.lora_r


def die(msg: str):  # one clear line on stderr, exit status 1, no traceback
    raise SystemExit(f"error: {msg}")


def warn(msg: str) -> None:  # one line on stderr; the run goes on
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- model
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tiny_model(seed: int) -> tuple[PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """A random 2-layer Qwen2 (about 0.1M parameters) and a byte-level BPE tokenizer trained in-process.
    Qwen2's NFC normaliser and split regex make digits single tokens and let AutoTokenizer reload it."""
    import tokenizers as tk

    import toy_tasks  # the tokenizer's corpus: the questions of every built-in task

    corpus = [r["question"] for r in toy_tasks.make_task("modes")[0]] + list(arith_dataset(200, seed)["question"])
    tok = tk.Tokenizer(tk.models.BPE())
    tok.normalizer = tk.normalizers.NFC()
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Split(tk.Regex(QWEN2_SPLIT), "isolated"),
                                                    tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    tok.train_from_iterator(corpus + ["user assistant system"], tk.trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                     chat_template=CHATML, padding_side="left")
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return transformers.Qwen2ForCausalLM(config), tokenizer


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co accepts a connection within `timeout` seconds (never under HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    with contextlib.suppress(OSError), socket.create_connection(("huggingface.co", 443), timeout=timeout):
        return True
    return False


def load_model(name: str, seed: int) -> tuple[PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """The policy π_θ and its tokenizer: the tiny model, a local directory, or a hub id (cache first)."""
    local = os.path.isdir(os.path.expanduser(name))
    if name == "tiny":
        model, tokenizer = build_tiny_model(seed)
    else:
        if name.startswith(("/", ".", "~")) and not local:
            die(f"--model {name}: no such directory")
        repo = os.path.expanduser(name)
        if not local:
            # a bare name like Qwen2.5-0.5B means Qwen/Qwen2.5-0.5B
            repo = name if "/" in name else f"Qwen/{name}"
        try:  # the local cache first: no network, no retries
            tokenizer = transformers.AutoTokenizer.from_pretrained(repo, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(repo, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as e:
            if local:
                die(f"--model {name}: cannot load a model from this directory ({str(e).splitlines()[0]})")
            if not hub_reachable():
                die(f"--model {name}: {repo} is not in the local cache and the Hugging Face hub cannot be reached; "
                    f"pass a local model directory (--model path/to/dir) or use --model tiny")
            tokenizer = transformers.AutoTokenizer.from_pretrained(repo)
            model = transformers.AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    for m in model.modules():  # RL on LLMs runs without dropout: sampled and trained log-probs must agree
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model, tokenizer


def add_lora(model: PreTrainedModel, r: int, alpha: float) -> PreTrainedModel:
    """LoRA adapters (rank r, scale α/r) on every linear layer but the LM head, through transformers'
    peft integration; the base weights are frozen, and model.disable_adapters() gives them back."""
    try:
        from peft import LoraConfig
    except ImportError:
        die("--lora-r needs the peft package: pip install peft")
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0))
    return model


def eos_token_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the generation config's (e.g. <|im_end|>)."""
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = []
    if isinstance(ids, int):
        ids = [ids]
    return sorted(set(ids) | {tokenizer.eos_token_id})


class LogZ(nn.Module):
    """log Z_φ(x): a 3-layer MLP on the prompt's representation, the mean of the policy's last hidden
    states over the prompt tokens (`sequence_logprobs` returns it from the same forward as log π_θ).
    Not detached: its gradient flows into the LM, as in the paper. (N, H) -> (N,)"""

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        block = lambda: [nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Dropout(dropout)]
        self.net = nn.Sequential(*block(), *block(), nn.Linear(hidden, 1))

    def forward(self, prompt_repr: torch.Tensor) -> torch.Tensor:
        return self.net(prompt_repr.float()).squeeze(-1)


# ----------------------------------------------------------------------------- data
MATH_INSTRUCTION = "\nPut the final answer in \\boxed{}."


def arith_dataset(n: int, seed: int) -> Dataset:
    """Procedural grade-school arithmetic with exact integer answers: 'What is 17 - 9?' -> '8'."""
    rng = random.Random(seed)
    qs, ans = [], []
    for _ in range(n):
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(1, 30), rng.randint(1, 30))
        qs.append(f"What is {a} {op} {b}?")
        ans.append(str({"+": a + b, "-": a - b, "*": a * b}[op]))
    return Dataset.from_dict({"question": qs, "answer": ans})


def load_file_dataset(path: str) -> Dataset:
    """A question/answer file; each problem with it is one line naming the file."""
    readers = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    builder = readers.get(os.path.splitext(path)[1])
    if not os.path.isfile(path):
        die(f"--dataset {path}: no such file (or use arith, gsm8k, modes, graded)")
    if builder is None:
        die(f"--dataset {path}: use a .jsonl, .json, .csv or .parquet file")
    if not os.path.getsize(path):
        die(f"--dataset {path}: the file is empty; it needs rows with question and answer columns")
    try:
        ds = load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # noqa: BLE001 -- any reader error: name the file in one line, not a traceback
        die(f"--dataset {path}: cannot be read as {builder} ({type(e).__name__}: {str(e)[:200]})")
    missing = [c for c in ("question", "answer") if c not in ds.column_names]
    if missing:
        found = ", ".join(ds.column_names) or "none"
        die(f"--dataset {path}: missing column(s) {', '.join(missing)}; found {found}")
    if len(ds) == 0:
        die(f"--dataset {path}: the file has no rows")
    return ds


def load_data(cfg: Config) -> tuple[Dataset, Dataset, RewardFn]:
    """Train and held-out prompts (columns question, answer) and the task's reward function."""
    if cfg.dataset in TOY_TASKS:
        import toy_tasks
        return toy_tasks.make_task(cfg.dataset)
    if cfg.dataset == "arith":
        train, test = arith_dataset(5000, cfg.seed), arith_dataset(500, cfg.seed + 1)
    elif cfg.dataset == "gsm8k":
        if not hub_reachable() and os.environ.get("HF_DATASETS_OFFLINE") != "1":
            die("--dataset gsm8k: the Hugging Face hub cannot be reached; set HF_DATASETS_OFFLINE=1 to use a cached "
                "copy, or pass a local .jsonl file with question/answer columns, or --dataset arith")
        gsm = load_dataset("openai/gsm8k", "main")
        train, test = (gsm[s].map(lambda r: {"answer": r["answer"].split("####")[-1].strip()}) for s in ("train", "test"))
    else:
        ds = load_file_dataset(cfg.dataset).map(lambda r: {"question": str(r["question"]), "answer": str(r["answer"])})
        n_eval = min(100, len(ds) // 5)
        if n_eval < 16:
            held = f"{n_eval} held out for evaluation"
            if not n_eval:
                held = "too few to hold any out: evaluation reuses the training rows"
            warn(f"--dataset {cfg.dataset} has only {len(ds)} rows; {held}")
        split = ds.train_test_split(test_size=n_eval, seed=cfg.seed) if n_eval else {"train": ds, "test": ds}
        train, test = split["train"], split["test"]
    add = lambda r: {"question": r["question"] + MATH_INSTRUCTION}
    return train.map(add), test.map(add), math_reward


def format_prompt(tokenizer, question: str) -> str:
    """The chat template when the tokenizer has one, else a plain 'Question/Answer' format."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


# ----------------------------------------------------------------------------- reward
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, nested braces included; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def parse_number(s: str) -> Fraction | None:
    """Exactly one number in s ('1,234', '-3.50', '3/4', '\\frac{3}{4}'), else None ('', '3 or 4')."""
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", s).replace("$", "").replace(" ", "")
    found = NUMBER.findall(s)
    return Fraction(found[0].replace(",", "")) if len(found) == 1 else None


def extract_answer(text: str) -> Fraction | None:
    """The final answer: the last \\boxed{}, else the number after '####', else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return parse_number(boxed)
    if "####" in text:
        return parse_number(text.split("####")[-1].strip().split("\n")[0])
    found = NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def math_reward(completion: str, answer: str) -> float:
    """r(x, y): 1.0 if the final answer equals the reference numerically, else 0.0."""
    got, want = extract_answer(completion), parse_number(answer)
    return float(got is not None and got == want)


def score_completions(reward_fn: RewardFn, completions: list[str], answers: list[str]) -> tuple[torch.Tensor, str]:
    """Rewards (N,); a reward function that raises (or returns a non-number) scores 0, and is reported."""
    rewards, error = [], ""
    for c, a in zip(completions, answers):
        try:
            r = float(reward_fn(c, a))
            if not math.isfinite(r):
                raise ValueError(f"non-finite reward {r}")
        except Exception as e:  # noqa: BLE001 -- user code: any failure scores 0 and is reported
            r, error = 0.0, error or f"{type(e).__name__}: {e} (completion {c!r})"
        rewards.append(r)
    return torch.tensor(rewards), error


# ----------------------------------------------------------------------------- losses
def group_normalize(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """r̂_i = (r_i − mean_group) / (std_group + eps), unbiased std; a constant group gets 0. (N,) -> (N,)"""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size must be >= 2 and divide {rewards.numel()} rewards, got {group_size}")
    g = rewards.view(-1, group_size).to(torch.promote_types(rewards.dtype, torch.float32))  # (N/G, G)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1; values at masked-out positions (even inf/nan) never leak."""
    x = torch.where(mask.bool(), x, 0.0)
    return x.sum() / mask.sum().clamp(min=1) if dim is None else x.sum(dim) / mask.sum(dim).clamp(min=1)


def flowrl_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                log_z: torch.Tensor, adv: torch.Tensor, beta: float = 15.0, clip_low: float = 0.8,
                clip_high: float = 1.2, length_norm: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """L_FlowRL = mean_i w_i · δ_i² (trajectory balance with length normalisation and importance weights).
    logp, old_logp, ref_logp: per-token log π_θ, π_old, π_ref (N, T); mask: 1.0 on response tokens (N, T);
    log_z: log Z_φ(x_i) (N,); adv: r̂_i (N,). length_norm=False uses token sums (the unstable ablation)."""
    mean = (lambda x: masked_mean(x, mask, -1)) if length_norm else (lambda x: torch.where(mask.bool(), x, 0.0).sum(-1))
    delta = log_z + mean(logp) - beta * adv - mean(ref_logp)  # δ_i (N,)
    log_w = torch.where(mask.bool(), logp - old_logp, 0.0).sum(-1).detach()  # log of the sequence ratio (N,)
    w = log_w.exp().clamp(clip_low, clip_high)  # w_i, detached (N,)
    loss = (w * delta.pow(2)).mean()
    with torch.no_grad():
        stats = {"loss": loss.item(), "log_z": log_z.mean().item(), "log_reward": (beta * adv).mean().item(),
                 "delta_abs": delta.abs().mean().item(), "w": w.mean().item(),
                 "logp": masked_mean(logp, mask).item(), "old_logp": masked_mean(old_logp, mask).item(),
                 "ref_logp": masked_mean(ref_logp, mask).item(),
                 "ppo_kl": masked_mean(old_logp - logp, mask).item(), "ref_kl": masked_mean(ref_logp - logp, mask).item()}
    return loss, stats


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
              adv: torch.Tensor, clip_eps: float = 0.2, kl_coef: float = 0.001,
              clip_c: float = 3.0) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO as in veRL: clipped surrogate with Â_i = r̂_i on every token, dual-clipped at −c·Â for
    Â < 0, plus kl_coef · k3 KL to π_ref clamped to [−10, 10], averaged over all response tokens of the
    batch ("token-mean"); both log-ratios are clamped to [−20, 20] before exp, as veRL does. The dual
    clip acts only off-policy (ρ far from 1); the k3 clamp also on-policy, on sampled tokens with
    π_ref/π_θ > 13.5. Shapes as in flowrl_loss."""
    log_ratio = torch.where(mask.bool(), logp - old_logp, 0.0).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)  # ρ (N, T)
    a = adv.unsqueeze(-1)  # (N, 1)
    clipped = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    # dual clip: for a negative advantage the per-token loss is at most −c·Â
    dual = torch.minimum(clipped, -a * clip_c)
    surrogate = torch.where(a < 0, dual, clipped)
    log_r = torch.where(mask.bool(), ref_logp - logp, 0.0).clamp(-20.0, 20.0)
    # k3 estimator of KL(π_θ ‖ π_ref) per token
    kl = (torch.exp(log_r) - log_r - 1).clamp(-10.0, 10.0)
    loss = masked_mean(surrogate + kl_coef * kl, mask)
    with torch.no_grad():
        is_clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = {"loss": loss.item(), "kl": masked_mean(kl, mask).item(), "clipfrac": masked_mean(is_clipped, mask).item(),
                 "logp": masked_mean(logp, mask).item(), "ref_logp": masked_mean(ref_logp, mask).item(),
                 "ppo_kl": masked_mean(old_logp - logp, mask).item(), "ref_kl": masked_mean(ref_logp - logp, mask).item()}
    return loss, stats


# ----------------------------------------------------------------------------- sampling and scoring
@dataclass
class Rollouts:
    prompts: list[torch.Tensor]  # token ids of each prompt, unpadded (P_j,)
    response_ids: torch.Tensor  # (N, T): rows j·G .. j·G+G−1 answer prompt j
    mask: torch.Tensor  # (N, T) float: 1 on every generated token up to and including the first EOS
    completions: list[str]  # N decoded responses
    truncated: torch.Tensor  # (N,) bool: no EOS within max_new_tokens
    sample_logp: torch.Tensor  # (N, T): log π_θ(y_t) as the sampler computed it (logits / T, no top-p)


def response_mask(response_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 on every generated token up to and including the first EOS, 0 after it. (N, T) -> (N, T) long"""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


def next_token(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t ~ softmax(logits / T), renormalised over the nucleus (the most likely tokens whose mass
    reaches top_p) when top_p < 1. Returns the tokens (A,) and their log-probs under softmax(logits / T)
    (A,), the distribution the trainer's log-probs describe. logits (A, V)."""
    probs = torch.softmax(logits.float() / temperature, -1)  # (A, V)
    nucleus = probs
    if top_p < 1.0:
        p_sorted, order = probs.sort(-1, descending=True)
        # a token stays while the mass of the tokens ranked above it is below top_p
        p_sorted[p_sorted.cumsum(-1) - p_sorted >= top_p] = 0.0
        nucleus = torch.zeros_like(probs).scatter_(-1, order, p_sorted)
    # inverse-CDF draw: the first token whose cumulative mass exceeds u·total, u ~ U[0, 1) (a float32
    # u < 1 − 2⁻²⁴ keeps u·total below the total, and a zero-mass token is never the first to exceed it)
    cdf = nucleus.double().cumsum(-1)  # (A, V)
    u = torch.rand(len(cdf), 1, device=cdf.device).double() * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()


def sample(model: PreTrainedModel, tokenizer, prompts: list[str], cfg: Config, eos_ids: list[int],
           n: int) -> Rollouts:
    """n responses per prompt, one token per step with a KV cache. Each prompt is prefilled once and its
    cache copied n times; a row that emits EOS leaves the batch, so finished rows cost nothing."""
    device = model.device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # left-padded (B, P)
    N, T = len(prompts) * n, cfg.max_new_tokens
    eos = torch.tensor(eos_ids, device=device)
    resp = torch.full((N, T), tokenizer.pad_token_id, device=device)
    logp = torch.zeros(N, T, device=device)
    rows = torch.arange(N, device=device)  # the rows still running
    model.eval()
    cuda = device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
        out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        logits, attn = out.logits[:, -1].repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
        for t in range(T):
            resp[rows, t], logp[rows, t] = next_token(logits, cfg.temperature, cfg.top_p)
            running = ~torch.isin(resp[rows, t], eos)
            if t == T - 1 or not running.any():
                break
            if not running.all():
                # finished rows leave the batch and the cache
                rows, attn = rows[running], attn[running]
                cache.batch_select_indices(running.nonzero().squeeze(-1))
            attn = torch.cat([attn, attn.new_ones(len(rows), 1)], 1)
            out = model(input_ids=resp[rows, t, None], attention_mask=attn, past_key_values=cache,
                        position_ids=attn.sum(-1, keepdim=True) - 1, use_cache=True)
            logits = out.logits[:, -1]
    # clones made outside inference mode can enter autograd
    resp, logp = resp.clone(), logp.clone()
    mask = response_mask(resp, eos_ids)
    is_eos = torch.isin(resp, eos)
    # decode exactly what was generated before EOS: a stray special token must not vanish from the text
    completions = tokenizer.batch_decode([row[k].tolist() for row, k in zip(resp, mask.bool() & ~is_eos)])
    prompts_ids = [p[m.bool()] for p, m in zip(enc["input_ids"], enc["attention_mask"])]
    return Rollouts([p.to(device) for p in prompts_ids], resp, mask.float(), completions,
                    ~is_eos.any(-1), logp)


def pack(prompts: list[torch.Tensor], prompt_of: list[int], response_ids: torch.Tensor,
         lengths: list[int]):
    """Responses and their prompts as one sequence with no padding: each prompt once, before its first
    response, then each response without its last token (nothing is predicted from it). A token sees
    the earlier tokens of its own part and of its prompt, never another response or prompt.
    prompts: token ids (P_j,); prompt_of[i]: the prompt of response i; response_ids (n, T);
    lengths: |y_i|. Returns ids (S,), position ids (S,), the attention mask (S, S), for each response
    token y_t in mask order the packed position whose hidden state predicts it (M,), and for each
    response the packed span of its prompt."""
    ids, positions, part, home, before = [], [], [], [], []
    span: dict[int, tuple[int, int]] = {}
    for y, L, j in zip(response_ids, lengths, prompt_of):
        P = len(prompts[j])
        if j not in span:
            span[j] = (len(part), len(part) + P)
            ids.append(prompts[j])
            positions += range(P)
            part += [span[j][0]] * P
            home += [span[j][0]] * P
        start = len(part)
        # y_1 is predicted from the last prompt token, y_t from y_(t-1) at its packed position
        before += [span[j][1] - 1] + list(range(start, start + L - 1))
        ids.append(y[:L - 1])
        positions += range(P, P + L - 1)
        part += [start] * (L - 1)
        home += [span[j][0]] * (L - 1)
    device = response_ids.device
    part, home = torch.tensor(part, device=device), torch.tensor(home, device=device)
    same = (part[None, :] == part[:, None]) | (part[None, :] == home[:, None])
    visible = same & torch.ones_like(same).tril()
    return (torch.cat(ids), torch.tensor(positions, device=device), visible,
            torch.tensor(before, device=device), [span[j] for j in prompt_of])


def token_logprobs(lm_head: nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float,
                   chunk: int = 256) -> torch.Tensor:
    """log softmax(lm_head(h) / T)[target] for each row of h, `chunk` rows at a time. With a graph, each
    chunk's (chunk, V) logits are recomputed in the backward pass instead of stored, so a 150k-token
    vocabulary never holds (M, V) floats. h (M, H), targets (M,) -> (M,)"""

    def one_chunk(h_c: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h_c).float() / temperature  # (chunk, V)
        return -F.cross_entropy(logits, y_c, reduction="none")

    out = []
    for h_c, y_c in zip(h.split(chunk), targets.split(chunk)):
        if torch.is_grad_enabled():
            out.append(checkpoint(one_chunk, h_c, y_c, use_reentrant=False))
        else:
            out.append(one_chunk(h_c, y_c))
    return torch.cat(out)


def sequence_logprobs(model: PreTrainedModel, prompts: list[torch.Tensor], prompt_of: list[int],
                      response_ids: torch.Tensor, response_mask: torch.Tensor,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y_t | x, y_<t) of n responses by teacher forcing, with logits / temperature, in one
    forward over the packed sequence (`pack`): each prompt runs once for all its responses and no
    layer or LM head sees padding. prompts: token ids (P_j,); prompt_of[i]: the prompt of response i;
    response_ids and response_mask (n, T), every response at least one token. Returns the log-probs
    (n, T), 0 off the mask, and each response's prompt representation for log Z (n, H): the mean of
    the last hidden states over its prompt's tokens, from the same forward."""
    mask = response_mask.bool()
    lengths = mask.sum(-1).tolist()
    ids, positions, visible, before, spans = pack(prompts, prompt_of, response_ids, lengths)
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=ids.device.type == "cuda"):
        hidden = model.base_model(input_ids=ids[None], position_ids=positions[None],
                                  attention_mask=visible[None, None]).last_hidden_state[0]  # (S, H)
        flat = token_logprobs(model.get_output_embeddings(), hidden[before], response_ids[mask],
                              temperature)  # (M,)
    logp = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)
    pooled = {(a, b): hidden[a:b].float().mean(0) for a, b in set(spans)}  # once per prompt
    prompt_repr = torch.stack([pooled[s] for s in spans])  # (n, H)
    return logp, prompt_repr


def micro_batches(rows: torch.Tensor, r: Rollouts, cfg: Config) -> list[torch.Tensor]:
    """The rows of a rollout batch, in order, cut into packed forwards of at most --micro-batch
    responses and --micro-tokens tokens (each prompt once, each response but its last token); a
    response over the budget gets a forward of its own. Memory and the attention's S² stay bounded."""
    lengths = r.mask[rows].sum(-1).long().tolist()
    chunks, current, seen, tokens = [], [], set(), 0
    for row, length in zip(rows.tolist(), lengths):
        j = row // cfg.group_size
        prompt = len(r.prompts[j])
        cost = length - 1
        if j not in seen:
            cost += prompt
        if current and (len(current) == cfg.micro_batch or tokens + cost > cfg.micro_tokens):
            chunks.append(torch.tensor(current))
            current, seen, tokens = [], set(), 0
            cost = length - 1 + prompt
        current.append(row)
        seen.add(j)
        tokens += cost
    chunks.append(torch.tensor(current))
    return chunks


@torch.inference_mode()
def score(model: PreTrainedModel, r: Rollouts, cfg: Config) -> torch.Tensor:
    """Per-token log-probs (N, T) of rollouts under a model, prompt by prompt, without a graph."""
    model.eval()
    out = torch.zeros_like(r.mask)
    for rows in micro_batches(torch.arange(len(r.mask)), r, cfg):
        prompt_of = (rows // cfg.group_size).tolist()
        out[rows] = sequence_logprobs(model, r.prompts, prompt_of, r.response_ids[rows], r.mask[rows],
                                      cfg.temperature)[0]
    return out


def reference_logprobs(model: PreTrainedModel, ref: PreTrainedModel | None, r: Rollouts,
                       cfg: Config) -> torch.Tensor:
    """log π_ref per token (N, T): the frozen copy, or with LoRA (ref None) the policy's own base
    weights, its adapters switched off for this forward."""
    if ref is not None:
        return score(ref, r, cfg)
    model.disable_adapters()
    try:
        return score(model, r, cfg)
    finally:
        model.enable_adapters()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def distinct_answers(completions: list[str], group_size: int) -> float:
    """Mean number of distinct final answers per group of responses."""
    groups = [completions[i:i + group_size] for i in range(0, len(completions), group_size)]
    return statistics.mean(len({extract_answer(c) for c in g} - {None}) for g in groups)


def evaluate(model: PreTrainedModel, tokenizer, eval_ds: Dataset, reward_fn: RewardFn, cfg: Config,
             eos_ids: list[int]) -> dict[str, float]:
    """Held-out prompts, k samples each: mean accuracy, unbiased pass@k for k = 1, 2, 4, ..., distinct answers."""
    rows = eval_ds.select(range(min(cfg.eval_prompts, len(eval_ds))))
    k = cfg.eval_k
    r = sample(model, tokenizer, [format_prompt(tokenizer, q) for q in rows["question"]], cfg, eos_ids, k)
    rewards, _ = score_completions(reward_fn, r.completions, [a for a in rows["answer"] for _ in range(k)])
    correct = (rewards.view(-1, k) >= 1.0).sum(1).tolist()
    out = {"eval_acc": (rewards >= 1.0).float().mean().item(), "eval_distinct": distinct_answers(r.completions, k)}
    ks = [2 ** i for i in range(k.bit_length())]  # 1, 2, 4, ... up to k
    return out | {f"eval_pass@{j}": statistics.mean(pass_at_k(k, c, j) for c in correct) for j in ks}


# ----------------------------------------------------------------------------- training
def save_checkpoint(out: str, model: PreTrainedModel, tokenizer, logz: LogZ | None, cfg: Config,
                    state: dict | None = None) -> str:
    """Write <out>/checkpoint atomically: into a temporary directory first, then renamed into place.
    state: what --resume needs besides the weights (step, optimiser, scheduler, random state)."""
    final, tmp = os.path.join(out, "checkpoint"), tempfile.mkdtemp(dir=out, prefix=".checkpoint-")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if logz is not None:
        torch.save(logz.state_dict(), os.path.join(tmp, "logz.pt"))
    if state is not None:
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "flowrl_config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    # temporary files are private (0600, 0700): give the checkpoint the modes the user's umask gives
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    os.chmod(tmp, 0o777 & ~umask)
    old = final + ".old"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def make_optimizer(cfg: Config, model: PreTrainedModel, logz: LogZ | None):
    """AdamW (decay on matrices) with linear warm-up; log Z_φ joins it, as in the official code, at its own lr."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "lr": cfg.lr},
              {"params": [p for p in trainable if p.dim() < 2], "lr": cfg.lr, "weight_decay": 0.0}]
    groups += [{"params": list(logz.parameters()), "lr": cfg.logz_lr}] if logz is not None else []
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))


def update(cfg: Config, model: PreTrainedModel, logz: LogZ | None, opt, sched, r: Rollouts, adv: torch.Tensor,
           ref_logp: torch.Tensor, old_logp: torch.Tensor | None, step: int) -> dict[str, float]:
    """epochs × mini-batches optimiser steps on one rollout batch, each accumulated over micro-batches. old_logp
    None means one on-policy update: π_old is then the detached current log-prob (no extra forward)."""
    mask = r.mask  # (N, T)
    model.train()
    stats: dict[str, float] = {}
    n_updates = cfg.epochs * cfg.mini_batches
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(adv)) if cfg.mini_batches > 1 else torch.arange(len(adv))
        for mb in perm.chunk(cfg.mini_batches):
            for mi in micro_batches(mb, r, cfg):
                prompt_of = (mi // cfg.group_size).tolist()
                logp, prompt_repr = sequence_logprobs(model, r.prompts, prompt_of, r.response_ids[mi],
                                                      mask[mi], cfg.temperature)
                old = logp.detach() if old_logp is None else old_logp[mi]
                if logz is None:
                    loss, st = grpo_loss(logp, old, ref_logp[mi], mask[mi], adv[mi], cfg.clip_eps, cfg.kl_coef,
                                         cfg.clip_c)
                    frac = (mask[mi].sum() / mask[mb].sum().clamp(min=1)).item()  # token-mean over the mini-batch
                else:
                    log_z = logz(prompt_repr)  # (n,): equal for the responses of one prompt
                    loss, st = flowrl_loss(logp, old, ref_logp[mi], mask[mi], log_z, adv[mi], cfg.beta,
                                           cfg.clip_low, cfg.clip_high, cfg.length_norm)
                    frac = len(mi) / len(mb)  # sequence-mean over the mini-batch
                if not math.isfinite(st["loss"]):
                    die(f"step {step}: the loss is {st['loss']} (non-finite); lower --lr or --beta")
                (loss * frac).backward()
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + v * frac / n_updates
            grad_norm = float(nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0))
            if not math.isfinite(grad_norm):  # stop before a non-finite step corrupts the weights
                die(f"step {step}: the gradient norm is {grad_norm} (non-finite); lower --lr or --beta")
            stats["grad_norm"] = stats.get("grad_norm", 0.0) + grad_norm / n_updates
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    return stats


class Stopped(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped training; `history` holds the steps that finished."""

    def __init__(self, signum: int, history: list[dict] | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.history = signum, history or []


@dataclass
class StopGuard:
    """The handler of SIGINT and SIGTERM during training: it raises Stopped at once, except while
    `hold` is set (from the update to the end of its step, and while a checkpoint is written), when
    it only records the signal, so that a checkpoint always holds one whole step."""
    hold: bool = False
    signum: int = 0

    def __call__(self, signum: int, frame) -> None:
        self.signum = signum
        if not self.hold:
            raise Stopped(signum)
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step, then saving", file=sys.stderr)


def rng_state() -> dict:
    """The random state a resumed run continues from (sampling, log Z dropout, mini-batch order)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def train(cfg: Config, model: PreTrainedModel, tokenizer, train_ds: Dataset, eval_ds: Dataset, reward_fn: RewardFn,
          on_step: Callable[[int, PreTrainedModel], dict] | None = None,
          ref: PreTrainedModel | None = None, resume: dict | None = None) -> list[dict]:
    """The FlowRL (or GRPO) loop: sample G responses per prompt, score them, then update π_θ and log Z_φ.
    π_ref defaults to a frozen snapshot of the initial policy; on_step(step, model) may add metrics.
    resume: a checkpoint's trainer state (and "logz") to continue from. Writes <out>/metrics.jsonl
    (one line per step) and <out>/checkpoint; returns the metrics. SIGINT or SIGTERM saves the last
    whole step and raises Stopped."""
    device, G = model.device, cfg.group_size
    # with LoRA π_ref needs no copy: it is the policy with its adapters switched off
    if ref is None and not cfg.lora_r:
        ref = copy.deepcopy(model)
    if ref is not None:
        ref.eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # its own seed: GRPO and FlowRL then draw the same first rollouts
        torch.manual_seed(cfg.seed)
        logz = LogZ(model.config.hidden_size).to(device) if cfg.algo == "flowrl" else None
    opt, sched = make_optimizer(cfg, model, logz)
    if cfg.grad_ckpt:  # layers recompute their activations in the backward pass (training mode only)
        model.activation_checkpointing_enable({"use_reentrant": False})
    eos_ids = eos_token_ids(model, tokenizer)
    os.makedirs(cfg.out, exist_ok=True)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    history, done, warned = [], 0, False
    if resume is not None:
        done = resume["step"]
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        if logz is not None:
            logz.load_state_dict(resume["logz"])
        # the steps the checkpoint holds; a later line (written after it) is dropped and redone
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                history = [m for m in map(json.loads, f) if m["step"] <= done]
        torch.set_rng_state(resume["rng"]["torch"])
        if "cuda" in resume["rng"]:
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
    # the random state as of the last whole step (a resumed run's is the one just restored)
    rng = rng_state()

    def save() -> str:
        state = {"step": done, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng}
        return save_checkpoint(cfg.out, model, tokenizer, logz, cfg, state)

    guard = StopGuard()
    handlers = {s: signal.signal(s, guard) for s in (signal.SIGINT, signal.SIGTERM)}
    stopped = None
    try:
        with open(metrics_path, "w") as log_file:
            log_file.writelines(json.dumps(m) + "\n" for m in history)
            if cfg.eval_every and resume is None:  # held-out numbers before any update, logged as step 0
                history.append({"step": 0, **evaluate(model, tokenizer, eval_ds, reward_fn, cfg, eos_ids)})
                log_file.write(json.dumps(history[0]) + "\n")
                log_file.flush()
            bar = tqdm(range(done + 1, cfg.steps + 1), desc=cfg.algo, dynamic_ncols=True, disable=None)
            for step in bar:
                # 1. G responses for each prompt of the batch, scored by the rule-based reward; r̂ per group
                t0 = time.perf_counter()
                rows = train_ds.select([order[((step - 1) * cfg.prompts + j) % len(order)] for j in range(cfg.prompts)])
                r = sample(model, tokenizer, [format_prompt(tokenizer, q) for q in rows["question"]], cfg, eos_ids, G)
                rewards, error = score_completions(reward_fn, r.completions, [a for a in rows["answer"] for _ in range(G)])
                if error and not warned:
                    tqdm.write(f"warning: the reward function failed, scoring 0 (reported once): {error}")
                    warned = True
                adv = group_normalize(rewards, G).to(device)  # r̂ (N,)
                t1 = time.perf_counter()
                # 2. π_ref once per rollout batch; π_old only when it differs from the policy being updated
                ref_logp = reference_logprobs(model, ref, r, cfg)
                old_logp = None if cfg.epochs == cfg.mini_batches == 1 else score(model, r, cfg)
                t2 = time.perf_counter()
                # 3. the FlowRL (or GRPO) update; from here a signal waits for the end of the step
                guard.hold = True
                stats = update(cfg, model, logz, opt, sched, r, adv, ref_logp, old_logp, step)
                t3 = time.perf_counter()
                lengths = r.mask.sum(-1)
                m = {"step": step, "reward": rewards.mean().item(), "accuracy": (rewards >= 1.0).float().mean().item(),
                     **stats, "response_len": lengths.mean().item(), "truncated": r.truncated.float().mean().item(),
                     "distinct": distinct_answers(r.completions, G), "gen_tokens": int(lengths.sum()),
                     "gen_s": t1 - t0, "ref_s": t2 - t1, "update_s": t3 - t2}
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    m.update(evaluate(model, tokenizer, eval_ds, reward_fn, cfg, eos_ids))
                if on_step is not None:
                    m.update(on_step(step, model))
                history.append(m)
                log_file.write(json.dumps(m) + "\n")
                log_file.flush()
                done, rng = step, rng_state()
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    save()
                bar.set_postfix(reward=f"{m['reward']:.2f}", logZ=f"{m.get('log_z', 0):.2f}", loss=f"{m['loss']:.3f}")
                guard.hold = False
                if guard.signum:
                    raise Stopped(guard.signum)
    except Stopped as e:
        stopped = e
    try:
        guard.hold = True
        if stopped is None or done > 0:
            path = save()
        else:
            # stopped before a step finished (a resumed run has always finished one): leave no
            # half-written run behind
            os.remove(metrics_path)
            with contextlib.suppress(OSError):
                os.rmdir(cfg.out)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if stopped is not None:
        name = signal.Signals(stopped.signum).name
        if done:
            tqdm.write(f"stopped by {name} during step {done + 1}: saved step {done} to {path} "
                       "(continue with --resume)", file=sys.stderr)
        else:
            tqdm.write(f"stopped by {name} before the first step finished: nothing to save", file=sys.stderr)
        raise Stopped(stopped.signum, history)
    return history


def summarize(history: list[dict], device: torch.device) -> str:
    """The run's last metrics, its median step time split by phase (steps 2+), and its peak memory."""
    steps, evals = [h for h in history if "reward" in h], [h for h in history if "eval_acc" in h]
    if not steps:
        return "no step finished"
    timed = steps[1:] or steps  # step 1 pays one-off warm-up costs
    med = {k: statistics.median(h[k] for h in timed) for k in ("gen_s", "ref_s", "update_s")}
    tok_s = sum(h["gen_tokens"] for h in timed) / sum(h["gen_s"] for h in timed)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"  # ru_maxrss is in KiB on Linux
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    first, last = steps[0], steps[-1]
    lines = [(f"steps {first['step']}-{last['step']}  reward {first['reward']:.3f} (step {first['step']}) -> "
              f"{last['reward']:.3f} (step {last['step']})  distinct answers/group {last['distinct']:.2f}")]
    shown = evals[-1:]
    if len(evals) > 1:
        shown = [evals[0], evals[-1]]
    for e in shown:
        lines.append(f"held-out at step {e['step']}  "
                     + "  ".join(f"{k[5:]} {v:.3f}" for k, v in e.items() if k.startswith("eval_")))
    lines.append(f"median step {sum(med.values()):.2f}s (generate {med['gen_s']:.2f}s, reference {med['ref_s']:.2f}s, "
                 + f"update {med['update_s']:.2f}s), {tok_s:.0f} generated tokens/s, peak "
                 + f"{'GPU' if device.type == 'cuda' else 'RSS'} memory {peak:.2f} GiB")
    return "\n".join(lines)


# veRL's names for the same tensors (verl-recipe flowrl/flowrl_actor.py, update_policy), read as they are
VERL_KEYS = {"log_prob": "logp", "old_log_probs": "old_logp", "ref_log_prob": "ref_logp",
             "response_mask": "mask", "advantages": "adv"}


def check_batch(cfg: Config) -> dict[str, dict[str, float]]:
    """Our losses and gradients, in float64, for tensors from another implementation (README: sanity-checking).
    The file is a dict saved with torch.save: logp, ref_logp, mask (N, T) and adv (N,), or rewards (N,) with
    group_size; optionally old_logp (N, T; default: logp, one on-policy update) and log_z (N,; default 0).
    veRL's key names work too (VERL_KEYS): advantages (N, T) per token, log_z (N, 1)."""
    if not os.path.isfile(cfg.check_batch):
        die(f"--check-batch {cfg.check_batch}: no such file")
    b = torch.load(cfg.check_batch, map_location="cpu", weights_only=True)
    b = {VERL_KEYS.get(k, k): v for k, v in b.items()}
    missing = [k for k in ("logp", "ref_logp", "mask") if k not in b]
    missing += [] if "adv" in b or {"rewards", "group_size"} <= set(b) else ["adv (or rewards and group_size)"]
    if missing:
        die(f"--check-batch {cfg.check_batch}: missing {', '.join(missing)}; found {', '.join(b) or 'nothing'}")
    t = {k: v.detach().to(torch.float64) for k, v in b.items() if torch.is_tensor(v)}
    old, ref, mask = t.get("old_logp", t["logp"]), t["ref_logp"], t["mask"]
    adv = t["adv"] if "adv" in t else group_normalize(t["rewards"], int(b["group_size"]))
    if adv.dim() == 2:
        # per-token advantages (veRL): the sequence's r̂ is their mean over its tokens, as the recipe takes it
        adv = masked_mean(adv, mask, -1)
    log_z = t.get("log_z", torch.zeros_like(adv)).reshape(adv.shape)
    logp, log_z = t["logp"].clone().requires_grad_(), log_z.clone().requires_grad_()
    flow, out_f = flowrl_loss(logp, old, ref, mask, log_z, adv, cfg.beta, cfg.clip_low, cfg.clip_high, cfg.length_norm)
    out_f["grad_logp_norm"], out_f["grad_log_z_norm"] = (g.norm().item() for g in torch.autograd.grad(flow, [logp, log_z]))
    grpo, out_g = grpo_loss(logp, old, ref, mask, adv, cfg.clip_eps, cfg.kl_coef, cfg.clip_c)
    out = {"flowrl": out_f, "grpo": {**out_g, "grad_logp_norm": torch.autograd.grad(grpo, logp)[0].norm().item()}}
    print("\n".join(f"{algo}: " + "  ".join(f"{k} {v:.6g}" for k, v in st.items()) for algo, st in out.items()))
    return out


def load_resume(cfg: Config, model: PreTrainedModel) -> tuple[PreTrainedModel, PreTrainedModel | None, dict]:
    """For --resume: the policy from <out>/checkpoint, π_ref as the original run had it (the initial
    model, given here), and the trainer state. With LoRA the adapter is loaded onto the initial model
    and π_ref stays its base weights. Returns (policy, π_ref or None, state)."""
    ckpt = os.path.join(cfg.out, "checkpoint")
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=False)
    if cfg.algo == "flowrl":
        state["logz"] = torch.load(os.path.join(ckpt, "logz.pt"), map_location=model.device)
    if cfg.lora_r:
        model.load_adapter(ckpt, adapter_name="default", is_trainable=True)
        return model, None, state
    policy, _ = load_model(ckpt, cfg.seed)
    return policy.to(model.device), model, state


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse flags, load model and data, train, print a summary; returns the per-step metrics.
    SIGINT or SIGTERM: one line, a checkpoint if a step finished, exit status 128 + signal number."""
    handlers = {s: signal.signal(s, exit_quietly) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run_main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def run_main(argv: list[str] | None) -> list[dict]:
    cfg = parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if cfg.check_batch:
        return [check_batch(cfg)]
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(cfg.model, cfg.seed)
    train_ds, eval_ds, reward_fn = load_data(cfg)
    if cfg.model == "tiny" and cfg.dataset not in TOY_TASKS:
        warn(f"--model tiny is a random 0.1M-parameter model and cannot answer --dataset {cfg.dataset}; "
             "pass --model with a pretrained model (a hub id or a local directory)")
    model.to(device)
    if cfg.model == "tiny" and cfg.dataset in TOY_TASKS:
        import toy_tasks  # a random model cannot find the answer format by itself: teach π_ref the format first
        toy_tasks.warm_start(model, tokenizer, cfg.seed)
    ref, state = None, None
    if cfg.resume:
        model, ref, state = load_resume(cfg, model)
    elif cfg.lora_r:
        add_lora(model, cfg.lora_r, cfg.lora_alpha)
    try:
        history = train(cfg, model, tokenizer, train_ds, eval_ds, reward_fn, ref=ref, resume=state)
    except Stopped as e:
        if e.history:
            print(summarize(e.history, device))
        raise SystemExit(128 + e.signum) from None
    print(summarize(history, device))
    print(f"metrics: {os.path.join(cfg.out, 'metrics.jsonl')}  checkpoint: {os.path.join(cfg.out, 'checkpoint')}")
    return history


if __name__ == "__main__":
    main()
