"""api.py against a real HTTP server on 127.0.0.1 that injects 429s, 500s, bad bodies, slow replies."""

import asyncio
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent_forge.data import api
from agent_forge.data.parse import evaluate
from agent_forge.data.schema import read_records


class FakeTeacher:
    """Scripted OpenAI-compatible endpoint. Behaviour is chosen by a tag in the question."""

    def __init__(self, delay: float = 0.0):
        self.attempts = Counter()
        self.requests = 0
        self.delay = delay
        self.lock = threading.Lock()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers, payload, sleep = teacher.respond(self.path, body)
                time.sleep(sleep)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    data = payload.encode()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def respond(self, path, body):
        assert path == "/v1/chat/completions"
        user = body["messages"][-1]["content"]
        question = re.search(r"Question: (.*)\n", user).group(1)
        strategy = re.search(r"at least one <(\w+)>", user).group(1)
        key = (question, body["model"], strategy)
        with self.lock:
            self.requests += 1
            self.attempts[key] += 1
            n = self.attempts[key]
        tag = re.match(r"\[(\w+)\]", question).group(1)
        expr = question.split("] ", 1)[1]
        value = int(evaluate(expr))
        if tag == "r429" and n == 1:
            return 429, {"Retry-After": "0"}, '{"error": "slow down"}', 0
        if tag == "r500" and n <= 2:
            return 500, {}, '{"error": "boom"}', 0
        if tag == "bad" and n == 1:
            return 200, {"Content-Type": "application/json"}, "this is not json{", 0
        if tag == "slow" and n == 1:
            return 200, {}, "{}", 1.0
        steps = f"<step> {expr} = {value}"
        if tag == "wrong":
            value += 1
        if tag == "dup":
            text = f"[thinking]{steps}<step> so {value}<doubt> same every time[/endthinking] {value}"
        elif tag == "nostrat":
            text = f"[thinking]{steps}[/endthinking] {value}"
        elif tag == "garbage":
            text = f"I think it is {value}"
        else:
            text = f"[thinking]{steps}<{strategy}> {strategy} {strategy} {strategy} checked[/endthinking] {value}"
        usage = {"prompt_tokens": 10, "completion_tokens": 20}
        if tag != "nocost":
            usage["cost"] = 0.001
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "stop"}], "usage": usage}
        return 200, {"Content-Type": "application/json"}, json.dumps(reply), self.delay

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def teacher():
    t = FakeTeacher()
    yield t
    t.close()


def _cfg(url, **kw):
    base = dict(base_url=url, api_key_env="FAKE_TEACHER_KEY", models=("m1",), strategies=("step", "doubt"),
                budget_usd=10.0, concurrency=4, max_retries=3, timeout_s=0.3, backoff_base_s=0.01)
    base.update(kw)
    return api.TeacherConfig(**base)


def _questions(tags):
    exprs = ["3 + 4", "5 + 6", "1 + 1", "2 + 2", "7 + 1", "9 + 9", "2 + 5", "4 + 4", "6 + 1", "8 + 3"]
    return [{"id": f"q{i}", "question": f"[{t}] {exprs[i % len(exprs)]}", "gold": str(int(evaluate(exprs[i % len(exprs)]))),
             "family": "test"} for i, t in enumerate(tags)]


def test_retries_filter_and_cost_exact(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TEACHER_KEY", "sk-secret-123")
    qs = _questions(["r429", "r500", "bad", "slow", "wrong", "dup", "garbage", "nostrat", "nocost"])
    cfg = _cfg(teacher.url)
    out = tmp_path / "t.jsonl"
    rep = api.run_api_build(qs, out, cfg)
    assert rep.calls == teacher.requests == 28
    assert rep.retries == 10
    assert rep.accepted == 12
    assert rep.rejected_by_reason == {"wrong_answer": 2, "near_duplicate": 1, "unparseable": 2, "missing_strategy": 1}
    fallback = api.price_of("m1", 10, 20, cfg.prices)
    assert rep.cost_usd == pytest.approx(16 * 0.001 + 2 * fallback)
    recs = list(read_records(out))
    assert len(recs) == 12 and len({r.id for r in recs}) == 12
    assert all(r.answer == r.gold and r.source == "api" and r.teacher == "m1" for r in recs)
    for p in (out, out.with_name(out.name + ".log")):
        assert "sk-secret-123" not in p.read_text()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_budget_is_never_exceeded(teacher, tmp_path, monkeypatch, concurrency):
    monkeypatch.setenv("FAKE_TEACHER_KEY", "k")
    qs = _questions(["ok"] * 10)
    cfg = _cfg(teacher.url, budget_usd=0.0055, concurrency=concurrency)
    rep = api.run_api_build(qs, tmp_path / "b.jsonl", cfg)
    assert rep.cost_usd <= 0.0055 and rep.skipped_budget > 0
    assert rep.accepted == teacher.requests == round(rep.cost_usd / 0.001)
    for _ in range(2):                                          # budget covers earlier runs too
        again = api.run_api_build(qs, tmp_path / "b.jsonl", cfg)
        assert again.prior_cost_usd + again.cost_usd <= 0.0055
    assert again.calls == 0


def test_stop_midway_then_rerun_gives_all_records_once(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TEACHER_KEY", "k")
    qs = _questions(["ok"] * 10)
    out = tmp_path / "r.jsonl"
    first = api.run_api_build(qs, out, _cfg(teacher.url, max_jobs=7))
    assert first.accepted == 7
    with open(out, "a") as f:
        f.write('{"id": "half-writ')          # a killed writer's partial line
    second = api.run_api_build(qs, out, _cfg(teacher.url))
    assert second.skipped_done == 7 and second.accepted == 13
    ids = [r.id for r in read_records(out)]
    assert len(ids) == 20 == len(set(ids))
    assert teacher.requests == 20


def test_cancelled_run_resumes_without_duplicates(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TEACHER_KEY", "k")
    slow = FakeTeacher(delay=0.05)
    try:
        qs = _questions(["ok"] * 10)
        out = tmp_path / "c.jsonl"
        cfg = _cfg(slow.url, concurrency=2, timeout_s=2.0)

        async def cancel_midway():
            task = asyncio.create_task(api.build_api_records(qs, out, cfg))
            while not out.exists() or len(out.read_text().splitlines()) < 5:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_midway())
        partial = len(list(read_records(out)))
        assert 5 <= partial < 20
        rep = api.run_api_build(qs, out, cfg)
        ids = [r.id for r in read_records(out)]
        assert len(ids) == 20 == len(set(ids)) and rep.accepted == 20 - partial
    finally:
        slow.close()


def test_judge_and_prompt():
    q = {"id": "a", "question": "2+2?", "gold": "4"}
    ok = "```\n[thinking]<step> 2 + 2 = 4<doubt> 4 - 2 = 2[/endthinking]\n```\nAnswer: 4"
    rec, verdict = api.judge(q, "m", "doubt", ok, 0.1, [], 95)
    assert verdict == "accepted" and rec.strategies == ["step", "doubt"]
    assert api.judge(q, "m", "mece", ok, 0.1, [], 95)[1] == "missing_strategy"
    assert api.judge(q, "m", "doubt", ok, 0.1, ["[thinking]<step> 2 + 2 = 4<doubt> 4 - 2 = 2[/endthinking]"], 95)[1] == "near_duplicate"
    msgs = api.build_messages("2+2?", "falsify")
    assert "<falsify>" in msgs[1]["content"] and "[thinking]" in msgs[0]["content"]


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("FAKE_TEACHER_KEY", raising=False)
    with pytest.raises(RuntimeError, match="FAKE_TEACHER_KEY"):
        api.make_client(_cfg("http://127.0.0.1:9/v1"))
