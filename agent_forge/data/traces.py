"""Reasoning traces computed from each problem: exact `<step>` lines plus the other strategies.

Each problem's expression (or equation, or worked solution) is turned into short
`<step>` lines computed exactly, plus one or two other strategies where they make sense
(fewer on long problems, so the trace fits the thinking budget): an inverse-operation
`<doubt>`, a planted slip in SLIP_RATE of traces that a check catches by computing (a
`<doubt>` run backwards, or a `<falsify>` substituting the wrong solution: "..., not 25")
before a `<correct>` repairs it (the slip is never a training target), `<uncertain>` on
a carry or a sign, `<expert>` naming the rule, `<mece>` splitting signed terms, a
`<bayesian>` magnitude estimate, `<orthogonal>` recomputation in another order,
`<falsify>` rejecting a nearby wrong answer or plugging a solution back, `<multidomain>`
translating a story's words into operations. procedural.verify_record re-checks them all.
"""

from __future__ import annotations

import math
import random
import re
from fractions import Fraction
from typing import Callable

from agent_forge.data.gym import linear_form
from agent_forge.data.parse import eval_steps, evaluate, false_equalities
from agent_forge.data.parse import format_number as fmt
from agent_forge.data.parse import parse_expression
from agent_forge.data.schema import Segment

# Share of traces with a planted slip that a check catches (it computes, and misses) before
# a <correct> repairs it: common enough that the model sees checks fail, not only approve.
SLIP_RATE = 0.3


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
