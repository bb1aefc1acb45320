"""bf16 vs fp32 on CPU for the quickstart model: LoRA training step time and greedy decoding speed.

Justifies two defaults: quickstart configs train in bfloat16, `finch chat` decodes in float32 on CPU.
Both dtypes are measured in this run on the same inputs; the ratios are what to read.

    .venv/bin/python bench/cpu_dtype.py [--steps 3] [--new-tokens 24]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from finch.config import LoraConfig, ModelConfig
from finch.models.gemma_gguf import ensure_gemma3_270m
from finch.models.loading import apply_lora, load_base_model


def train_step_seconds(folder: str, dtype: str, steps: int) -> float:
    model = apply_lora(load_base_model(ModelConfig(path=folder, dtype=dtype), folder), LoraConfig(r=16, alpha=32))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(10, 200_000, (2, 256), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and is not counted
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps


def decode_tokens_per_second(folder: str, dtype: str, new_tokens: int) -> float:
    model = load_base_model(ModelConfig(path=folder, dtype=dtype), folder).eval()
    prompt = torch.tensor([[2, 818, 5279, 529, 7001, 563]])
    with torch.inference_mode():
        model.generate(input_ids=prompt, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    folder = str(ensure_gemma3_270m())
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    step = {d: train_step_seconds(folder, d, args.steps) for d in ("float32", "bfloat16")}
    decode = {d: decode_tokens_per_second(folder, d, args.new_tokens) for d in ("float32", "bfloat16")}
    print("LoRA r=16 train step, batch 2 x 256 tokens (s/step): " + ", ".join(f"{d} {v:.2f}" for d, v in step.items()))
    print(f"  bf16 speed-up over fp32: {step['float32'] / step['bfloat16']:.2f}x")
    print("greedy decoding (tokens/s): " + ", ".join(f"{d} {v:.2f}" for d, v in decode.items()))
    print(f"  fp32 speed-up over bf16: {decode['float32'] / decode['bfloat16']:.2f}x")


if __name__ == "__main__":
    main()
