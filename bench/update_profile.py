"""Where one update spends its time, per precision: bench/precision.py's kept batch (the
default shape, 4 arith prompts x 8 responses, sampled once in fp32), one FlowRL update to warm
up (AdamW's moments exist after it), then one timed and one profiled update (torch.profiler).

    python bench/update_profile.py MODEL_DIR [--lora-r 16]

Prints ms per response token and the operators with the most self time for fp32 and bf16
autocast, and the time in matrix products: the self time of aten::mm, addmm and bmm (the
backward's and the recompute's included) and of the matmul/linear wrappers around them, not
the fused attention kernels.
"""
import os
import sys
import time
from dataclasses import replace

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.getcwd())
from precision import kept_batch  # the same kept batch as bench/precision.py

import flowrl_min as fm

PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def main(model_dir: str, flags: list[str]) -> None:
    model, _, cfg0, ref, _, _, kept, adv = kept_batch(model_dir, flags)
    n_tokens = int(kept.mask.sum())
    if cfg0.grad_ckpt:  # as train does
        model.activation_checkpointing_enable({"use_reentrant": False})
    for dtype in ("float32", "bfloat16"):
        cfg = replace(cfg0, dtype=dtype)
        ref_logp = fm.reference_logprobs(model, ref, kept, cfg)
        logz = fm.LogZ(model.config.hidden_size)
        opt, sched = fm.make_optimizer(cfg, model, logz)
        fm.update(cfg, model, logz, opt, sched, kept, adv, ref_logp, None)  # warm-up
        start = time.perf_counter()
        fm.update(cfg, model, logz, opt, sched, kept, adv, ref_logp, None)
        seconds = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fm.update(cfg, model, logz, opt, sched, kept, adv, ref_logp, None)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS)
        print(f"{dtype} {' '.join(flags)}: update {seconds:.1f} s, {1000 * seconds / n_tokens:.1f}"
              f" ms per response token ({n_tokens} tokens); matrix products "
              f"{products / 1e6:.1f} s of {total / 1e6:.1f} s profiled")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12))
        del opt, sched  # AdamW's moments: one set at a time


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
