"""Reasoning traces from teacher models behind an OpenAI-compatible API (OpenRouter default).

Each job is one (question, teacher model, strategy). Jobs run concurrently under a
semaphore; every attempt reserves its worst-case cost before it is sent, so the budget holds
even with many calls in flight. Every attempt that may have been billed is charged: a reply
whose body is unreadable or has no text, and a timeout, count their usage or the worst case.
Retries back off exponentially with jitter and honour Retry-After. Every job that made a
call is appended (and fsynced) to a log beside the output with what it cost, and every
accepted record to the output. A job is done once the teacher's reply was judged (kept, or
rejected for its content); a job whose calls failed (retries ran out, a 4xx, the budget
ran out mid-retry) is not, so a rerun with the same output asks it again: no duplicates,
nothing lost, money already spent still counted against the budget. A refused key
(401/403) stops the whole build at once with TeacherAuthError. The API key is read from an
environment variable and never printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent_forge.data.parse import ParseError, answers_match, parse_completion
from agent_forge.data.schema import Record, render_thinking
from agent_forge.vocab import STRATEGIES

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_MODELS = ("openai/gpt-4o-mini", "meta-llama/llama-3.1-8b-instruct")
# USD per million tokens (input, output); used when a reply carries no usage.cost.
PRICES = {
    "openai/gpt-4o-mini": (0.15, 0.60),
    "meta-llama/llama-3.1-8b-instruct": (0.02, 0.05),
    "default": (1.0, 4.0),
}

STRATEGY_HINTS = {
    "step": "work in short numbered-free steps, each one computed result",
    "mece": "split the problem into parts that do not overlap and together cover it",
    "falsify": "test the answer by trying to disprove it, e.g. plug it back in",
    "expert": "name the rule an expert would apply",
    "orthogonal": "recompute the result a different way",
    "doubt": "re-check one step with the inverse operation",
    "bayesian": "sanity-check the size of the answer with a rough estimate",
    "multidomain": "translate the words of the problem into operations",
    "correct": "if a step is wrong, repair it in a <correct> segment",
    "uncertain": "flag the step you are least sure of, then check it",
}


@dataclass
class TeacherConfig:
    """How to ask teachers. Budget is in USD for the output file as a whole (resumes included)."""

    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENROUTER_API_KEY"
    models: tuple[str, ...] = DEFAULT_MODELS
    strategies: tuple[str, ...] = STRATEGIES
    budget_usd: float = 1.0
    concurrency: int = 4
    max_retries: int = 4
    timeout_s: float = 60.0
    max_tokens: int = 256
    temperature: float = 0.7
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_jobs: int | None = None          # stop after this many jobs in this run
    near_duplicate: float = 95.0         # rapidfuzz ratio above which a trace is a duplicate
    prices: dict = field(default_factory=lambda: dict(PRICES))


@dataclass
class BuildReport:
    accepted: int = 0
    rejected_by_reason: dict = field(default_factory=dict)
    cost_usd: float = 0.0               # spent in this run
    calls: int = 0                      # HTTP requests sent in this run
    retries: int = 0
    skipped_done: int = 0               # jobs already finished by an earlier run
    skipped_budget: int = 0
    prior_cost_usd: float = 0.0         # spent by earlier runs on the same output

    def reject(self, reason: str) -> None:
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return asdict(self)


# Log statuses of jobs that are not done: a rerun tries them again.
FAILED = ("api_error", "auth_error", "over_budget", "cancelled")


class TeacherAuthError(RuntimeError):
    """The API refused the key (401/403): every other call would be refused too, so the build stops."""


class _Retryable(Exception):
    def __init__(self, why: str, wait: float | None = None, cost: float = 0.0):
        super().__init__(why)
        self.why, self.wait, self.cost = why, wait, cost      # cost: what this attempt may have been billed


class _Refused(Exception):
    """A 401 or 403 from the API; the text is the server's, with the key blanked out."""


class _OverBudget(Exception):
    """The next attempt's worst case does not fit the budget."""


# ---------------------------------------------------------------------------------------
# Prompts and cost


def build_messages(question: str, strategy: str) -> list[dict]:
    system = (
        "You write short reasoning traces in a fixed token format. Reply with exactly one line:\n"
        "[thinking]<step> ...<doubt> ...[/endthinking] FINAL_ANSWER\n"
        "Segments start with one of the markers <step> <mece> <falsify> <expert> <orthogonal> "
        "<doubt> <bayesian> <multidomain> <correct> <uncertain>. Keep the whole trace under 60 "
        "words, every computation exact, and put only the final answer (a number or a letter) "
        "after [/endthinking]."
    )
    user = (f"Question: {question}\nUse <step> for the computation and at least one <{strategy}> "
            f"segment: {STRATEGY_HINTS.get(strategy, strategy)}.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def price_of(model: str, prompt_tokens: int, completion_tokens: int, prices: dict) -> float:
    p_in, p_out = prices.get(model, prices.get("default", PRICES["default"]))
    return (prompt_tokens * p_in + completion_tokens * p_out) / 1e6


def max_cost(model: str, messages: list[dict], cfg: TeacherConfig) -> float:
    """Worst case for one call: a generous prompt-token count and max_tokens of output."""
    chars = sum(len(m["content"]) for m in messages)
    return price_of(model, chars // 2 + 50, cfg.max_tokens, cfg.prices)


# ---------------------------------------------------------------------------------------
# One call, with retries


def _backoff(attempt: int, cfg: TeacherConfig, wait: float | None) -> float:
    if wait is not None:
        return min(max(wait, 0.0), cfg.backoff_max_s)
    return min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** attempt) * random.uniform(0.5, 1.0)


async def _post_once(client, model: str, messages: list[dict], cfg: TeacherConfig) -> tuple[str, float]:
    """(reply text, billed cost) of one request; raises _Retryable (with what it may have cost) or _Refused."""
    import openai

    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature)
    except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
        raise _Refused(f"{e.status_code}: {_redact(str(e), cfg)[:300]}") from None
    except openai.RateLimitError as e:
        raise _Retryable("429", _retry_after(e.response)) from e
    except openai.APITimeoutError as e:           # we hung up; the teacher may have answered and billed
        raise _Retryable("timeout", cost=max_cost(model, messages, cfg)) from e
    except openai.APIConnectionError as e:
        raise _Retryable("connection") from e
    except openai.APIStatusError as e:
        if e.status_code >= 500:
            raise _Retryable(str(e.status_code), _retry_after(e.response)) from e
        raise
    return _read_reply(raw.http_response.text, model, messages, cfg)


def _read_reply(text: str, model: str, messages: list[dict], cfg: TeacherConfig) -> tuple[str, float]:
    """(content, cost) of a 200 reply; a malformed one raises _Retryable carrying its cost, as it was billed."""
    try:
        body = json.loads(text)
    except ValueError:
        raise _Retryable("malformed", cost=max_cost(model, messages, cfg)) from None
    cost = _billed(body, model, messages, cfg)
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        raise _Retryable("malformed", cost=cost)
    return content, cost


def _billed(body, model: str, messages: list[dict], cfg: TeacherConfig) -> float:
    """usage.cost, else the token counts at list price, else (nothing readable) the worst case."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict) or not usage:
        return max_cost(model, messages, cfg)
    if isinstance(usage.get("cost"), (int, float)) and not isinstance(usage["cost"], bool):
        return float(usage["cost"])
    try:
        return price_of(model, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                        cfg.prices)
    except (TypeError, ValueError):
        return max_cost(model, messages, cfg)


def _redact(text: str, cfg: TeacherConfig) -> str:
    """Blank the key out of a server's error text (some servers echo what they were sent)."""
    key = os.environ.get(cfg.api_key_env)
    return text.replace(key, "***") if key else text


def _retry_after(response) -> float | None:
    try:
        value = response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, ValueError):
        return None


async def call_teacher(client, model: str, messages: list[dict], cfg: TeacherConfig, report: BuildReport,
                       state: _State, billed: list[float]) -> str:
    """The reply text. Each attempt reserves its worst case first; what it was billed goes to `billed`.

    Raises _OverBudget when the next attempt does not fit, _Refused on 401/403, RuntimeError
    when retries run out, and the openai error of any other 4xx.
    """
    reserve, last = max_cost(model, messages, cfg), "unknown"
    for attempt in range(cfg.max_retries + 1):
        if not state.try_reserve(reserve):
            raise _OverBudget()
        report.calls += 1
        cost, wait = 0.0, None
        try:
            text, cost = await _post_once(client, model, messages, cfg)
            return text
        except _Retryable as e:
            cost, wait, last = e.cost, e.wait, e.why
        finally:
            billed.append(cost)
            report.cost_usd += cost
            state.settle(reserve, cost)
        if attempt < cfg.max_retries:
            report.retries += 1
            await asyncio.sleep(_backoff(attempt, cfg, wait))
    raise RuntimeError(f"gave up after {cfg.max_retries + 1} attempts ({last})")


# ---------------------------------------------------------------------------------------
# Resumable build


def _repair_tail(path: Path) -> None:
    """Drop a half-written last line left by a killed run."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _append(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _job_key(qid: str, model: str, strategy: str) -> str:
    return json.dumps([str(qid), model, strategy])


class _State:
    """What is done already, the traces kept per question, and money spent or reserved."""

    def __init__(self, out: Path, log: Path, budget: float):
        from agent_forge.data.schema import read_records

        for p in (out, log):
            _repair_tail(p)
        self.done: set[str] = set()
        self.traces: dict[str, list[str]] = {}
        self.prior_cost = 0.0
        self.refused: str | None = None       # the first 401/403's text: the build stops
        if log.exists():
            for line in log.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                if entry.get("status") not in FAILED:
                    self.done.add(entry["key"])
                self.prior_cost += float(entry.get("cost", 0.0))
        if out.exists():
            for r in read_records(out, errors=[]):
                self.done.add(_job_key(r.meta.get("question_id", ""), r.teacher or "", r.meta.get("strategy", "")))
                self.traces.setdefault(str(r.meta.get("question_id")), []).append(render_thinking(r.thinking))
        self.spent, self.reserved, self.budget, self.stop = self.prior_cost, 0.0, budget, False

    def try_reserve(self, amount: float) -> bool:
        if self.stop or self.spent + self.reserved + amount > self.budget:
            self.stop = True
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, cost: float) -> None:
        """An attempt ended: free its reservation, charge what it cost."""
        self.reserved -= reserved
        self.spent += cost
        if cost > reserved:
            self.stop = True        # the estimate was too low: launch nothing more


def judge(question: dict, model: str, strategy: str, text: str, cost: float,
          known_traces: list[str], threshold: float) -> tuple[Record | None, str]:
    """(record, "accepted") or (None, reason): parse, answer vs gold, strategy used, near-duplicate."""
    from rapidfuzz import fuzz

    try:
        segments, answer = parse_completion(text)
    except ParseError:
        return None, "unparseable"
    if not segments or any(s.strategy not in STRATEGIES for s in segments):
        return None, "unparseable"
    gold = str(question.get("gold", question.get("answer")))
    if not answers_match(answer, gold):
        return None, "wrong_answer"
    if strategy not in {s.strategy for s in segments}:
        return None, "missing_strategy"
    rendered = render_thinking(segments)
    if any(fuzz.ratio(rendered, t) > threshold for t in known_traces):
        return None, "near_duplicate"
    slug = model.replace("/", "_")
    record = Record(id=f"api-{question['id']}-{slug}-{strategy}", question=question["question"],
                    thinking=segments, answer=answer, gold=gold, source="api",
                    family=question.get("family", ""), teacher=model, cost_usd=cost,
                    meta={"question_id": str(question["id"]), "strategy": strategy})
    return record, "accepted"


async def build_api_records(questions: list[dict], out: str | Path, cfg: TeacherConfig,
                            client=None, progress=None) -> BuildReport:
    """Ask every teacher for every strategy on every question; append accepted records to `out`.

    `questions`: dicts with id, question, gold (or answer), optional family. `progress`,
    if given, is called after each finished job.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".log")
    state = _State(out, log, cfg.budget_usd)
    report = BuildReport(prior_cost_usd=state.prior_cost)
    client = client or make_client(cfg)
    sem = asyncio.Semaphore(cfg.concurrency)
    jobs = [(q, m, s) for q in questions for m in cfg.models for s in cfg.strategies]
    todo = [j for j in jobs if _job_key(j[0]["id"], j[1], j[2]) not in state.done]
    report.skipped_done = len(jobs) - len(todo)
    if cfg.max_jobs is not None:
        todo = todo[: cfg.max_jobs]

    async def run(job):
        async with sem:
            await _run_job(job, client, cfg, state, report, out, log)
        if progress:
            progress()

    await asyncio.gather(*(run(j) for j in todo))
    if state.refused:
        raise TeacherAuthError(f"the API at {cfg.base_url} refused the key in {cfg.api_key_env} "
                               f"({state.refused}); the build stopped and no job was marked done: "
                               "set a valid key and rerun")
    return report


async def _run_job(job, client, cfg, state: _State, report: BuildReport, out: Path, log: Path) -> None:
    q, model, strategy = job
    key = _job_key(q["id"], model, strategy)
    messages, billed = build_messages(q["question"], strategy), []
    try:
        text = await call_teacher(client, model, messages, cfg, report, state, billed)
        record, verdict = judge(q, model, strategy, text, sum(billed), state.traces.get(str(q["id"]), []),
                                cfg.near_duplicate)
    except _OverBudget:
        if not billed:              # never sent
            if not state.refused:
                report.skipped_budget += 1
            return
        record, verdict = None, "over_budget"
    except _Refused as e:
        state.refused, state.stop = state.refused or str(e), True
        record, verdict = None, "auth_error"
    except asyncio.CancelledError:
        if sum(billed) > 0:         # keep what it spent on the books for the rerun's budget
            _append(log, json.dumps({"key": key, "status": "cancelled", "cost": sum(billed)}))
        raise
    except Exception:  # noqa: BLE001 - retries ran out, a 4xx or a client error: record it, keep going
        record, verdict = None, "api_error"
    _finish_job(key, q, record, verdict, sum(billed), state, report, out, log)


def _finish_job(key, q, record, verdict, cost, state: _State, report: BuildReport, out: Path, log: Path) -> None:
    """Write the record and the log line; only a judged reply makes the job done."""
    if record is not None:
        _append(out, record.to_json())
        state.traces.setdefault(str(q["id"]), []).append(render_thinking(record.thinking))
        report.accepted += 1
    else:
        report.reject(verdict)
    _append(log, json.dumps({"key": key, "status": verdict, "cost": cost}))
    if verdict not in FAILED:
        state.done.add(key)


def make_client(cfg: TeacherConfig):
    """AsyncOpenAI with our own retries (max_retries=0); key from cfg.api_key_env, never logged."""
    from openai import AsyncOpenAI

    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise RuntimeError(f"set the API key in the environment variable {cfg.api_key_env}")
    return AsyncOpenAI(api_key=key, base_url=cfg.base_url, timeout=cfg.timeout_s, max_retries=0)


def run_api_build(questions: list[dict], out: str | Path, cfg: TeacherConfig, progress=None) -> BuildReport:
    """Synchronous wrapper for the CLI."""
    return asyncio.run(build_api_records(questions, out, cfg, progress=progress))
