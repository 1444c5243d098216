"""Procedural reasoning records: reasoning-gym problems (gym.py) with traces computed from
each problem (traces.py), every record re-verified (each claimed equality, the answer
against gold) and dropped if anything fails.

Ids are "gym-<family>-<difficulty>-s<seed>-<index>"; the seeds keep training and
evaluation apart (gym.py).
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Callable

from agent_forge.data.gym import MAX_TRAIN_SEED, TRAIN_SEED_STRIDE, family_offset, gym_problems
from agent_forge.data.parse import answers_match, false_equalities, to_number
from agent_forge.data.schema import Record, planted_slip
from agent_forge.data.traces import arithmetic_trace, equation_trace, word_problem_trace
from agent_forge.vocab import STRATEGIES

DEFAULT_FAMILIES = ("chain_sum", "basic_arithmetic", "simple_equations", "gsm_symbolic")


# ---------------------------------------------------------------------------------------
# Verification and the build


def verify_record(record: Record) -> list[str]:
    """Problems with a record's trace; empty when it is sound.

    Every claimed equality must hold, except a planted slip (schema.planted_slip) that its
    <correct> repairs; the answer must equal gold and appear in the trace.
    """
    problems = []
    if not answers_match(record.answer, record.gold):
        problems.append(f"answer {record.answer!r} != gold {record.gold!r}")
    if not record.thinking:
        problems.append("empty trace")
    segs = record.thinking
    for i, seg in enumerate(segs):
        if seg.strategy not in STRATEGIES:
            problems.append(f"unknown strategy {seg.strategy!r}")
        wrong = false_equalities(seg.text)
        if not wrong:
            continue
        fix = segs[i + 1 if segs[i + 1].strategy == "correct" else i + 2] if planted_slip(segs, i) else None
        repaired = (len(wrong) == 1 and fix is not None and not false_equalities(fix.text)
                    and wrong[0][0].replace(" ", "") in fix.text.replace(" ", ""))
        if not repaired:
            problems.append(f"false claim in <{seg.strategy}>: {wrong[0][0]} = {wrong[0][1]}")
    trace = re.sub(r"(?<=\d),(?=\d{3})", "", " ".join(s.text for s in segs))
    numbers = {Fraction(x) for x in re.findall(r"-?\d+(?:\.\d+)?", trace)}
    target = to_number(record.answer)
    if target is None or target not in numbers:
        problems.append("answer never appears in the trace")
    return problems


def make_record(family: str, item: dict, rid: str, difficulty: str, rng_seed: int) -> Record:
    rng = random.Random(rid)
    meta = item.get("metadata", {})
    if family in ("chain_sum", "basic_arithmetic"):
        segs, answer = arithmetic_trace(meta["expression"], rng)
    elif family == "simple_equations":
        segs, answer = equation_trace(meta["equation"], meta["variable"], rng)
    elif family == "gsm_symbolic":
        segs, answer = word_problem_trace(item["question"], meta["answer_cot"], str(item["answer"]), rng)
    else:
        raise ValueError(f"no trace builder for reasoning-gym family {family!r}; "
                         f"supported: {', '.join(DEFAULT_FAMILIES)}")
    extra = {k: meta[k] for k in ("expression", "equation") if k in meta}
    if "gold_fixed_from" in item:
        extra["gold_fixed_from"] = item["gold_fixed_from"]
    return Record(id=rid, question=item["question"], thinking=segs, answer=answer,
                  gold=str(item["answer"]), source="gym", family=family,
                  meta={"difficulty": difficulty, "gym_seed": rng_seed, **extra})


def build_gym_records(n: int, seed: int = 0, families=DEFAULT_FAMILIES,
                      difficulty: str = "easy", stats: dict | None = None,
                      exclude: Callable[[str], bool] | None = None) -> list[Record]:
    """`n` verified records, an equal share per family, interleaved family by family.

    Ids are "gym-<family>-<difficulty>-s<seed>-<index>". Items whose gold is wrong, whose
    trace fails verification, or whose question `exclude` rejects (an evaluation set asks
    it: see overlap.asked_by) are skipped (counted in `stats`) and replaced by the next
    index, so a filtered build still has `n` records, deterministic in its arguments.
    """
    if not 0 <= seed < MAX_TRAIN_SEED:
        raise ValueError(f"seed must be in [0, {MAX_TRAIN_SEED}) to stay clear of evaluation seeds")
    if n * 4 + 200 >= TRAIN_SEED_STRIDE:
        raise ValueError(f"n={n} is too large for one seed; split the build over several seeds")
    families = tuple(families)
    stats = stats if stats is not None else {}
    per_family = []
    for k, family in enumerate(families):
        want = n // len(families) + (k < n % len(families))
        per_family.append(_family_records(family, want, seed, difficulty, stats, exclude))
    out = []
    for i in range(max((len(x) for x in per_family), default=0)):
        out.extend(rs[i] for rs in per_family if i < len(rs))
    return out


def _family_records(family: str, want: int, seed: int, difficulty: str, stats: dict,
                    exclude: Callable[[str], bool] | None = None) -> list[Record]:
    base = seed * TRAIN_SEED_STRIDE
    records: list[Record] = []
    start = 0
    while len(records) < want:
        if start > 8 * want + 200:
            raise RuntimeError(f"{family}: too many items fail verification ({stats})")
        batch = gym_problems(family, difficulty, base, start, max(want - len(records), 16))
        for offset, item in enumerate(batch):
            index = start + offset
            if item is None:
                stats["bad_gold"] = stats.get("bad_gold", 0) + 1
                continue
            if exclude is not None and exclude(item["question"]):
                stats["eval_overlap"] = stats.get("eval_overlap", 0) + 1
                continue
            record = make_record(family, item, f"gym-{family}-{difficulty}-s{seed}-{index}",
                                 difficulty, base + family_offset(family) + index)
            if verify_record(record):
                stats["failed_verification"] = stats.get("failed_verification", 0) + 1
                continue
            stats["gold_fixed"] = stats.get("gold_fixed", 0) + ("gold_fixed_from" in record.meta)
            records.append(record)
            if len(records) == want:
                break
        start += len(batch)
    return records
