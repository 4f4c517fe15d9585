"""FlowRL, minimal: reward-distribution matching RL for LLMs (Zhu et al., arXiv 2509.15207).

GRPO and PPO maximise reward and collapse onto its dominant mode. FlowRL instead matches the target
    p*(y|x) ∝ exp(β·r̂(x,y)) · π_ref(y|x)
by minimising, over the G responses y_i sampled for each prompt x (trajectory balance, Eq. 5-6),
    δ_i = log Z_φ(x) + (1/|y_i|) log π_θ(y_i|x) − β·r̂_i − (1/|y_i|) log π_ref(y_i|x)
    L   = mean_i  w_i · δ_i²,       w_i = clip(π_θ(y_i|x) / π_old(y_i|x), 1 − ε, 1 + ε), detached
where log π(y|x) = Σ_t log π(y_t | x, y_<t), r̂ is the group-normalised reward, β = 15, ε = 0.2.

    pip install -r requirements.txt
    python flowrl_min.py --model Qwen2.5-0.5B     # a hub id or a local dir, on `arith`
    python flowrl_min.py --model DIR --algo grpo  # the baseline, everything else identical
    python toy_tasks.py train                     # offline: a tiny model, seconds on a CPU
    python toy_tasks.py                           # FlowRL keeps every mode, GRPO collapses
"""
import argparse
import copy
import json
import math
import os
import pathlib
import random
import re
import resource
import shutil
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction

if __name__ == "__main__":  # Ctrl-C before training (imports, loading): exit at once, no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import huggingface_hub.constants
import torch
import transformers
from datasets import Dataset, disable_progress_bars, load_dataset
from torch import Tensor, nn
from tqdm import tqdm
from transformers import PreTrainedModel

RewardFn = Callable[[str, str], float]
# ----------------------------------------------------------------------------- config
def flag(default, help: str, least: float | None = None):  # least: checked by parse_args
    return field(default=default, metadata={"help": help, "least": least})

@dataclass
class Config:
    model: str = flag("Qwen2.5-0.5B", "hub id (bare 'Qwen2.5-0.5B': Qwen/...) or local directory")
    dataset: str = flag("arith", "arith, or a .jsonl/.json/.csv/.parquet file (question, answer)")
    algo: str = flag("flowrl", "flowrl, or the grpo baseline with everything else identical")
    steps: int = flag(50, "rollout batches", 1)
    prompts: int = flag(4, "prompts per rollout batch", 1)
    group_size: int = flag(8, "G: responses sampled per prompt", 2)
    max_new_tokens: int = flag(128, "response length limit", 1)
    temperature: float = flag(1.0, "sampling temperature T; log-probs also use logits / T", 0)
    beta: float = flag(15.0, "β: reward temperature of the target distribution")
    log_z: str = flag("mlp", "mlp: the paper's log Z_φ network; group: its closed form per group")
    clip_low: float = flag(0.8, "lower clip of the importance weight w (paper: 1-ε)")
    clip_high: float = flag(1.2, "upper clip of w (paper: 1+ε; official code: inf; veRL: 10)")
    length_norm: bool = flag(True, "divide log-prob sums by |y| (--no-length-norm: the ablation)")
    kl_coef: float = flag(0.001, "GRPO: k3 KL-to-reference coefficient (ratio clip 0.2, dual 3)")
    lr: float = flag(None, "policy learning rate (default: 1e-6; 2e-5 with --lora-r)", 0)
    logz_lr: float = flag(None, "log Z_φ learning rate (default: the policy's)", 0)
    mini_batches: int = flag(1, "optimiser steps per rollout batch (w ≠ 1 from the second on)", 1)
    micro_tokens: int = flag(512, "tokens per packed forward and backward (accumulated)", 1)
    grad_ckpt: bool = flag(True, "activation checkpointing: less memory, one more forward")
    lora_r: int = flag(0, "LoRA rank (needs peft), 0: full fine-tuning; π_ref: adapters off", 0)
    lora_alpha: float = flag(None, "LoRA α: the adapters' output is scaled by α/r (default: 2·r)")
    eval_every: int = flag(25, "evaluate every N steps (0: only at the end)", 0)
    eval_prompts: int = flag(16, "held-out prompts per evaluation", 1)
    eval_k: int = flag(8, "samples per held-out prompt (mean accuracy and pass@k)", 1)
    device: str = flag("", "cuda, mps or cpu (default: the first of them that is available)")
    dtype: str = flag("auto", "bfloat16 autocast or float32; auto: bf16 where the device has it")
    out: str = flag("out", "output directory: metrics.jsonl and checkpoint/")
    overwrite: bool = flag(False, "replace a run already in --out")
    resume: bool = flag(False, "continue the run in --out with its flags (--steps may change)")
    save_every: int = flag(0, "also save the checkpoint every N steps (0: at the end)", 0)
    seed: int = flag(0, "seed for weights, data order and sampling")
# ----------------------------------------------------------------------------- the objective
def group_normalize(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """r̂_i = (r_i − group mean) / (unbiased group std + eps); G adjacent rows. (N,) -> (N,)"""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size must be >= 2 and divide {rewards.numel()}, got {group_size}")
    g = rewards.view(-1, group_size).to(torch.promote_types(rewards.dtype, torch.float32))
    # shifted by the group's first reward (r̂ does not change): an equal group is exactly 0
    g = g - g[:, :1]  # (N/G, G); float64 stays float64
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)

class LogZ(nn.Sequential):
    """log Z_φ(x): 3-layer MLP on the prompt's mean last hidden state, not detached. (N, H)->(N,)"""
    def __init__(self, h: int, dropout: float = 0.1):
        block = lambda: [nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h), nn.Dropout(dropout)]
        super().__init__(*block(), *block(), nn.Linear(h, 1), nn.Flatten(0))

def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x where mask is 1 (over dim, or all); masked-out values, even inf, never leak."""
    return torch.where(mask.bool(), x, 0.0).sum(dim) / mask.sum(dim).clamp(min=1)

def sequence_logp(logp: Tensor, mask: Tensor, length_norm: bool) -> Tensor:
    """(1/|y|) Σ_t log π(y_t|x, y_<t) per response, or the sum without 1/|y|. (N, T) -> (N,)"""
    total = torch.where(mask.bool(), logp, 0.0).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_norm else total

def importance_weight(logp: Tensor, old_logp: Tensor, mask: Tensor, clip_low: float = 0.8,
                      clip_high: float = 1.2) -> Tensor:
    """w_i = clip(π_θ(y_i|x) / π_old(y_i|x)), the sequence's ratio, detached. (N, T) -> (N,)"""
    return sequence_logp(logp - old_logp, mask, False).detach().exp().clamp(clip_low, clip_high)

def group_log_z(logp: Tensor, ref_logp: Tensor, mask: Tensor, adv: Tensor, group_size: int,
                beta: float = 15.0, length_norm: bool = True, w: Tensor | None = None) -> Tensor:
    """--log-z group, log Z(x) in closed form. δ_i = c + a_i with a_i = (1/|y_i|) log π_θ(y_i) −
    β·r̂_i − (1/|y_i|) log π_ref(y_i); over a prompt's G responses Σ_i w_i·(c + a_i)² is least
    where its derivative 2·Σ_i w_i·(c + a_i) is 0: c* = −Σ_i w_i·a_i / Σ_i w_i. Without gradient
    the loss is then the w-weighted variance of the a_i (VarGrad). (N, T); adv, w (N,) -> (N,)"""
    a = sequence_logp(logp, mask, length_norm) - beta * adv
    a = (a - sequence_logp(ref_logp, mask, length_norm)).detach().view(-1, group_size)
    w = torch.ones_like(a) if w is None else w.view(-1, group_size)  # (N/G, G)
    return (-(w * a).sum(1) / w.sum(1)).repeat_interleave(group_size)

def flowrl_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, log_z: Tensor,
                adv: Tensor, beta: float = 15.0, clip_low: float = 0.8, clip_high: float = 1.2,
                length_norm: bool = True) -> tuple[Tensor, dict[str, float]]:
    """L_FlowRL = mean_i w_i·δ_i²: log π_θ, π_old, π_ref and mask (N, T); log Z(x_i), r̂_i (N,)."""
    delta = (log_z + sequence_logp(logp, mask, length_norm) - beta * adv
             - sequence_logp(ref_logp, mask, length_norm))  # δ_i (N,)
    w = importance_weight(logp, old_logp, mask, clip_low, clip_high)  # (N,)
    loss = (w * delta.pow(2)).mean()
    return loss, {"loss": loss.item(), "log_z": log_z.mean().item(), "w": w.mean().item(),
                  "log_reward": (beta * adv).mean().item(), "delta_abs": delta.abs().mean().item()}

def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, adv: Tensor,
              clip_eps: float = 0.2, kl_coef: float = 0.001,
              clip_c: float = 3.0) -> tuple[Tensor, dict[str, float]]:
    """veRL's GRPO: dual-clipped surrogate, Â = r̂ per token, + kl_coef·k3 KL to π_ref. (N, T)"""
    ratio = torch.where(mask.bool(), logp - old_logp, 0.0).clamp(-20.0, 20.0).exp()  # ρ (N, T)
    a = adv.unsqueeze(-1)  # (N, 1)
    clipped = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    surrogate = torch.where(a < 0, torch.minimum(clipped, -a * clip_c), clipped)  # dual clip
    log_r = torch.where(mask.bool(), ref_logp - logp, 0.0).clamp(-20.0, 20.0)
    kl = (torch.exp(log_r) - log_r - 1).clamp(-10.0, 10.0)  # k3 estimate of KL(π_θ ‖ π_ref)
    loss = masked_mean(surrogate + kl_coef * kl, mask)
    clipfrac = masked_mean(((ratio - 1).abs() > clip_eps).float(), mask).item()
    return loss, {"loss": loss.item(), "kl": masked_mean(kl, mask).item(), "clipfrac": clipfrac}

def logprob_stats(logp: Tensor, old: Tensor, ref: Tensor, mask: Tensor) -> dict[str, float]:
    """What both losses report: mean log π_θ, π_old, π_ref per token, and k1 KL estimates."""
    m = {"logp": logp, "old_logp": old, "ref_logp": ref, "ppo_kl": old - logp, "ref_kl": ref - logp}
    return {k: masked_mean(v, mask).item() for k, v in m.items()}
# ----------------------------------------------------------------------------- sampling
@dataclass
class Rollouts:
    prompts: list[Tensor]  # token ids of each prompt, unpadded (P_j,)
    response_ids: Tensor  # (N, T): rows j·G .. j·G+G−1 answer prompt j
    mask: Tensor  # (N, T) float: 1 on each generated token up to and with the first EOS
    completions: list[str]  # N decoded responses
    truncated: Tensor  # (N,) bool: no EOS within max_new_tokens
    sample_logp: Tensor  # (N, T): the sampler's log π_θ(y_t), π_old for --log-z group (w = 1)

def response_mask(response_ids: Tensor, eos_ids: list[int]) -> Tensor:
    """1 on each generated token up to and including the first EOS, then 0. (N, T) -> (N, T)"""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()

def next_token(logits: Tensor, temperature: float,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """y_t ~ softmax(logits / T). logits (A, V) -> tokens (A,) and their log-probs (A,)"""
    logp = torch.log_softmax(logits.float() / temperature, -1)  # (A, V)
    tokens = torch.multinomial(logp.exp(), 1, generator=generator)  # (A, 1)
    return tokens.squeeze(-1), logp.gather(-1, tokens).squeeze(-1)

def sample(model: PreTrainedModel, tokenizer, prompts: list[str], cfg: Config,
           eos_ids: list[int], n: int, generator: torch.Generator | None = None) -> Rollouts:
    """n responses per prompt, KV-cached: each prompt prefilled once, a row leaves at its EOS."""
    device, N, T = model.device, len(prompts) * n, cfg.max_new_tokens
    enc = tokenizer(prompts, return_tensors="pt", padding=True,
                    add_special_tokens=not tokenizer.chat_template)
    ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # left-padded
    prompt_ids = [p[m.bool()] for p, m in zip(ids, attn)]
    resp, logp = ids.new_full((N, T), tokenizer.pad_token_id), torch.zeros(N, T, device=device)
    eos, rows = torch.tensor(eos_ids, device=device), torch.arange(N, device=device)  # live rows
    model.eval()
    # no_grad, not inference_mode: only outside it does autocast cast a weight once, not per token
    bf16 = torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    with torch.no_grad(), bf16:
        out = model(input_ids=ids, attention_mask=attn, use_cache=True, logits_to_keep=1,
                    position_ids=(attn.cumsum(-1) - 1).clamp(min=0))
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)  # a copy per response
        logits, attn = out.logits[:, -1].repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
        for t in range(T):
            resp[rows, t], logp[rows, t] = next_token(logits, cfg.temperature, generator)
            running = ~torch.isin(resp[rows, t], eos)
            if t == T - 1 or not running.any():
                break
            if not running.all():  # finished rows leave the batch and the cache
                rows, attn = rows[running], attn[running]
                cache.batch_select_indices(running.nonzero().squeeze(-1))
            attn = torch.cat([attn, attn.new_ones(len(rows), 1)], 1)
            out = model(input_ids=resp[rows, t, None], attention_mask=attn, past_key_values=cache,
                        position_ids=attn.sum(-1, keepdim=True) - 1, use_cache=True)
            logits = out.logits[:, -1]
    mask, is_eos = response_mask(resp, eos_ids).bool(), torch.isin(resp, eos)
    # decode exactly what came before EOS: a stray special token must not vanish from the text
    completions = tokenizer.batch_decode([y[k].tolist() for y, k in zip(resp, mask & ~is_eos)])
    return Rollouts(prompt_ids, resp, mask.float(), completions, ~is_eos.any(-1), logp)
# ----------------------------------------------------------------------------- log-probs
def pack(prompts: list[Tensor], prompt_of: list[int], response_ids: Tensor, lengths: list[int]):
    """Prompts once, each y_i but its last token: ids, positions (S,), bias (S, S), before, spans"""
    ids, positions, part, home, before, span = [], [], [], [], [], {}
    for y, L, j in zip(response_ids, lengths, prompt_of):
        P = len(prompts[j])
        if j not in span:
            span[j] = (len(part), len(part) + P)
            ids.append(prompts[j])
            positions += range(P)
            part += [len(part)] * P  # each token holds the start of its part
        before += [span[j][1] - 1] + list(range(len(part), len(part) + L - 1))  # predict y_t
        ids.append(y[:L - 1])
        positions += range(P, P + L - 1)
        part += [len(part)] * (L - 1)
        home += [span[j][0]] * (len(part) - len(home))  # the prompt each new token sees
    part, home, positions, before = (torch.tensor(v, device=response_ids.device)
                                     for v in (part, home, positions, before))
    visible = ((part == part[:, None]) | (part == home[:, None])).tril()  # own part, own prompt
    # added to the scores (0 or −inf), a float mask reads alike in eager, SDPA and flex attention
    bias = torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, -math.inf)
    return torch.cat(ids), positions, bias, before, [span[j] for j in prompt_of]

def token_logprobs(lm_head: nn.Module, h: Tensor, targets: Tensor, temperature: float,
                   chunk: int = 256) -> Tensor:
    """log softmax(lm_head(h) / T)[targets] in fp32, checkpointed per chunk. (M, H), (M,) -> (M,)"""
    def logprobs(hc: Tensor, yc: Tensor) -> Tensor:
        return -nn.functional.cross_entropy(lm_head(hc).float() / temperature, yc, reduction="none")
    return torch.cat([torch.utils.checkpoint.checkpoint(logprobs, hc, yc, use_reentrant=False)
                      for hc, yc in zip(h.split(chunk), targets.split(chunk))])

def sequence_logprobs(model: PreTrainedModel, prompts: list[Tensor], prompt_of: list[int],
                      response_ids: Tensor, response_mask: Tensor, temperature: float,
                      dtype: str = "float32") -> tuple[Tensor, Tensor]:
    """log π(y_t|x, y_<t) (n, T) at logits / T in one packed forward; log Z's input (n, H)."""
    if "flash" in str(model.config._attn_implementation):  # it would read the mask as padding
        die("the packed forward needs eager, sdpa or flex attention: load with one of them")
    mask = response_mask.bool()
    ids, pos, bias, before, spans = pack(prompts, prompt_of, response_ids, mask.sum(-1).tolist())
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=dtype == "bfloat16",
                        cache_enabled=False):  # cached bf16 weights would outlive each layer
        h = model.base_model(input_ids=ids[None], position_ids=pos[None],
                             attention_mask=bias[None, None]).last_hidden_state[0].float()
        flat = token_logprobs(model.get_output_embeddings(), h[before], response_ids[mask],
                              temperature)
    logp = torch.zeros(mask.shape, device=flat.device).masked_scatter(mask, flat)
    return logp, torch.stack([h[a:b].mean(0) for a, b in spans])

def micro_batches(rows: Tensor, r: Rollouts, cfg: Config) -> list[Tensor]:
    """The rows, in order, cut into forwards of at most --micro-tokens (each with its prompt)."""
    chunks, tokens = [[]], 0
    for row, length in zip(rows.tolist(), r.mask[rows].sum(-1).long().tolist()):
        cost = length + len(r.prompts[row // cfg.group_size])
        if chunks[-1] and tokens + cost > cfg.micro_tokens:
            chunks, tokens = chunks + [[]], 0
        chunks[-1].append(row)
        tokens += cost
    return [torch.tensor(c) for c in chunks]

@torch.no_grad()
def score(model: PreTrainedModel, r: Rollouts, cfg: Config) -> Tensor:
    """Per-token log-probs (N, T) of the rollouts under a model, without a graph."""
    model.eval()
    return torch.cat([sequence_logprobs(model, r.prompts, (rows // cfg.group_size).tolist(),
                                        r.response_ids[rows], r.mask[rows], cfg.temperature,
                                        cfg.dtype)[0]
                      for rows in micro_batches(torch.arange(len(r.mask)), r, cfg)])

def reference_logprobs(model: PreTrainedModel, ref: PreTrainedModel | None, r: Rollouts,
                       cfg: Config) -> Tensor:
    """log π_ref per token (N, T): the frozen copy, or with LoRA the policy with adapters off."""
    if ref is not None:
        return score(ref, r, cfg)
    model.disable_adapters()
    try:
        return score(model, r, cfg)
    finally:  # a caller that catches an error must not keep a policy without its adapters
        model.enable_adapters()
# ----------------------------------------------------------------------------- task and reward
MATH_INSTRUCTION = "\nPut the final answer in \\boxed{}."
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")  # one level of nested {} allowed

def format_prompt(tokenizer, question: str) -> str:
    """The chat template when the tokenizer has one, else a plain 'Question/Answer' format."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"

def arith_dataset(n: int, seed: int) -> Dataset:
    """Procedural arithmetic with exact integer answers: 'What is 17 - 9?' -> '8'."""
    rng, qs, ans = random.Random(seed), [], []
    for _ in range(n):
        op = rng.choice("+-*")
        lo, hi = (2, 12) if op == "*" else (1, 30)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        qs.append(f"What is {a} {op} {b}?")
        ans.append(str({"+": a + b, "-": a - b, "*": a * b}[op]))
    return Dataset.from_dict({"question": qs, "answer": ans})

def load_data(cfg: Config) -> tuple[Dataset, Dataset, RewardFn]:
    """Train and held-out prompts (columns question, answer) and the reward function."""
    train, test = (load_file_dataset(cfg.dataset, cfg.seed) if cfg.dataset != "arith"
                   else (arith_dataset(5000, cfg.seed), arith_dataset(500, cfg.seed + 1)))
    instruct = lambda r: {"question": r["question"] + MATH_INSTRUCTION}
    return train.map(instruct), test.map(instruct), math_reward

def parse_number(s: str) -> Fraction | None:
    """Exactly one number in s ('1,234', '-3.50', '3/4', '\\frac{3}{4}'), else None."""
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", s)
    found = NUMBER.findall(s.replace("$", "").replace(" ", ""))
    return Fraction(found[0].replace(",", "")) if len(found) == 1 else None

def extract_answer(text: str) -> Fraction | None:
    """The final answer: the last \\boxed{}, else the number after '####', else the last one."""
    if boxed := BOXED.findall(text):
        return parse_number(boxed[-1])
    if "####" in text:
        return parse_number(text.split("####")[-1].strip().split("\n")[0])
    return parse_number((NUMBER.findall(text) or [""])[-1])

def math_reward(completion: str, answer: str) -> float:
    """r(x, y): 1.0 if the final answers of completion and reference are equal, else 0.0."""
    got = extract_answer(completion)
    return float(got is not None and got == extract_answer(str(answer)))

def score_completions(reward_fn: RewardFn, completions: list[str], answers: list[str]) -> Tensor:
    """Rewards (N,); a reward function that fails or returns a non-finite number scores 0."""
    rewards = torch.zeros(len(completions))  # a failure stays 0
    for i, (c, a) in enumerate(zip(completions, answers)):
        try:
            r = float(reward_fn(c, a))
            if not math.isfinite(r):
                raise ValueError(f"non-finite reward {r}")
            rewards[i] = r
        except Exception as e:  # noqa: BLE001 -- user code: any failure scores 0, with a warning
            warnings.warn(f"reward_fn failed, scoring 0: {type(e).__name__}: {e}", stacklevel=2)
    return rewards
# ----------------------------------------------------------------------------- update and loop
def rollout(model: PreTrainedModel, tokenizer, rows: Dataset, reward_fn: RewardFn, cfg: Config,
            eos_ids: list[int], n: int, generator: torch.Generator | None = None):
    """n responses to each question of rows and their rewards: (Rollouts, (N,))."""
    questions = [format_prompt(tokenizer, q) for q in rows["question"]]
    r = sample(model, tokenizer, questions, cfg, eos_ids, n, generator)
    answers = [a for a in rows["answer"] for _ in range(n)]
    return r, score_completions(reward_fn, r.completions, answers)

def make_optimizer(cfg: Config, model: PreTrainedModel, logz: LogZ | None):
    """AdamW as in the paper (weight decay 0.1 on matrices, 10 warm-up steps), log Z_φ at its lr."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "lr": cfg.lr},
              {"params": [p for p in trainable if p.dim() < 2], "lr": cfg.lr, "weight_decay": 0}]
    groups += [{"params": list(logz.parameters()), "lr": cfg.logz_lr}] if logz is not None else []
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))

def update(cfg: Config, model: PreTrainedModel, logz: LogZ | None, opt, sched, r: Rollouts,
           adv: Tensor, ref_logp: Tensor, old_logp: Tensor | None) -> dict[str, float]:
    """--mini-batches optimiser steps on a rollout batch; old_logp None: π_old = π_θ detached."""
    mask, n, G, stats = r.mask, cfg.mini_batches, cfg.group_size, {}
    params = [p for g in opt.param_groups for p in g["params"]]
    old = r.sample_logp if old_logp is None else old_logp  # π_old for the closed-form log Z
    group_z = group_log_z(old, ref_logp, mask, adv, G, cfg.beta, cfg.length_norm)
    model.train()
    for mb in (torch.randperm(len(adv)) if n > 1 else torch.arange(len(adv))).tensor_split(n):
        for mi in micro_batches(mb, r, cfg):
            logp, prompt_repr = sequence_logprobs(model, r.prompts, (mi // G).tolist(),
                                                  r.response_ids[mi], mask[mi], cfg.temperature,
                                                  cfg.dtype)
            old, ref = (logp.detach() if old_logp is None else old_logp[mi]), ref_logp[mi]
            if cfg.algo == "grpo":
                loss, st = grpo_loss(logp, old, ref, mask[mi], adv[mi], kl_coef=cfg.kl_coef)
                frac = (mask[mi].sum() / mask[mb].sum()).item()  # token-mean over the mini-batch
            else:
                log_z = group_z[mi]  # log Z(x) (n,): equal for the responses of one prompt
                if logz is not None:
                    log_z = logz(prompt_repr)
                loss, st = flowrl_loss(logp, old, ref, mask[mi], log_z, adv[mi], cfg.beta,
                                       cfg.clip_low, cfg.clip_high, cfg.length_norm)
                frac = len(mi) / len(mb)  # sequence-mean over the mini-batch
            (loss * frac).backward()
            for k, v in (st | logprob_stats(logp, old, ref, mask[mi])).items():
                stats[k] = stats.get(k, 0.0) + v * frac / n
        grad_norm = float(nn.utils.clip_grad_norm_(params, 1.0))
        if not math.isfinite(grad_norm):  # stop before it corrupts the weights
            die(f"the gradient norm is {grad_norm}; lower --lr or --beta")
        stats["grad_norm"] = stats.get("grad_norm", 0.0) + grad_norm / n
        opt.step()
        sched.step()
        opt.zero_grad()
    return stats

def train(cfg: Config, model: PreTrainedModel, tokenizer, train_ds: Dataset, eval_ds: Dataset,
          reward_fn: RewardFn, on_step: Callable[[int, PreTrainedModel], dict] | None = None,
          ref: PreTrainedModel | None = None, state: dict | None = None) -> list[dict]:
    """The loop; SIGINT/SIGTERM: finish the step, save, exit 128 + signal (twice: exit at once)."""
    device, G = model.device, cfg.group_size
    dtype, why = pick_dtype(device, cfg.dtype)
    cfg = replace(cfg, dtype=dtype)  # auto resolved: a resumed run keeps this precision
    tqdm.write(f"{cfg.algo} on {device.type} in {cfg.dtype} ({why})", sys.stderr)
    ref = copy.deepcopy(model).requires_grad_(False) if ref is None and not cfg.lora_r else ref
    with torch.random.fork_rng(devices=[]):  # own seed: GRPO and FlowRL sample alike
        torch.manual_seed(cfg.seed)
        mlp = cfg.algo == "flowrl" and cfg.log_z == "mlp"
        logz = LogZ(model.config.hidden_size).to(device) if mlp else None
    opt, sched = make_optimizer(cfg, model, logz)
    opt.zero_grad()  # gradients the model came with (a warm start's) stay out of step 1
    if cfg.grad_ckpt:  # layers recompute their activations in the backward pass
        model.activation_checkpointing_enable({"use_reentrant": False})
    eos_ids = eos_token_ids(model, tokenizer)
    order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(cfg.seed))
    parts, done, history = {"optimizer": opt, "scheduler": sched, "logz": logz}, 0, []
    if state is not None:
        for name in parts.keys() & state.keys():  # log Z_φ only where the run has one
            parts[name].load_state_dict(state[name])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type in state["rng"] and device.type != "cpu":  # CUDA's or MPS's generator
            torch.get_device_module(device).set_rng_state(state["rng"][device.type])
        done, history = state["step"], state["history"]
    elif cfg.eval_every:  # held-out numbers before any update, logged as step 0
        history.append({"step": 0, **evaluate(model, tokenizer, eval_ds, reward_fn, cfg, eos_ids)})
    stop: list[int] = []
    def on_signal(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if stop:
            print(f"\n{name} again: stopped at once", file=sys.stderr)
            raise SystemExit(128 + signum)
        stop.append(signum)
        tqdm.write(f"{name}: finishing this step, then saving (again: stop at once)", sys.stderr)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for step in tqdm(range(done + 1, cfg.steps + 1), desc=cfg.algo, disable=None):
            t0 = time.perf_counter()
            picks = range((step - 1) * cfg.prompts, step * cfg.prompts)
            rows = train_ds.select([int(order[i % len(order)]) for i in picks])
            r, rewards = rollout(model, tokenizer, rows, reward_fn, cfg, eos_ids, G)
            adv = group_normalize(rewards, G).to(device)  # r̂ (N,)
            t1 = time.perf_counter()
            ref_logp = reference_logprobs(model, ref, r, cfg)
            old_logp = None  # π_old = π_θ: the sampler's log-probs where they agree (fp32)
            if cfg.mini_batches > 1 or (cfg.log_z == "group" and cfg.dtype == "bfloat16"):
                old_logp = score(model, r, cfg)
            t2 = time.perf_counter()
            stats = update(cfg, model, logz, opt, sched, r, adv, ref_logp, old_logp)
            lens = r.mask.sum(-1)
            m = {"step": step, "reward": rewards.mean().item(),
                 "accuracy": (rewards >= 1.0).float().mean().item(), **stats,
                 "response_len": lens.mean().item(), "truncated": r.truncated.float().mean().item(),
                 "distinct": distinct_answers(r.completions, G), "gen_tokens": int(lens.sum()),
                 "gen_s": t1 - t0, "ref_s": t2 - t1, "update_s": time.perf_counter() - t2}
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                m |= evaluate(model, tokenizer, eval_ds, reward_fn, cfg, eos_ids)
            m |= on_step(step, model) if on_step else {}
            history.append(m)
            os.makedirs(cfg.out, exist_ok=True)  # only once a step is done
            if step == 1 and state is None:  # --overwrite: the old run is gone
                for old in ("checkpoint", "checkpoint.old"):
                    shutil.rmtree(os.path.join(cfg.out, old), ignore_errors=True)
            metrics = os.path.join(cfg.out, "metrics.jsonl")
            with open(metrics + ".tmp", "w") as f:
                f.writelines(json.dumps(h) + "\n" for h in history)
            os.replace(metrics + ".tmp", metrics)  # a stop mid-write keeps the last whole file
            if stop or step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint(cfg, model, tokenizer, parts, history)
            if stop:
                tqdm.write(f"stopped by {signal.Signals(stop[0]).name}: saved step {step} to "
                           f"{cfg.out}/checkpoint (continue with --resume)", sys.stderr)
                raise SystemExit(128 + stop[0])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return history
# ----------------------------------------------------------------------------- evaluation
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)

def distinct_answers(completions: list[str], group_size: int) -> float:
    """Mean number of distinct final answers per group of responses."""
    groups = [completions[i:i + group_size] for i in range(0, len(completions), group_size)]
    return statistics.mean(len({extract_answer(c) for c in g} - {None}) for g in groups)

def evaluate(model: PreTrainedModel, tokenizer, eval_ds: Dataset, reward_fn: RewardFn,
             cfg: Config, eos_ids: list[int]) -> dict[str, float]:
    """Accuracy, pass@k, distinct answers of k samples per held-out prompt; own seeded generator."""
    rows, k = eval_ds.select(range(min(cfg.eval_prompts, len(eval_ds)))), cfg.eval_k
    generator = torch.Generator(model.device).manual_seed(cfg.seed)
    r, rewards = rollout(model, tokenizer, rows, reward_fn, cfg, eos_ids, k, generator)
    correct = (rewards.view(-1, k) >= 1.0).sum(1).tolist()  # per prompt
    return {"eval_acc": (rewards >= 1.0).float().mean().item(),
            "eval_distinct": distinct_answers(r.completions, k),
            **{f"eval_pass@{j}": statistics.mean(pass_at_k(k, c, j) for c in correct)
               for j in [2 ** i for i in range(k.bit_length())]}}

def summarize(history: list[dict], device: torch.device) -> str:
    """Rewards, last evaluation, median step by phase (from step 2), tokens/s, peak memory."""
    steps = [h for h in history if "reward" in h]
    timed = steps[1:] or steps  # step 1 pays one-off warm-up costs
    med = {k: statistics.median(h[k] for h in timed) for k in ("gen_s", "ref_s", "update_s")}
    tok_s = sum(h["gen_tokens"] for h in timed) / sum(h["gen_s"] for h in timed)
    unit = 2**30 if sys.platform == "darwin" else 2**20  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    evals = "  ".join(f"{k[5:]} {v:.3f}" for k, v in history[-1].items() if k[:5] == "eval_")
    return (f"reward {steps[0]['reward']:.3f} -> {steps[-1]['reward']:.3f} (steps "
            f"{steps[0]['step']}-{steps[-1]['step']}); held-out at step {history[-1]['step']}: "
            f"{evals}\nmedian step {sum(med.values()):.2f}s: " + ", ".join(f"{k} {v:.2f}s" for k, v
            in med.items()) + f"; {tok_s:.0f} generated tokens/s; peak memory {peak:.2f} GiB")
# ----------------------------------------------------------------------------- flags and main
def main(argv: list[str] | None = None, defaults: dict | None = None,
         load: Callable[[Config], tuple] | None = None) -> list[dict]:
    """Flags, model, data, train, summary -> metrics; load(cfg) replaces load_model, load_data."""
    cfg = parse_args(argv, defaults)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    disable_progress_bars()
    torch.manual_seed(cfg.seed)
    if load is None:  # the data first: a bad file fails before a model loads
        data = load_data(cfg)
        load = lambda c: (*load_model(c.model), *data)
    model, tokenizer, *data = load(cfg)
    model.to(pick_device(cfg.device))
    if cfg.lora_r and not cfg.resume:
        add_lora(model, cfg.lora_r, cfg.lora_alpha)
    model, ref, state = load_checkpoint(cfg, model) if cfg.resume else (model, None, None)
    history = train(cfg, model, tokenizer, *data, ref=ref, state=state)
    print(summarize(history, model.device))
    print(f"metrics: {cfg.out}/metrics.jsonl  checkpoint: {cfg.out}/checkpoint")
    return history

def die(msg: str):
    """One clear line on stderr (a library's error: its first line), exit status 1, no traceback."""
    raise SystemExit(f"error: {msg}".splitlines()[0])

def parse_args(argv: list[str] | None = None, defaults: dict | None = None) -> Config:
    """Flags into a checked Config; with --resume the saved one, but for --out and --steps."""
    defaults = defaults or {}
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                argument_default=argparse.SUPPRESS)  # given flags only
    p.error = lambda message: die(f"{message}; see --help")
    choices = {"algo": ["flowrl", "grpo"], "log_z": ["mlp", "group"],
               "device": ["cuda", "mps", "cpu"], "dtype": ["auto", "float32", "bfloat16"]}
    for f in fields(Config):
        kw = ({"action": argparse.BooleanOptionalAction} if f.type is bool
              else {"type": f.type, "choices": choices.get(f.name)})
        shown = f.metadata["help"]
        shown += "" if "(default:" in shown else f" (default: {defaults.get(f.name, f.default)})"
        p.add_argument("--" + f.name.replace("_", "-"), help=shown, **kw)
    given = vars(p.parse_args(argv))
    cfg = Config(**defaults | given)
    if cfg.resume:
        if other := sorted(given.keys() - {"resume", "out", "steps"}):
            die(f"--resume continues the run in {cfg.out} with its own flags; only --steps may "
                f"change: drop --{' --'.join(other)}".replace("_", "-"))
        ckpt = os.path.join(cfg.out, "checkpoint")
        if os.path.isdir(ckpt + ".old") and not os.path.isdir(ckpt):  # a stop between renames
            os.replace(ckpt + ".old", ckpt)
        pt = os.path.join(ckpt, "trainer_state.pt")
        saved = torch.load(pt, "cpu", weights_only=True, mmap=True) if os.path.isfile(pt) else {}
        if "history" not in saved:  # none, or saved before the checkpoint held the metrics
            die(f"--resume: no run found in --out {cfg.out} ({pt} is missing or from an older "
                "flowrl_min.py); start one without it")
        cfg = Config(**saved["config"] | {"resume": True, "steps": cfg.steps, "out": cfg.out})
    if cfg.lr is None:
        cfg.lr = 2e-5 if cfg.lora_r else 1e-6
    cfg.logz_lr, cfg.lora_alpha = cfg.logz_lr or cfg.lr, cfg.lora_alpha or 2.0 * cfg.lora_r
    for f in fields(Config):  # a float's least is 0, exclusive; NaN fails >= too
        value, low = getattr(cfg, f.name), f.metadata["least"]
        if low is not None and (not value >= low or (isinstance(value, float) and value == 0)):
            die(f"--{f.name.replace('_', '-')} {value}: must be "
                + ("positive" if isinstance(value, float) else f"at least {low}"))
    if cfg.mini_batches > (batch := cfg.prompts * cfg.group_size):  # --prompts × --group-size
        die(f"--mini-batches {cfg.mini_batches}: more than a batch's {batch} responses")
    if os.path.isfile(cfg.out) or (os.path.exists(os.path.join(cfg.out, "metrics.jsonl"))
                                   and not (cfg.overwrite or cfg.resume)):
        die(f"--out {cfg.out} is a file or holds a run; pass another --out, --overwrite, --resume")
    return cfg

def pick_device(name: str) -> torch.device:
    """--device, or the first of cuda, mps and cpu that is available."""
    found = [d for d, m in [("cuda", torch.cuda), ("mps", torch.backends.mps)] if m.is_available()]
    return torch.device(name or (found + ["cpu"])[0])

def pick_dtype(device: torch.device, dtype: str, cpuinfo: str = "/proc/cpuinfo") -> tuple[str, str]:
    """--dtype and why. auto: bf16 on CUDA capability ≥ 8.0 and CPUs with avx512_bf16/amx_bf16."""
    if dtype != "auto":
        return dtype, "as set"
    native = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu" and os.path.isfile(cpuinfo):  # Linux's CPU flags
        native = bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", pathlib.Path(cpuinfo).read_text()))
    dtype = "bfloat16" if native else "float32"
    return dtype, f"auto: {'' if native else 'no '}native bf16 on this {device.type}"
# ----------------------------------------------------------------------------- models, files
def load_model(name: str) -> tuple[PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """π_θ (fp32, no dropout), tokenizer: a directory, or a hub id (HF_ENDPOINT, proxies, cache)."""
    path = os.path.expanduser(name)
    offline = os.path.isdir(path) or huggingface_hub.is_offline_mode()
    repo = path if os.path.isdir(path) or "/" in name else f"Qwen/{name}"  # Qwen2.5-0.5B: Qwen/…
    if not offline:  # no answer in 5 s: the cache alone, rather than a minute of retries
        try:
            huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=5)
        except Exception:  # noqa: BLE001 -- any network failure means the same here
            offline = True
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(repo, local_files_only=offline,
                                                               padding_side="left")
        model = transformers.AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32,
                                                                  local_files_only=offline)
    except (OSError, ValueError) as e:
        die(f"--model {name}: cannot load {repo} (offline: python toy_tasks.py train): {e}")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    for m in model.modules():  # RL runs without dropout: sampled and trained log-probs agree
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model, tokenizer

def add_lora(model: PreTrainedModel, r: int, alpha: float) -> PreTrainedModel:
    """LoRA adapters (rank r, scale α/r) on every linear layer but the LM head; the base freezes."""
    try:
        from peft import LoraConfig
    except ImportError:
        die("--lora-r needs the peft package: pip install peft")
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
    return model

def eos_token_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """Tokens that end a response: EOS and the chat template's turn end (Qwen2.5: <|im_end|>)."""
    ids = model.generation_config.eos_token_id
    ends = {tokenizer.eos_token_id, *([ids] if isinstance(ids, int) else ids or [])}
    if tokenizer.chat_template:
        turn = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "FLOWRL"}]
        after = tokenizer.apply_chat_template(turn, tokenize=False).split("FLOWRL")[-1]
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        ends |= {t for t in first if getattr(tokenizer.added_tokens_decoder.get(t), "special", 0)}
    return sorted(ends)

def load_file_dataset(path: str, seed: int) -> tuple[Dataset, Dataset]:
    """Train and held-out rows (a fifth, ≤ 100) of a file with question and answer columns."""
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(
        path.rsplit(".", 1)[-1])
    if builder is None or not os.path.isfile(path):
        die(f"--dataset {path}: no such .jsonl, .json, .csv or .parquet file (or use arith)")
    try:
        ds = load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # noqa: BLE001 -- any reader error: one line naming the file
        die(f"--dataset {path}: cannot read it as {builder}: {e}")
    if missing := {"question", "answer"} - set(ds.column_names):
        die(f"--dataset {path}: no column {', '.join(sorted(missing))} (found: "
            f"{', '.join(ds.column_names)}); rename the columns to question and answer")
    # strings, whatever the file held (a column of integers stays int in a map)
    ds = Dataset.from_dict({k: [str(v) for v in ds[k]] for k in ("question", "answer")})
    bad = [a for a in ds["answer"] if extract_answer(a) is None]
    if len(bad) > len(ds) / 2:
        die(f"--dataset {path}: {len(bad)} of {len(ds)} answers hold no number (e.g. "
            f"{bad[0][-60:]!r}); math_reward needs a number, '#### N' or \\boxed{{N}} at the end")
    if len(ds) < 5:
        return ds, ds
    split = ds.train_test_split(test_size=min(100, len(ds) // 5), seed=seed)
    return split["train"], split["test"]

def save_checkpoint(cfg: Config, model: PreTrainedModel, tokenizer, parts: dict, history: list):
    """<out>/checkpoint: weights or adapters, tokenizer, trainer state, metrics; renamed whole."""
    final = os.path.join(cfg.out, "checkpoint")
    shutil.rmtree(final + ".tmp", ignore_errors=True)
    model.save_pretrained(final + ".tmp")
    tokenizer.save_pretrained(final + ".tmp")
    rng = {"cpu": torch.get_rng_state()}
    if model.device.type != "cpu":
        rng[model.device.type] = torch.get_device_module(model.device).get_rng_state()
    state = {k: v.state_dict() for k, v in parts.items() if v is not None}
    state |= {"config": asdict(cfg), "step": history[-1]["step"], "history": history, "rng": rng}
    torch.save(state, os.path.join(final + ".tmp", "trainer_state.pt"))
    if os.path.isdir(final):
        shutil.rmtree(final + ".old", ignore_errors=True)
        os.replace(final, final + ".old")
    os.replace(final + ".tmp", final)
    shutil.rmtree(final + ".old", ignore_errors=True)

def load_checkpoint(cfg: Config, model: PreTrainedModel):
    """--resume: (policy from <out>/checkpoint, π_ref = model as loaded or None, trainer state)."""
    ckpt = os.path.join(cfg.out, "checkpoint")
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), "cpu", weights_only=True)
    if cfg.lora_r:
        model.load_adapter(ckpt, adapter_name="default", is_trainable=True)
        return model, None, state
    return load_model(ckpt)[0].to(model.device), model, state

if __name__ == "__main__":
    main()
