"""api.py against a real HTTP server on 127.0.0.1 that injects 429s, 500s, bad bodies, slow replies,
and against a scripted stand-in for AsyncOpenAI that raises the openai package's own errors."""

import asyncio
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import httpx
import openai
import pytest
from typer.testing import CliRunner

from agent_forge.data import api
from agent_forge.data.parse import evaluate
from agent_forge.data.schema import read_records


class FakeTeacher:
    """Scripted OpenAI-compatible endpoint. Behaviour is chosen by a tag in the question."""

    def __init__(self, delay: float = 0.0, key: str | None = None):
        self.key = key                  # when set, any other bearer token gets a 401 that echoes it
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
                status, headers, payload, sleep = teacher.respond(self.path, body, self.headers.get("Authorization"))
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

    def respond(self, path, body, auth=None):
        assert path == "/v1/chat/completions"
        if self.key is not None and auth != f"Bearer {self.key}":
            with self.lock:
                self.requests += 1
            return 401, {"Content-Type": "application/json"}, json.dumps(
                {"error": {"message": f"No user found for {auth}", "code": 401}}), 0
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
            return 200, {}, "{}", 4.0  # far past timeout_s, which leaves room for a loaded machine
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
                budget_usd=10.0, concurrency=4, max_retries=3, timeout_s=1.5, backoff_base_s=0.01)
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
    # the unreadable reply and the timed-out one may have been billed: each counts its worst case
    unknown = sum(api.max_cost("m1", api.build_messages(q["question"], s), cfg)
                  for q in qs[2:4] for s in cfg.strategies)
    assert rep.cost_usd == pytest.approx(16 * 0.001 + 2 * fallback + unknown)
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


# ---------------------------------------------------------------------------------------
# Failed jobs, billed retries and refused keys


def _status_error(cls, code: int, headers: dict | None = None):
    """A factory for one of openai's own errors, built on an httpx.Response as the client does."""
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx.Response(code, headers=headers or {}, request=request,
                              json={"error": {"message": f"status {code}"}})
    return lambda: cls(f"Error code: {code}", response=response, body=None)


def _reply(content, cost: float | None = 0.001) -> str:
    usage = {"prompt_tokens": 10, "completion_tokens": 20, **({"cost": cost} if cost is not None else {})}
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}], "usage": usage})


GOOD = _reply("[thinking]<step> 3 + 4 = 7<step> checked[/endthinking] 7")


class ScriptedClient:
    """Stands in for AsyncOpenAI: call i raises or returns script[i]; the last entry repeats."""

    def __init__(self, script):
        self.script, self.calls = list(script), 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(
            with_raw_response=SimpleNamespace(create=self.create)))

    async def create(self, **kwargs):
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if callable(step):
            raise step()
        return SimpleNamespace(http_response=httpx.Response(200, text=step))


def _same_questions(n):
    return [{"id": f"q{i}", "question": "[ok] 3 + 4", "gold": "7"} for i in range(n)]


def _scripted(qs, out, script, **kw):
    client = ScriptedClient(script)
    cfg = _cfg("http://127.0.0.1:9/v1", strategies=("step",), concurrency=1, **kw)
    return asyncio.run(api.build_api_records(qs, out, cfg, client=client)), client


def test_failed_jobs_are_not_done_and_a_rerun_retries_them(tmp_path):
    qs, out = _same_questions(3), tmp_path / "f.jsonl"
    rate_limited = _status_error(openai.RateLimitError, 429, {"retry-after": "0"})
    server_error = _status_error(openai.APIStatusError, 500)
    rep, client = _scripted(qs, out, [rate_limited, server_error], max_retries=1)
    assert rep.rejected_by_reason == {"api_error": 3} and client.calls == 6 and rep.retries == 3
    again, client = _scripted(qs, out, [GOOD])
    assert again.skipped_done == 0 and again.accepted == 3 and client.calls == 3


def test_every_billed_attempt_is_counted(tmp_path):
    qs = _same_questions(1)
    billed_but_empty = _reply(None, cost=0.001)          # parsed, billed, no text: retried
    rep, client = _scripted(qs, tmp_path / "a.jsonl", [billed_but_empty] * 3 + [GOOD])
    assert client.calls == 4 and rep.accepted == 1
    assert rep.cost_usd == pytest.approx(0.004)
    assert next(read_records(tmp_path / "a.jsonl")).cost_usd == pytest.approx(0.004)
    rep, _ = _scripted(qs, tmp_path / "b.jsonl", ["not json{", GOOD])
    worst = api.max_cost("m1", api.build_messages(qs[0]["question"], "step"), _cfg("x"))
    assert rep.cost_usd == pytest.approx(worst + 0.001)


def test_billed_retries_stay_within_the_budget(tmp_path):
    qs, out = _same_questions(1), tmp_path / "m.jsonl"
    worst = api.max_cost("m1", api.build_messages(qs[0]["question"], "step"), _cfg("x"))
    budget = 2.5 * worst
    rep, client = _scripted(qs, out, [_reply(None, cost=0.9 * worst)], budget_usd=budget)
    assert client.calls * 0.9 * worst <= budget           # what the API billed
    assert rep.cost_usd == pytest.approx(client.calls * 0.9 * worst)
    again, client = _scripted(qs, out, [GOOD], budget_usd=budget)
    assert client.calls == 0 and again.prior_cost_usd == pytest.approx(rep.cost_usd)


def test_permission_denied_stops_the_build_at_once(tmp_path):
    qs, out = _same_questions(10), tmp_path / "p.jsonl"
    with pytest.raises(api.TeacherAuthError, match="403"):
        _scripted(qs, out, [_status_error(openai.PermissionDeniedError, 403)])
    client = ScriptedClient([GOOD])
    rep = asyncio.run(api.build_api_records(qs, out, _cfg("x", strategies=("step",)), client=client))
    assert rep.skipped_done == 0 and rep.accepted == 10


def test_wrong_key_stops_at_once_and_the_right_key_then_does_everything(tmp_path, monkeypatch, capsys):
    strict = FakeTeacher(key="sk-right-key-42")
    try:
        qs, out = _questions(["ok"] * 10), tmp_path / "k.jsonl"
        monkeypatch.setenv("FAKE_TEACHER_KEY", "sk-wrong-key-987")
        with pytest.raises(api.TeacherAuthError, match="FAKE_TEACHER_KEY.*401") as refused:
            api.run_api_build(qs, out, _cfg(strict.url, concurrency=2))
        assert 1 <= strict.requests <= 2                   # the calls already in flight, no more
        assert "sk-wrong-key-987" not in str(refused.value)  # the server echoed it back; we do not
        monkeypatch.setenv("FAKE_TEACHER_KEY", "sk-right-key-42")
        rep = api.run_api_build(qs, out, _cfg(strict.url))
        assert rep.skipped_done == 0 and rep.accepted == 20
    finally:
        strict.close()
    seen = capsys.readouterr()
    for text in [seen.out, seen.err] + [p.read_text() for p in tmp_path.iterdir()]:
        assert "sk-wrong-key-987" not in text and "sk-right-key-42" not in text


def test_cli_wrong_key_is_one_clear_message(tmp_path, monkeypatch):
    from agent_forge.data.commands import data_app

    strict = FakeTeacher(key="sk-right-key-42")
    try:
        questions = tmp_path / "q.jsonl"
        questions.write_text("\n".join(json.dumps({"question": "[ok] 3 + 4", "answer": "7"}) for _ in range(5)))
        monkeypatch.setenv("FAKE_TEACHER_KEY", "sk-wrong-key-987")
        result = CliRunner().invoke(data_app, [
            "build", "--source", "api", "--questions", str(questions), "--out", str(tmp_path / "o.jsonl"),
            "--base-url", strict.url, "--api-key-env", "FAKE_TEACHER_KEY", "--models", "m1",
            "--strategies", "step", "--concurrency", "1", "--no-check-overlap"])
    finally:
        strict.close()
    assert result.exit_code == 2 and strict.requests == 1
    assert "refused the key in FAKE_TEACHER_KEY" in result.output
    assert "sk-wrong-key-987" not in result.output
