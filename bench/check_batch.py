"""Our losses, statistics and gradient norms (float64) on another implementation's batch.

    python bench/check_batch.py BATCH.pt [--beta B] [--clip-low L] [--clip-high H]
                                         [--no-length-norm] [--kl-coef K]

BATCH.pt is a torch.save'd dict of (N, T) log-probs `logp`, `old_logp` (default: logp), `ref_logp`,
the response `mask`, `adv` (r̂, (N,) or per token), optionally `log_z` (N,) and `group_size` G, under
our names or veRL's (`log_prob`, `old_log_probs`, `ref_log_prob`, `response_mask`, `advantages`).
Prints FlowRL's loss with the batch's log Z and with the closed-form log Z (weighted by w), GRPO's
loss, and the log-prob statistics, each with the norms of its gradients (README: "Checking another
implementation").
"""
import argparse
import os
import sys
from dataclasses import fields

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flowrl_min as fm

# veRL's names for the same tensors (verl-recipe flowrl/flowrl_actor.py, update_policy)
VERL_KEYS = {"log_prob": "logp", "old_log_probs": "old_logp", "ref_log_prob": "ref_logp",
             "response_mask": "mask", "advantages": "adv"}


def check_batch(path: str, beta: float, clip_low: float, clip_high: float, length_norm: bool,
                kl_coef: float) -> dict[str, dict[str, float]]:
    """The batch's FlowRL (given and closed-form log Z) and GRPO numbers, printed and returned."""
    b = torch.load(path, weights_only=True) if os.path.isfile(path) else {}
    t = {VERL_KEYS.get(k, k): torch.as_tensor(v).detach().double() for k, v in b.items()}
    if {"logp", "ref_logp", "mask", "adv", "group_size"} - set(t):
        fm.die(f"{path}: needs logp, ref_logp, mask, adv and group_size; "
               f"found {', '.join(t) or 'no such file'}")
    logp, ref, mask, adv = t["logp"].requires_grad_(), t["ref_logp"], t["mask"], t["adv"]
    G = int(t["group_size"])
    old = t.get("old_logp", logp.detach())
    if adv.dim() == 2:  # veRL's per-token advantages: the sequence's r̂ on each token
        adv = fm.masked_mean(adv, mask, -1)
    w = fm.importance_weight(logp, old, mask, clip_low, clip_high)
    log_zs = {"flowrl": t.get("log_z", torch.zeros_like(adv)).reshape(adv.shape),
              "flowrl_group_log_z": fm.group_log_z(logp, ref, mask, adv, G, beta, length_norm, w)}
    out = {}
    for name, log_z in log_zs.items():
        loss, out[name] = fm.flowrl_loss(logp, old, ref, mask, log_z.requires_grad_(), adv, beta,
                                         clip_low, clip_high, length_norm)
        g_logp, g_z = torch.autograd.grad(loss, [logp, log_z])
        out[name] |= {"grad_logp_norm": g_logp.norm().item(), "grad_log_z_norm": g_z.norm().item(),
                      "grad_log_z_per_prompt_norm": g_z.view(-1, G).sum(1).norm().item()}
    loss, out["grpo"] = fm.grpo_loss(logp, old, ref, mask, adv, kl_coef=kl_coef)
    out["grpo"]["grad_logp_norm"] = torch.autograd.grad(loss, logp)[0].norm().item()
    out["logprobs"] = fm.logprob_stats(logp, old, ref, mask)
    for name, stats in out.items():
        print(f"{name}: " + "  ".join(f"{k} {v:.6g}" for k, v in stats.items()))
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """The flags (defaults: flowrl_min.py's) and the check."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.error = lambda message: fm.die(f"{message}; see --help")
    p.add_argument("batch", help="a torch.save'd dict of tensors (above)")
    defaults = {f.name: f.default for f in fields(fm.Config)}
    for name in ("beta", "clip_low", "clip_high", "kl_coef"):
        default = defaults[name]
        p.add_argument("--" + name.replace("_", "-"), type=float, default=default,
                       help=f"as in flowrl_min.py (default: {default})")
    p.add_argument("--length-norm", action=argparse.BooleanOptionalAction,
                   default=defaults["length_norm"],
                   help=f"divide log-prob sums by |y| (default: {defaults['length_norm']})")
    a = p.parse_args(argv)
    return check_batch(a.batch, a.beta, a.clip_low, a.clip_high, a.length_norm, a.kl_coef)


if __name__ == "__main__":
    main()
