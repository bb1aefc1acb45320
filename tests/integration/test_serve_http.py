"""`finch serve` over real HTTP: Ray Serve + vLLM (CPU build), driven by the official openai client."""

from __future__ import annotations

import concurrent.futures
import os
import time

import httpx
import pytest

from finch.config import ServeConfig, validate_config
from finch.data.tokenization import prompt_token_ids
from finch.fingerprint import fingerprint_model_folder
from finch.registry.store import publish
from tests.conftest import free_port, make_tokenizer, model_source
from tests.greedy import greedy_answers, load_reference
from tests.integration.test_serve_engine import make_adapter, register

pytestmark = pytest.mark.integration
API_KEY = "test-key-123"
QUESTION = [{"role": "user", "content": "Name a colour."}]
# Debian's Chromium (the Makefile installs it); Playwright drives it and downloads no browser.
CHROMIUM = os.environ.get("FINCH_CHROMIUM", "/usr/bin/chromium")
# The machine's network is closed: keep Chromium from trying to reach Google's services.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory, tiny_serving_model_dir, monkeypatch_module):
    from ray import serve

    from finch.serve.app import run

    tmp = tmp_path_factory.mktemp("serve-http")
    registry = tmp / "registry"
    adapters = {
        name: make_adapter(tiny_serving_model_dir, tmp / name, seed)
        for name, seed in (("a1", 1), ("a2", 2), ("a1v2", 3))
    }
    register(registry, "a1", adapters["a1"], tiny_serving_model_dir)
    register(registry, "a2", adapters["a2"], tiny_serving_model_dir)
    monkeypatch_module.setenv("FINCH_API_KEY", API_KEY)
    config = validate_config(
        {
            "model": {"path": str(tiny_serving_model_dir), "dtype": "float32"},
            "template": "chat",
            "registry_dir": str(registry),
            "adapters": ["a1"],
            "on_demand": ["od-*"],
            "engine": {"max_model_len": 512, "max_loras": 3, "max_lora_rank": 8, "max_cpu_loras": 5},
            # two replicas: admin changes must reach both
            "server": {
                "port": free_port(),
                "max_tokens_limit": 64,
                "request_timeout_s": 60,
                "num_replicas": 2,
                "cpus_per_replica": 0.5,
                "adapter_sync_s": 0.5,
                "tool_parser": "hermes",
            },
        },
        schema=ServeConfig,
    )
    url = run(config, blocking=False)
    yield url, registry, adapters, tiny_serving_model_dir
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def client(url: str, key: str = API_KEY):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def reference_answers(model_dir, adapter_dir, max_new_tokens: int) -> set[str]:
    """transformers' greedy answers to QUESTION: the plain one, and any that leave it only at a
    near-tie, where another CPU's kernels may rightly pick the other token (tests/greedy.py)."""
    tokenizer = make_tokenizer()
    # the prompt exactly as training renders it (finch.data.tokenization)
    prompt = prompt_token_ids(QUESTION, tokenizer, "chat")
    answers = greedy_answers(load_reference(model_dir, adapter_dir), prompt, max_new_tokens, tokenizer.eos_token_id)
    return {tokenizer.decode(answer, skip_special_tokens=True) for answer in answers}


def test_models_chat_and_streaming_match_transformers(server):
    url, _, adapters, model_dir = server
    api = client(url)
    assert {m.id for m in api.models.list().data} == {"base", "a1"}
    expected = {"a1": reference_answers(model_dir, adapters["a1"], 10), "base": reference_answers(model_dir, None, 10)}
    assert not expected["a1"] & expected["base"]  # a base request computed with a1 (or the reverse) fails
    for model in ("a1", "base"):
        reply = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=10, temperature=0)
        assert reply.choices[0].message.content in expected[model], (model, expected[model])
        assert reply.usage.prompt_tokens == len(prompt_token_ids(QUESTION, make_tokenizer(), "chat"))
        assert reply.usage.completion_tokens <= 10
        chunks = list(
            api.chat.completions.create(
                model=model,
                messages=QUESTION,
                max_tokens=10,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == reply.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
    completion = api.completions.create(
        model="a1", prompt="Once upon", max_tokens=5, temperature=0.8, top_p=0.9, seed=3
    )
    again = api.completions.create(model="a1", prompt="Once upon", max_tokens=5, temperature=0.8, top_p=0.9, seed=3)
    assert completion.choices[0].text == again.choices[0].text  # seeded sampling repeats


def test_bad_requests_get_openai_style_4xx_errors(server):
    import openai

    url, *_ = server
    api = client(url)
    with pytest.raises(openai.NotFoundError, match="not served"):
        api.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="takes at most"):
        api.completions.create(model="base", prompt="word " * 1200, max_tokens=5)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        api.chat.completions.create(model="base", messages=QUESTION, temperature=5)
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        api.chat.completions.create(model="base", messages=QUESTION, max_tokens=1000)
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    response = httpx.post(f"{url}/admin/adapters", json={"adapter": "a2"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 401
    assert httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {API_KEY}"}).json() == {"status": "ok"}


TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(("field", "value"), [("functions", [TOOL["function"]]), ("best_of", 3), ("suffix", "!")])
def test_fields_that_would_change_the_answer_are_refused_by_name_not_ignored(server, field, value):
    import openai

    api = client(server[0])
    with pytest.raises(openai.BadRequestError, match=f"{field}: this server does not support it") as refused:
        api.chat.completions.create(model="a1", messages=QUESTION, max_tokens=4, extra_body={field: value})
    assert refused.value.body["code"] == "unsupported_parameter"


def test_n_prompt_lists_and_token_prompts_answer_each_prompt_n_times(server):
    import openai

    api = client(server[0])
    prompts = ["Once upon", "Name a colour"]
    single = [
        api.completions.create(model="a1", prompt=p, max_tokens=6, temperature=0).choices[0].text for p in prompts
    ]
    batch = api.completions.create(model="a1", prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [single[0], single[0], single[1], single[1]]  # choice = prompt * n + j
    tokenizer = make_tokenizer()
    assert batch.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    as_ids = api.completions.create(model="a1", prompt=tokenizer(prompts[1])["input_ids"], max_tokens=6, temperature=0)
    assert as_ids.choices[0].text == single[1]
    streamed: dict[int, str] = {}
    for chunk in api.completions.create(model="a1", prompt=prompts, max_tokens=6, temperature=0, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {0: single[0], 1: single[1]}
    sampled = api.chat.completions.create(model="a1", messages=QUESTION, n=3, max_tokens=8, temperature=1.0, seed=5)
    assert len({c.message.content for c in sampled.choices}) > 1  # n samples, not one answer copied
    with pytest.raises(openai.BadRequestError, match="n: 2 prompts x n=100"):
        api.completions.create(model="a1", prompt=prompts, n=100, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="prompt: token ids"):
        api.completions.create(model="a1", prompt=[10**7], max_tokens=2)


def test_logprobs_are_the_models_own_log_probabilities(server):
    import torch

    url, _, adapters, model_dir = server
    api = client(url)
    reply = api.chat.completions.create(
        model="a1", messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = reply.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob for e in entries)
    assert all(abs(e.logprob - e.top_logprobs[0].logprob) < 1e-4 for e in entries)  # greedy takes the most likely
    tokenizer = make_tokenizer()
    prompt = prompt_token_ids(QUESTION, tokenizer, "chat")
    first = tokenizer(entries[0].token, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logits = load_reference(model_dir, adapters["a1"])(torch.tensor([prompt])).logits[0, -1]
    assert entries[0].logprob == pytest.approx(torch.log_softmax(logits, -1)[first].item(), abs=1e-3)
    legacy = api.completions.create(
        model="base", prompt="Once upon", max_tokens=4, temperature=0, logprobs=2, stream=True
    )
    chunks = [c.choices[0] for c in legacy if c.choices]
    assert "".join(t for c in chunks if c.logprobs for t in c.logprobs.tokens) == "".join(c.text for c in chunks)


COLOUR_SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "shade": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["colour", "shade"],
    "additionalProperties": False,
}


def test_response_format_json_schema_answers_match_the_schema(server):
    import json

    import jsonschema
    import openai

    api = client(server[0])
    response_format = {"type": "json_schema", "json_schema": {"name": "colour", "schema": COLOUR_SCHEMA}}
    for model in ("base", "a1"):
        reply = api.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=30, temperature=0, response_format=response_format
        )
        jsonschema.validate(json.loads(reply.choices[0].message.content), COLOUR_SCHEMA)
        streamed = api.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=30,
            temperature=1.0,
            seed=1,
            n=2,
            response_format=response_format,
            stream=True,
        )
        texts: dict[int, str] = {}
        for chunk in streamed:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        for text in texts.values():
            jsonschema.validate(json.loads(text), COLOUR_SCHEMA)
    free = (
        api.chat.completions.create(model="a1", messages=QUESTION, max_tokens=4, temperature=0)
        .choices[0]
        .message.content
    )
    as_json = (
        api.chat.completions.create(
            model="a1", messages=QUESTION, max_tokens=4, temperature=0, response_format={"type": "json_object"}
        )
        .choices[0]
        .message.content
    )
    assert as_json.startswith("{") and not free.startswith("{")
    with pytest.raises(openai.UnprocessableEntityError, match="response_format.json_schema.*not a valid JSON schema"):
        api.chat.completions.create(
            model="a1",
            messages=QUESTION,
            max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}},
        )


def test_penalties_and_logit_bias_change_the_answer_as_asked(server):
    import openai

    api = client(server[0])
    tokenizer = make_tokenizer()
    plain = api.completions.create(model="base", prompt="Once upon", max_tokens=12, temperature=0)
    forced_id = tokenizer("cat", add_special_tokens=False)["input_ids"][0]
    forced = api.completions.create(
        model="base", prompt="Once upon", max_tokens=3, temperature=0, logit_bias={str(forced_id): 100}
    )
    assert forced.choices[0].text == tokenizer.decode([forced_id] * 3)  # +100 makes that token every greedy choice
    ids = tokenizer(plain.choices[0].text, add_special_tokens=False)["input_ids"]
    assert len(set(ids)) < len(ids), "the test needs a plain answer that repeats a token"
    penalized = api.completions.create(
        model="base", prompt="Once upon", max_tokens=12, temperature=0, frequency_penalty=2.0, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in penalized if chunk.choices)
    assert text != plain.choices[0].text
    for field, value, message in (
        ("logit_bias", {"999999": 5}, "not in the vocabulary"),
        ("presence_penalty", 3.0, "presence_penalty"),
    ):
        with pytest.raises((openai.BadRequestError, openai.UnprocessableEntityError), match=message):
            api.chat.completions.create(model="a1", messages=QUESTION, max_tokens=4, stream=True, **{field: value})


def test_text_parts_and_fields_set_to_their_no_op_values_are_served(server):
    import openai

    api = client(server[0])
    plain = api.chat.completions.create(model="a1", messages=QUESTION, max_tokens=8, temperature=0)
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}]
    same = api.chat.completions.create(
        model="a1",
        messages=parts,
        max_tokens=8,
        temperature=0,
        logprobs=False,
        frequency_penalty=0,
        response_format={"type": "text"},
        user="someone",
    )
    assert same.choices[0].message.content == plain.choices[0].message.content
    assert same.usage.prompt_tokens == plain.usage.prompt_tokens
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    with pytest.raises(openai.UnprocessableEntityError, match="messages.0.content"):
        api.chat.completions.create(model="a1", messages=image, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="echo: this server does not support it"):
        api.completions.create(model="base", prompt="Once upon", max_tokens=4, echo=True)


def test_adapters_load_reload_and_unload_under_traffic(server):
    url, registry, adapters, model_dir = server
    api = client(url)
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    loaded = admin.post("/admin/adapters", json={"adapter": "a2"}).json()
    assert loaded["ref"] == "a2@v1" and loaded["replicas_behind"] == []
    listings = [admin.get("/v1/models") for _ in range(20)]
    assert len({r.headers["x-finch-replica"] for r in listings}) == 2  # both replicas answered...
    assert all({m["id"] for m in r.json()["data"]} == {"base", "a1", "a2"} for r in listings)  # ...with a2
    refused = admin.post("/admin/adapters", json={"adapter": "../etc"})
    assert refused.status_code == 404 and "must look like name" in refused.json()["error"]["message"]

    register(registry, "a1", adapters["a1v2"], model_dir)
    before = reference_answers(model_dir, adapters["a1"], 8)
    after = reference_answers(model_dir, adapters["a1v2"], 8)
    assert not before & after

    def ask(_):
        return (
            api.chat.completions.create(model="a1", messages=QUESTION, max_tokens=8, temperature=0)
            .choices[0]
            .message.content
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
        swap = admin.post("/admin/adapters", json={"adapter": "a1"})
        answers += list(pool.map(ask, range(4)))
    assert swap.json()["ref"] == "a1@v2"
    assert set(answers) <= before | after and set(answers[-4:]) <= after, answers  # no request failed during the swap
    with pytest.raises(Exception, match="a1@v2 loaded"):
        api.chat.completions.create(model="a1@v1", messages=QUESTION, max_tokens=2)

    assert admin.delete("/admin/adapters/a2").json()["name"] == "a2"
    assert admin.delete("/admin/adapters/a2").status_code == 404
    for _ in range(10):
        assert {m.id for m in api.models.list().data} == {"base", "a1"}
        listed = admin.get("/admin/adapters").json()
        assert [(a["name"], a["ref"]) for a in listed["adapters"]] == [("a1", "a1@v2")]
    assert len(set(listed["replica_versions"].values())) == 1  # every replica on the same adapter set


def test_registry_adapters_are_served_on_demand_with_new_versions_and_no_admin_calls(server):
    import openai

    url, registry, adapters, model_dir = server
    api = client(url)
    folder = adapters["a1"].parent
    for name, seed, options in (("od-1", 21, {}), ("od-2", 22, {}), ("od-1v2", 23, {}), ("od-wide", 24, {"r": 16})):
        adapters[name] = make_adapter(model_dir, folder / name, seed, **options)
    for name in ("od-1", "od-2", "od-wide"):
        register(registry, name, adapters[name], model_dir)

    def ask(model: str) -> str:
        return (
            api.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)
            .choices[0]
            .message.content
        )

    listed = {m.id for m in api.models.list().data}
    assert {"od-1", "od-2"} <= listed and "od-wide" not in listed  # rank 16 > engine.max_lora_rank
    expected = {name: reference_answers(model_dir, adapters[name], 8) for name in ("od-1", "od-2", "od-1v2")}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # a cold adapter, many requests at once
        answers = list(pool.map(lambda model: ask(model), ["od-1"] * 4 + ["od-2"] * 2))
    assert set(answers[:4]) <= expected["od-1"] and set(answers[4:]) <= expected["od-2"]
    register(registry, "od-1", adapters["od-1v2"], model_dir)
    time.sleep(1.0)  # server.adapter_sync_s: how long "od-1" may still mean v1
    assert {ask("od-1") for _ in range(4)} <= expected["od-1v2"]  # the new version, with no admin call
    assert ask("od-1@v1") in expected["od-1"]
    with pytest.raises(openai.ConflictError, match="rank 16"):
        ask("od-wide")
    with pytest.raises(openai.NotFoundError, match="no version 7"):
        ask("od-2@v7")
    with pytest.raises(openai.NotFoundError, match="not served"):
        ask("a2")  # in the registry, but neither pinned nor matching on_demand
    on_demand = httpx.get(f"{url}/admin/adapters", headers={"Authorization": f"Bearer {API_KEY}"}).json()["on_demand"]
    assert on_demand["loads"] >= 1 and set(on_demand["cached"]) <= {"od-1@v1", "od-1@v2", "od-2@v1"}


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_tools_reach_the_prompt_and_forced_calls_match_their_schema(server):
    import json

    import jsonschema
    import openai

    url, registry, adapters, model_dir = server
    api = client(url)
    plain = api.chat.completions.create(model="a1", messages=QUESTION, max_tokens=4, temperature=0)
    named = api.chat.completions.create(
        model="a1",
        messages=QUESTION,
        tools=[WEATHER, TOOL],
        max_tokens=30,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "weather"}},
    )
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "weather" and named.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert named.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the tool definitions are in the prompt
    streamed = api.chat.completions.create(
        model="base",
        messages=QUESTION,
        tools=[WEATHER, TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=40,
        temperature=0,
        stream=True,
    )
    calls = [c for chunk in streamed for choice in chunk.choices for c in choice.delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name in {"weather", "lookup"}
    conversation = [
        *QUESTION,
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    follow_up = api.chat.completions.create(
        model="a1", messages=conversation, tools=[WEATHER], tool_choice="none", max_tokens=6, temperature=0
    )
    assert isinstance(follow_up.choices[0].message.content, str) and not follow_up.choices[0].message.tool_calls
    auto = api.chat.completions.create(
        model="a1", messages=QUESTION, tools=[WEATHER], max_tokens=6, temperature=0
    )  # hermes reads it
    assert (
        auto.choices[0].message.content
        == api.chat.completions.create(
            model="a1", messages=QUESTION, tools=[WEATHER], tool_choice="none", max_tokens=6, temperature=0
        )
        .choices[0]
        .message.content
    )
    entry = {f: adapters["a2"] / f for f in ("adapter_config.json", "adapter_model.safetensors")}
    publish(
        registry,
        "od-alpaca",
        entry,
        {"base_model": {"fingerprint": fingerprint_model_folder(model_dir)}, "template": "alpaca"},
    )
    with pytest.raises(openai.BadRequestError, match="tools: model 'od-alpaca' is prompted with the alpaca template"):
        api.chat.completions.create(model="od-alpaca", messages=QUESTION, tools=[WEATHER], max_tokens=4)


def test_chat_page_streams_answers_and_compares_two_models(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, *_ = server
    api = client(url)
    served = [m.id for m in api.models.list().data]
    adapter = next(m for m in served if m != "base")

    def greedy(model: str) -> str:
        reply = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=48, temperature=0)
        return reply.choices[0].message.content

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        console_errors = []
        page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
        page.goto(url)
        expect(page.locator("#status")).to_contain_text("wrong API key")  # the key guards the page's API calls
        page.fill("#api-key", API_KEY)
        page.dispatch_event("#api-key", "change")
        expect(page.locator(".pane select.model option")).to_have_count(len(served))
        page.fill("#temperature", "0")
        # enough tokens that vLLM cannot hand them all over in one delta before the stream is read
        page.fill("#max-tokens", "48")

        page.select_option(".pane select.model", adapter)
        page.fill("#prompt", QUESTION[0]["content"])
        page.press("#prompt", "Enter")
        reply = page.locator(".msg.assistant[data-done=true]")
        expect(reply).to_have_count(1, timeout=60_000)
        assert reply.text_content() == greedy(adapter)
        assert int(reply.get_attribute("data-chunks")) > 1  # streamed in pieces, not in one go
        expect(page.locator(".pane .stats")).to_contain_text("tok/s")

        page.check("#compare")
        expect(page.locator(".pane")).to_have_count(2)
        page.click("#clear")
        page.locator(".pane select.model").nth(0).select_option("base")
        page.locator(".pane select.model").nth(1).select_option(adapter)
        page.fill("#prompt", QUESTION[0]["content"])
        page.click("#send")
        replies = page.locator(".msg.assistant[data-done=true]")
        expect(replies).to_have_count(2, timeout=60_000)
        side_by_side = replies.all_text_contents()
        page.screenshot(path=tmp_path / "chat-page.png")
        browser.close()
    assert side_by_side == [greedy("base"), greedy(adapter)]
    assert side_by_side[0] != side_by_side[1]
    assert console_errors == [] or all("401" in e for e in console_errors), console_errors


@pytest.fixture(scope="module")
def tight_server(server, tiny_serving_model_dir):
    """A second application on the same Serve proxy: one request at a time, one queued, a 1 s timeout."""
    from ray import serve

    from finch.serve.app import build_application

    url, registry, *_ = server
    config = validate_config(
        {
            "name": "tight",
            "model": {"path": str(tiny_serving_model_dir), "dtype": "float32"},
            "template": "chat",
            "registry_dir": str(registry),
            "engine": {"max_model_len": 1024, "max_loras": 2, "max_lora_rank": 8},
            "server": {
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "request_timeout_s": 1.0,
                "max_tokens_limit": 950,
                "cpus_per_replica": 0.25,
            },
        },
        schema=ServeConfig,
    )
    serve.run(build_application(config, model_source(tiny_serving_model_dir)), name="tight", route_prefix="/tight")
    yield f"{url}/tight"
    serve.delete("tight")


# The tiny model's greedy answer to QUESTION repeats without an end token. 400 tokens took 1.1-1.5 s
# in float32 on a 2-core EPYC (bf16 capped away), a race with the old 1.5 s timeout; 950 tokens (the
# model's 1,024 positions) take about 2.4x that, against a 1 s timeout.
SLOW = {"model": "base", "messages": QUESTION, "max_tokens": 950, "temperature": 0}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def answers_quickly(url: str) -> bool:
    quick = httpx.post(f"{url}/v1/chat/completions", json=SLOW | {"max_tokens": 2}, headers=AUTH, timeout=60)
    return quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] == 2


def test_slow_generations_time_out_with_a_504_and_the_server_goes_on(tight_server):
    started = time.monotonic()
    response = httpx.post(f"{tight_server}/v1/chat/completions", json=SLOW, headers=AUTH, timeout=60)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started < 8
    with httpx.stream(
        "POST", f"{tight_server}/v1/chat/completions", json=SLOW | {"stream": True}, headers=AUTH, timeout=60
    ) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert "timeout" in events[-2] and events[-1] == "[DONE]"  # a stream ends with an error event, then DONE
    assert answers_quickly(tight_server)


def test_requests_beyond_the_queue_limit_get_503_not_a_crash(tight_server):
    def post(_) -> httpx.Response:
        return httpx.post(f"{tight_server}/v1/chat/completions", json=SLOW, headers=AUTH, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(post, range(6)))
    statuses = [response.status_code for response in responses]
    # one runs, one waits (each then times out), the rest are turned away at once, told when to retry
    assert statuses.count(503) >= 2 and set(statuses) <= {503, 504}, statuses
    assert all(r.headers.get("retry-after") == "2" for r in responses if r.status_code == 503)
    assert answers_quickly(tight_server)


def test_ask_prints_every_served_models_answer(server):
    from rich.console import Console

    from finch.serve.probe import ask_every_model

    url, *_ = server
    api = client(url)
    console = Console(record=True, width=200)
    ask_every_model(url, [QUESTION[0]["content"]], API_KEY, 6, console)
    printed = console.export_text()
    for model in api.models.list().data:
        answer = api.chat.completions.create(model=model.id, messages=QUESTION, max_tokens=6, temperature=0)
        assert f"│ {model.id} " in printed and answer.choices[0].message.content.strip().split()[0] in printed


def test_eval_judge_scores_through_finch_serve_and_counts_refused_rows(server, monkeypatch):
    """finch eval's LLM judge against finch's own OpenAI API: each row's score is the first number of
    what the served model answers to the filled-in rubric; a refused request is that row's error."""
    import re

    from finch.config import JudgeConfig
    from finch.eval.judge import judge_scores

    url = server[0]
    rubric = "Score 1-10. Question: {prompt} Answer: {answer} Reference: {reference}"
    items = [
        {"prompt": "Name a colour.", "answer": f"Colour {n}", "reference": "Blue" if n else None} for n in range(3)
    ]
    monkeypatch.setenv("JUDGE_KEY", API_KEY)
    judge = JudgeConfig(url=f"{url}/v1", model="a1", rubric=rubric, api_key_env="JUDGE_KEY", max_tokens=16)
    scores = judge_scores(judge, items)
    for item, (score, error) in zip(items, scores):
        content = rubric.replace("{prompt}", item["prompt"]).replace("{answer}", item["answer"])
        content = content.replace("{reference}", item["reference"] or "(none)")
        reply = (
            client(url)
            .chat.completions.create(
                model="a1", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=16
            )
            .choices[0]
            .message.content
        )
        number = re.search(r"(?:(?<![\w-])-)?\d+(?:\.\d+)?", reply)
        assert (score, error is None) == ((float(number.group()), True) if number else (None, False)), (
            reply,
            score,
            error,
        )
    monkeypatch.setenv("JUDGE_KEY", "wrong-key")
    refused = judge_scores(judge, items)
    assert all(score is None and "401" in error for score, error in refused), refused


def test_prometheus_metrics_per_model_are_scraped_from_every_ray_node(server):
    """finch's metrics reach Ray's metrics agent on every node (finch/serve/metrics.py): requests,
    tokens and times per model, refusals under their status, the on-demand adapter cache."""
    import openai

    url, registry, adapters, model_dir = server
    api = client(url)
    before = scraped("finch")
    replies = [
        api.chat.completions.create(model="a1", messages=QUESTION, max_tokens=6, temperature=0) for _ in range(2)
    ]
    replies.append(
        list(
            api.chat.completions.create(
                model="a1",
                messages=QUESTION,
                max_tokens=6,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )[-1]
    )
    api.completions.create(model="base", prompt="Once upon", max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="no-such-model", messages=QUESTION)
    on_demand = [f"od-metrics-{n}" for n in range(5)]
    for name in on_demand:
        register(registry, name, adapters["a1"], model_dir)
    # Until one replica has served all five: more than its cache holds next to the pinned adapters, so it evicted.
    seen: dict[str, set[str]] = {}
    for turn in range(60):
        response = httpx.post(
            f"{url}/v1/completions",
            headers=AUTH,
            timeout=60,
            json={"model": on_demand[turn % 5], "prompt": "Once upon", "max_tokens": 1},
        )
        seen.setdefault(response.raise_for_status().headers["x-finch-replica"], set()).add(on_demand[turn % 5])
        if max(len(models) for models in seen.values()) == 5:
            break
    for _ in range(3):  # two replicas, three requests: one replica answers twice, from its cache
        api.completions.create(model="od-metrics-0", prompt="Once upon", max_tokens=1)

    a1 = {"model": "a1"}
    expected = [  # (metric, labels, at least this much more than before)
        ("ray_finch_requests_total", a1 | {"endpoint": "chat", "status": "200"}, 3),
        ("ray_finch_requests_total", {"model": "base", "endpoint": "completions", "status": "200"}, 1),
        ("ray_finch_requests_total", {"model": "unknown", "endpoint": "chat", "status": "404"}, 1),
        ("ray_finch_prompt_tokens_total", a1, sum(r.usage.prompt_tokens for r in replies)),
        ("ray_finch_completion_tokens_total", a1, sum(r.usage.completion_tokens for r in replies)),
        ("ray_finch_request_latency_seconds_count", a1, 3),
        ("ray_finch_time_to_first_token_seconds_count", a1, 3),
        ("ray_finch_adapter_loads_total", {"model": "od-metrics-0", "kind": "on_demand"}, 1),
        ("ray_finch_adapter_cache_lookups_total", {"model": "od-metrics-0", "result": "hit"}, 1),
        ("ray_finch_adapter_evictions_total", {}, 1),
    ]

    def short() -> list[tuple[str, dict[str, str], float, int]]:
        now = scraped("finch")
        grown = [
            (name, labels, total(now, name, labels) - total(before, name, labels), least)
            for name, labels, least in expected
        ]
        return [row for row in grown if row[2] < row[3]]

    deadline = time.monotonic() + 60  # Ray's agent exports what replicas recorded every few seconds
    while (left := short()) and time.monotonic() < deadline:
        time.sleep(2)
    assert not left, left  # (metric, labels, increase scraped, increase expected)
    names = {name for name, _, _ in scraped("finch")}
    assert {"ray_finch_adapter_loads_total", "ray_finch_adapters_cached", "ray_finch_requests_running"} <= names
    assert {"ray_serve_deployment_queued_queries", "ray_serve_replica_processing_queries"} <= names  # Ray Serve's own


def scraped(application: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample an application's deployments export, from every Ray node."""
    from prometheus_client.parser import text_string_to_metric_families

    from finch.serve.metrics import scrape_urls

    return [
        (sample.name, sample.labels, sample.value)
        for address in scrape_urls()
        for family in text_string_to_metric_families(httpx.get(address, timeout=30).text)
        for sample in family.samples
        if sample.labels.get("application") == application
    ]


def total(samples: list[tuple[str, dict[str, str], float]], name: str, labels: dict[str, str]) -> float:
    """The sum over replicas (and any other labels) of `name`'s samples that carry `labels`."""
    return sum(value for sample, tags, value in samples if sample == name and labels.items() <= tags.items())
