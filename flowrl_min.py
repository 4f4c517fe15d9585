"""FlowRL, minimal: reward-distribution matching RL for LLMs (Zhu et al., arXiv 2509.15207).

GRPO and PPO maximise reward and collapse onto its dominant mode. FlowRL instead matches the target
    p*(y|x) ∝ exp(β·r̂(x,y)) · π_ref(y|x)
by minimising, over the G responses y_i sampled for each prompt x (trajectory balance, Eq. 5-6),
    δ_i = log Z_φ(x) + (1/|y_i|) log π_θ(y_i|x) − β·r̂_i − (1/|y_i|) log π_ref(y_i|x)
    L   = mean_i  w_i · δ_i²,       w_i = clip(π_θ(y_i|x) / π_old(y_i|x), 1 − ε, 1 + ε), detached
where log π(y|x) = Σ_t log π(y_t | x, y_<t). The choices made here (README: variants):
 1. r̂ is the reward normalised within its group of G (mean 0, unbiased std), as in GRPO.
 2. log Z_φ is a 3-layer MLP on the mean of the policy's last hidden states over the prompt;
    its gradient flows into the LM. β = 15, ε = 0.2 (the official code has no upper clip).
 3. --algo grpo, the baseline, shares everything but the loss: veRL's clipped surrogate with its
    dual clip and k3 KL to π_ref, averaged over tokens.
 4. Samples are drawn at --temperature without top-p, from the π_θ whose log-probs are trained.

    pip install -r requirements.txt
    python flowrl_min.py --model Qwen2.5-0.5B     # a hub id or a local dir, on `arith`
    python flowrl_min.py --model DIR --algo grpo  # the baseline, everything else identical
    python toy_tasks.py train                     # offline: a tiny model, about 10 s on a CPU
    python toy_tasks.py                           # FlowRL keeps every mode, GRPO collapses
    pytest -q
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
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
    """Ctrl-C or SIGTERM before a step finished: one line, exit status 128 + signal number."""
    name = signal.Signals(signum).name
    print(f"\nstopped by {name} before the first step finished: nothing to save", file=sys.stderr)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    # torch and transformers take seconds to import: a Ctrl-C meanwhile is one line
    signal.signal(signal.SIGINT, exit_quietly)
    signal.signal(signal.SIGTERM, exit_quietly)
    # held until the imports are done: raised inside torch's C++ import code, it would abort
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])

import datasets
import torch
import transformers
from datasets import Dataset, load_dataset
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

if __name__ == "__main__" and hasattr(signal, "pthread_sigmask"):
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])

RewardFn = Callable[[str, str], float]
# the default --lr with --lora-r (README: how it was chosen)
LORA_LR = 2e-5


# ----------------------------------------------------------------------------- config
def flag(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = flag("Qwen2.5-0.5B", "hub id (bare 'Qwen2.5-0.5B': Qwen/...) or local directory")
    dataset: str = flag("arith", "arith, or a .jsonl/.json/.csv/.parquet file (question, answer)")
    algo: str = flag("flowrl", "FlowRL, or the GRPO baseline with everything else identical")
    steps: int = flag(50, "rollout batches")
    prompts: int = flag(4, "prompts per rollout batch")
    group_size: int = flag(8, "G: responses sampled per prompt")
    max_new_tokens: int = flag(128, "response length limit")
    temperature: float = flag(1.0, "sampling temperature; log-probs use logits / temperature too")
    top_p: float = flag(1.0, "nucleus sampling; keep 1.0: samples from the π being trained")
    beta: float = flag(15.0, "β: reward temperature of the target distribution")
    clip_low: float = flag(0.8, "lower clip of the importance weight w (paper: 1-ε)")
    clip_high: float = flag(1.2, "upper clip of w (paper: 1+ε; official code: inf; veRL: 10)")
    length_norm: bool = flag(True, "divide log-prob sums by |y| (--no-length-norm: the ablation)")
    clip_eps: float = flag(0.2, "GRPO ratio clip ε")
    kl_coef: float = flag(0.001, "GRPO k3 KL-to-reference coefficient")
    clip_c: float = flag(3.0, "GRPO dual clip: for Â < 0 a token's loss is at most −c·Â")
    lr: float = flag(None, f"policy learning rate (default: 1e-6; {LORA_LR} with --lora-r)")
    logz_lr: float = flag(None, "log Z_φ learning rate (default: the policy's)")
    weight_decay: float = flag(0.1, "AdamW weight decay")
    warmup_steps: int = flag(10, "linear learning-rate warm-up, in optimiser steps")
    epochs: int = flag(1, "passes over each rollout batch")
    mini_batches: int = flag(1, "optimiser steps per pass (w ≠ 1 from the second one on)")
    micro_batch: int = flag(32, "responses per packed forward and backward (accumulated)")
    micro_tokens: int = flag(512, "tokens per packed forward and backward, prompts included")
    grad_ckpt: bool = flag(True, "activation checkpointing: less memory, one more forward")
    lora_r: int = flag(0, "LoRA rank, 0 for full fine-tuning; π_ref is then the base model "
                       "with the adapters off (needs: pip install peft)")
    lora_alpha: float = flag(None, "LoRA α: the adapters' output is scaled by α/r (default: 2·r)")
    eval_every: int = flag(25, "evaluate every N steps (0: only at the end)")
    eval_prompts: int = flag(16, "held-out prompts per evaluation")
    eval_k: int = flag(8, "samples per held-out prompt (mean accuracy and pass@k)")
    out: str = flag("out", "output directory: metrics.jsonl and checkpoint/")
    overwrite: bool = flag(False, "replace a run already in --out")
    resume: bool = flag(False, "continue the run in --out from its checkpoint")
    save_every: int = flag(0, "also save the checkpoint every N steps (0: at the end)")
    seed: int = flag(0, "seed for weights, data order and sampling")
    check_batch: str = flag("", "a torch.save'd batch: print our losses and gradients, exit")


# ----------------------------------------------------------------------------- the objective
def group_normalize(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """r̂_i = (r_i − mean of its group) / (std of its group + eps), unbiased std; equal rewards
    give 0. rewards (N,), the G rows of a prompt adjacent -> (N,)"""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size must be >= 2 and divide {rewards.numel()}, got {group_size}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    g = rewards.view(-1, group_size).to(dtype)  # (N/G, G)
    centred = g - g.mean(1, keepdim=True)
    return (centred / (g.std(1, keepdim=True) + eps)).view(-1)


class LogZ(nn.Module):
    """log Z_φ(x): a 3-layer MLP on the mean of the policy's last hidden states over the prompt
    (from the forward that gives log π_θ; not detached, so its gradient reaches the LM).
    (N, H) -> (N,)"""

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        layers = []
        for _ in range(2):
            layers += [nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden)]
            layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 1))

    def forward(self, prompt_repr: Tensor) -> Tensor:
        return self.net(prompt_repr.float()).squeeze(-1)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x where mask is 1 (over dim, or all); masked-out values, even inf, never leak."""
    x = torch.where(mask.bool(), x, 0.0)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def sequence_logp(logp: Tensor, mask: Tensor, length_norm: bool) -> Tensor:
    """(1/|y|) Σ_t log π(y_t|x, y_<t) per response, or the sum without 1/|y|. (N, T) -> (N,)"""
    if length_norm:
        return masked_mean(logp, mask, -1)
    return torch.where(mask.bool(), logp, 0.0).sum(-1)


def flowrl_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, log_z: Tensor,
                adv: Tensor, beta: float = 15.0, clip_low: float = 0.8, clip_high: float = 1.2,
                length_norm: bool = True) -> tuple[Tensor, dict[str, float]]:
    """L_FlowRL = mean_i w_i · δ_i². logp, old_logp, ref_logp: log π_θ, π_old, π_ref per token
    (N, T); mask: 1.0 on response tokens (N, T); log_z: log Z_φ(x_i) (N,); adv: r̂_i (N,)."""
    logp_seq = sequence_logp(logp, mask, length_norm)  # (N,)
    ref_seq = sequence_logp(ref_logp, mask, length_norm)  # (N,)
    delta = log_z + logp_seq - beta * adv - ref_seq  # δ_i (N,)
    # w_i: the sequence's importance ratio π_θ / π_old, clipped, without gradient
    log_w = torch.where(mask.bool(), logp - old_logp, 0.0).sum(-1).detach()  # (N,)
    w = log_w.exp().clamp(clip_low, clip_high)  # (N,)
    loss = (w * delta.pow(2)).mean()
    stats = {"loss": loss.item(), "log_z": log_z.mean().item(), "w": w.mean().item(),
             "log_reward": (beta * adv).mean().item(), "delta_abs": delta.abs().mean().item()}
    return loss, stats


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, adv: Tensor,
              clip_eps: float = 0.2, kl_coef: float = 0.001,
              clip_c: float = 3.0) -> tuple[Tensor, dict[str, float]]:
    """GRPO as veRL has it: the clipped surrogate with Â_i = r̂_i on every token, dual-clipped
    at −c·Â for Â < 0, plus kl_coef · k3 KL to π_ref clamped to [−10, 10], averaged over all
    response tokens; log-ratios clamped to [−20, 20] before exp. The k3 clamp also acts
    on-policy, on sampled tokens with π_ref/π_θ > 13.5. Shapes as in flowrl_loss."""
    log_ratio = torch.where(mask.bool(), logp - old_logp, 0.0).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)  # ρ (N, T)
    a = adv.unsqueeze(-1)  # (N, 1)
    clipped = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    # dual clip: for a negative advantage the loss of a token is at most −c·Â
    dual = torch.minimum(clipped, -a * clip_c)
    surrogate = torch.where(a < 0, dual, clipped)
    log_r = torch.where(mask.bool(), ref_logp - logp, 0.0).clamp(-20.0, 20.0)
    # k3 estimator of KL(π_θ ‖ π_ref) per token
    kl = (torch.exp(log_r) - log_r - 1).clamp(-10.0, 10.0)
    loss = masked_mean(surrogate + kl_coef * kl, mask)
    is_clipped = ((ratio - 1).abs() > clip_eps).float()
    stats = {"loss": loss.item(), "kl": masked_mean(kl, mask).item(),
             "clipfrac": masked_mean(is_clipped, mask).item()}
    return loss, stats


@torch.no_grad()
def logprob_stats(logp: Tensor, old_logp: Tensor, ref_logp: Tensor,
                  mask: Tensor) -> dict[str, float]:
    """What both losses report: mean log π_θ, π_old, π_ref per token, and k1 KL estimates."""
    return {"logp": masked_mean(logp, mask).item(), "old_logp": masked_mean(old_logp, mask).item(),
            "ref_logp": masked_mean(ref_logp, mask).item(),
            "ppo_kl": masked_mean(old_logp - logp, mask).item(),
            "ref_kl": masked_mean(ref_logp - logp, mask).item()}


# ----------------------------------------------------------------------------- sampling
@dataclass
class Rollouts:
    prompts: list[Tensor]  # token ids of each prompt, unpadded (P_j,)
    response_ids: Tensor  # (N, T): rows j·G .. j·G+G−1 answer prompt j
    mask: Tensor  # (N, T) float: 1 on each generated token up to and with the first EOS
    completions: list[str]  # N decoded responses
    truncated: Tensor  # (N,) bool: no EOS within max_new_tokens
    sample_logp: Tensor  # (N, T): log π_θ(y_t) as the sampler computed it


def response_mask(response_ids: Tensor, eos_ids: list[int]) -> Tensor:
    """1 on each generated token up to and including the first EOS, then 0. (N, T) -> (N, T)"""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


def next_token(logits: Tensor, temperature: float, top_p: float) -> tuple[Tensor, Tensor]:
    """y_t ~ softmax(logits / T), renormalised over the nucleus (the likeliest tokens whose mass
    reaches top_p) when top_p < 1. logits (A, V) -> tokens (A,) and their log-probs under
    softmax(logits / T) (A,), the distribution the trainer's log-probs describe."""
    probs = torch.softmax(logits.float() / temperature, -1)  # (A, V)
    nucleus = probs
    if top_p < 1.0:
        p_sorted, order = probs.sort(-1, descending=True)
        # a token stays while the mass of the tokens ranked above it is below top_p
        p_sorted[p_sorted.cumsum(-1) - p_sorted >= top_p] = 0.0
        nucleus = torch.zeros_like(probs).scatter_(-1, order, p_sorted)
    # inverse CDF: the first token whose cumulative mass exceeds u·total, u ~ U[0, 1); a float32
    # u < 1 − 2⁻²⁴ keeps u·total below the total, and a zero-mass token is never the first
    cdf = nucleus.double().cumsum(-1)  # (A, V)
    u = torch.rand(len(cdf), 1, device=cdf.device).double() * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()


def sample(model: PreTrainedModel, tokenizer, prompts: list[str], cfg: Config,
           eos_ids: list[int], n: int) -> Rollouts:
    """n responses per prompt, a token per step with a KV cache. Each prompt is prefilled once
    and its cache copied n times; a row that emits EOS leaves the batch and costs nothing."""
    device = model.device
    enc = tokenizer(prompts, return_tensors="pt", padding=True,
                    add_special_tokens=not tokenizer.chat_template)
    ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # left-padded
    N, T = len(prompts) * n, cfg.max_new_tokens
    eos = torch.tensor(eos_ids, device=device)
    resp = torch.full((N, T), tokenizer.pad_token_id, device=device)
    logp = torch.zeros(N, T, device=device)
    rows = torch.arange(N, device=device)  # the rows still running
    model.eval()
    cuda = device.type == "cuda"
    with (torch.inference_mode(), onednn_linear(),
          torch.autocast(device.type, torch.bfloat16, enabled=cuda)):
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
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
    # decode exactly what came before EOS: a stray special token must not vanish from the text
    kept = mask.bool() & ~is_eos
    completions = tokenizer.batch_decode([row[k].tolist() for row, k in zip(resp, kept)])
    prompt_ids = [p[m.bool()].to(device) for p, m in zip(enc["input_ids"], enc["attention_mask"])]
    if cfg.lora_r:
        release_memory()
    return Rollouts(prompt_ids, resp, mask.float(), completions, ~is_eos.any(-1), logp)


# ----------------------------------------------------------------------------- log-probs
def pack(prompts: list[Tensor], prompt_of: list[int], response_ids: Tensor, lengths: list[int]):
    """Responses and their prompts as one sequence without padding: each prompt once, before its
    first response, then each response but its last token (nothing is predicted from it). A
    token sees the earlier tokens of its own part and of its prompt, never another response.
    prompt_of[i]: the prompt of response i; response_ids (n, T); lengths: |y_i|. Returns ids,
    position ids (S,), the attention mask (S, S), the packed position whose hidden state
    predicts each response token, in mask order (M,), and each response's prompt span."""
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


def head_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """z = (h Wᵀ + b) / T for one chunk of rows, without a graph. h (c, H) -> (c, V)"""
    z = linear_no_grad(h, weight, bias)
    # at T = 1 the division changes no bit: skip its pass over (c, V)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def head_logprobs(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                  temperature: float) -> tuple[Tensor, Tensor]:
    """One chunk of rows: log softmax(z)[y] and logsumexp(z), in place in z's one (c, V)
    buffer. h (c, H), targets (c,) -> (c,), (c,)"""
    z = head_logits(h, weight, bias, temperature)  # (c, V)
    z_y = z.gather(-1, targets[:, None]).squeeze(-1)
    top = z.amax(-1)
    # z becomes exp(z - max)
    lse = z.sub_(top[:, None]).exp_().sum(-1).log_() + top
    return z_y - lse, lse


class HeadLogProbs(torch.autograd.Function):
    """token_logprobs (without a graph, only the forward runs). The forward keeps h and each
    row's logsumexp, never the logits; the backward recomputes each chunk's logits once and
    adds the chunk's share of ∂/∂W into one (V, H) buffer, so the LM head's transients are one
    (chunk, V) buffer."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                temperature: float, chunk: int) -> Tensor:
        parts = [head_logprobs(h_c, weight, bias, y_c, temperature)
                 for h_c, y_c in zip(h.split(chunk), targets.split(chunk))]
        ctx.save_for_backward(h, weight, bias, targets, torch.cat([lse for _, lse in parts]))
        ctx.temperature, ctx.chunk = temperature, chunk
        return torch.cat([logp for logp, _ in parts])

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight, bias, targets, lse = ctx.saved_tensors
        T = ctx.temperature
        grad_h = torch.empty_like(h)
        grad_w = None
        grad_b = None
        for start in range(0, len(h), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            z = head_logits(h[rows], weight, bias, T)  # (c, V)
            # softmax(z) from the forward's logsumexp
            p = z.sub_(lse[rows, None]).exp_()
            # ∂ log softmax(z / T)[y] / ∂(h Wᵀ + b) = (onehot(y) − p) / T, times the incoming grad
            g = (grad[rows] / T)[:, None]  # (c, 1)
            dz = p.mul_(-g).scatter_add_(-1, targets[rows, None], g)  # (c, V)
            grad_h[rows] = linear_no_grad(dz, weight.t())
            if ctx.needs_input_grad[1] and grad_w is None:
                grad_w = dz.t() @ h[rows]
            elif ctx.needs_input_grad[1]:
                grad_w.addmm_(dz.t(), h[rows])
            if ctx.needs_input_grad[2] and grad_b is None:
                grad_b = dz.sum(0)
            elif ctx.needs_input_grad[2]:
                grad_b += dz.sum(0)
        return grad_h, grad_w, grad_b, None, None, None


def token_logprobs(lm_head: nn.Module, h: Tensor, targets: Tensor, temperature: float,
                   chunk: int = 256) -> Tensor:
    """log softmax(lm_head(h) / T)[target] per row of h, `chunk` rows at a time, so a 150k-token
    vocabulary never holds (M, V) floats; with a graph, HeadLogProbs's backward recomputes each
    chunk's logits. h (M, H), targets (M,) -> (M,)"""
    return HeadLogProbs.apply(h, lm_head.weight, lm_head.bias, targets, temperature, chunk)


def sequence_logprobs(model: PreTrainedModel, prompts: list[Tensor], prompt_of: list[int],
                      response_ids: Tensor, response_mask: Tensor,
                      temperature: float) -> tuple[Tensor, Tensor]:
    """log π(y_t | x, y_<t) of n responses, teacher-forced with logits / temperature, in one
    forward over the packed sequence (pack): no padding anywhere. response_ids, response_mask
    (n, T), each response at least one token. Returns the log-probs (n, T), 0 off the mask,
    and the prompt representation for log Z (n, H): the mean of the last hidden states over
    the response's prompt, from the same forward."""
    mask = response_mask.bool()
    ids, positions, visible, before, spans = pack(prompts, prompt_of, response_ids,
                                                  mask.sum(-1).tolist())
    cuda = ids.device.type == "cuda"
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=cuda):
        out = model.base_model(input_ids=ids[None], position_ids=positions[None],
                               attention_mask=visible[None, None])
        hidden = out.last_hidden_state[0]  # (S, H)
    # the LM head and log-softmax in fp32 (a no-op on the CPU)
    flat = token_logprobs(model.get_output_embeddings(), hidden[before].float(),
                          response_ids[mask], temperature)  # (M,)
    logp = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)
    # each prompt pooled once
    pooled = {(a, b): hidden[a:b].float().mean(0) for a, b in set(spans)}
    return logp, torch.stack([pooled[s] for s in spans])


def micro_batches(rows: Tensor, r: Rollouts, cfg: Config) -> list[Tensor]:
    """The rows of a rollout batch, in order, cut into packed forwards of at most --micro-batch
    responses and --micro-tokens tokens (each prompt once, each response but its last token);
    a longer response gets a forward of its own."""
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
def score(model: PreTrainedModel, r: Rollouts, cfg: Config) -> Tensor:
    """Per-token log-probs (N, T) of the rollouts under a model, without a graph."""
    model.eval()
    out = torch.zeros_like(r.mask)
    with onednn_linear():
        for rows in micro_batches(torch.arange(len(r.mask)), r, cfg):
            prompt_of = (rows // cfg.group_size).tolist()
            out[rows] = sequence_logprobs(model, r.prompts, prompt_of, r.response_ids[rows],
                                          r.mask[rows], cfg.temperature)[0]
    return out


def reference_logprobs(model: PreTrainedModel, ref: PreTrainedModel | None, r: Rollouts,
                       cfg: Config) -> Tensor:
    """log π_ref per token (N, T): the frozen copy, or with LoRA (ref None) the policy's base
    weights, its adapters off for this forward."""
    if ref is not None:
        return score(ref, r, cfg)
    model.disable_adapters()
    try:
        return score(model, r, cfg)
    finally:
        model.enable_adapters()


# ----------------------------------------------------------------------------- task and reward
MATH_INSTRUCTION = "\nPut the final answer in \\boxed{}."
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def format_prompt(tokenizer, question: str) -> str:
    """The chat template when the tokenizer has one, else a plain 'Question/Answer' format."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


def arith_dataset(n: int, seed: int) -> Dataset:
    """Procedural arithmetic with exact integer answers: 'What is 17 - 9?' -> '8'."""
    rng = random.Random(seed)
    qs, ans = [], []
    for _ in range(n):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        else:
            a, b = rng.randint(1, 30), rng.randint(1, 30)
        qs.append(f"What is {a} {op} {b}?")
        ans.append(str({"+": a + b, "-": a - b, "*": a * b}[op]))
    return Dataset.from_dict({"question": qs, "answer": ans})


def load_data(cfg: Config) -> tuple[Dataset, Dataset, RewardFn]:
    """Train and held-out prompts (columns question, answer) and the reward function."""
    if cfg.dataset == "arith":
        train, test = arith_dataset(5000, cfg.seed), arith_dataset(500, cfg.seed + 1)
    else:
        train, test = load_file_dataset(cfg.dataset, cfg.seed)
    instruct = lambda r: {"question": r["question"] + MATH_INSTRUCTION}
    return train.map(instruct), test.map(instruct), math_reward


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
    """Exactly one number in s ('1,234', '-3.50', '3/4', '\\frac{3}{4}'), else None."""
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", s)
    found = NUMBER.findall(s.replace("$", "").replace(" ", ""))
    return Fraction(found[0].replace(",", "")) if len(found) == 1 else None


def extract_answer(text: str) -> Fraction | None:
    """The final answer: the last \\boxed{}, else the number after '####', else the last one."""
    boxed = last_boxed(text)
    if boxed is not None:
        return parse_number(boxed)
    if "####" in text:
        return parse_number(text.split("####")[-1].strip().split("\n")[0])
    found = NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def math_reward(completion: str, answer: str) -> float:
    """r(x, y): 1.0 if the final answer equals the reference numerically, else 0.0."""
    got = extract_answer(completion)
    return float(got is not None and got == parse_number(answer))


def score_completions(reward_fn: RewardFn, completions: list[str],
                      answers: list[str]) -> tuple[Tensor, str]:
    """Rewards (N,); a reward function that raises or returns a non-number scores 0, and the
    first such failure is returned, to be reported."""
    rewards, error = [], ""
    for c, a in zip(completions, answers):
        try:
            r = float(reward_fn(c, a))
            if not math.isfinite(r):
                raise ValueError(f"non-finite reward {r}")
        except Exception as e:  # noqa: BLE001 -- user code: any failure scores 0, reported
            r = 0.0
            error = error or f"{type(e).__name__}: {e} (completion {c!r})"
        rewards.append(r)
    return torch.tensor(rewards), error


# ----------------------------------------------------------------------------- update and loop
def make_optimizer(cfg: Config, model: PreTrainedModel, logz: LogZ | None):
    """AdamW (decay on matrices) with linear warm-up; log Z_φ joins it at its own lr."""
    # with LoRA: the adapters only
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "lr": cfg.lr},
              {"params": [p for p in trainable if p.dim() < 2], "lr": cfg.lr, "weight_decay": 0}]
    if logz is not None:
        groups.append({"params": list(logz.parameters()), "lr": cfg.logz_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)
    warmup = max(1, cfg.warmup_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


def update(cfg: Config, model: PreTrainedModel, logz: LogZ | None, opt, sched, r: Rollouts,
           adv: Tensor, ref_logp: Tensor, old_logp: Tensor | None, step: int) -> dict[str, float]:
    """epochs × mini-batches optimiser steps on one rollout batch, each accumulated over
    micro-batches. old_logp None: one on-policy update, π_old = the detached log π_θ."""
    mask = r.mask  # (N, T)
    model.train()
    stats: dict[str, float] = {}
    n_updates = cfg.epochs * cfg.mini_batches
    params = [p for g in opt.param_groups for p in g["params"]]
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(adv)) if cfg.mini_batches > 1 else torch.arange(len(adv))
        for mb in perm.chunk(cfg.mini_batches):
            for mi in micro_batches(mb, r, cfg):
                prompt_of = (mi // cfg.group_size).tolist()
                logp, prompt_repr = sequence_logprobs(model, r.prompts, prompt_of,
                                                      r.response_ids[mi], mask[mi], cfg.temperature)
                old = logp.detach() if old_logp is None else old_logp[mi]
                if logz is None:
                    loss, st = grpo_loss(logp, old, ref_logp[mi], mask[mi], adv[mi], cfg.clip_eps,
                                         cfg.kl_coef, cfg.clip_c)
                    # token-mean over the mini-batch
                    frac = (mask[mi].sum() / mask[mb].sum().clamp(min=1)).item()
                else:
                    # log Z_φ(x) (n,): equal for the responses of one prompt
                    log_z = logz(prompt_repr)
                    loss, st = flowrl_loss(logp, old, ref_logp[mi], mask[mi], log_z, adv[mi],
                                           cfg.beta, cfg.clip_low, cfg.clip_high, cfg.length_norm)
                    # sequence-mean over the mini-batch
                    frac = len(mi) / len(mb)
                if not math.isfinite(st["loss"]):
                    die(f"step {step}: the loss is {st['loss']} (non-finite); lower --lr or --beta")
                (loss * frac).backward()
                st |= logprob_stats(logp, old, ref_logp[mi], mask[mi])
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + v * frac / n_updates
            grad_norm = float(nn.utils.clip_grad_norm_(params, 1.0))
            # stop before a non-finite step corrupts the weights
            if not math.isfinite(grad_norm):
                die(f"step {step}: the gradient norm is {grad_norm} (non-finite); lower --lr")
            stats["grad_norm"] = stats.get("grad_norm", 0.0) + grad_norm / n_updates
            opt.step()
            sched.step()
            # zeroed, not freed: 2.5 GB of Qwen gradients are not mapped and faulted in afresh
            opt.zero_grad(set_to_none=False)
    release_memory()
    return stats


def train(cfg: Config, model: PreTrainedModel, tokenizer, train_ds: Dataset, eval_ds: Dataset,
          reward_fn: RewardFn, on_step: Callable[[int, PreTrainedModel], dict] | None = None,
          ref: PreTrainedModel | None = None, resume: dict | None = None) -> list[dict]:
    """The loop: sample G responses per prompt, reward them, score π_ref, update π_θ and log Z_φ.
    π_ref: by default a frozen copy of the initial policy; on_step(step, model) may add metrics;
    resume: a checkpoint's trainer state. Writes <out>/metrics.jsonl and <out>/checkpoint and
    returns the metrics; SIGINT or SIGTERM saves the last whole step, then exits 128 + signal."""
    device, G = model.device, cfg.group_size
    # with LoRA π_ref needs no copy: it is the policy with its adapters off
    if ref is None and not cfg.lora_r:
        ref = copy.deepcopy(model)
    bound_onednn_caches()
    if ref is not None:
        ref.eval().requires_grad_(False)
    # log Z_φ from its own seed: GRPO and FlowRL then draw the same first rollouts
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        logz = LogZ(model.config.hidden_size).to(device) if cfg.algo == "flowrl" else None
    opt, sched = make_optimizer(cfg, model, logz)
    if cfg.grad_ckpt:
        # layers recompute their activations in the backward pass (training mode only)
        model.activation_checkpointing_enable({"use_reentrant": False})
    eos_ids = eos_token_ids(model, tokenizer)
    os.makedirs(cfg.out, exist_ok=True)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    seeded = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train_ds), generator=seeded).tolist()
    done, history = restore(resume, metrics_path, opt, sched, logz) if resume else (0, [])
    # the random state as of the last whole step (a resumed run's: the one just restored)
    rng, warned, stopped = rng_state(), False, 0

    def save() -> str:
        state = {"step": done, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": rng}
        return save_checkpoint(cfg.out, model, tokenizer, logz, cfg, state)

    guard = StopGuard()
    handlers = {s: signal.signal(s, guard) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(metrics_path, "w") as log:
            log.writelines(json.dumps(m) + "\n" for m in history)
            if cfg.eval_every and resume is None:
                # held-out numbers before any update, logged as step 0
                history.append({"step": 0, **evaluate(model, tokenizer, eval_ds, reward_fn, cfg,
                                                      eos_ids)})
                print(json.dumps(history[-1]), file=log, flush=True)
            bar = tqdm(range(done + 1, cfg.steps + 1), desc=cfg.algo, dynamic_ncols=True,
                       disable=None)
            for step in bar:
                t0 = time.perf_counter()
                # 1. G responses for each prompt of the batch, their rewards, r̂ per group
                picks = [(step - 1) * cfg.prompts + j for j in range(cfg.prompts)]
                rows = train_ds.select([order[i % len(order)] for i in picks])
                questions = [format_prompt(tokenizer, q) for q in rows["question"]]
                r = sample(model, tokenizer, questions, cfg, eos_ids, G)
                answers = [a for a in rows["answer"] for _ in range(G)]
                rewards, error = score_completions(reward_fn, r.completions, answers)
                if error and not warned:
                    tqdm.write(f"warning: the reward function failed, scoring 0 (reported once): "
                               f"{error}")
                    warned = True
                adv = group_normalize(rewards, G).to(device)  # r̂ (N,)
                t1 = time.perf_counter()
                # 2. π_ref once per rollout batch; π_old only where it differs from π_θ
                ref_logp = reference_logprobs(model, ref, r, cfg)
                old_logp = score(model, r, cfg) if cfg.epochs * cfg.mini_batches > 1 else None
                t2 = time.perf_counter()
                # 3. the update; from here a signal waits for the end of the step
                guard.hold = True
                # the big layers' forwards, and their recomputation in backward, through oneDNN
                with onednn_linear():
                    stats = update(cfg, model, logz, opt, sched, r, adv, ref_logp, old_logp, step)
                t3 = time.perf_counter()
                lengths = r.mask.sum(-1)
                m = {"step": step, "reward": rewards.mean().item(),
                     "accuracy": (rewards >= 1.0).float().mean().item(), **stats,
                     "response_len": lengths.mean().item(),
                     "truncated": r.truncated.float().mean().item(),
                     "distinct": distinct_answers(r.completions, G),
                     "gen_tokens": int(lengths.sum()), "gen_s": t1 - t0, "ref_s": t2 - t1,
                     "update_s": t3 - t2}
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    m.update(evaluate(model, tokenizer, eval_ds, reward_fn, cfg, eos_ids))
                if on_step is not None:
                    m.update(on_step(step, model))
                history.append(m)
                print(json.dumps(m), file=log, flush=True)
                done, rng = step, rng_state()
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    save()
                bar.set_postfix(reward=f"{m['reward']:.2f}", logZ=f"{m.get('log_z', 0):.2f}",
                                loss=f"{m['loss']:.3f}")
                guard.hold = False
                if guard.signum:
                    raise KeyboardInterrupt(guard.signum)
    except KeyboardInterrupt as e:
        # StopGuard passes the signal; a bare KeyboardInterrupt is a Ctrl-C
        stopped = e.args[0] if e.args else signal.SIGINT
    guard.hold = True
    try:
        if not stopped or done:
            path = save()
        else:
            # stopped before a step finished: leave no half-written run behind
            os.remove(metrics_path)
            with contextlib.suppress(OSError):
                os.rmdir(cfg.out)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if not stopped:
        return history
    name = signal.Signals(stopped).name
    if done:
        print(summarize(history, device))
        tqdm.write(f"stopped by {name} during step {done + 1}: saved step {done} to {path} "
                   "(continue with --resume)", file=sys.stderr)
    else:
        tqdm.write(f"stopped by {name} before the first step finished: nothing to save",
                   file=sys.stderr)
    raise SystemExit(128 + stopped)


@dataclass
class StopGuard:
    """The SIGINT and SIGTERM handler in training: it stops at once (KeyboardInterrupt(signum)),
    except while `hold` is set (the update to the end of its step, and saving), when it only
    records the signal, so that a checkpoint always holds one whole step."""
    hold: bool = False
    signum: int = 0

    def __call__(self, signum: int, frame) -> None:
        self.signum = signum
        if not self.hold:
            raise KeyboardInterrupt(signum)
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step, then saving",
                   file=sys.stderr)


# ----------------------------------------------------------------------------- reporting
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def distinct_answers(completions: list[str], group_size: int) -> float:
    """Mean number of distinct final answers per group of responses."""
    groups = [completions[i:i + group_size] for i in range(0, len(completions), group_size)]
    return statistics.mean(len({extract_answer(c) for c in g} - {None}) for g in groups)


def evaluate(model: PreTrainedModel, tokenizer, eval_ds: Dataset, reward_fn: RewardFn,
             cfg: Config, eos_ids: list[int]) -> dict[str, float]:
    """Held-out prompts, k samples each: accuracy, pass@k for k = 1, 2, 4, ..., distinct answers."""
    rows = eval_ds.select(range(min(cfg.eval_prompts, len(eval_ds))))
    k = cfg.eval_k
    questions = [format_prompt(tokenizer, q) for q in rows["question"]]
    r = sample(model, tokenizer, questions, cfg, eos_ids, k)
    answers = [a for a in rows["answer"] for _ in range(k)]
    rewards, _ = score_completions(reward_fn, r.completions, answers)
    correct = (rewards.view(-1, k) >= 1.0).sum(1).tolist()
    out = {"eval_acc": (rewards >= 1.0).float().mean().item(),
           "eval_distinct": distinct_answers(r.completions, k)}
    for j in [2 ** i for i in range(k.bit_length())]:
        out[f"eval_pass@{j}"] = statistics.mean(pass_at_k(k, c, j) for c in correct)
    return out


def summarize(history: list[dict], device: torch.device) -> str:
    """The run's first and last numbers, its median step by phase (steps 2+), its peak memory."""
    steps = [h for h in history if "reward" in h]
    evals = [h for h in history if "eval_acc" in h]
    # step 1 pays one-off warm-up costs
    timed = steps[1:] or steps
    med = {k: statistics.median(h[k] for h in timed) for k in ("gen_s", "ref_s", "update_s")}
    tok_s = sum(h["gen_tokens"] for h in timed) / sum(h["gen_s"] for h in timed)
    # ru_maxrss is in KiB on Linux
    memory = f"peak RSS memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}"
    if device.type == "cuda":
        memory = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f}"
    a, b = steps[0], steps[-1]
    lines = [(f"steps {a['step']}-{b['step']}  reward {a['reward']:.3f} (step {a['step']}) -> "
              f"{b['reward']:.3f} (step {b['step']})  distinct answers/group {b['distinct']:.2f}")]
    for e in evals[:1] + evals[1:][-1:]:
        numbers = [f"{k[5:]} {v:.3f}" for k, v in e.items() if k.startswith("eval_")]
        lines.append(f"held-out at step {e['step']}  " + "  ".join(numbers))
    lines.append(f"median step {sum(med.values()):.2f}s (generate {med['gen_s']:.2f}s, "
                 f"reference {med['ref_s']:.2f}s, update {med['update_s']:.2f}s), "
                 f"{tok_s:.0f} generated tokens/s, {memory} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None, defaults: dict | None = None,
         load: Callable[[Config], tuple] | None = None) -> list[dict]:
    """Parse flags, load model and data, train, print a summary; returns the per-step metrics.
    defaults replace Config's; load(cfg) -> (model, tokenizer, train set, held-out set, reward)
    replaces load_model and load_data (toy_tasks.py passes its tiny model and tasks)."""
    handlers = {s: signal.signal(s, exit_quietly) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cfg = parse_args(argv, defaults)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        if cfg.check_batch:
            return [check_batch(cfg)]
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if load is None:
            # the data first: a bad file fails before a model loads
            data = load_data(cfg)
            model, tokenizer = load_model(cfg.model)
        else:
            model, tokenizer, *data = load(cfg)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        ref, state = None, None
        if cfg.resume:
            model, ref, state = load_resume(cfg, model)
        elif cfg.lora_r:
            add_lora(model, cfg.lora_r, cfg.lora_alpha)
        history = train(cfg, model, tokenizer, *data, ref=ref, resume=state)
        print(summarize(history, model.device))
        print(f"metrics: {cfg.out}/metrics.jsonl  checkpoint: {cfg.out}/checkpoint")
        return history
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- plumbing: flags
# --help shows the flags in these groups, each starting at the named field
HELP_GROUPS = {"model": "model, data and batch", "max_new_tokens": "sampling",
               "beta": "FlowRL objective", "clip_eps": "GRPO baseline", "lr": "optimisation",
               "eval_every": "evaluation and output"}
# what a run is: --resume refuses to change these (the rest, e.g. --steps, may change)
RUN_IDENTITY = ("model", "dataset", "algo", "group_size", "prompts", "seed", "lora_r", "beta",
                "max_new_tokens", "temperature", "top_p")


def die(msg: str):
    """One clear line on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {msg}")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line, no usage dump
        die(f"{message}; see --help")


def build_parser(defaults: dict) -> ArgumentParser:
    """A flag per Config field, in HELP_GROUPS; `defaults` replaces Config's defaults."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p
    for f in fields(Config):
        group = p.add_argument_group(HELP_GROUPS[f.name]) if f.name in HELP_GROUPS else group
        default = defaults.get(f.name, f.default)
        help = f.metadata["help"]
        if default is not None and default != "":
            help += f" (default: {default})"
        name = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            group.add_argument(name, default=default, help=help,
                               action=argparse.BooleanOptionalAction)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            choices = ["flowrl", "grpo"] if f.name == "algo" else None
            group.add_argument(name, default=default, help=help, type=kind, choices=choices)
    return p


def parse_args(argv: list[str] | None = None, defaults: dict | None = None) -> Config:
    """Flags into a checked Config; `defaults` replaces Config's defaults."""
    cfg = Config(**vars(build_parser(defaults or {}).parse_args(argv)))
    if cfg.resume:
        cfg = resumed_config(argv, cfg.out)
    # the defaults that depend on other flags
    if cfg.lr is None:
        cfg.lr = LORA_LR if cfg.lora_r else 1e-6
    if cfg.logz_lr is None:
        cfg.logz_lr = cfg.lr
    if cfg.lora_alpha is None:
        cfg.lora_alpha = 2.0 * cfg.lora_r
    has_run = os.path.exists(os.path.join(cfg.out, "metrics.jsonl"))
    sizes = (cfg.steps, cfg.prompts, cfg.max_new_tokens, cfg.epochs, cfg.mini_batches,
             cfg.micro_batch, cfg.micro_tokens, cfg.eval_k, cfg.eval_prompts)
    checks = [
        (cfg.group_size >= 2, "--group-size must be at least 2: r̂ needs 2 responses per group"),
        (min(sizes) > 0, ("--steps, --prompts, --max-new-tokens, --epochs, --mini-batches, "
                          "--micro-batch, --micro-tokens, --eval-k and --eval-prompts must be "
                          "positive")),
        (cfg.lr > 0 and cfg.logz_lr > 0, "--lr and --logz-lr must be positive"),
        (cfg.clip_c > 1, "--clip-c must be greater than 1 (veRL asserts the same)"),
        (cfg.lora_r >= 0, "--lora-r must be 0 (full fine-tuning) or a positive rank"),
        (cfg.temperature > 0 and 0 < cfg.top_p <= 1, "--temperature must be > 0, --top-p in (0,1]"),
        (not os.path.isfile(cfg.out), f"--out {cfg.out} is an existing file; give a directory"),
        (cfg.save_every >= 0, "--save-every must be 0 (off) or a number of steps"),
        (cfg.overwrite or cfg.check_batch or cfg.resume or not has_run,
         f"--out {cfg.out} already holds a run; pass another --out, or --overwrite to replace it"),
    ]
    for ok, msg in checks:
        if not ok:
            die(msg)
    return cfg


def resumed_config(argv: list[str] | None, out: str) -> Config:
    """The saved run's config with the flags given now on top, unless one changes RUN_IDENTITY."""
    saved_path = os.path.join(out, "checkpoint", "flowrl_config.json")
    if not os.path.isfile(os.path.join(out, "checkpoint", "trainer_state.pt")):
        die(f"--resume: {out} holds no checkpoint of a flowrl_min run to continue (no "
            f"{out}/checkpoint/trainer_state.pt); start a new run without --resume")
    try:
        with open(saved_path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        die(f"--resume: cannot read {saved_path} ({type(e).__name__}); start a new run")
    # parse again with every default suppressed: only the flags given now remain
    given = vars(build_parser({f.name: argparse.SUPPRESS for f in fields(Config)}).parse_args(argv))
    for k in RUN_IDENTITY:
        if k in given and given[k] != saved.get(k):
            die(f"--resume: --{k.replace('_', '-')} {given[k]} contradicts the saved run's "
                f"{saved.get(k)}; resume without it, or start a new run in another --out")
    known = {f.name for f in fields(Config)}
    return Config(**{**{k: v for k, v in saved.items() if k in known}, **given})


# ----------------------------------------------------------------------------- plumbing: files
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers within `timeout` seconds (never with HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    with contextlib.suppress(OSError), socket.create_connection(("huggingface.co", 443), timeout):
        return True
    return False


def load_model(name: str) -> tuple[PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """π_θ (float32, no dropout) and its tokenizer from a local directory or a hub id (the local
    cache first: no network, no retries)."""
    path = os.path.expanduser(name)
    local = os.path.isdir(path)
    if name.startswith(("/", ".", "~")) and not local:
        die(f"--model {name}: no such directory")
    # a bare name like Qwen2.5-0.5B means Qwen/Qwen2.5-0.5B
    repo = path if local or "/" in name else f"Qwen/{name}"
    auto_tok, auto_lm = transformers.AutoTokenizer, transformers.AutoModelForCausalLM
    try:
        tokenizer = auto_tok.from_pretrained(repo, local_files_only=True)
        model = auto_lm.from_pretrained(repo, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        if local:
            die(f"--model {name}: cannot load a model from it ({str(e).splitlines()[0]})")
        if not hub_reachable():
            die(f"--model {name}: {repo} is not in the local cache and the Hugging Face hub "
                "cannot be reached; pass a local model directory, or run the offline tiny "
                "model: python toy_tasks.py train")
        tokenizer = auto_tok.from_pretrained(repo)
        model = auto_lm.from_pretrained(repo, dtype=torch.float32)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    # RL on LLMs runs without dropout: sampled and trained log-probs must agree
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model, tokenizer


def add_lora(model: PreTrainedModel, r: int, alpha: float) -> PreTrainedModel:
    """LoRA adapters (rank r, scale α/r) on every linear layer but the LM head, through
    transformers' peft integration; the base weights freeze."""
    try:
        from peft import LoraConfig
    except ImportError:
        die("--lora-r needs the peft package: pip install peft")
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear",
                                 lora_dropout=0.0))
    return model


def eos_token_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the generation config's."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids) | {tokenizer.eos_token_id})


def load_file_dataset(path: str, seed: int) -> tuple[Dataset, Dataset]:
    """A question/answer file split into train and held-out rows (up to 100, a fifth of a small
    file); each problem with the file is one line that names it."""
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv",
               ".parquet": "parquet"}.get(os.path.splitext(path)[1])
    if not os.path.isfile(path):
        die(f"--dataset {path}: no such file (or use arith)")
    if builder is None:
        die(f"--dataset {path}: use a .jsonl, .json, .csv or .parquet file")
    if not os.path.getsize(path):
        die(f"--dataset {path}: the file is empty; it needs question and answer columns")
    try:
        ds = load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # noqa: BLE001 -- any reader error: one line naming the file
        die(f"--dataset {path}: cannot be read as {builder} ({type(e).__name__}: {str(e)[:200]})")
    missing = [c for c in ("question", "answer") if c not in ds.column_names]
    if missing or not len(ds):
        die(f"--dataset {path}: needs question and answer columns and a row at least; it has "
            f"{len(ds)} rows and the columns {', '.join(ds.column_names) or 'none'}")
    ds = ds.map(lambda r: {"question": str(r["question"]), "answer": str(r["answer"])})
    n_eval = min(100, len(ds) // 5)
    if n_eval < 16:
        held = f"{n_eval} held out for evaluation"
        if not n_eval:
            held = "too few to hold any out: evaluation reuses the training rows"
        print(f"warning: --dataset {path} has only {len(ds)} rows; {held}", file=sys.stderr)
    if not n_eval:
        return ds, ds
    split = ds.train_test_split(test_size=n_eval, seed=seed)
    return split["train"], split["test"]


# ----------------------------------------------------------------------------- plumbing: saving
def save_checkpoint(out: str, model: PreTrainedModel, tokenizer, logz: LogZ | None, cfg: Config,
                    state: dict | None = None) -> str:
    """Write <out>/checkpoint atomically: into a temporary directory, then renamed into place.
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
    # temporary files are private (0600, 0700): give them the modes the user's umask gives
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    os.chmod(tmp, 0o777 & ~umask)
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    return final


def load_resume(cfg: Config, model: PreTrainedModel) -> tuple[PreTrainedModel, PreTrainedModel
                                                             | None, dict]:
    """For --resume: (the policy from <out>/checkpoint, π_ref as the run had it, trainer state).
    model: the initial model, π_ref; with LoRA the adapter loads onto it and π_ref is None."""
    ckpt = os.path.join(cfg.out, "checkpoint")
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu",
                       weights_only=False)
    if cfg.algo == "flowrl":
        state["logz"] = torch.load(os.path.join(ckpt, "logz.pt"), map_location=model.device)
    if cfg.lora_r:
        model.load_adapter(ckpt, adapter_name="default", is_trainable=True)
        return model, None, state
    policy, _ = load_model(ckpt)
    return policy.to(model.device), model, state


def restore(resume: dict, metrics_path: str, opt, sched, logz: LogZ | None) -> tuple[int, list]:
    """Continue from a trainer state: optimiser, scheduler, log Z, random state, and the metrics
    up to its step (a line written after it is dropped and redone)."""
    opt.load_state_dict(resume["optimizer"])
    sched.load_state_dict(resume["scheduler"])
    if logz is not None:
        logz.load_state_dict(resume["logz"])
    history = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            history = [m for m in map(json.loads, f) if m["step"] <= resume["step"]]
    torch.set_rng_state(resume["rng"]["torch"])
    if "cuda" in resume["rng"]:
        torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
    return resume["step"], history


def rng_state() -> dict:
    """The random state a resumed run continues from (sampling, log Z dropout, mini-batches)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# ----------------------------------------------------------------------------- plumbing: kernels
def linear_no_grad(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x Wᵀ + b where no gradient flows through it: on the CPU in fp32, oneDNN's matmul instead
    of MKL's, 1.2-1.5× faster for the layers' and the LM head's shapes on an Intel CPU, 2-2.4×
    on an AMD one with AVX-512 (MKL keeps to AVX2 there), 1.5-2.5× for the few rows of decoding
    (README: speed), equal up to rounding. The one private name in the file,
    checked with torch 2.13: torch.ops.mkldnn._linear_pointwise takes the plain (out, in)
    weight; where it is missing, torch's kernel runs. x (..., in) -> (..., out)"""
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if onednn and x.is_cpu and x.dtype == weight.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    # not F.linear: inside onednn_linear, F.linear is this function's caller
    out = x @ weight.t()
    if bias is not None:
        out = out + bias
    return out


class OneDNNLinear(torch.autograd.Function):
    """F.linear under a graph (oneDNN's op has no backward of its own): y = x Wᵀ + b and
    ∂x = ∂y W through linear_no_grad, Wᵀ read in place (strided, not copied); ∂W = ∂yᵀ x through
    torch's product: through oneDNN, each new number of rows left an (out, in) buffer in its
    caches, 17 MB for an MLP weight (README: memory bounded over a run).
    x (..., in), W (out, in), b (out,)"""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        return linear_no_grad(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # Wᵀ (in, out) as the weight of a linear from out to in
            grad_x = linear_no_grad(grad, weight.t())
        # (rows, out) and (rows, in) over every leading dimension
        g, x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x
        # False for a bias of None
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


@contextlib.contextmanager
def onednn_linear(min_size: int = 2**19):
    """Inside this block, each nn.Linear whose weight has min_size elements or more runs its
    forward through oneDNN: linear_no_grad without a graph, OneDNNLinear with one (the update,
    its recomputed forwards included), on the CPU. Smaller weights keep torch's kernel, as fast
    there."""
    plain = F.linear

    def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        # on a GPU, under autocast, the plain kernel and its backward, always
        if weight.numel() < min_size or not x.is_cpu:
            return plain(x, weight, bias)
        if torch.is_grad_enabled():
            return OneDNNLinear.apply(x, weight, bias)
        return linear_no_grad(x, weight, bias)

    # nn.Linear.forward calls torch.nn.functional.linear: swapped for this block only
    F.linear = linear
    try:
        yield
    finally:
        F.linear = plain


def bound_onednn_caches(entries: int = 256) -> None:
    """Keep at most `entries` prepared oneDNN products, one per shape of x and W, in oneDNN's
    cache and in ideep's (torch's layer over it). Both default to 1,024 and an entry holds
    0.7-1.4 MB for our forwards and ∂x, so each new micro-batch length added memory that stayed
    (README: memory bounded over a run). Decoding reuses its 4 weight shapes × ≤ 32 rows, and
    rebuilding an entry costs 0.1-0.5 ms. Read when oneDNN first runs; a value already in the
    environment wins."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(entries))


def release_memory() -> None:
    """Give the heap memory a phase freed back to the OS: glibc keeps it (README: memory). Used
    after LoRA's sampling (the 30-step peak falls from 5.37 to 4.98 GiB for 3-4% of a step)
    and after every update (full fine-tuning: the resident memory after each of 12 steps stays
    at 12.43-12.50 GiB). Only in a process over 1 GiB: a trim walks the heap for milliseconds,
    too long for a tiny model's steps. Linux with glibc only; elsewhere nothing happens."""
    with contextlib.suppress(OSError, AttributeError, ValueError), open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        if resident > 2**30:
            ctypes.CDLL("libc.so.6").malloc_trim(0)


# ----------------------------------------------------------------------------- --check-batch
# veRL's names for the same tensors (verl-recipe flowrl/flowrl_actor.py, update_policy)
VERL_KEYS = {"log_prob": "logp", "old_log_probs": "old_logp", "ref_log_prob": "ref_logp",
             "response_mask": "mask", "advantages": "adv"}


def check_batch(cfg: Config) -> dict[str, dict[str, float]]:
    """Our losses and gradients, in float64, for another implementation's tensors (README:
    sanity-checking): a torch.save'd dict of logp, ref_logp, mask (N, T) and adv (N,), or
    rewards (N,) and group_size; optional old_logp (N, T; default logp) and log_z (N,; default
    0). veRL's names work too (VERL_KEYS): advantages (N, T) per token, log_z (N, 1)."""
    if not os.path.isfile(cfg.check_batch):
        die(f"--check-batch {cfg.check_batch}: no such file")
    b = torch.load(cfg.check_batch, map_location="cpu", weights_only=True)
    b = {VERL_KEYS.get(k, k): v for k, v in b.items()}
    missing = [k for k in ("logp", "ref_logp", "mask") if k not in b]
    if "adv" not in b and not {"rewards", "group_size"} <= set(b):
        missing.append("adv (or rewards and group_size)")
    if missing:
        die(f"--check-batch {cfg.check_batch}: missing {', '.join(missing)}; "
            f"found {', '.join(b) or 'nothing'}")
    t = {k: v.detach().to(torch.float64) for k, v in b.items() if torch.is_tensor(v)}
    old, ref, mask = t.get("old_logp", t["logp"]), t["ref_logp"], t["mask"]
    adv = t["adv"] if "adv" in t else group_normalize(t["rewards"], int(b["group_size"]))
    if adv.dim() == 2:
        # per-token advantages (veRL): the sequence's r̂ is their mean over its tokens
        adv = masked_mean(adv, mask, -1)
    log_z = t.get("log_z", torch.zeros_like(adv)).reshape(adv.shape).clone().requires_grad_()
    logp = t["logp"].clone().requires_grad_()
    flow, out_f = flowrl_loss(logp, old, ref, mask, log_z, adv, cfg.beta, cfg.clip_low,
                              cfg.clip_high, cfg.length_norm)
    grad_logp, grad_log_z = torch.autograd.grad(flow, [logp, log_z])
    out_f["grad_logp_norm"] = grad_logp.norm().item()
    out_f["grad_log_z_norm"] = grad_log_z.norm().item()
    grpo, out_g = grpo_loss(logp, old, ref, mask, adv, cfg.clip_eps, cfg.kl_coef, cfg.clip_c)
    out_g["grad_logp_norm"] = torch.autograd.grad(grpo, logp)[0].norm().item()
    out = {"flowrl": out_f, "grpo": out_g, "logprobs": logprob_stats(logp, old, ref, mask)}
    for name, stats in out.items():
        print(f"{name}: " + "  ".join(f"{k} {v:.6g}" for k, v in stats.items()))
    return out


if __name__ == "__main__":
    main()
