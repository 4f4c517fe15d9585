"""fp32 against bf16 autocast on one fixed batch, so that both precisions do the same work (the
speed table's runs sample differently in each precision, and a step's time follows its samples).

    python bench/precision.py MODEL_DIR [--lora-r 16]

One rollout batch of the default shape (4 arith prompts x 8 responses) is sampled once in fp32
and kept. Then, per precision: decoding (the sampler with no EOS, so all 32 rows run the full
128 tokens: 4096 tokens), the reference pass and one update on the kept batch, each timed alone
in this process. Also prints each precision's own response lengths on the same prompts and seed.
"""
import copy
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.getcwd())
import flowrl_min as fm


def kept_batch(model_dir: str, flags: list[str]) -> tuple:
    """model (with adapters if the flags ask), tokenizer, config, π_ref (None with LoRA), EOS ids,
    the 4 arith prompts, one rollout batch of the default shape sampled in fp32 (seed 0) and a
    non-constant r̂ for it. bench/update_profile.py uses the same batch."""
    model, tok = fm.load_model(model_dir)
    cfg0 = fm.parse_args(["--model", model_dir, "--out", "/nonexistent", *flags])
    if cfg0.lora_r:
        fm.add_lora(model, cfg0.lora_r, cfg0.lora_alpha)
    ref = None if cfg0.lora_r else copy.deepcopy(model).requires_grad_(False)
    eos = fm.eos_token_ids(model, tok)
    rows = fm.arith_dataset(4, 0)
    torch.manual_seed(0)
    kept, _ = fm.rollout(model, tok, rows, fm.math_reward, replace(cfg0, dtype="float32"), eos,
                         8)
    adv = fm.group_normalize(torch.arange(32.0) % 3, 8)  # any non-constant r̂
    return model, tok, cfg0, ref, eos, rows, kept, adv


def main(model_dir: str, flags: list[str]) -> None:
    model, tok, cfg0, ref, eos, rows, kept, adv = kept_batch(model_dir, flags)
    questions = [fm.format_prompt(tok, q) for q in rows["question"]]
    n_tokens = int(kept.mask.sum())
    for dtype in ("float32", "bfloat16"):
        cfg = replace(cfg0, dtype=dtype)
        torch.manual_seed(1)
        own, _ = fm.rollout(model, tok, rows, fm.math_reward, cfg, eos, 8)
        t0 = time.perf_counter()
        fm.sample(model, tok, questions, cfg, [], 8)
        t1 = time.perf_counter()
        ref_logp = fm.reference_logprobs(model, ref, kept, cfg)
        t2 = time.perf_counter()
        logz = fm.LogZ(model.config.hidden_size)
        opt, sched = fm.make_optimizer(cfg, model, logz)
        if cfg.grad_ckpt:  # as train does
            model.activation_checkpointing_enable({"use_reentrant": False})
        t3 = time.perf_counter()
        fm.update(cfg, model, logz, opt, sched, kept, adv, ref_logp, None)
        gen_s, ref_s, upd_s = t1 - t0, t2 - t1, time.perf_counter() - t3
        model.activation_checkpointing_disable()
        del opt, sched  # AdamW's moments: one set at a time
        rate = 32 * cfg.max_new_tokens / gen_s  # every row runs to the limit (no EOS)
        print(f"{dtype:9} {' '.join(flags)}: decode {rate:6.1f} tokens/s ({gen_s:.1f} s); "
              f"reference {1000 * ref_s / n_tokens:.1f} ms and update {1000 * upd_s / n_tokens:.1f}"
              f" ms per response token ({n_tokens} tokens); own samples' mean length "
              f"{own.mask.sum(-1).mean():.1f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
