"""The tokenizer of a model folder and the token ids that end an answer: one place for data
preparation, training, evaluation, `finch chat` and `finch serve`."""

from __future__ import annotations

import functools
from typing import Any

from finch.config import ConfigError


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """One tokenizer per process and path (Ray tasks reuse worker processes); a pad token always."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise ConfigError(f"{path}: finch needs a fast (Rust) tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def merge_stop_ids(tokenizer: Any, configured: int | list[int] | None) -> list[int]:
    """The tokenizer's EOS plus the model's own stop tokens (e.g. end-of-turn tokens)."""
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({tokenizer.eos_token_id, *(t for t in configured if t is not None)})


def stop_token_ids(model_folder: str, tokenizer: Any) -> list[int]:
    """merge_stop_ids for a model folder, read from its generation_config.json when it has one."""
    from transformers import GenerationConfig

    try:
        configured = GenerationConfig.from_pretrained(model_folder).eos_token_id
    except OSError:
        configured = None
    return merge_stop_ids(tokenizer, configured)
