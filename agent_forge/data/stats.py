"""What a reasoning-data file holds: strategies, sources, families, lengths, cost."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from agent_forge.data.schema import read_records, render_thinking
from agent_forge.vocab import STRATEGIES


def dataset_stats(records) -> dict:
    """Counts over records. `strategy_records`: records using each strategy at least once;
    `strategy_segments`: segments per strategy; lengths in characters and whitespace words."""
    records = list(records)
    n = len(records)
    seg_counts = Counter(s.strategy for r in records for s in r.thinking)
    rec_counts = Counter(s for r in records for s in set(r.strategies))
    chars = [len(render_thinking(r.thinking)) for r in records]
    words = [len(" ".join(s.text for s in r.thinking).split()) + len(r.thinking) for r in records]
    return {
        "records": n,
        "strategy_records": {s: rec_counts.get(s, 0) for s in STRATEGIES},
        "strategy_share": {s: (rec_counts.get(s, 0) / n if n else 0.0) for s in STRATEGIES},
        "strategy_segments": {s: seg_counts.get(s, 0) for s in STRATEGIES},
        "source": dict(Counter(r.source for r in records)),
        "family": dict(Counter(r.family or "-" for r in records)),
        "teacher": dict(Counter(r.teacher for r in records if r.teacher)),
        "segments_mean": statistics.fmean(len(r.thinking) for r in records) if n else 0.0,
        "thinking_chars": _summary(chars),
        "thinking_words": _summary(words),
        "cost_usd": sum(r.cost_usd for r in records),
    }


def _summary(xs: list[int]) -> dict:
    if not xs:
        return {"mean": 0.0, "median": 0.0, "max": 0}
    return {"mean": statistics.fmean(xs), "median": statistics.median(xs), "max": max(xs)}


def file_stats(path: str | Path) -> dict:
    errors: list[str] = []
    stats = dataset_stats(read_records(path, errors=errors))
    stats["bad_lines"] = len(errors)
    return stats
