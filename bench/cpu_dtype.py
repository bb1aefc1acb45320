"""bf16 vs fp32 on CPU for the quickstart model: LoRA training step time and greedy decoding speed.

What `dtype: auto` decides (finch/precision.py): bf16 pays only on CPUs that run it natively
(AVX512-BF16/AMX); elsewhere PyTorch emulates it, many times slower. Both dtypes are measured in
this run on the same inputs; the ratios are what to read. The first line names the CPU, its ATen
capability, its bf16 instructions and any ISA cap; `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`
reproduces a CPU without native bf16 on one that has it.

    .venv/bin/python bench/cpu_dtype.py [--steps 3] [--new-tokens 24] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import command_line, machine_description

from finch.config import LoraConfig, ModelConfig
from finch.models.gemma_gguf import ensure_gemma3_270m
from finch.models.loading import apply_lora, load_base_model
from finch.precision import cpu_device, inference_dtype


def train_step_seconds(folder: str, dtype: str, steps: int, seq_len: int) -> float:
    model = apply_lora(load_base_model(ModelConfig(path=folder, dtype=dtype), folder), LoraConfig(r=16, alpha=32))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(10, 200_000, (2, seq_len), generator=torch.Generator().manual_seed(0))
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
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row of the 2-row training batch")
    args = parser.parse_args()
    folder = str(ensure_gemma3_270m())
    print(f"machine: {machine_description(('torch', 'transformers', 'peft'))}")
    device = cpu_device()
    print(f"finch dtype auto here: {inference_dtype('auto', device)[0]} ({device.evidence})")
    print(f"command: {command_line()}", flush=True)
    step = {d: train_step_seconds(folder, d, args.steps, args.seq_len) for d in ("float32", "bfloat16")}
    decode = {d: decode_tokens_per_second(folder, d, args.new_tokens) for d in ("float32", "bfloat16")}
    print(
        f"LoRA r=16 train step, batch 2 x {args.seq_len} tokens (s/step): "
        + ", ".join(f"{d} {v:.2f}" for d, v in step.items())
    )
    print(f"  bf16 speed-up over fp32: {step['float32'] / step['bfloat16']:.3g}x")
    print("greedy decoding (tokens/s): " + ", ".join(f"{d} {v:.2f}" for d, v in decode.items()))
    print(f"  bf16 speed-up over fp32: {decode['bfloat16'] / decode['float32']:.3g}x")


if __name__ == "__main__":
    main()
