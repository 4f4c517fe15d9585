"""The per-token gap between the log-probs the sampler records and the ones the trainer computes
for the same tokens, under each precision (README: "Precision").

    python bench/logprob_gap.py MODEL_DIR [ROLLOUT_BATCHES]

For each --dtype, samples ROLLOUT_BATCHES (default 2) batches of the default shape (4 arith
prompts x 8 responses, <= 128 new tokens), then scores the same tokens with the trainer's packed
forward (sequence_logprobs, the LM head inside the same autocast region as the sampler's) and,
for bf16, also with the LM head's product in fp32. Prints the mean and max |difference| over all
response tokens.
"""
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import flowrl_min as fm


def trainer_logprobs(model, r, dtype: str, head_fp32: bool) -> torch.Tensor:
    """sequence_logprobs over all rows, optionally with the LM head's product outside autocast."""
    rows = list(range(len(r.mask)))
    prompt_of = [i // 8 for i in rows]
    if not head_fp32:
        return fm.sequence_logprobs(model, r.prompts, prompt_of, r.response_ids, r.mask, 1.0,
                                    dtype)[0]
    mask = r.mask.bool()
    ids, pos, bias, before, _ = fm.pack(r.prompts, prompt_of, r.response_ids,
                                       mask.sum(-1).tolist())
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
        h = model.base_model(input_ids=ids[None], position_ids=pos[None],
                             attention_mask=bias[None, None]).last_hidden_state[0].float()
    flat = fm.token_logprobs(model.get_output_embeddings(), h[before], r.response_ids[mask], 1.0)
    return torch.zeros(mask.shape).masked_scatter(mask, flat)


@torch.inference_mode()
def main(model_dir: str, batches: int) -> None:
    model, tok = fm.load_model(model_dir)
    eos = fm.eos_token_ids(model, tok)
    data = fm.arith_dataset(4 * batches, 0)
    for dtype in ("float32", "bfloat16"):
        cfg = fm.parse_args(["--model", model_dir, "--dtype", dtype, "--out", "/nonexistent"])
        gaps = {False: [], True: []}
        torch.manual_seed(0)
        for b in range(batches):
            rows = data.select(range(4 * b, 4 * b + 4))
            r, _ = fm.rollout(model, tok, rows, fm.math_reward, cfg, eos, 8)
            m = r.mask.bool()
            for head_fp32 in ([False, True] if dtype == "bfloat16" else [False]):
                got = trainer_logprobs(model, r, dtype, head_fp32)
                gaps[head_fp32].append((got - r.sample_logp)[m].abs())
        for head_fp32, g in gaps.items():
            if g:
                g = torch.cat(g)
                where = "LM head fp32" if head_fp32 else "LM head as the sampler's"
                print(f"{dtype:9} {where:25} tokens {len(g):5}  mean |gap| {g.mean():.2e}  "
                      f"max {g.max():.2e}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
