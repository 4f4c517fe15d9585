"""One row of the README's speed table: flowrl_min's trainer for STEPS steps at its default flags
(the tiny model: toy_tasks.py train's), without the periodic evaluation, alone in this process.

    python bench/speed.py tiny 20
    python bench/speed.py MODEL_DIR 5 [any flowrl_min flag, e.g. --lora-r 16]

Prints the medians of steps 2+ (step 1 pays one-off costs): the step and its generate, reference
and update phases, generated tokens per second, and the process's peak memory.
"""
import os
import resource
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.getcwd())
import flowrl_min as fm
import toy_tasks as tt


def main(model: str, steps: int, flags: list[str]) -> None:
    out = tempfile.mkdtemp(prefix="speed-")
    argv = ["--steps", str(steps), "--eval-every", "0", "--eval-prompts", "1", "--eval-k", "2",
            "--out", out, "--overwrite", *flags]
    if model == "tiny":
        history = tt.train_tiny(argv)
    else:
        history = fm.main(["--model", model, *argv])
    timed = [h for h in history if "gen_s" in h][1:]
    med = {k: statistics.median(h[k] for h in timed) for k in ("gen_s", "ref_s", "update_s")}
    step = statistics.median(h["gen_s"] + h["ref_s"] + h["update_s"] for h in timed)
    tok_s = sum(h["gen_tokens"] for h in timed) / sum(h["gen_s"] for h in timed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"| {os.path.basename(model.rstrip('/'))} {' '.join(flags)} | {step:.2f} s | "
          f"{med['gen_s']:.2f} s | {med['ref_s']:.2f} s | {med['update_s']:.2f} s | {tok_s:.0f} | "
          f"{peak:.2f} GiB |  (steps 2-{len(timed) + 1}, response tokens a step: "
          f"{[h['gen_tokens'] for h in timed]})")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
