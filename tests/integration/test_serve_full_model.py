"""`finch serve` with a fully fine-tuned registry entry as the base model (model.path 'registry:NAME'),
an adapter trained on that entry beside it: real Ray Serve + vLLM (CPU build), one server start."""

from __future__ import annotations

from pathlib import Path

import pytest

from finch.config import ServeConfig, validate_config
from finch.data.tokenization import prompt_token_ids
from tests.conftest import free_port, make_adapter, make_tiny_model_dir, make_tokenizer
from tests.greedy import greedy_answers, load_reference
from tests.integration.test_serve_engine import register
from tests.unit.test_serve_registry_model import register_full_model

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "Name a colour."}]
NEW_TOKENS = 10


def expected_answers(model_dir: Path, adapter_dir: Path | None, template: str) -> set[str]:
    """transformers' greedy answers to QUESTION in `template`, near-ties included (tests/greedy.py)."""
    tokenizer = make_tokenizer()
    prompt = prompt_token_ids(QUESTION, tokenizer, template)
    answers = greedy_answers(load_reference(model_dir, adapter_dir), prompt, NEW_TOKENS, tokenizer.eos_token_id)
    return {tokenizer.decode(answer, skip_special_tokens=True) for answer in answers}


def test_a_registry_full_fine_tune_serves_as_the_base_in_its_template_with_adapters_trained_on_it(
    ray_local, tmp_path, tiny_serving_model_dir
):
    import openai
    from ray import serve

    from finch.serve.app import run

    registry = tmp_path / "registry"
    # "Fine-tuned": other weights than the base. Trained in alpaca, though its tokenizer has a chat
    # template, so an answer in the config's template ('auto' would pick chat) fails the comparison.
    fine_tuned = make_tiny_model_dir(tmp_path / "fine-tuned", seed=7, head_dim=32)
    entry = register_full_model(registry, "full", fine_tuned, tiny_serving_model_dir, template="alpaca")
    on_top = make_adapter(entry.path, tmp_path / "on-top", seed=3)
    register(registry, "ontop", on_top, entry.path)  # base fingerprint: the entry's folder
    config = validate_config(
        {
            "model": {"path": "registry:full", "dtype": "float32"},
            "registry_dir": str(registry),
            "adapters": ["ontop"],
            "engine": {"max_model_len": 128, "max_loras": 2, "max_lora_rank": 8},
            "server": {"port": free_port(), "max_tokens_limit": 64, "request_timeout_s": 60},
        },
        schema=ServeConfig,
    )
    url = run(config, blocking=False)
    try:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert {m.id for m in api.models.list().data} == {"base", "ontop"}
        expected = {
            "base": expected_answers(entry.path, None, "alpaca"),
            "ontop": expected_answers(entry.path, on_top, "chat"),
        }
        assert not expected["base"] & expected_answers(
            tiny_serving_model_dir, None, "alpaca"
        )  # the fine-tune, not its base
        assert not expected["base"] & expected_answers(entry.path, None, "chat")  # in its template, not the tokenizer's
        for model, answers in expected.items():
            reply = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=NEW_TOKENS, temperature=0)
            assert reply.choices[0].message.content in answers, (model, answers)
    finally:
        serve.shutdown()
