"""The endpoint judge against a stub OpenAI-compatible server on 127.0.0.1 (good answer, slow answers with a retry
that succeeds or runs out, malformed JSON, HTTP 500 / 400), bounded request loops, and `skyjax distill --judge
endpoint` end to end."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import random_image
from skyjax.cli import main
from skyjax.rl.judge import ENDPOINT_KEYS, EndpointJudge, JudgeError, Query, clarity_of, parse_endpoint_answer

GOOD = {"image_necessity": 8, "image_relevance": 6, "question_quality": 9, "difficulty": 3, "reasoning_demand": 6,
        "integration": 7}


def completion(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


class Stub:
    """A chat-completions server that plays `script` (one action per request; the last repeats):
    ("ok", ratings) | ("slow", seconds) | ("raw", content string) | ("map", request json -> ratings) |
    ("status", code)."""

    def __init__(self):
        self.script, self.requests = [], []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep the test output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stub.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(body)})
                i = min(len(stub.requests), len(stub.script)) - 1
                kind, arg = stub.script[i]
                try:
                    if kind == "slow":
                        time.sleep(arg)
                        out, code = completion(json.dumps(GOOD)), 200
                    elif kind == "ok":
                        out, code = completion(json.dumps(arg)), 200
                    elif kind == "raw":
                        out, code = completion(arg), 200
                    elif kind == "map":  # ratings computed from the request (order-free, for parallel requests)
                        out, code = completion(json.dumps(arg(stub.requests[-1]["json"]))), 200
                    else:
                        out, code = b'{"error": "boom"}', arg
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/chat/completions"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def judge_for(stub, **kw):
    sleeps = []
    kw = {"timeout": 2.0, "max_retries": 2, "backoff": 0.5, "workers": 1, **kw}
    return EndpointJudge(stub.url, "judge-model", api_key_env="SKYJAX_TEST_JUDGE_KEY", sleep=sleeps.append, **kw), \
        sleeps


def test_good_answer_scores_and_request(stub, monkeypatch):
    monkeypatch.setenv("SKYJAX_TEST_JUDGE_KEY", "sk-test")
    stub.script = [("ok", GOOD)]
    judge, sleeps = judge_for(stub)
    img = random_image(0, 64, 48)
    [s] = judge.score([Query("Why does the block slide down the incline?", (img,), where="q.jsonl:3")])
    c = clarity_of([img])
    assert s.clarity == pytest.approx(c) and 0 < c < 1
    assert s.s_v == pytest.approx((c + 0.8 + 0.6) / 3)
    assert s.s_t == pytest.approx((9 + 3 + 6) / 30) and s.s_i == pytest.approx(0.7)
    assert s.details == {k: float(v) for k, v in GOOD.items()}
    assert len(stub.requests) == 1 and sleeps == []
    req = stub.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == "Bearer sk-test"
    body = req["json"]
    assert body["model"] == "judge-model" and body["response_format"] == {"type": "json_object"}
    parts = body["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1]["text"].endswith("Why does the block slide down the incline?")
    assert all(k in parts[1]["text"] for k in ENDPOINT_KEYS)


def test_no_key_no_authorization_header(stub, monkeypatch):
    monkeypatch.delenv("SKYJAX_TEST_JUDGE_KEY", raising=False)
    stub.script = [("ok", GOOD)]
    judge, _ = judge_for(stub)
    [s] = judge.score([Query("What colour is the sky today?")])
    assert s.s_v == pytest.approx((0 + 0.8 + 0.6) / 3)  # no image: clarity 0
    assert "Authorization" not in stub.requests[0]["headers"]


def test_slow_answer_times_out_then_retry_succeeds(stub):
    stub.script = [("slow", 1.5), ("ok", GOOD)]
    judge, sleeps = judge_for(stub, timeout=0.3)
    [s] = judge.score([Query("How many apples are left?", where="in.jsonl:7")])
    assert s.s_i == pytest.approx(0.7)
    assert len(stub.requests) == 2 and sleeps == [0.5]


def test_slow_answers_run_out_of_retries(stub):
    stub.script = [("slow", 1.5)]
    judge, sleeps = judge_for(stub, timeout=0.25, max_retries=2)
    with pytest.raises(JudgeError, match=r"in\.jsonl:7: judge endpoint failed 3 time\(s\); last: timed out"):
        judge.score([Query("How many apples are left?", where="in.jsonl:7")])
    assert len(stub.requests) == 3 and sleeps == [0.5, 1.0]  # bounded, exponential backoff


@pytest.mark.parametrize("content, what", [
    ("the question is fine, 7/10", "not JSON"),
    (json.dumps({**GOOD, "difficulty": 12}), "difficulty=12 is not a number in 0..10"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "integration"}), "lacks ['integration']"),
    (json.dumps([1, 2]), "must be a JSON object"),
])
def test_malformed_answer_names_the_row(stub, content, what):
    stub.script = [("raw", content)]
    judge, sleeps = judge_for(stub)
    with pytest.raises(JudgeError) as e:
        judge.score([Query("Compute the area of the triangle.", where="in.jsonl:2")])
    assert str(e.value).startswith("in.jsonl:2: ") and what in str(e.value)
    assert len(stub.requests) == 1 and sleeps == []  # a malformed answer is not retried


def test_not_a_chat_completion():
    with pytest.raises(JudgeError, match=r"^a\.jsonl:1: judge response is not a chat completion"):
        parse_endpoint_answer(b'{"error": "x"}', "a.jsonl:1")
    fenced = completion("```json\n" + json.dumps(GOOD) + "\n```")
    assert parse_endpoint_answer(fenced, "a.jsonl:1")["integration"] == 7.0


def test_http_500_retried_then_ok_or_failing(stub):
    stub.script = [("status", 500), ("status", 503), ("ok", GOOD)]
    judge, sleeps = judge_for(stub)
    judge.score([Query("Explain why the current flows.", where="x:1")])
    assert len(stub.requests) == 3 and sleeps == [0.5, 1.0]
    stub.requests.clear()
    stub.script = [("status", 500)]
    with pytest.raises(JudgeError, match=r"^x:1: judge endpoint failed 3 time\(s\); last: HTTP 500"):
        judge.score([Query("Explain why the current flows.", where="x:1")])
    assert len(stub.requests) == 3


def test_http_400_is_not_retried(stub):
    stub.script = [("status", 400)]
    judge, sleeps = judge_for(stub)
    with pytest.raises(JudgeError, match=r"^x:4: judge endpoint answered HTTP 400"):
        judge.score([Query("Explain why the current flows.", where="x:4")])
    assert len(stub.requests) == 1 and sleeps == []


def test_parallel_requests_keep_row_order(stub):
    def by_question(body):  # integration = the number in the question
        text = body["messages"][0]["content"][-1]["text"]
        return dict(GOOD, integration=int(text.rsplit(" ", 1)[-1]))

    stub.script = [("map", by_question)]
    judge, _ = judge_for(stub, workers=4)
    got = judge.score([Query(f"Question number {i}", where=f"x:{i}") for i in range(10)])
    assert [s.s_i for s in got] == [pytest.approx(i / 10) for i in range(10)] and len(stub.requests) == 10


def test_distill_cli_with_endpoint_judge(stub, tmp_path, capsys):
    (tmp_path / "img").mkdir()
    random_image(3, 96, 96).save(tmp_path / "img" / "a.png")
    rows = [{"images": ["img/a.png"], "prompt": "Why does the ball roll left?", "answer": "gravity"},
            {"prompt": "What is 2 + 2?", "answer": "4"},
            {"prompt": "Prove that the sum of angles in a triangle is 180 degrees.", "answer": "180"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ratings = [dict(GOOD, difficulty=d, integration=i) for d, i in ((2, 9), (0, 1), (10, 4))]
    stub.script = [("ok", r) for r in ratings]
    out = tmp_path / "out.jsonl"
    args = ["distill", "--data", str(tmp_path / "in.jsonl"), "--out", str(out), "--judge", "endpoint",
            "--judge-url", stub.url, "--judge-model", "m", "--judge-api-key-env", "SKYJAX_TEST_JUDGE_KEY",
            "--judge-workers", "1", "--no-progress"]
    assert main(args) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["meta"]["distill"]["judge"] for g in got] == ["endpoint"] * 3
    assert [g["meta"]["distill"]["s_i_norm"] for g in got] == [1.0, 0.0, pytest.approx(3 / 8, abs=1e-6)]
    assert got[0]["meta"]["distill"]["judge_details"]["integration"] == 9.0
    # a malformed answer on the second row stops the job with an error naming that row
    stub.requests.clear()
    stub.script = [("ok", GOOD), ("raw", "not json")]
    assert main(args) == 2
    assert f"{tmp_path / 'in.jsonl'}:2: judge answer is not JSON" in capsys.readouterr().err


def test_user_judge_by_dotted_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_judges.py").write_text(
        "class LengthJudge:\n"
        "    def vision_score(self, image, question):\n"
        "        return 0.0 if image is None else image.size[0] / 100\n"
        "    def text_score(self, question):\n"
        "        return len(question)\n"
        "    def integration_score(self, image, question):\n"
        "        return question.count('?')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "img").mkdir()
    random_image(1, 50, 40).save(tmp_path / "img" / "a.png")
    rows = [{"prompt": "Why?", "images": ["img/a.png"]}, {"prompt": "What is it?? Tell me."}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    common = ["distill", "--data", str(tmp_path / "in.jsonl"), "--out", str(out), "--no-progress", "--judge"]
    assert main(common + ["my_judges:LengthJudge"]) == 0
    got = [json.loads(line)["meta"]["distill"] for line in out.read_text().splitlines()]
    assert [g["judge"] for g in got] == ["my_judges:LengthJudge"] * 2
    assert [g["s_v"] for g in got] == [0.5, 0.0] and [g["s_t"] for g in got] == [4, 21]
    assert [g["s_i_norm"] for g in got] == [0.0, 1.0]
    assert main(common + ["my_judges:Nope"]) == 2
    assert "judge 'my_judges:Nope': module 'my_judges' has no attribute 'Nope'" in capsys.readouterr().err
