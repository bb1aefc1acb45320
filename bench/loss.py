"""The LM head at labelled positions only (train/loss.py) against the model's own loss over every
position: LoRA step time and peak memory on the quickstart model (Gemma 3 270M, 262k vocabulary).

Two batches, each run with both losses in this run (separate processes, so peak RSS is each one's own):
- sft: the quickstart's packed rows (jobs/data/concierge.jsonl, Alpaca template, 2 x 256 tokens;
  about 46% of the tokens carry a label);
- long: one 2,048-token row of continued pre-training (every token labelled), where only the
  chunking (one chunk of logits alive at a time) can help.

    .venv/bin/python bench/loss.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from machine import command_line, machine_description

VARIANTS = ("model", "labelled")


def sft_batch(folder: str) -> dict[str, torch.Tensor]:
    from finch.data.formats import detect_format, normalize
    from finch.data.packing import pack_examples
    from finch.data.pipeline import load_tokenizer
    from finch.data.tokenization import tokenize_sample
    from finch.train.collate import RowCollator

    tokenizer = load_tokenizer(folder)
    examples = []
    with open("jobs/data/concierge.jsonl") as lines:
        for number, line in enumerate(lines, 1):
            record = json.loads(line)
            examples.append(tokenize_sample(normalize(record, detect_format(record), f"concierge:{number}"), "alpaca", tokenizer, 256))
    rows = pack_examples([e.input_ids for e in examples], [e.labels for e in examples], 256, tokenizer.pad_token_id)
    return RowCollator(tokenizer.pad_token_id)([{k: rows[k][i] for k in rows} for i in range(2)])


def long_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(10, 200_000, (1, 2048), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def measure(variant: str, batch_name: str, steps: int, dtype: str) -> dict[str, float]:
    """One variant in this process: seconds per LoRA step and the process's peak RSS."""
    from finch.config import LoraConfig, ModelConfig
    from finch.models.gemma_gguf import ensure_gemma3_270m
    from finch.models.loading import apply_lora, load_base_model
    from finch.train.loss import LabelledHead, next_token_loss

    folder = str(ensure_gemma3_270m())
    batch = sft_batch(folder) if batch_name == "sft" else long_batch()
    model = apply_lora(load_base_model(ModelConfig(path=folder, dtype=dtype), folder), LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    model.train()
    head = LabelledHead(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and is not counted
        start = time.perf_counter()
        loss = model(**batch).loss if variant == "model" else next_token_loss(model, head, batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"seconds": sum(times[1:]) / steps, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "labelled": int((batch["labels"][:, 1:] != -100).sum()), "tokens": batch["input_ids"].numel()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="weights dtype; 'auto' as finch chooses for this CPU")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.steps, args.dtype)))
        return
    from finch.precision import cpu_device, inference_dtype

    dtype = inference_dtype(args.dtype, cpu_device())[0]
    print(f"machine: {machine_description(('torch', 'transformers', 'peft'))}")
    print(f"command: {command_line()}; weights {dtype}, LoRA r=16 on all linear layers", flush=True)
    for batch in ("sft", "long"):
        results = {}
        for variant in VARIANTS:
            child = [sys.executable, __file__, "--steps", str(args.steps), "--dtype", dtype, "--child", variant, batch]
            results[variant] = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        model, labelled = results["model"], results["labelled"]
        print(f"{batch}: {model['tokens']} tokens, {labelled['labelled']} labelled")
        for variant in VARIANTS:
            print(f"  {variant:>8} loss: {results[variant]['seconds']:.2f} s/step, peak RSS {results[variant]['peak_gib']:.2f} GiB")
        print(f"  labelled head: {model['seconds'] / labelled['seconds']:.2f}x faster, "
              f"{model['peak_gib'] / labelled['peak_gib']:.2f}x less peak memory", flush=True)


if __name__ == "__main__":
    main()
