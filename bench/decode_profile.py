"""Where decoding spends its time, per precision: the sampler on 4 arith prompts x 8 responses,
no EOS (every row runs MAX_NEW_TOKENS), timed once, then profiled once (torch.profiler, CPU).

    python bench/decode_profile.py MODEL_DIR [MAX_NEW_TOKENS]   # default 32

Prints generated tokens/s and the operators with the most self time for fp32 and bf16 autocast.
"""
import os
import sys
import time
from dataclasses import replace

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.getcwd())
import flowrl_min as fm


def main(model_dir: str, tokens: int) -> None:
    model, tok = fm.load_model(model_dir)
    cfg0 = fm.parse_args(["--model", model_dir, "--out", "/nonexistent", "--max-new-tokens",
                          str(tokens)])
    questions = [fm.format_prompt(tok, q) for q in fm.arith_dataset(4, 0)["question"]]
    for dtype in ("float32", "bfloat16"):
        cfg = replace(cfg0, dtype=dtype)
        fm.sample(model, tok, questions, cfg, [], 8)  # warm-up
        start = time.perf_counter()
        fm.sample(model, tok, questions, cfg, [], 8)
        print(f"{dtype}: {32 * tokens / (time.perf_counter() - start):.1f} generated tokens/s")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fm.sample(model, tok, questions, cfg, [], 8)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32)
