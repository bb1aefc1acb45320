import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from finch.config import JudgeConfig
from finch.eval.judge import judge_scores
from tests.conftest import free_port

# Braces in a rubric are text (JSON examples are common in rubrics), only the three placeholders are filled.
RUBRIC = 'Reply like {"score": N}.\nQuestion: {prompt}\nAnswer: <<{answer}>>\nReference: {reference}'


class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint whose score is the length of the answer it finds in the filled-in rubric."""

    requests: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        self.requests.append({"path": self.path, "body": body, "authorization": self.headers.get("Authorization")})
        answer = re.search(r"<<(.*)>>", content, re.DOTALL).group(1)
        if answer == "server error":
            self.send_error(500, "judge broke")
            return
        # Early items answer last, so replies come back out of order when requests run concurrently.
        time.sleep(0.3 / len(answer))
        reply = "I cannot say." if answer == "unsure" else f"Score: {len(answer)}. It is fine."
        payload = json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    FakeJudge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def item(answer: str, reference: str | None = "ref", prompt: str = "Q?") -> dict:
    return {"prompt": prompt, "answer": answer, "reference": reference}


def test_scores_come_back_in_item_order(judge_url):
    judge = JudgeConfig(url=judge_url, model="judge-model", rubric=RUBRIC, concurrency=4, max_tokens=7)
    answers = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    assert judge_scores(judge, [item(answer) for answer in answers]) == [(float(len(a)), None) for a in answers]
    request = FakeJudge.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "judge-model"
    assert request["body"]["temperature"] == 0
    assert request["body"]["max_tokens"] == 7


def test_rubric_is_filled_in_literally(judge_url):
    judge = JudgeConfig(url=judge_url, model="m", rubric=RUBRIC)
    tricky = item("uses {reference} and {x}", reference="R {answer}", prompt="P {answer}")
    judge_scores(judge, [item("42", reference=None, prompt="What is 6*7?"), tricky])
    sent = sorted((r["body"]["messages"] for r in FakeJudge.requests), key=lambda messages: len(messages[0]["content"]))
    assert sent[0] == [
        {
            "role": "user",
            "content": ('Reply like {"score": N}.\nQuestion: What is 6*7?\nAnswer: <<42>>\nReference: (none)'),
        }
    ]
    # Text filled in is not scanned again for placeholders.
    assert sent[1][0]["content"] == (
        'Reply like {"score": N}.\nQuestion: P {answer}\nAnswer: <<uses {reference} and {x}>>\nReference: R {answer}'
    )


def test_reply_without_a_number_or_http_error_is_a_row_error(judge_url):
    judge = JudgeConfig(url=judge_url, model="m", rubric=RUBRIC)
    results = judge_scores(judge, [item("ok"), item("unsure"), item("server error")])
    assert results[0] == (2.0, None)
    assert results[1] == (None, "judge reply has no score: I cannot say.")
    assert results[2][0] is None and results[2][1].startswith("InternalServerError: ")


def test_api_key_comes_from_the_named_environment_variable(judge_url, monkeypatch):
    monkeypatch.setenv("FINCH_TEST_JUDGE_KEY", "sk-test-123")
    judge_scores(JudgeConfig(url=judge_url, model="m", rubric=RUBRIC, api_key_env="FINCH_TEST_JUDGE_KEY"), [item("a")])
    judge_scores(JudgeConfig(url=judge_url, model="m", rubric=RUBRIC), [item("a")])
    assert [r["authorization"] for r in FakeJudge.requests] == ["Bearer sk-test-123", "Bearer none"]


def test_unset_api_key_variable_is_an_error_on_every_row(judge_url, monkeypatch):
    monkeypatch.delenv("FINCH_TEST_JUDGE_KEY", raising=False)
    judge = JudgeConfig(url=judge_url, model="m", rubric=RUBRIC, api_key_env="FINCH_TEST_JUDGE_KEY")
    error = "judge: environment variable FINCH_TEST_JUDGE_KEY (api_key_env) is not set"
    assert judge_scores(judge, [item("a"), item("b")]) == [(None, error), (None, error)]
    assert FakeJudge.requests == []


def test_unreachable_judge_fails_each_row_quickly():
    judge = JudgeConfig(url=f"http://127.0.0.1:{free_port()}/v1", model="m", rubric=RUBRIC, concurrency=2)
    started = time.monotonic()
    results = judge_scores(judge, [item(str(n)) for n in range(5)])
    assert time.monotonic() - started < 30
    assert len(results) == 5
    for score, error in results:
        assert score is None
        assert error.startswith("APIConnectionError: ") and "connection" in error.lower()
