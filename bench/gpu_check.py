"""GPU check: finch's training step against TRL's, packed attention per kernel, and finch's memory
estimate against the measured peak, on one CUDA GPU, without Ray or vLLM.

1. Training step, finch vs TRL in the same run: a Llama 3.2 1B-shaped model with random weights
   (saved in bf16), LoRA (bf16 weights) and QLoRA (4-bit NF4, bf16 compute), rank 16 on all linear
   layers. finch's side is the code its training worker runs without Ray around it
   (load_trainable_model, build_trainer) on rows packed by finch.data.packing; TRL's is a plain
   `AutoModelForCausalLM` + `peft_config` in `SFTTrainer`, given the same examples pre-tokenized and
   its best setting (best-fit-decreasing packing, padding-free). Both get the same
   TrainingArguments (finch's own mapping), batch size, learning rate and steps, and the attention
   kernel finch picks. Tokens/s = non-pad tokens of the timed steps / their time (warm-up steps
   left out, the GPU synchronized at both ends); peak = torch.cuda.max_memory_allocated over the
   whole process (load and training). Every variant runs in a process of its own.
2. finch's memory estimate (finch.memory.training_memory) against each finch variant's peak.
3. Packed vs separate logits per attention kernel (sdpa, eager, flex_attention, flash_attention_2
   and _3 where their packages are installed): examples packed into rows as finch collates them
   (flattened into one row for flash kernels) against each example alone, in bf16, with the logits
   of the same rows with their example boundaries ignored for scale. For flash kernels also rows
   left unflattened: they leak, which is why finch flattens.

It prints a markdown report and writes it (report.md, report.json, and the variants' logs) to
--out (default: $OUT, else ./gpu_check_out).

On the device machine (nvidia-h200: Python 3.12 with torch, transformers, accelerate; no trl,
bitsandbytes, datasets or pydantic), the missing packages travel as wheels (about 58 MiB: the
working tree and they must stay under 64 MiB). Here, once, from the repository root (.whl/ is
git-ignored):

    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl trl==1.16.0 bitsandbytes==0.50.2 transformers==5.19.0 \
        peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.3 pydantic-core==2.50.4 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0

then the device tool's `run` with carry [".whl"] and timeout_s 480 (the check should take about 5 minutes;
report.md is rewritten after every part, so a run cut short still returns what it measured):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:platform PYTHONUNBUFFERED=1 || exit; \
      python3 bench/gpu_check.py --out $OUT

On a CPU, `--smoke` runs all of it tiny (2 steps, sdpa and eager only) to check the script; its
numbers mean nothing:

    PYTHONPATH=platform .venv/bin/python bench/gpu_check.py --smoke --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from machine import command_line, load_average, machine_description

from finch.config import validate_config

PAD_ID = 0  # random token ids start at 1, so the non-pad tokens are the ids that are not 0
# Llama 3.2 1B: its vocabulary and tied embeddings, 16 layers of Llama 3's block.
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1024,
    "tie_word_embeddings": True,
    "max_position_embeddings": 1024,
}
# The attention kernels that need a package of their own, and which one.
KERNEL_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
# Packed logits count as the separate ones within this fraction of the largest logit: bf16 keeps 8
# bits, and the same example computed in another batch shape differed by about 0.5% of it on a CPU,
# while examples attending to each other moved the logits by 40-115% of it.
TOLERANCE = 0.02
CHILD_TIMEOUT_S = 180  # a variant takes under a minute on an H200; one that hangs must not eat the lease


@dataclass(frozen=True)
class Plan:
    """Sizes of a run: the GPU check, or the smoke run on a CPU."""

    shape: dict[str, Any]
    attention_layers: int
    dtype: str  # weights and QLoRA compute
    max_length: int
    example_lengths: tuple[int, int]  # training examples: random lengths between these
    attention_lengths: tuple[int, ...]  # packed into rows of attention_row tokens: three rows
    attention_row: int
    attentions: tuple[str, ...]
    steps: int
    warmup: int


PLANS = {
    "gpu": Plan(
        LLAMA_1B,
        4,
        "bfloat16",
        4096,
        (100, 1500),
        (1500, 900, 1300, 400, 700, 200),
        2048,
        ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
        10,
        3,
    ),
    # float32: a CPU without bf16 instructions runs bf16 about 100x slower (finch/precision.py)
    "smoke": Plan(TINY, 2, "float32", 256, (10, 150), (187, 112, 162, 50, 87, 25), 256, ("sdpa", "eager"), 2, 1),
}


# ---- the parent: models, data, variants and the report ----------------------------------------


class Report:
    """The markdown printed as it comes, and report.md / report.json rewritten after every part, so
    that a run cut short by the device's time limit still leaves what it measured."""

    def __init__(self, out: Path):
        self.out, self.lines, self.data = out, [], {}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, text: str, **data: Any) -> None:
        print(text, flush=True)
        self.lines.append(text)
        self.data.update(data)
        (self.out / "report.md").write_text("\n".join(self.lines) + "\n")
        (self.out / "report.json").write_text(json.dumps(self.data, indent=1, default=str))


def gpu_description() -> str:
    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
        f"driver {nvidia_driver()}, CUDA {torch.version.cuda}"
    )


def nvidia_driver() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def save_random_llama(folder: Path, shape: dict[str, Any], layers: int, device: str) -> str:
    """A Llama with random weights, saved in bf16: no download, and the shape is all the speed and
    memory depend on."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape | {"num_hidden_layers": layers}, pad_token_id=PAD_ID))
    model.to(torch.bfloat16).save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return str(folder)


def random_examples(count: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """SFT-like examples: random ids, the first 10-50% of each (the prompt) without labels."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(*lengths))]
        prompt = int(len(ids) * rng.uniform(0.1, 0.5))
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def packed_rows(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, Any]]:
    """finch's packed rows, one dict per row (a list of them serves as a Dataset)."""
    from finch.data.packing import pack_examples

    rows = pack_examples([e["input_ids"] for e in examples], [e["labels"] for e in examples], max_length, PAD_ID)
    return [{key: rows[key][i] for key in rows} for i in range(len(rows["input_ids"]))]


def run_config(args: argparse.Namespace, plan: Plan, work: Path, model_dir: str, method: str) -> dict:
    """The finch run config of a training variant; TRL's arguments come from the same dict."""
    return {
        "name": method,
        "output_dir": str(work / "runs"),
        "registry_dir": str(work / "registry"),
        "model": {"path": model_dir, "dtype": plan.dtype, "attn_implementation": args.attention},
        "data": {"train_files": ["unused.jsonl"], "max_length": plan.max_length},
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.0, "target_modules": "all-linear"},
        "qlora": {"quant_type": "nf4", "double_quant": True, "compute_dtype": plan.dtype},
        # 16-bit weights compute in their own type: no autocast (finch's 'auto' for LoRA on a GPU)
        "train": {
            "method": method,
            "lr": 2e-4,
            "max_steps": args.warmup + args.steps,
            "batch_size": args.batch_size,
            "scheduler": "constant",
            "save_steps": 10**6,
            "logging_steps": 1,
            "mixed_precision": "no",
        },
        "scale": {"use_gpu": not args.smoke},
    }


def run_child(spec: dict[str, Any], work: Path, name: str, logs: Path) -> dict[str, Any]:
    """Run one variant in a process of its own; its result, or {"error": ...} with its output's end."""
    spec_path, result_path, log = work / f"{name}.json", work / f"{name}.result.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec | {"result": str(result_path)}))
    with log.open("w") as output:
        try:
            code = subprocess.run(
                [sys.executable, __file__, "--variant", str(spec_path)],
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=CHILD_TIMEOUT_S,
            ).returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {CHILD_TIMEOUT_S}s"
    with logs.open("a") as combined:
        combined.write(f"\n===== {name} =====\n{log.read_text()}")
    if result_path.exists():
        return json.loads(result_path.read_text())
    tail = log.read_text().strip().splitlines()[-3:]
    return {"error": f"{name}: exit {code}: " + " / ".join(tail)}


def training_section(
    args: argparse.Namespace, plan: Plan, work: Path, model_dir: str, report: Report, logs: Path
) -> None:
    rows_path, examples_path = work / "rows.json", work / "examples.json"
    # Enough examples for every step's rows (packing fills rows to ~97%), with a margin.
    needed_tokens = 1.1 * (args.warmup + args.steps) * args.batch_size * plan.max_length
    examples = random_examples(
        int(needed_tokens / (sum(plan.example_lengths) / 2)) + 1, plan.example_lengths, plan.shape["vocab_size"]
    )
    rows = packed_rows(examples, plan.max_length)
    rows_path.write_text(json.dumps(rows))
    examples_path.write_text(json.dumps(examples))
    memory = "peak RSS GiB (CPU)" if args.smoke else "peak GPU GiB (max allocated)"
    report.add(
        f"\n## 1. Training step, finch vs TRL SFTTrainer\n\n{len(examples)} random examples of "
        f"{plan.example_lengths[0]}-{plan.example_lengths[1]} tokens (prompt 10-50% unlabelled), "
        f"{len(rows)} finch rows of {plan.max_length}; batch {args.batch_size}, {args.warmup} warm-up + "
        f"{args.steps} timed steps, lr 2e-4 constant, LoRA rank {args.rank} on all linear layers, "
        f"{plan.dtype} weights.\n\n"
        f"| method | attention | trained params | finch tokens/s | TRL tokens/s | finch/TRL | finch {memory} "
        f"| TRL {memory} | finch/TRL | train loss finch / TRL |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    results = []
    for method in args.methods:  # a row as soon as it is measured: a run cut short keeps it
        config = run_config(args, plan, work, model_dir, method)
        spec = {"config": config, "model": model_dir, "warmup": args.warmup}
        finch = run_child(spec | {"kind": "finch", "rows": str(rows_path)}, work, f"finch-{method}", logs)
        trl = run_child(spec | {"kind": "trl", "examples": str(examples_path)}, work, f"trl-{method}", logs)
        results.append({"method": method, "finch": finch, "trl": trl, "estimate": memory_estimate(config, model_dir)})
        report.add(training_row(results[-1]), training=results)
    report.add(
        f"\n## 2. finch's memory estimate vs measured peak\n\n| method | estimate GiB | measured {memory} "
        "| estimate/measured | peak reserved GiB | estimate's parts |\n|---|---|---|---|---|---|\n"
        + "\n".join(estimate_row(result) for result in results)
    )


def memory_estimate(config: dict, model_dir: str) -> dict[str, Any]:
    """finch's estimate for a variant (finch/memory.py), or why it could not be made: a broken
    estimate must not cost the measurements of a device run."""
    try:
        from finch.memory import training_memory

        estimate = training_memory(validate_config(config), model_dir)
        return {"total_gib": estimate.total, "parts": estimate.parts, "describe": estimate.describe()}
    except Exception as err:  # reported in the table instead
        return {"error": f"{type(err).__name__}: {err}"}


def training_row(result: dict[str, Any]) -> str:
    finch, trl = result["finch"], result["trl"]
    failed = [side["error"] for side in (finch, trl) if "error" in side]
    if failed:
        return f"| {result['method']} | failed: {' // '.join(failed)} |"
    return (
        f"| {result['method']} | {finch['attention']} | {finch['trained']:,} / {trl['trained']:,} | "
        f"{finch['tokens_per_s']:,.0f} | {trl['tokens_per_s']:,.0f} | {finch['tokens_per_s'] / trl['tokens_per_s']:.2f}x | "
        f"{finch['peak_gib']:.2f} | {trl['peak_gib']:.2f} | {finch['peak_gib'] / trl['peak_gib']:.2f}x | "
        f"{finch['train_loss']:.3f} / {trl['train_loss']:.3f} |"
    )


def estimate_row(result: dict[str, Any]) -> str:
    estimate, finch = result["estimate"], result["finch"]
    if "error" in estimate:
        return f"| {result['method']} | - | - | - | - | estimate failed: {estimate['error']} |"
    if "error" in finch:
        return f"| {result['method']} | {estimate['total_gib']:.2f} | - | - | - | {estimate['describe']} |"
    reserved = "-" if finch["peak_reserved_gib"] is None else f"{finch['peak_reserved_gib']:.2f}"
    return (
        f"| {result['method']} | {estimate['total_gib']:.2f} | {finch['peak_gib']:.2f} | "
        f"{estimate['total_gib'] / finch['peak_gib']:.2f} | {reserved} | {estimate['describe']} |"
    )


def attention_section(args: argparse.Namespace, plan: Plan, work: Path, report: Report, logs: Path) -> None:
    model_dir = save_random_llama(
        work / "attention-llama", plan.shape, plan.attention_layers, "cpu" if args.smoke else "cuda"
    )
    rng = random.Random(1)
    examples = [[rng.randrange(1, plan.shape["vocab_size"]) for _ in range(n)] for n in plan.attention_lengths]
    report.add(
        f"\n## 3. Packed vs separate logits per attention kernel\n\nA {plan.attention_layers}-layer random "
        f"Llama of the same shape in bf16; examples of {', '.join(map(str, plan.attention_lengths))} tokens "
        f"packed into rows of {plan.attention_row}. Separate = every example's packed logits within "
        f"{TOLERANCE:.0%} of the largest logit of its forward alone. 'Boundaries ignored' = the same rows "
        f"without position_ids: what attending across examples does to the logits.\n\n"
        "| attention | layout (finch's?) | max abs diff, packed vs alone | boundaries ignored | largest logit "
        "| result | seconds |\n|---|---|---|---|---|---|---|"
    )
    checks = []
    for attention in plan.attentions:
        package = KERNEL_PACKAGES.get(attention)
        if package and importlib.util.find_spec(package) is None:
            found = [{"attention": attention, "error": f"not installed (no {package} package)"}]
        else:
            # A process per kernel: a kernel that breaks the CUDA context or hangs in compilation
            # leaves the others' results standing.
            spec = {
                "kind": "attention",
                "attention": attention,
                "model": model_dir,
                "examples": examples,
                "row": plan.attention_row,
                "dtype": "bfloat16",
                "use_gpu": not args.smoke,
            }
            result = run_child(spec, work, f"attention-{attention}", logs)
            found = result.get("checks") or [{"attention": attention, **result}]
        checks += found
        report.add("\n".join(map(attention_row, found)), attention=checks)


def attention_row(check: dict[str, Any]) -> str:
    if "error" in check:
        return f"| {check['attention']} | - | - | - | - | {check['error']} | - |"
    separate = check["diff"] <= TOLERANCE * check["scale"]
    verdict = "separate" if separate else "LEAKS (FAIL)" if check["finch"] else "LEAKS"
    return (
        f"| {check['attention']} | {check['layout']} ({'yes' if check['finch'] else 'no'}) | {check['diff']:.4f} | "
        f"{check['leak']:.4f} | {check['scale']:.3f} | {verdict} | {check['seconds']:.1f} |"
    )


# ---- the variants, each in a process of its own ------------------------------------------------


class TokenCount:
    """Wraps a trainer's collator: the non-pad tokens of every batch, in the order steps take them."""

    def __init__(self, collate: Any):
        self.collate, self.batches = collate, []

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(rows)
        self.batches.append(int((batch["input_ids"] != PAD_ID).sum()))
        return batch


def step_clock(warmup: int) -> Any:
    """A callback that stamps the end of the last warm-up step and of the last step, after the GPU
    finished the work queued for them."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, state.max_steps):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks.append(time.perf_counter())

    return StepClock()


def timed_training(trainer: Any, warmup: int) -> dict[str, Any]:
    from finch.train.mixins import peak_memory_gib

    counter, clock = TokenCount(trainer.data_collator), step_clock(warmup)
    trainer.data_collator = counter
    trainer.add_callback(clock)
    output = trainer.train()
    steps = trainer.state.global_step
    tokens, seconds = sum(counter.batches[warmup:steps]), clock.marks[1] - clock.marks[0]
    peak = peak_memory_gib()
    # reserved: what the caching allocator held at most, allocated or not (closer to what the GPU must have)
    reserved = torch.cuda.max_memory_reserved() / 2**30 if "peak_gpu_gib" in peak else None
    model = trainer.model
    return {
        "tokens_per_s": tokens / seconds,
        "timed_tokens": tokens,
        "timed_seconds": seconds,
        "steps": steps,
        "train_loss": output.metrics["train_loss"],
        "peak_gib": peak.get("peak_gpu_gib", peak["peak_rss_gib"]),
        "peak_reserved_gib": reserved,
        "attention": str(model.config._attn_implementation),
        "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def finch_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """What a finch training worker runs, without Ray: its model loading and trainer."""
    from finch.models.loading import load_trainable_model
    from finch.train.trainers import build_trainer

    config = validate_config(spec["config"])
    rows = json.loads(Path(spec["rows"]).read_text())
    model = load_trainable_model(config, spec["model"])
    with tempfile.TemporaryDirectory() as output_dir:
        # SFT's collator needs the tokenizer's pad id only
        trainer = build_trainer(config, model, SimpleNamespace(pad_token_id=PAD_ID), rows, None, output_dir)
        return timed_training(trainer, spec["warmup"])


def trl_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL as its users write it: plain transformers model + peft_config + SFTConfig, packed padding-free."""
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from finch.models.loading import attention_implementation
    from finch.train.arguments import hf_arguments

    config = validate_config(spec["config"])
    extra: dict[str, Any] = {"dtype": getattr(torch, config.model.dtype)}
    attention = attention_implementation(config.model, config.scale.use_gpu)
    if attention:
        extra["attn_implementation"] = attention
    if config.train.method == "qlora":
        qlora = config.qlora
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=qlora.quant_type,
            bnb_4bit_use_double_quant=qlora.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, qlora.compute_dtype),
        )
    lora = config.lora
    peft_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    with tempfile.TemporaryDirectory() as output_dir:
        # finch's arguments say no autocast and no gradient checkpointing, where SFTConfig's defaults differ
        arguments = hf_arguments(config, output_dir) | {"save_strategy": "no"}
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(spec["model"], **extra),
            args=SFTConfig(**arguments, max_length=config.data.max_length, packing=True, padding_free=True),
            train_dataset=Dataset.from_list(json.loads(Path(spec["examples"]).read_text())),
            processing_class=pad_only_tokenizer(),
            peft_config=peft_config,
        )
        return timed_training(trainer, spec["warmup"])


def pad_only_tokenizer() -> Any:
    """SFTTrainer wants a tokenizer that knows its pad token; the examples are token ids already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = Tokenizer(models.WordLevel({"<pad>": PAD_ID}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=vocabulary, pad_token="<pad>")


def attention_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Each example's logits in the packed batch vs alone, for finch's layout (flattened for flash
    kernels, as finch.train.trainers.uses_flash_attention decides) and, for flash kernels, rows too."""
    from transformers import AutoModelForCausalLM

    from finch.train.collate import RowCollator

    attention, examples = spec["attention"], spec["examples"]
    rows = packed_rows([{"input_ids": e, "labels": e} for e in examples], spec["row"])
    device = "cuda" if spec["use_gpu"] else "cpu"
    model = (
        AutoModelForCausalLM.from_pretrained(
            spec["model"], dtype=getattr(torch, spec["dtype"]), attn_implementation=attention
        )
        .to(device)
        .eval()
    )
    # as finch's loader does: with a KV cache, transformers ignores the position restarts
    model.config.use_cache = False
    flash = attention.startswith("flash_attention")
    layouts = [("flattened" if flash else "rows", True)] + ([("rows", False)] if flash else [])
    checks = []
    with torch.no_grad():
        started = time.perf_counter()
        alone = [model(input_ids=torch.tensor([e], device=device)).logits[0] for e in examples]
        for layout, finch in layouts:
            batch = RowCollator(PAD_ID, flatten=layout == "flattened")(rows)
            ids = batch["input_ids"].to(device)
            packed = model(input_ids=ids, position_ids=batch["position_ids"].to(device)).logits
            ignored = model(input_ids=ids).logits  # no position restarts: one causal sequence per row
            spans = [locate(batch["input_ids"].tolist(), e) for e in examples]
            checks.append(
                {
                    "attention": attention,
                    "layout": layout,
                    "finch": finch,
                    "rows": len(ids),
                    "diff": max_diff(packed, alone, spans),
                    "leak": max_diff(ignored, alone, spans),
                    "scale": max(a.abs().max().item() for a in alone),
                    "seconds": time.perf_counter() - started,
                }
            )
            started = time.perf_counter()
    return {"checks": checks}


def locate(rows: list[list[int]], example: list[int]) -> tuple[int, int]:
    """(row, start) of an example in a batch (random ids: it occurs once)."""
    for index, row in enumerate(rows):
        for start in range(len(row) - len(example) + 1):
            if row[start] == example[0] and row[start : start + len(example)] == example:
                return index, start
    raise ValueError("example not found in the packed batch")


def max_diff(logits: torch.Tensor, alone: list[torch.Tensor], spans: list[tuple[int, int]]) -> float:
    return max(
        (logits[row, start : start + len(a)].float() - a.float()).abs().max().item()
        for a, (row, start) in zip(alone, spans)
    )


VARIANTS = {"finch": finch_variant, "trl": trl_variant, "attention": attention_variant}


def run_variant(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = VARIANTS[spec["kind"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))


# ---- command line -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU, to check the script (~2 minutes)")
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or "gpu_check_out",
        help="report folder (default: $OUT, else ./gpu_check_out)",
    )
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default 10; --smoke 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, at least 1 (default 3; --smoke 1)")
    parser.add_argument("--batch-size", type=int, default=2, help="packed rows per step (default 2)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--methods", default="lora,qlora", help="lora, qlora or both (default lora,qlora)")
    parser.add_argument(
        "--attention", default="auto", help="finch's model.attn_implementation for training (default auto)"
    )
    parser.add_argument("--skip-attention", action="store_true", help="leave out part 3 (packed vs separate logits)")
    args = parser.parse_args()
    plan = PLANS["smoke" if args.smoke else "gpu"]
    args.steps = args.steps or plan.steps
    args.warmup = args.warmup or plan.warmup
    args.methods = args.methods.split(",")
    if set(args.methods) - {"lora", "qlora"}:
        parser.error("--methods takes lora, qlora or both")
    return args


def main() -> None:
    args = parse_args()
    if args.variant:
        return run_variant(args.variant)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            "bench/gpu_check.py measures on a CUDA GPU and this machine has none; "
            "--smoke runs it tiny on the CPU to check the script"
        )
    started, plan = time.perf_counter(), PLANS["smoke" if args.smoke else "gpu"]
    # Every model is built here: a hub lookup could only stall (the device machine has no network).
    os.environ["HF_HUB_OFFLINE"] = "1"
    report = Report(Path(args.out))
    device = "cpu" if args.smoke else "cuda"
    modules = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")
    smoke = " (smoke run on CPU: it checks the script; its numbers mean nothing)" if args.smoke else ""
    report.add(
        f"# finch GPU check{smoke}\n\n"
        f"machine: {machine_description(modules, device)}; load average {load_average()}\n\n"
        f"GPU: {gpu_description() if not args.smoke else 'none'}\n\ncommand: {command_line()}",
        command=command_line(),
        args=vars(args),
    )
    logs = report.out / "variants.log"
    logs.write_text("")
    with tempfile.TemporaryDirectory(prefix="finch-gpu-check-") as tmp:
        work = Path(tmp)
        model_dir = save_random_llama(work / "llama", plan.shape, plan.shape["num_hidden_layers"], device)
        training_section(args, plan, work, model_dir, report, logs)
        if not args.skip_attention:
            attention_section(args, plan, work, report, logs)
    report.add(
        f"\nTotal time: {time.perf_counter() - started:.0f}s; load average {load_average()} at the end",
        total_seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
