"""finch eval's generation against a transformers `generate` loop that switches PEFT adapters per model.

The same greedy answers in both, measured in one run: the base model and N LoRA adapters (random,
rank 16 on all seven linear projections, published to a temporary registry) each answer the same
real prompts (the quickstart's held-out tickets and concierge questions), up to the same number of
new tokens, stopping at the model's end tokens.

- finch: the code of `finch eval`'s Ray Data actor (finch/eval/generate.py `Generator`), called
  directly: one vLLM engine with every adapter, all models' requests handed over together, so vLLM
  schedules them in the same continuous batches. Ray Data's share (moving a few hundred rows) is left
  out on both sides.
- baseline: transformers + PEFT, every adapter loaded in one PeftModel; for each model in turn
  `set_adapter` (adapters disabled for the base) and batched greedy `generate` over the prompts
  (left-padded, --batch prompts per call), the way LLaMA-Factory's `do_predict` generates.

Both count the answer tokens up to and including the first end token; "answers equal" counts the
(model, prompt) pairs whose texts agree (greedy on the same weights; the kernels differ, so a near-tie
may rarely differ). Ratios compare answer tokens per second of generation, and of the whole job
(engine start or model load included). On CPU read the ratios; absolute times mean something only
from a GPU run.

    .venv/bin/python bench/eval.py [--adapters 3] [--prompts 24] [--new-tokens 32] [--batch 8] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import command_line, machine_description
from serve_multilora import build_adapters, load_peft_model, publish_adapters

from finch.config import EvalConfig, EvalDataConfig, validate_config
from finch.data.tokenization import prompt_token_ids
from finch.eval.examples import read_examples
from finch.eval.generate import Generator
from finch.eval.targets import engine_groups
from finch.models.gemma_gguf import GEMMA3_270M_URI
from finch.models.source import resolve_model_path
from finch.models.tokenizer import load_tokenizer
from finch.precision import detect_device, inference_dtype

REPO = Path(__file__).resolve().parents[1]
PROMPT_FILES = ("jobs/data/triage_heldout.jsonl", "jobs/data/concierge.jsonl")


def real_prompts(count: int) -> list[list[dict[str, str]]]:
    """The prompt turns of the quickstart's data (read as finch eval reads them), without their answers."""
    examples = read_examples(EvalDataConfig(files=[str(REPO / name) for name in PROMPT_FILES], limit=count))
    if len(examples) < count:
        raise SystemExit(f"only {len(examples)} prompts in {PROMPT_FILES}")
    return [e.messages for e in examples]


def finch_generation(config: EvalConfig, prompts: list, dtype: str) -> tuple[dict, float, float]:
    """Answers keyed by (prompt index, model), engine start seconds, generation seconds."""
    (group,) = engine_groups(config)
    start = time.perf_counter()
    generator = Generator(group, group.engine_settings(config.engine, on_gpu=False), config.generation, dtype, gpus=0)
    started = time.perf_counter()
    rows = [
        (i, t.name, json.dumps(p)) for i, p in enumerate(prompts) for t in group.targets
    ]  # example-major, as finch eval
    batch = {
        "example": np.array([r[0] for r in rows]),
        "target": np.array([r[1] for r in rows]),
        "messages": np.array([r[2] for r in rows]),
    }
    out = generator(batch)
    finished = time.perf_counter()
    # keyed by adapter name, as the baseline: the registry refs are name@v1
    answers = {
        (e, t.split("@")[0]): (a, n)
        for e, t, a, n in zip(out["example"], out["target"], out["answer"], out["answer_tokens"])
    }
    del generator
    return answers, started - start, finished - started


def baseline_generation(
    model_path: str,
    adapters: dict[str, Path],
    prompts: list,
    template: str,
    new_tokens: int,
    batch: int,
    dtype: torch.dtype,
    stop_ids: list[int],
) -> tuple[dict, float, float]:
    start = time.perf_counter()
    model = load_peft_model(model_path, adapters, dtype, "cpu")
    tokenizer = load_tokenizer(model_path)
    tokenizer.padding_side = "left"
    loaded = time.perf_counter()
    ids = [prompt_token_ids(p, tokenizer, template) for p in prompts]
    answers = {}
    for name in ["base", *adapters]:
        for first in range(0, len(ids), batch):
            chunk = ids[first : first + batch]
            width = max(len(x) for x in chunk)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            with torch.inference_mode(), model.disable_adapter() if name == "base" else contextlib.nullcontext():
                if name != "base":
                    model.set_adapter(name)
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=stop_ids,
                    pad_token_id=tokenizer.pad_token_id,
                )
            for offset, row in enumerate(out[:, width:].tolist()):
                tokens = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
                answers[(first + offset, name)] = (tokenizer.decode(row[:tokens], skip_special_tokens=True), tokens)
    return answers, loaded - start, time.perf_counter() - loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=GEMMA3_270M_URI)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="baseline: prompts per generate call")
    args = parser.parse_args()
    from finch.models.tokenizer import stop_token_ids

    model_path = resolve_model_path(args.model)
    dtype, _ = inference_dtype("auto", detect_device(False))
    prompts = real_prompts(args.prompts)
    work = Path(tempfile.mkdtemp(prefix="finch-bench-eval-"))
    names = [f"bench-{i}" for i in range(args.adapters)]
    adapters = build_adapters(model_path, work / "adapters", names, rank=16, dtype=getattr(torch, dtype))
    template = "alpaca" if not getattr(load_tokenizer(model_path), "chat_template", None) else "chat"
    run_config = {
        "name": "bench",
        "model": {"path": model_path, "dtype": dtype},
        "data": {"train_files": ["x.jsonl"], "template": template},
    }
    for name, folder in adapters.items():
        publish_adapters(work / "registry", {name: folder}, model_path, args.model, template)
        manifest_path = work / "registry" / name / "v1" / "finch_manifest.json"
        manifest = json.loads(manifest_path.read_text()) | {"config": run_config}
        manifest_path.write_text(json.dumps(manifest))
    config = validate_config(
        {
            "name": "bench",
            "models": ["base", *names],
            "model": {"path": model_path, "dtype": dtype},
            "template": template,
            "registry_dir": str(work / "registry"),
            "data": {"files": [str(REPO / PROMPT_FILES[0])]},
            "metrics": ["answer_tokens"],
            "generation": {"max_tokens": args.new_tokens},
            "engine": {"max_model_len": 512},
        },
        schema=EvalConfig,
    )
    print(f"machine: {machine_description(('torch', 'transformers', 'peft', 'vllm'))}")
    print(f"command: {command_line()}")
    baseline, baseline_load, baseline_s = baseline_generation(
        model_path,
        adapters,
        prompts,
        template,
        args.new_tokens,
        args.batch,
        getattr(torch, dtype),
        stop_token_ids(model_path, load_tokenizer(model_path)),
    )
    finch, finch_start, finch_s = finch_generation(config, prompts, dtype)
    finch_tokens = sum(n for _, n in finch.values())
    baseline_tokens = sum(n for _, n in baseline.values())
    equal = sum(finch[key][0].strip() == baseline[key][0].strip() for key in baseline)
    print(
        f"\n{args.adapters} adapters + base, {len(prompts)} prompts, up to {args.new_tokens} new tokens, {dtype}; "
        f"answers equal: {equal}/{len(baseline)}\n"
    )
    print("| | start (s) | generation (s) | answer tokens | tokens/s | whole job tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, start, seconds, tokens in (
        ("transformers + PEFT, batched per model", baseline_load, baseline_s, baseline_tokens),
        ("finch eval (vLLM, one engine)", finch_start, finch_s, finch_tokens),
    ):
        print(
            f"| {name} | {start:.1f} | {seconds:.1f} | {tokens} | {tokens / seconds:.1f} | {tokens / (start + seconds):.1f} |"
        )
    speed = (finch_tokens / finch_s) / (baseline_tokens / baseline_s)
    whole = (finch_tokens / (finch_start + finch_s)) / (baseline_tokens / (baseline_load + baseline_s))
    print(f"\nfinch vs baseline: generation {speed:.2f}x, whole job {whole:.2f}x")


if __name__ == "__main__":
    main()
