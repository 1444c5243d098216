"""Problems from reasoning-gym: difficulty settings, seeds, and gold we recompute ourselves.

Seeds: training item i of user seed s uses reasoning-gym seed s*TRAIN_SEED_STRIDE + i;
evaluation sets use EVAL_SEED_BASE + i, far above any training seed, so the two never
generate from the same random state. Each family adds its own offset (family_offset).
"""

from __future__ import annotations

import re
import zlib
from fractions import Fraction

from agent_forge.data.parse import answers_match, evaluate
from agent_forge.data.parse import format_number as fmt

# Families whose problems are GSM8K *test* questions with names and numbers redrawn
# (reasoning-gym's gsm_symbolic, after GSM-Symbolic, Mirzadeh et al. 2024): a model trained
# on them has seen GSM8K's test set, so its GSM8K figures are flagged (overlap.gsm8k_contamination).
GSM8K_TEST_TEMPLATE_FAMILIES = frozenset({"gsm_symbolic"})
TRAIN_SEED_STRIDE = 10_000_000
MAX_TRAIN_SEED = 100_000
EVAL_SEED_BASE = 1 << 40
_CHUNK = 1000

# reasoning-gym settings per difficulty; `max_number` is our own cap on any constant.
DIFFICULTY: dict[str, dict[str, dict]] = {
    "easy": {
        "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
        "basic_arithmetic": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2,
                                 operators=("+", "-", "*"), allow_parentheses=False,
                                 allow_negation=False, format_style="natural", max_number=99),
        "simple_equations": dict(min_terms=2, max_terms=3, min_value=1, max_value=10,
                                 operators_weights=[0.5, 0.5, 0.0]),
        "gsm_symbolic": {},
    },
    "medium": {
        "chain_sum": dict(min_terms=3, max_terms=4, min_digits=1, max_digits=3),
        "basic_arithmetic": dict(min_terms=3, max_terms=4, min_digits=1, max_digits=2,
                                 operators=("+", "-", "*"), allow_parentheses=True,
                                 allow_negation=False, format_style="natural"),
        "simple_equations": dict(min_terms=2, max_terms=4, min_value=1, max_value=50),
        "gsm_symbolic": {},
    },
    "hard": {
        "chain_sum": dict(min_terms=4, max_terms=6, min_digits=2, max_digits=4),
        "basic_arithmetic": dict(min_terms=4, max_terms=6, min_digits=1, max_digits=3,
                                 format_style="natural"),
        "simple_equations": dict(min_terms=3, max_terms=5, min_value=1, max_value=100,
                                 operators_weights=[0.35, 0.35, 0.3]),
        "gsm_symbolic": {},
    },
}
# The whole easy range, wider than "easy" and named by what it changes: 2-5-term chains,
# 2-4-term expressions, equations with constants up to 20 and some products (coefficient 1
# and negative coefficients come with them). The fresh evaluation split uses it (evalsets).
DIFFICULTY["easy_wide"] = {
    **DIFFICULTY["easy"],
    "chain_sum": {**DIFFICULTY["easy"]["chain_sum"], "max_terms": 5},
    "basic_arithmetic": {**DIFFICULTY["easy"]["basic_arithmetic"], "max_terms": 4},
    "simple_equations": {**DIFFICULTY["easy"]["simple_equations"], "max_value": 20,
                         "operators_weights": [0.45, 0.45, 0.1]},
}


# ---------------------------------------------------------------------------------------
# Problems from reasoning-gym


def gym_problems(family: str, difficulty: str, base_seed: int, start: int, count: int) -> list[dict]:
    """Raw reasoning-gym items start..start+count-1; item i comes from seed base_seed + i.

    Items are drawn in fixed chunks so an item's content does not depend on `count`.
    Each is checked (gold recomputed); bad ones come back as None.
    """
    import reasoning_gym

    if difficulty not in DIFFICULTY and difficulty != "default":
        raise ValueError(f"unknown difficulty {difficulty!r}; choose from {sorted(DIFFICULTY)}")
    settings = dict(DIFFICULTY.get(difficulty, {}).get(family, {}))
    max_number = settings.pop("max_number", None)
    out, datasets = [], {}
    for i in range(start, start + count):
        chunk = i // _CHUNK
        if chunk not in datasets:
            datasets = {chunk: reasoning_gym.create_dataset(
                family, seed=base_seed + family_offset(family) + chunk * _CHUNK, size=_CHUNK, **settings)}
        item = dict(datasets[chunk][i % _CHUNK])
        item["index"] = i
        out.append(check_problem(family, item, max_number))
    return out


def family_offset(family: str) -> int:
    """Seed offset per family, so chain_sum and basic_arithmetic never share a random state.

    Multiples of 2**44 lie above every training (< 1e12) and eval (2**40 + i) seed, so the
    offset keeps the two ranges apart within each family.
    """
    return (zlib.crc32(family.encode()) % 1000 + 1) << 44


def check_problem(family: str, item: dict, max_number: int | None = None) -> dict | None:
    """Recompute gold from the expression; fix it (noting the old one) or drop the item.

    reasoning-gym's basic_arithmetic without parentheses computes left to right, so its
    "3 + 2 * 3" has gold 15; the question means 9.
    """
    meta = item.get("metadata", {})
    expr = meta.get("expression")
    if family in ("chain_sum", "basic_arithmetic") and expr:
        try:
            value = evaluate(expr)
        except (ValueError, ZeroDivisionError):
            return None
        if value.denominator != 1:
            return None
        if max_number is not None and any(abs(int(n)) > max_number for n in re.findall(r"\d+", expr)):
            return None
        if not answers_match(item["answer"], fmt(value)):
            item["gold_fixed_from"] = item["answer"]
            item["answer"] = fmt(value)
    if family == "simple_equations":
        if _solve_linear(meta["equation"], meta["variable"]) != Fraction(item["answer"]):
            return None
    return item


def _solve_linear(equation: str, var: str) -> Fraction | None:
    a, b, c = linear_form(equation, var)
    return None if a == 0 else (c - b) / a


def linear_form(equation: str, var: str) -> tuple[Fraction, Fraction, Fraction]:
    """'56 - 98*e = -1218' -> (a=-98, b=56, c=-1218) for a*var + b = c; ValueError if not linear."""
    lhs, rhs = equation.split("=")
    f = lambda t: evaluate(re.sub(rf"\b{var}\b", f"({t})", lhs))  # noqa: E731
    b = f(0)
    a = f(1) - b
    if f(2) != 2 * a + b or f(-3) != -3 * a + b:
        raise ValueError(f"not linear in {var}: {equation}")
    return a, b, evaluate(rhs)
