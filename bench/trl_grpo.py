"""TRL's GRPOTrainer as a yardstick for the speed table: the same model, prompts (`arith`, seed 0),
reward, group size, temperature and token limit as flowrl_min's defaults. TRL is never a
dependency: install it in a virtual environment of its own that shares this one's torch, run
from the checkout root so that flowrl_min imports:

    python -m venv --system-site-packages /tmp/trl-venv && /tmp/trl-venv/bin/pip install trl==1.16.0
    /tmp/trl-venv/bin/python bench/trl_grpo.py MODEL_DIR STEPS [MAX_NEW_TOKENS] [LORA_R] [BF16]

BF16 1: TRL's bf16=True (torch's CPU autocast), as flowrl_min's --dtype bfloat16.

Prints the median step of steps 2+ (step 1 allocates AdamW's moments) and the peak RSS.
"""
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import flowrl_min as fm


class Timer(TrainerCallback):
    """Wall time of each optimiser step, as flowrl_min times a step (sampling included)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)


def reward(completions, answer, **kw) -> list[float]:
    return [fm.math_reward(c[0]["content"], a) for c, a in zip(completions, answer)]


def main(model: str, steps: int, max_new_tokens: int = 128, lora_r: int = 0,
         bf16: int = 0) -> None:
    question = lambda r: {"prompt": [{"role": "user",
                                      "content": r["question"] + fm.MATH_INSTRUCTION}]}
    data = fm.arith_dataset(5000, 0).map(question)
    # flowrl_min's defaults: 4 prompts x 8 responses, lr 1e-6 (2e-5 with LoRA), KL 0.001
    args = GRPOConfig(output_dir="/tmp/trl_out", use_cpu=True, bf16=bool(bf16), max_steps=steps,
                      learning_rate=2e-5 if lora_r else 1e-6, per_device_train_batch_size=32,
                      num_generations=8, gradient_accumulation_steps=1, beta=0.001,
                      max_completion_length=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                      logging_steps=1, save_strategy="no", report_to=[], seed=0,
                      dataloader_num_workers=0, gradient_checkpointing=True)
    peft = None
    if lora_r:
        from peft import LoraConfig
        peft = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear")
    timer = Timer()
    GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                callbacks=[timer], peft_config=peft).train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"TRL median step (steps 2+) {statistics.median(timer.times[1:]):.1f} s over "
          f"{len(timer.times) - 1} steps; peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6]))
