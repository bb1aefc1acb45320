"""The LM head at labelled positions only (train/loss.py) against the model's own loss over every
position and against TRL's fused LM head: LoRA step time and peak memory on the quickstart model
(Gemma 3 270M, 262k vocabulary).

Variants, each in a process of its own (so each peak RSS is its own), all in this run:
- model: the model's own loss (full [tokens x vocabulary] logits and their gradient), the baseline;
- trl: TRL's fused LM head (`add_fused_lm_head`, what TRL 1.16's SFTTrainer and DPOTrainer use);
- labelled: finch's loss;
- labelled+checkpointing: finch's loss with activation checkpointing (train.gradient_checkpointing).

Batches:
- sft: the quickstart's packed rows (jobs/data/concierge.jsonl, Alpaca template, 2 x 256 tokens;
  about 46% of the tokens carry a label);
- long: one 2,048-token row of continued pre-training (every token labelled), where only the
  chunking (one chunk of logits alive at a time) can help;
- with --lengths: one row per length whose second half is labelled (an SFT answer), for the curve of
  peak memory against max_length (a PNG beside the table); the model's own loss is left out above
  2,048 tokens (its logits alone would take most of a 24 GiB machine).

    .venv/bin/python bench/loss.py [--steps 3] [--lengths 512,1024,2048,4096] [--plot loss_memory.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from machine import command_line, machine_description

VARIANTS = ("model", "trl", "labelled", "labelled+checkpointing")
MODEL_LOSS_MAX_TOKENS = 2048


def sft_batch(folder: str) -> dict[str, torch.Tensor]:
    from finch.data.formats import detect_format, normalize
    from finch.data.packing import pack_examples
    from finch.data.tokenization import tokenize_sample
    from finch.models.tokenizer import load_tokenizer
    from finch.train.collate import RowCollator

    tokenizer = load_tokenizer(folder)
    examples = []
    with open("jobs/data/concierge.jsonl") as lines:
        for number, line in enumerate(lines, 1):
            record = json.loads(line)
            examples.append(
                tokenize_sample(
                    normalize(record, detect_format(record), f"concierge:{number}"), "alpaca", tokenizer, 256
                )
            )
    rows = pack_examples([e.input_ids for e in examples], [e.labels for e in examples], 256, tokenizer.pad_token_id)
    return RowCollator(tokenizer.pad_token_id)([{k: rows[k][i] for k in rows} for i in range(2)])


def long_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(10, 200_000, (1, 2048), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def half_labelled_row(length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(10, 200_000, (1, length), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": ids, "labels": labels}


def make_batch(name: str, folder: str) -> dict[str, torch.Tensor]:
    if name == "sft":
        return sft_batch(folder)
    return long_batch() if name == "long" else half_labelled_row(int(name))


def step_loss(variant: str, model, head, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from finch.train.loss import next_token_loss

    if variant == "model":
        return model(**batch).loss
    if variant == "trl":
        return model(**batch, fused_lm_head=True).loss
    return next_token_loss(model, head, batch)[0]


def measure(variant: str, batch_name: str, steps: int, dtype: str) -> dict[str, float]:
    """One variant in this process: seconds per LoRA step and the process's peak RSS."""
    from finch.config import LoraConfig, ModelConfig
    from finch.models.gemma_gguf import ensure_gemma3_270m
    from finch.models.loading import apply_lora, load_base_model
    from finch.train.loss import LabelledHead
    from finch.train.mixins import peak_memory_gib

    folder = str(ensure_gemma3_270m())
    batch = make_batch(batch_name, folder)
    model = apply_lora(
        load_base_model(ModelConfig(path=folder, dtype=dtype), folder),
        LoraConfig(r=16, alpha=32, target_modules="all-linear"),
    )
    if variant == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model())  # as TRL's trainers do for a PEFT model
    if variant.endswith("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # as HF Trainer does for PEFT models
    model.train()
    head = LabelledHead(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and is not counted
        start = time.perf_counter()
        step_loss(variant, model, head, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {
        "seconds": sum(times[1:]) / steps,
        "peak_gib": peak_memory_gib()["peak_rss_gib"],
        "labelled": int((batch["labels"][:, 1:] != -100).sum()),
        "tokens": batch["input_ids"].numel(),
    }


def run_variant(variant: str, batch: str, steps: int, dtype: str) -> dict[str, float]:
    child = [sys.executable, __file__, "--steps", str(steps), "--dtype", dtype, "--child", variant, batch]
    return json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def compare(batch: str, steps: int, dtype: str) -> dict[str, dict[str, float]]:
    """Every variant on one batch (the model's own loss only up to MODEL_LOSS_MAX_TOKENS tokens a row)."""
    long_row = batch not in ("sft", "long") and int(batch) > MODEL_LOSS_MAX_TOKENS
    results = {
        variant: run_variant(variant, batch, steps, dtype)
        for variant in VARIANTS
        if not (long_row and variant == "model")
    }
    some = next(iter(results.values()))
    print(f"{batch}: {some['tokens']} tokens, {some['labelled']} labelled")
    base = results.get("model")
    for variant, result in results.items():
        versus = (
            f" ({base['seconds'] / result['seconds']:.2f}x faster, "
            f"{base['peak_gib'] / result['peak_gib']:.2f}x less memory than the model's loss)"
            if base
            else ""
        )
        print(
            f"  {variant:>24}: {result['seconds']:.2f} s/step, peak RSS {result['peak_gib']:.2f} GiB{versus}",
            flush=True,
        )
    return results


def plot(curves: dict[int, dict[str, dict[str, float]]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for variant in VARIANTS:
        points = [(length, results[variant]["peak_gib"]) for length, results in curves.items() if variant in results]
        axis.plot(*zip(*points), marker="o", label=variant)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("tokens in the row (second half labelled)")
    axis.set_ylabel("peak RSS, GiB")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="weights dtype; 'auto' as finch chooses for this CPU")
    parser.add_argument("--batches", default="sft,long", help="fixed batches to run (sft, long; '' for none)")
    parser.add_argument("--lengths", default="", help="row lengths for the memory curve, e.g. 512,1024,2048,4096")
    parser.add_argument("--plot", default="loss_memory.png", help="where the memory curve goes (with --lengths)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.steps, args.dtype)))
        return
    from finch.precision import cpu_device, inference_dtype

    dtype = inference_dtype(args.dtype, cpu_device())[0]
    print(f"machine: {machine_description(('torch', 'transformers', 'peft', 'trl'))}")
    print(f"command: {command_line()}; weights {dtype}, LoRA r=16 on all linear layers", flush=True)
    for batch in filter(None, args.batches.split(",")):
        compare(batch, args.steps, dtype)
    if args.lengths:
        curves = {int(length): compare(length, args.steps, dtype) for length in args.lengths.split(",")}
        plot(curves, args.plot, f"Gemma 3 270M, LoRA r=16, {dtype}: peak memory of a training step")


if __name__ == "__main__":
    main()
