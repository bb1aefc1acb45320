"""Memory against dataset size: the training worker's and the driver's peak resident memory when
`finch train` runs on 1x, 10x, 30x and 100x of the same set, each size in a run of its own.

The set is guanaco-llama2-1k (../shared/data, 1,000 Llama-2-chat rows), repeated; the model a
2-layer random Llama with the torchtune test BPE tokenizer (so memory is the data's, not the
weights'); LoRA, 1 worker, max_length 512, packed rows, a few optimizer steps (the rows are all
prepared and handed to the worker before the first). The baseline is the 1x run: the table's
ratio is a size's peak over 1x's, which should stay near 1.

- worker peak RSS: the training worker's own `ru_maxrss` (finch logs it as peak_rss_gib);
- driver peak RSS: the `finch train` process, sampled every 0.2 s;
- all processes: the largest sum of PSS over the command's process tree (driver, Ray, worker).

    .venv/bin/python bench/data_memory.py [--scales 1,10,30,100] [--steps 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from machine import command_line, load_average, machine_description
from train import FINCH, run_measured

from finch.registry.store import resolve_entry

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GUANACO = SHARED / "sft" / "guanaco-llama2-1k.train.parquet"
TOKENIZER = SHARED / "tokenizers" / "torchtune_tiny_bpe_tokenizer.json"


def tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def repeated(scale: int, path: Path) -> Path:
    table = pq.read_table(GUANACO)
    pq.write_table(pa.concat_tables([table] * scale), path)
    return path


def run_scale(scale: int, model: Path, work: Path, steps: int) -> dict:
    name = f"guanaco-{scale}x"
    config = {
        "name": name,
        "output_dir": str(work / "runs"),
        "registry_dir": str(work / "registry"),
        "model": {"path": str(model), "dtype": "float32"},
        "data": {
            "train_files": [str(repeated(scale, work / f"{name}.parquet"))],
            "template": "alpaca",
            "max_length": 512,
        },
        "train": {"method": "lora", "max_steps": steps, "batch_size": 2, "save_steps": 10**6, "logging_steps": 1},
        "scale": {"num_workers": 1},
        "tracking": {"mlflow": False},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    wall, memory = run_measured([FINCH, "train", str(path), "--overwrite"], work / f"{name}.log")
    manifest = resolve_entry(config["registry_dir"], name).manifest
    (work / f"{name}.parquet").unlink()
    return {
        "scale": scale,
        "examples": manifest["dataset"]["stats"]["examples"],
        "tokens": manifest["dataset"]["stats"]["tokens"],
        "worker": manifest["metrics"]["peak_rss_gib"],
        "driver": memory.root_rss / 2**30,
        "all": memory.total / 2**30,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,10,30,100", help="copies of the set, comma-separated (first = baseline)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="finch-bench-") as folder:
        work = Path(folder)
        model = tiny_llama(work / "model")
        results = []
        for scale in (int(s) for s in args.scales.split(",")):
            results.append(run_scale(scale, model, work, args.steps))
            r = results[-1]
            print(
                f"{scale}x: {r['tokens']:,} tokens, worker {r['worker']:.2f} GiB, driver {r['driver']:.2f} GiB, "
                f"all processes {r['all']:.2f} GiB, {r['wall']:.0f} s",
                flush=True,
            )
    base = results[0]
    print(
        f"\n{machine_description(('torch', 'ray', 'transformers'))}\n{command_line()}\nload average: {load_average()}\n"
    )
    print(
        "| size | examples | tokens | worker peak RSS GiB | vs 1x | driver peak RSS GiB | vs 1x "
        "| all processes PSS GiB | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['scale']}x | {r['examples']:,} | {r['tokens']:,} | {r['worker']:.2f} | {r['worker'] / base['worker']:.2f}x "
            f"| {r['driver']:.2f} | {r['driver'] / base['driver']:.2f}x | {r['all']:.2f} | {r['wall']:.0f} |"
        )


if __name__ == "__main__":
    main()
