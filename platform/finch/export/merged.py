"""`finch export REF --format merged`: a registry entry as one standalone 16-bit model folder.

The adapter is merged into its base (PEFT `merge_and_unload`), and the folder holds what plain
transformers, vLLM or llama.cpp's converter load without PEFT or finch: config, safetensors
weights, generation config, the tokenizer files the model was trained with, plus
`finch_export.json` naming the source entry.

A QLoRA adapter was trained against the 4-bit base, so it merges into that base loaded in 4-bit
as in training and then dequantized to 16-bit: the merged model computes what the trained one
did. (4-bit weights cannot hold a merge; the original 16-bit weights would differ from what the
adapter was trained with by the quantization error.) A fully fine-tuned entry is already a whole
model: it is cast and written the same way.

The folder is written into a staging folder beside the target and renamed into place, so a
reader never sees half an export.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from finch.config import ConfigError, RunConfig, validate_config
from finch.models.loading import load_base_model
from finch.registry.models import trained_base_folder
from finch.registry.store import RegistryEntry, resolve_entry

EXPORT_MANIFEST = "finch_export.json"
# Copied as they are, not re-saved by transformers: a re-save may drop the SentencePiece
# `tokenizer.model` that llama.cpp's converter reads.
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.model",
    "*.jinja",
    "vocab.json",
    "merges.txt",
)
SIXTEEN_BIT = ("bfloat16", "float16")


def export_merged(
    registry_dir: str | Path, ref: str, output: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Write `ref` merged into its base as a 16-bit model folder at `output`; returns the folder."""
    entry = resolve_entry(registry_dir, ref)
    entry.check_generates("be exported as a language model")
    config = validate_config(entry.manifest["config"])
    dtype = dtype or default_export_dtype(entry)
    if dtype not in SIXTEEN_BIT:
        raise ConfigError(f"dtype {dtype}: a merged export is 16-bit ({' or '.join(SIXTEEN_BIT)})")
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    model, tokenizer_folder = merged_model(entry, config)
    model = model.to(getattr(torch, dtype))
    model.config.use_cache = True  # training turned the KV cache off; generation wants it
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging)
        copy_tokenizer_files(Path(tokenizer_folder), staging)
        (staging / EXPORT_MANIFEST).write_text(json.dumps(export_manifest(entry, dtype), indent=2))
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def trained_dtype(entry: RegistryEntry, key: str = "weights") -> str:
    """The dtype the entry trained with: its weights, or the QLoRA compute dtype ("qlora_compute_dtype").
    Manifests from before finch recorded precision carry the config's, whose 'auto' meant bfloat16."""
    recorded = entry.manifest.get("precision", {}).get(key)
    if recorded is None:
        config = entry.manifest["config"]
        recorded = config["model"]["dtype"] if key == "weights" else config["qlora"]["compute_dtype"]
    return "bfloat16" if recorded == "auto" else recorded


def default_export_dtype(entry: RegistryEntry) -> str:
    """The 16-bit type the entry trained in; bfloat16 (the dtype checkpoints are published in) for
    fp32 training. A storage choice, independent of this machine: loaders cast as their device needs."""
    trained = trained_dtype(entry)
    return trained if trained in SIXTEEN_BIT else "bfloat16"


def merged_model(entry: RegistryEntry, config: RunConfig) -> tuple[Any, str]:
    """The entry's weights (trained with `config`) as one plain transformers model (no PEFT
    layers) on the CPU, and the folder whose tokenizer goes with it."""
    from peft import PeftModel

    # A registry manifest is data, not a trust decision: never run model code because of it.
    # Loaded in the dtype it trained in: PEFT merges in fp32 on the CPU, so no slow 16-bit matmuls here.
    # Always on the CPU, also on a GPU node: a merge is no reason to take GPU memory from a training
    # job or vLLM there.
    model_config = config.model.model_copy(
        update={"trust_remote_code": False, "dropout": None, "dtype": trained_dtype(entry)}
    )
    if entry.kind == "model":
        return load_base_model(model_config, str(entry.path)), str(entry.path)
    folder = trained_base_folder([entry])
    quantization = None
    if config.train.method == "qlora":
        quantization = config.qlora.model_copy(update={"compute_dtype": trained_dtype(entry, "qlora_compute_dtype")})
    base = load_base_model(model_config, folder, quantization=quantization, device_map="cpu")
    if quantization is not None:
        base = base.dequantize()  # 4-bit -> the 16-bit weights the adapter was trained against
    peft_model = PeftModel.from_pretrained(base, entry.path)
    return peft_model.merge_and_unload(safe_merge=True), folder  # safe_merge: refuses NaN/inf weights


def copy_tokenizer_files(source: Path, target: Path) -> None:
    for pattern in TOKENIZER_FILES:
        for path in source.glob(pattern):
            if path.is_file():
                shutil.copy2(path, target / path.name)


def export_manifest(entry: RegistryEntry, dtype: str) -> dict[str, Any]:
    return {
        "source": entry.ref,
        "kind": entry.kind,
        "method": entry.manifest["config"]["train"]["method"],
        "base_model": entry.manifest.get("base_model"),
        "template": entry.manifest.get("template"),
        "dtype": dtype,
    }
