"""Keep evaluation questions out of training data.

Every question is keyed by one function, `question_keys`, whichever side it comes from (an
eval item or a training record), so a copy matches however it is laid out:
- "q:" its stem normalised (case, whitespace and punctuation removed). The stem is the text
  before a list of lettered choices (A., B., ... or A), B), ... at line starts, or (A), (B)
  inline; an "Options:" label before them is dropped), so an ARC or CommonsenseQA item copied
  with or without its choices, in any of those layouts, has the key of the eval item.
- "m:" for arithmetic, the bare sequence of numbers and operators of the stem, because the
  same sum asked as "What is 8 + 0?" in one set and "Compute 8 + 0." in another is one item.

The index holds every item an evaluation can ask of each set: the procedural sets at their
largest size (evalsets.MAX_ASKED, what `--limit` and the `standard` preset can reach), the
others in full.
"""

from __future__ import annotations

import json
import re
from typing import Callable

# easy_arithmetic_confirm is left out on purpose: filtering a third set out of the default
# 3000 training records drops 188 more of them, small-number ones (median largest operand 8,
# against 31 in those kept), and in one `make demo` run that cut Step 1's accuracy (test
# 64.7% -> 51.3%). Compare on it with `forge ab --exclude-seen` instead.
DEFAULT_EVAL_SETS = ("easy_arithmetic", "easy_arithmetic_val", "gsm8k", "arc_easy", "arc_challenge", "commonsense_qa")


def normalize_question(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces; arithmetic operators are kept."""
    text = text.lower().replace("’", "'").replace("×", "*").replace("÷", "/")
    text = re.sub(r"([-+*/=])", r" \1 ", text)
    text = re.sub(r"[^\w\s+*/=-]|_", " ", text)
    return re.sub(r"\s+", " ", text).strip()


_OPERAND = r"(?:-?\d+(?:\.\d+)?(?:\s*\*?\s*[a-z]\b)?|-?[a-z]\b)"
_RUN = re.compile(rf"{_OPERAND}(?:\s*[-+*/×÷]\s*{_OPERAND})+(?:\s*=\s*{_OPERAND})?")


def math_key(text: str) -> str | None:
    """'Compute 8 + 0.' and 'State ... problem: 8 + 0 =' -> '8 + 0'; None for prose.

    Only when the run holds every number in the question; a word problem with a
    "5-6 split" in it keeps only its text key.
    The longest run of operands joined by operators, variables written as 'v', so
    "Solve for e: 56 - 98*e = -1218" and "Find d: 56 - 98*d = -1218" share a key.
    """
    runs = [m.group(0) for m in _RUN.finditer(text.lower())]
    runs = [r for r in runs if len(re.findall(r"\d+", r)) >= 2]
    if not runs or len(re.findall(r"\d+", max(runs, key=len))) < len(re.findall(r"\d+", text)):
        return None  # prose that merely contains a little arithmetic
    tokens = re.findall(r"\d+(?:\.\d+)?|[a-z]|[-+*/×÷=]", max(runs, key=len))
    return " ".join("v" if t.isalpha() else t for t in tokens)


# A choice marker: "A." / "A)" / "A:" / "(A)" at a line start, or "(A)" anywhere.
_MARK = re.compile(r"(?:^[ \t]*\(?([A-J])[.):]|\(([A-J])\))[ \t]+", re.M)
_LABEL = re.compile(r"(?:answer\s+)?(?:options|choices)\s*:?\s*$", re.I)


def question_stem(text: str) -> str:
    """The text before its lettered choices (A, B, ... in order, at least two); all of it if none."""
    run: list[re.Match] = []
    for m in _MARK.finditer(text):
        letter = m.group(1) or m.group(2)
        if run and ord(letter) == ord(run[-1].group(1) or run[-1].group(2)) + 1:
            run.append(m)
        elif len(run) >= 2:
            break
        elif letter == "A":
            run = [m]
    if len(run) < 2:
        return text
    stem = _LABEL.sub("", text[:run[0].start()]).strip()
    return stem if normalize_question(stem) else text


def question_keys(text: str) -> list[str]:
    """The overlap keys of a question; the same function for eval items and training text."""
    stem = question_stem(text)
    keys = ["q:" + normalize_question(stem)]
    mk = math_key(stem)
    if mk:
        keys.append("m:" + mk)
    return keys


def eval_index(eval_sets=DEFAULT_EVAL_SETS, items=None) -> dict[str, str]:
    """key -> eval item id over every item the named sets can ask (plus any EvalItems given)."""
    from agent_forge.data.evalsets import askable

    all_items = list(items or [])
    for name in eval_sets:
        all_items.extend(askable(name))
    index: dict[str, str] = {}
    for it in all_items:
        for key in question_keys(it.question):
            index.setdefault(key, it.id)
    return index


def eval_sets_for(*names: str | None) -> tuple[str, ...]:
    """DEFAULT_EVAL_SETS plus the other sets a run evaluates on (its test and validation sets)."""
    return DEFAULT_EVAL_SETS + tuple(dict.fromkeys(n for n in names if n and n not in DEFAULT_EVAL_SETS))


def gsm8k_contamination(families, eval_set: str | None) -> str | None:
    """A warning when `eval_set` includes GSM8K and training used a family generated from
    GSM8K test-question templates: renamed, renumbered copies that no key above matches."""
    from agent_forge.data.gym import GSM8K_TEST_TEMPLATE_FAMILIES

    templated = sorted(set(families or ()) & GSM8K_TEST_TEMPLATE_FAMILIES)
    if not templated or not eval_set or "gsm8k" not in eval_set.split("+"):
        return None
    return (f"GSM8K figures are contaminated: training data came from {', '.join(templated)}, "
            "built from templates of GSM8K test questions")


def asked_by(eval_sets=DEFAULT_EVAL_SETS, items=None) -> Callable[[str], bool]:
    """question -> True when an item of the named sets (or `items`) asks it: the `exclude`
    filter for building training data that still reaches its size."""
    index = eval_index(eval_sets, items)
    return lambda question: any(key in index for key in question_keys(question))


def find_overlap(records, eval_sets=DEFAULT_EVAL_SETS, items=None) -> dict[str, str]:
    """Training record id -> id of the evaluation item it duplicates."""
    index = eval_index(eval_sets, items)
    hits = {}
    for r in records:
        for key in question_keys(r.question):
            if key in index:
                hits[r.id] = index[key]
                break
    return hits


def filter_overlap(records, eval_sets=DEFAULT_EVAL_SETS, items=None):
    """(records that touch no eval item, ids of those dropped)."""
    records = list(records)
    hits = find_overlap(records, eval_sets, items)
    return [r for r in records if r.id not in hits], sorted(hits)


def unseen_items(items, seen_files) -> list:
    """The items whose question no line of the JSONL files asks (by the overlap keys), so
    a comparison can be made on questions neither model trained on."""
    questions: list[str] = []
    for path in seen_files:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    d = jsonl_object(line, path, i)
                    if "question" not in d:
                        raise ValueError(f"{path}:{i}: no 'question' field")
                    questions.append(d["question"])
    return items_not_asking(items, questions)


def items_not_asking(items, questions) -> list:
    """The items whose question matches none of `questions` (by the overlap keys)."""
    seen = {key for q in questions for key in question_keys(q)}
    return [it for it in items if not seen.intersection(question_keys(it.question))]


def jsonl_object(line: str, path, lineno: int) -> dict:
    """One JSONL line as a dict; a ValueError naming the file, the line and the problem if not."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}:{lineno}: not a JSON object")
    return d
