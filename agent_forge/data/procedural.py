"""Procedural reasoning records from reasoning-gym, with traces computed from the problem.

Each problem's expression (or equation, or worked solution) is turned into short
`<step>` lines computed exactly, plus one or two other strategies where they make sense
(fewer on long problems, so the trace fits the thinking budget): an inverse-operation
`<doubt>`, a planted slip in SLIP_RATE of traces that a check catches by computing (a
`<doubt>` run backwards, or a `<falsify>` substituting the wrong solution: "..., not 25")
before a `<correct>` repairs it (the slip is never a training target), `<uncertain>` on
a carry or a sign, `<expert>` naming the rule, `<mece>` splitting signed terms, a
`<bayesian>` magnitude estimate, `<orthogonal>` recomputation in another order,
`<falsify>` rejecting a nearby wrong answer or plugging a solution back, `<multidomain>`
translating a story's words into operations. Every record is re-verified (each claimed
equality, the answer against gold) and dropped if anything fails.

Seeds: training item i of user seed s uses reasoning-gym seed s*TRAIN_SEED_STRIDE + i;
evaluation sets use EVAL_SEED_BASE + i, far above any training seed, so the two never
generate from the same random state.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from typing import Callable
from fractions import Fraction

from agent_forge.data.parse import answers_match, eval_steps, evaluate, false_equalities, to_number
from agent_forge.data.parse import format_number as fmt
from agent_forge.data.parse import parse_expression
from agent_forge.data.schema import Record, Segment, planted_slip
from agent_forge.vocab import STRATEGIES

DEFAULT_FAMILIES = ("chain_sum", "basic_arithmetic", "simple_equations", "gsm_symbolic")
# Families whose problems are GSM8K *test* questions with names and numbers redrawn
# (reasoning-gym's gsm_symbolic, after GSM-Symbolic, Mirzadeh et al. 2024): a model trained
# on them has seen GSM8K's test set, so its GSM8K figures are flagged (overlap.gsm8k_contamination).
GSM8K_TEST_TEMPLATE_FAMILIES = frozenset({"gsm_symbolic"})
TRAIN_SEED_STRIDE = 10_000_000
MAX_TRAIN_SEED = 100_000
EVAL_SEED_BASE = 1 << 40
# Share of traces with a planted slip that a check catches (it computes, and misses) before
# a <correct> repairs it: common enough that the model sees checks fail, not only approve.
SLIP_RATE = 0.3
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


# ---------------------------------------------------------------------------------------
# Shared trace pieces


def _step(a, op, b, r) -> str:
    return f"{fmt(a)} {op} {fmt(b)} = {fmt(r)}"


def _inverse(a, op, b, r) -> str | None:
    """'a op b = r' checked backwards, e.g. 12 + 7 = 19 -> '19 - 7 = 12'."""
    if op == "+":
        return f"{fmt(r)} - {fmt(b)} = {fmt(a)}"
    if op == "-":
        return f"{fmt(r)} + {fmt(b)} = {fmt(a)}"
    if op == "*" and b != 0:
        return f"{fmt(r)} / {fmt(b)} = {fmt(a)}"
    if op == "*" and a != 0:
        return f"{fmt(r)} / {fmt(a)} = {fmt(b)}"
    if op == "/":
        return f"{fmt(r)} * {fmt(b)} = {fmt(a)}"
    return None


def _is_tricky(a, op, b, r) -> bool:
    """A carry, a borrow or a sign: where people slip."""
    if a < 0 or b < 0 or r < 0:
        return True
    if op == "+":
        return (a % 10) + (b % 10) >= 10
    if op == "-":
        return (a % 10) < (b % 10)
    return op == "*" and a >= 10 and b >= 10


def _slip(r: Fraction, rng: random.Random) -> Fraction:
    """A plausible wrong result: off by one, or by ten (a lost carry) for larger values."""
    return r + rng.choice([1, -1, 10, -10] if abs(r) >= 20 else [1, -1, 2, -2])


def _caught(a, op, b, wrong) -> str:
    """A check that catches the slip "a op b = wrong" by computing, never by copying: the step
    run backwards from the wrong result misses `a`; a product is recomputed the other way."""
    if op == "+":
        return f"{fmt(wrong)} - {fmt(b)} = {fmt(wrong - b)}, not {fmt(a)}"
    if op == "-":
        return f"{fmt(wrong)} + {fmt(b)} = {fmt(wrong + b)}, not {fmt(a)}"
    if op == "/":
        return f"{fmt(wrong)} * {fmt(b)} = {fmt(wrong * b)}, not {fmt(a)}"
    return f"{fmt(b)} * {fmt(a)} = {fmt(a * b)}, not {fmt(wrong)}"


def _slipped(a, op, b, r, rng: random.Random, text: Callable[[Fraction], str],
             check: Callable[[Fraction], Segment] | None = None) -> list[Segment]:
    """A planted slip: the step with a wrong result, the check that catches it, the repair.
    `text(value)` prints the step with a given result; `check(wrong)` is the catching check
    (default: a `<doubt>` running the step backwards)."""
    wrong = _slip(r, rng)
    caught = check(wrong) if check else Segment("doubt", _caught(a, op, b, wrong))
    return [Segment("step", text(wrong)), caught,
            Segment("correct", f"{_step(a, op, b, r)}, not {fmt(wrong)}")]


def _pick(rng: random.Random, weights: dict[str, float], ks=(0, 1, 1, 1, 2, 2)) -> set[str]:
    """Choose k distinct strategies, weighted, from those applicable (weight > 0)."""
    pool = {s: w for s, w in weights.items() if w > 0}
    chosen: set[str] = set()
    for _ in range(min(rng.choice(ks), len(pool))):
        names = [s for s in pool if s not in chosen]
        chosen.add(rng.choices(names, [pool[s] for s in names])[0])
    return chosen


# ---------------------------------------------------------------------------------------
# Arithmetic: chain_sum, basic_arithmetic


def _signed_terms(node, sign: int = 1) -> list[Fraction] | None:
    """Terms of a pure +/- expression with their signs; None if it has * or /."""
    kind = node[0]
    if kind == "num":
        return [sign * node[1]]
    if kind == "neg":
        return _signed_terms(node[1], -sign)
    if kind in "+-":
        left = _signed_terms(node[1], sign)
        right = _signed_terms(node[2], sign if kind == "+" else -sign)
        return None if left is None or right is None else left + right
    return None


def _mece_text(terms: list[Fraction] | None) -> str | None:
    """Signed terms split into plus and minus groups, or sums split by place value."""
    if not terms or len(terms) < 2:
        return None
    if len(terms) >= 3 and min(terms) < 0 <= max(terms):
        return _mece(terms)
    if min(terms) >= 0 and max(terms) >= 10 and all(t.denominator == 1 for t in terms):
        return _place_values(terms)
    return None


def _plus(x: Fraction, y: Fraction) -> str:
    return f"{fmt(x)} + {fmt(y)}" if y >= 0 else f"{fmt(x)} - {fmt(-y)}"


def _mece(terms: list[Fraction]) -> str:
    pos = [t for t in terms if t >= 0]
    neg = [-t for t in terms if t < 0]

    def group(xs):
        return " + ".join(fmt(x) for x in xs) + (f" = {fmt(sum(xs))}" if len(xs) > 1 else "")

    return f"plus {group(pos)}; minus {group(neg)}; {fmt(sum(pos))} - {fmt(sum(neg))} = {fmt(sum(terms))}"


def _place_values(terms: list[Fraction]) -> str:
    """Split non-negative terms into tens and ones: parts that cover each number once."""
    tens = [t // 10 * 10 for t in terms]
    ones = [t % 10 for t in terms]

    def group(xs):
        return " + ".join(fmt(x) for x in xs) + f" = {fmt(sum(xs))}"

    return f"tens {group(tens)}; ones {group(ones)}; {fmt(sum(tens))} + {fmt(sum(ones))} = {fmt(sum(terms))}"


def _right_to_left(terms: list[Fraction]) -> str:
    acc, parts = terms[-1], []
    for t in reversed(terms[:-1]):
        parts.append(f"{_plus(t, acc)} = {fmt(t + acc)}")
        acc = t + acc
    return "right to left: " + ", ".join(parts)


def _swap(a, op, b, r) -> str | None:
    if op in "+*":
        return f"{fmt(b)} {op} {fmt(a)} = {fmt(r)} too"
    if op == "-":
        return f"{_plus(-b, a)} = {fmt(r)} too"
    return None


def _rewrite(node, num, minus: str) -> str:
    """Re-print an expression, mapping each constant through `num` and '-' to `minus`."""
    if node[0] == "num":
        return fmt(num(node[1]))
    if node[0] == "neg":
        inner = _rewrite(node[1], num, minus)
        return inner if minus == "+" else f"-({inner})"
    op = minus if node[0] == "-" else node[0]
    left, right = _rewrite(node[1], num, minus), _rewrite(node[2], num, minus)
    if node[0] in "*/":
        left = f"({left})" if node[1][0] in "+-" else left
        right = f"({right})" if node[2][0] in "+-" else right
    return f"{left} {op} {right}"


def _falsify_near(a, op, b, r, rng) -> str | None:
    """Reject a nearby wrong answer by running the last step backwards."""
    if op == "+":
        w = r + rng.choice([1, -1])
        return f"try {fmt(w)}: {fmt(w)} - {fmt(b)} = {fmt(w - b)}, not {fmt(a)}"
    if op == "-":
        w = r + rng.choice([1, -1])
        return f"try {fmt(w)}: {fmt(w)} + {fmt(b)} = {fmt(w + b)}, not {fmt(a)}"
    if op == "*" and b != 0:
        w = r + b
        return f"try {fmt(w)}: {fmt(w)} / {fmt(b)} = {fmt(a + 1)}, not {fmt(a)}"
    return None


def _arith_rule(expr: str, steps) -> str:
    ops = {s[1] for s in steps}
    if "- -" in expr or "+ -" in expr:
        return "subtracting a negative number adds it; adding one subtracts"
    if ops & {"*", "/"} and ops & {"+", "-"}:
        return "multiplication before addition and subtraction"
    return "same-rank operations go left to right"


def arithmetic_trace(expr: str, rng: random.Random) -> tuple[list[Segment], str]:
    """Steps for `expr` in precedence order, plus 0-2 other strategies."""
    value, steps = eval_steps(expr)
    node = parse_expression(expr)
    terms = _signed_terms(node)
    last = steps[-1] if steps else None
    tricky = [i for i, s in enumerate(steps) if _is_tricky(*s)]
    weights = {
        "doubt": 3.0 * bool(steps), "expert": 1.5,
        "uncertain": 2.0 * bool(tricky), "orthogonal": 2.5 * bool(last and _swap(*last)),
        "mece": 4.0 * bool(_mece_text(terms)),
        "bayesian": 1.5, "falsify": 1.5 * bool(last and _falsify_near(*last, random.Random(0))),
    }
    # Long problems get fewer extra strategies: the steps are the work, and a trace must fit
    # the thinking budget (a 5-term chain with two extras runs past 128 tokens).
    chosen = _pick(rng, weights, (0, 1, 1, 1, 2, 2) if len(steps) <= 2 else (0, 1, 1) if len(steps) == 3 else (0, 0, 1))
    segs: list[Segment] = []
    if "expert" in chosen:
        segs.append(Segment("expert", _arith_rule(expr, steps)))
    check_at = rng.choice(tricky) if "uncertain" in chosen else rng.randrange(max(len(steps), 1))
    slip_at = rng.randrange(len(steps)) if steps and rng.random() < SLIP_RATE else -1
    for i, (a, op, b, r) in enumerate(steps):
        if i == slip_at:
            segs += _slipped(a, op, b, r, rng, lambda w, s=(a, op, b): _step(*s, w))
        else:
            segs.append(Segment("step", _step(a, op, b, r)))
        if i == check_at and "uncertain" in chosen:
            segs.append(Segment("uncertain", f"{fmt(a)} {op} {fmt(b)} has a carry or a sign; check it"))
        if i == check_at and chosen & {"uncertain", "doubt"}:
            segs.append(Segment("doubt", f"{_inverse(a, op, b, r)}, yes"))
    if "mece" in chosen:
        segs.append(Segment("mece", _mece_text(terms)))
    if "orthogonal" in chosen:
        text = _right_to_left(terms) if terms and len(terms) >= 3 else _swap(*last)
        segs.append(Segment("orthogonal", text))
    if "bayesian" in chosen:
        segs.append(Segment("bayesian", _estimate_text(node, value)))
    if "falsify" in chosen:
        segs.append(Segment("falsify", _falsify_near(*last, rng)))
    if not steps:
        segs.append(Segment("step", f"the value is {fmt(value)}"))
    return segs, fmt(value)


def _estimate_text(node, value: Fraction) -> str:
    """A magnitude check: rounded to tens when that lands near, else an upper bound."""
    constants = [abs(Fraction(x)) for x in re.findall(r"\d+", _rewrite(node, abs, "+"))]
    if "/" not in str(node) and min(constants) >= 10:
        rounded = _rewrite(node, lambda x: Fraction(math.floor(x / 10 + Fraction(1, 2)) * 10), "-")
        estimate = evaluate(rounded)
        if rounded != _rewrite(node, lambda x: x, "-") and abs(estimate - value) <= max(10, abs(value) / 4):
            return f"rounded to tens: {rounded} = {fmt(estimate)}, near {fmt(value)}"
        bound = _rewrite(node, abs, "+")
        return f"size at most {bound} = {fmt(evaluate(bound))}; {fmt(value)} fits"
    return f"{fmt(value)} is a whole number, as expected"


# ---------------------------------------------------------------------------------------
# Linear equations: simple_equations


def _times(a: Fraction, var: str) -> str:
    return var if a == 1 else f"-{var}" if a == -1 else f"{fmt(a)}*{var}"


def equation_trace(equation: str, var: str, rng: random.Random) -> tuple[list[Segment], str]:
    """Isolate the variable (move the constant, then divide), plus 1-2 other strategies."""
    a, b, c = linear_form(equation, var)
    rest, sol = c - b, (c - b) / a
    lhs = equation.split("=")[0].strip()
    weights = {"falsify": 3.0, "expert": 2.0, "doubt": 2.0 * bool(a != 1 or b != 0),
               "uncertain": 1.5 * bool(a < 0 or rest < 0),
               "bayesian": 1.0 * bool(abs(a) > 1 and sol > 0 and sol.denominator == 1)}
    chosen = _pick(rng, weights, ks=(1, 1, 2, 2))
    segs: list[Segment] = []
    if "expert" in chosen:
        undo = f"subtract {fmt(b)}" if b > 0 else f"add {fmt(-b)}" if b < 0 else "nothing to move"
        divide = f", then divide by {fmt(a)}" if a != 1 else ""
        segs.append(Segment("expert", f"undo in reverse: {undo} on both sides{divide}"))
    # Each move: (the operation it computes, its text given a result); coefficient 1 has no
    # division and a zero constant no move, so the trace has exactly the problem's steps.
    moves = []
    if b != 0:
        moves.append(((c, "-", b, rest) if b > 0 else (c, "+", -b, rest),
                      lambda v: f"{_times(a, var)} = {_plus(c, -b)} = {fmt(v)}"))
    if a != 1:
        moves.append(((rest, "/", a, sol), lambda v: f"{var} = {fmt(rest)} / {fmt(a)} = {fmt(v)}"))
    slip_at = rng.randrange(len(moves)) if moves and rng.random() < SLIP_RATE else -1
    plug = (lambda w: Segment("falsify", f"plug in {var} = {fmt(w)}: {_plugged(lhs, var, w)}, not {fmt(c)}")
            ) if rng.random() < 0.5 else None  # a wrong solution is caught by substituting it
    for i, (operation, text) in enumerate(moves):
        last = i == len(moves) - 1
        segs += (_slipped(*operation, rng, text, plug if last else None) if i == slip_at
                 else [Segment("step", text(operation[3]))])
    if not moves:
        segs.append(Segment("step", f"{var} = {fmt(sol)}"))
    if "uncertain" in chosen:
        segs.append(Segment("uncertain", "negative numbers here; the sign is easy to lose"))
    if chosen & {"uncertain", "doubt"}:
        check = f"{fmt(a)} * {fmt(sol)} = {fmt(rest)}" if a != 1 else f"{fmt(rest)} + {fmt(b)} = {fmt(c)}"
        segs.append(Segment("doubt", f"{check}, yes"))
    if "bayesian" in chosen:
        lo = sol // 10 * 10
        segs.append(Segment("bayesian", f"{fmt(abs(a))} * {fmt(lo)} = {fmt(abs(a) * lo)} and "
                            f"{fmt(abs(a))} * {fmt(lo + 10)} = {fmt(abs(a) * (lo + 10))}, "
                            f"so {var} lies between {fmt(lo)} and {fmt(lo + 10)}"))
    if "falsify" in chosen:
        segs.append(Segment("falsify", f"plug in {var} = {fmt(sol)}: {_plugged(lhs, var, sol)}, it holds"))
    return segs, fmt(sol)


def _plugged(lhs: str, var: str, value: Fraction) -> str:
    """The left side with `value` substituted, and what it comes to: "8*3 + 5 = 29"."""
    expr = re.sub(rf"\b{var}\b", fmt(value) if value >= 0 else f"({fmt(value)})", lhs)
    return f"{expr} = {fmt(evaluate(expr))}"


# ---------------------------------------------------------------------------------------
# Word problems: gsm_symbolic

_WORD_RULES = (
    (r"\btimes\b", "'times' means multiply"),
    (r"\b(twice|double)\b", "'twice' means multiply by 2"),
    (r"\bhalf\b", "'half' means divide by 2"),
    (r"%|\bpercent", "a percent is a part of 100"),
    (r"\b(fewer|less)\b", "'fewer' or 'less' means subtract"),
    (r"\bmore than\b", "'more than' means add"),
    (r"\b(total|combined|altogether|in all)\b", "a total means adding the parts"),
    (r"\b(each|per|every)\b", "'each' or 'per' means multiply by the count"),
    (r"\b(left|remain)", "what is left means subtract"),
)


def cot_steps(cot: str) -> list[str]:
    """Worked-solution lines without headers, bullets, numbering or the '#### N' line."""
    steps = []
    for line in cot.replace("×", "*").replace("÷", "/").splitlines():
        line = re.sub(r"^\s*(?:[•*\-]|\d+\.)\s*", "", line).strip()
        line = re.sub(r"(?<![\d.])(\d+)\.0\b(?!\.\d)", r"\1", line)
        if not line or line.startswith("####") or line.lower().startswith("let's solve"):
            continue
        if line.endswith(":") and "=" not in line:
            continue
        steps.append(line)
    return steps


def word_problem_trace(question: str, cot: str, answer: str, rng: random.Random) -> tuple[list[Segment], str]:
    """The worked solution as steps, plus word-to-math translation and a check."""
    lines = cot_steps(cot)
    rules = [(m.start(), text) for pattern, text in _WORD_RULES
             for m in [re.search(pattern, question, re.I)] if m]
    checks = []
    for i, line in enumerate(lines):
        for left, right in _simple_claims(line):
            checks.append((i, left, right))
    whole = to_int(answer)
    weights = {"multidomain": 4.0 * bool(rules), "doubt": 2.0 * bool(checks),
               "bayesian": 1.0 * (whole is not None and whole >= 0)}
    chosen = _pick(rng, weights, ks=(1, 1, 2))
    segs: list[Segment] = []
    if "multidomain" in chosen:
        picked = [text for _, text in sorted(rules)[:2]]
        segs.append(Segment("multidomain", "story to math: " + "; ".join(picked)))
    check = rng.choice(checks) if "doubt" in chosen else None
    for i, line in enumerate(lines):
        segs.append(Segment("step", line))
        if check and check[0] == i:
            segs.append(Segment("doubt", f"{check[2]}, yes"))
    if "bayesian" in chosen:
        segs.append(Segment("bayesian", f"the question expects a whole number of at least 0; {answer} fits"))
    return segs, answer


def _simple_claims(line: str) -> list[tuple[str, str]]:
    """(left, inverse check) for single-operation equalities such as '160-48=112'."""
    from agent_forge.data.parse import claimed_equalities

    out = []
    for left, right in claimed_equalities(line):
        try:
            value, steps = eval_steps(left)
            inv = _inverse(*steps[0]) if len(steps) == 1 and evaluate(right) == value else None
            if inv and not false_equalities(inv):
                out.append((left, inv))
        except (ValueError, ZeroDivisionError):
            continue
    return out


def to_int(text: str) -> int | None:
    try:
        x = Fraction(str(text).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return int(x) if x.denominator == 1 else None


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
