"""Reasoning records and the one text format every part of Agent Forge agrees on.

A record is a question, a thinking trace (a list of (strategy, text) segments), a final
answer and the gold answer. Rendered for training and inference it reads

    Question: <question>\\nAnswer:[thinking]<step> 3 + 4 = 7<doubt> 7 - 4 = 3, yes[/endthinking] 7

The prompt ends at "Answer:"; the completion is the thinking block, a space, the answer
and the tokenizer's end-of-sequence token. No chat template: on 40-token problems its
system prompt would be a third of the compute.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from agent_forge.vocab import STRATEGIES, ThinkingVocab, get_vocab

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass
class Segment:
    strategy: str
    text: str


@dataclass
class Record:
    """One question with its reasoning trace.

    id: stable unique id (source-specific).
    question: the problem text.
    thinking: the trace, in order; each segment's strategy is one of STRATEGIES.
    answer: the final answer the trace arrives at.
    gold: the verified correct answer (equal to `answer` for correct traces).
    source: "gym", "api", "star", or another producer name.
    family: task family (e.g. "chain_sum"), for per-family metrics.
    teacher: the model that wrote the trace, if any.
    cost_usd: money spent producing it.
    meta: anything else worth keeping (difficulty, seed, ...).
    """

    id: str
    question: str
    thinking: list[Segment]
    answer: str
    gold: str
    source: str
    family: str = ""
    teacher: str | None = None
    cost_usd: float = 0.0
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["thinking"] = [[s.strategy, s.text] for s in self.thinking]
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        validate_dict(d)
        segs = [Segment(s[0], s[1]) if isinstance(s, (list, tuple)) else Segment(**s) for s in d["thinking"]]
        known = {k: d[k] for k in ("family", "teacher", "cost_usd", "meta") if k in d}
        return cls(id=str(d["id"]), question=d["question"], thinking=segs, answer=str(d["answer"]),
                   gold=str(d["gold"]), source=d["source"], **known)

    @property
    def strategies(self) -> list[str]:
        return [s.strategy for s in self.thinking]


CHECKS = ("doubt", "falsify")


def planted_slip(segments: list[Segment], i: int) -> bool:
    """Segment i is a planted slip: a `<step>` that the next segment repairs (`<correct>`),
    or that a check catches (`<doubt>`/`<falsify>`) just before a `<correct>` repairs it."""
    if segments[i].strategy != "step" or i + 1 >= len(segments):
        return False
    nxt = segments[i + 1].strategy
    return nxt == "correct" or (nxt in CHECKS and i + 2 < len(segments)
                                and segments[i + 2].strategy == "correct")


class RecordError(ValueError):
    """A record that does not follow the schema."""


def validate_dict(d: dict) -> None:
    if not isinstance(d, dict):
        raise RecordError("record is not a JSON object")
    for key in ("id", "question", "thinking", "answer", "gold", "source"):
        if key not in d:
            raise RecordError(f"missing field {key!r}")
    if not str(d["question"]).strip():
        raise RecordError("empty question")
    if not isinstance(d["thinking"], list):
        raise RecordError("'thinking' must be a list of [strategy, text] segments")
    for i, seg in enumerate(d["thinking"]):
        strategy = seg[0] if isinstance(seg, (list, tuple)) and len(seg) == 2 else (
            seg.get("strategy") if isinstance(seg, dict) else None)
        if strategy not in STRATEGIES:
            raise RecordError(f"segment {i} has unknown strategy {strategy!r}")


# ---------------------------------------------------------------------------------------
# Rendering


def render_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question.strip())


def render_thinking(segments: list[Segment], vocab: ThinkingVocab | str = "default") -> str:
    vocab = get_vocab(vocab)
    body = "".join(f"<{s.strategy}> {s.text.strip()}" for s in segments)
    return f"{vocab.open}{body}{vocab.close}"


def render_completion(record: Record, vocab: ThinkingVocab | str = "default") -> str:
    """Thinking block then the answer (no end-of-sequence token: the tokenizer adds it)."""
    return f"{render_thinking(record.thinking, vocab)} {record.answer.strip()}"


def render(record: Record, vocab: ThinkingVocab | str = "default") -> str:
    return render_prompt(record.question) + render_completion(record, vocab)


# ---------------------------------------------------------------------------------------
# JSONL I/O


def read_records(path: str | Path, errors: list[str] | None = None) -> Iterator[Record]:
    """Yield valid records; a bad line is reported (into `errors`, else stderr) and skipped."""
    import sys

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Record.from_dict(json.loads(line))
            except (json.JSONDecodeError, RecordError, TypeError, KeyError, IndexError) as e:
                msg = f"{path}:{lineno}: skipped bad record: {e}"
                if errors is not None:
                    errors.append(msg)
                else:
                    print(msg, file=sys.stderr)


def write_records(path: str | Path, records, append: bool = False) -> int:
    n = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for r in records:
            f.write(r.to_json() + "\n")
            n += 1
    return n
