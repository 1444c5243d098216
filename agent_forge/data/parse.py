"""Reading model and teacher output back into records, and checking arithmetic in it.

Three things every data source needs: split a completion in the fixed text format into
(segments, answer); decide whether an answer matches gold (numerically when both are
numbers, so "18", "18.0" and "$18" agree); and evaluate the small arithmetic expressions
that traces claim ("12 + 7 = 19"), exactly, without `eval`.
"""

from __future__ import annotations

import re
from fractions import Fraction

from agent_forge.data.schema import Segment
from agent_forge.vocab import ThinkingVocab, get_vocab


class ParseError(ValueError):
    """A completion that does not follow the thinking-block format."""


# ---------------------------------------------------------------------------------------
# Completions

_FENCE = re.compile(r"```[a-zA-Z]*\n?(.*?)```", re.S)
_ANSWER_LINE = re.compile(r"(?:final\s+)?answer\s*[:：]\s*(.+)", re.I)


def parse_completion(text: str, vocab: ThinkingVocab | str = "default") -> tuple[list[Segment], str]:
    """Split "[thinking]<step> ...[/endthinking] 7" into ([Segment('step', ...)], "7").

    Also accepts the block inside a ``` fence, and an answer given after it as
    "Answer: X". Raises ParseError when the block is missing, unclosed, has text before
    its first strategy marker, an empty segment, or no answer.
    """
    vocab = get_vocab(vocab)
    body_text, outside = _unfence(text, vocab)
    if body_text.count(vocab.open) != 1 or body_text.count(vocab.close) != 1:
        raise ParseError("need exactly one thinking opener and one closer")
    start = body_text.index(vocab.open) + len(vocab.open)
    end = body_text.index(vocab.close)
    if end < start:
        raise ParseError("thinking closer comes before the opener")
    segments = split_segments(body_text[start:end], vocab)
    answer = clean_answer(body_text[end + len(vocab.close):]) or _answer_line(outside)
    if not answer:
        raise ParseError("no answer after the thinking block")
    if any(t in answer for t in vocab.tokens):
        raise ParseError("thinking token inside the answer")
    return segments, answer


def _unfence(text: str, vocab: ThinkingVocab) -> tuple[str, str]:
    """The part holding the thinking block, and the text outside any fence."""
    for m in _FENCE.finditer(text):
        if vocab.open in m.group(1):
            return m.group(1), text[: m.start()] + "\n" + text[m.end():]
    return text, ""


def split_segments(body: str, vocab: ThinkingVocab | str = "default") -> list[Segment]:
    vocab = get_vocab(vocab)
    if not body.strip():
        return []
    if not vocab.strategies:
        return [Segment("step", body.strip())]
    pattern = "(" + "|".join(re.escape(t) for t in vocab.strategies) + ")"
    parts = re.split(pattern, body)
    if parts[0].strip():
        raise ParseError(f"text before the first strategy marker: {parts[0].strip()[:40]!r}")
    segments = []
    for token, seg_text in zip(parts[1::2], parts[2::2]):
        if not seg_text.strip():
            raise ParseError(f"empty {token} segment")
        segments.append(Segment(token.strip("<>"), seg_text.strip()))
    return segments


def clean_answer(text: str) -> str:
    """First non-empty line, without an "Answer:" prefix, markdown bold or a final period."""
    for line in text.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        m = _ANSWER_LINE.match(line)
        if m:
            line = m.group(1)
        line = line.strip().strip("*`").strip()
        return line[:-1].strip() if line.endswith(".") else line
    return ""


def _answer_line(text: str) -> str:
    m = _ANSWER_LINE.search(text or "")
    return clean_answer(m.group(1)) if m else ""


# ---------------------------------------------------------------------------------------
# Answers

_NUM_JUNK = re.compile(r"[,$€£\s]")


def to_number(text: str) -> Fraction | None:
    """'1,234' -> 1234, '$18.50' -> 37/2, '-4' -> -4; None when not a plain number."""
    t = _NUM_JUNK.sub("", str(text)).rstrip(".").rstrip("%")
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", t):
        return None
    return Fraction(t)


def answers_match(pred: str | None, gold: str) -> bool:
    """Numeric equality when both are numbers, else case/punctuation-insensitive text."""
    if pred is None:
        return False
    a, b = to_number(pred), to_number(gold)
    if a is not None and b is not None:
        return a == b
    norm = lambda s: re.sub(r"[^a-z0-9]+", " ", str(s).lower()).strip()  # noqa: E731
    return norm(pred) == norm(gold) and norm(gold) != ""


def format_number(x: Fraction | int) -> str:
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    return format(float(x), ".10g")


# ---------------------------------------------------------------------------------------
# Exact arithmetic

_TOKEN = re.compile(r"\s*(\d+\.\d+|\d+|[-+*/×÷()])")


def tokenize(expr: str) -> list[str]:
    expr = expr.strip()
    pos, out = 0, []
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"bad character in {expr!r} at {pos}")
        out.append({"×": "*", "÷": "/"}.get(m.group(1), m.group(1)))
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    if not out:
        raise ValueError("empty expression")
    return out


def parse_expression(expr: str):
    """AST of nested tuples: ('num', Fraction) | ('neg', node) | (op, left, right)."""
    tokens = tokenize(expr)
    node, pos = _parse_sum(tokens, 0)
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} in {expr!r}")
    return node


def _parse_sum(tokens, pos):
    node, pos = _parse_product(tokens, pos)
    while pos < len(tokens) and tokens[pos] in "+-":
        op = tokens[pos]
        right, pos = _parse_product(tokens, pos + 1)
        node = (op, node, right)
    return node, pos


def _parse_product(tokens, pos):
    node, pos = _parse_unary(tokens, pos)
    while pos < len(tokens) and tokens[pos] in "*/":
        op = tokens[pos]
        right, pos = _parse_unary(tokens, pos + 1)
        node = (op, node, right)
    return node, pos


def _parse_unary(tokens, pos):
    if pos >= len(tokens):
        raise ValueError("expression ends early")
    tok = tokens[pos]
    if tok in "+-":
        inner, pos = _parse_unary(tokens, pos + 1)
        if tok == "+":
            return inner, pos
        if inner[0] == "num":
            return ("num", -inner[1]), pos
        return ("neg", inner), pos
    if tok == "(":
        node, pos = _parse_sum(tokens, pos + 1)
        if pos >= len(tokens) or tokens[pos] != ")":
            raise ValueError("unclosed parenthesis")
        return node, pos + 1
    if tok[0].isdigit():
        return ("num", Fraction(tok)), pos + 1
    raise ValueError(f"unexpected {tok!r}")


def evaluate(expr: str) -> Fraction:
    """Exact value with the usual precedence (* and / before + and -, left to right)."""
    return eval_steps(expr)[0]


def eval_steps(expr: str) -> tuple[Fraction, list[tuple[Fraction, str, Fraction, Fraction]]]:
    """Value and the binary operations in the order a person would do them.

    "12 + 3 * 4" -> (24, [(3, '*', 4, 12), (12, '+', 12, 24)]). A negated group
    "-(a + b)" records (0, '-', a+b, -(a+b)).
    """
    steps: list = []

    def walk(node):
        if node[0] == "num":
            return node[1]
        if node[0] == "neg":
            v = walk(node[1])
            steps.append((Fraction(0), "-", v, -v))
            return -v
        op, a, b = node[0], walk(node[1]), walk(node[2])
        if op == "/" and b == 0:
            raise ZeroDivisionError("division by zero")
        r = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
        steps.append((a, op, b, r))
        return r

    value = walk(parse_expression(expr))
    return value, steps


# ---------------------------------------------------------------------------------------
# Checking the equalities a trace claims

_CHAIN = re.compile(r"[-+*/×÷().\d\s=]*=[-+*/×÷().\d\s=]*")


def claimed_equalities(text: str) -> list[tuple[str, str]]:
    """Adjacent (left, right) pairs of every "a = b = c" chain in free text.

    A chain glued to a word, '%' or '$' on its left ("30% of 160 = 48") loses its first
    part, since that operand is only half visible.
    """
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text.replace("$", ""))
    pairs = []
    for m in _CHAIN.finditer(text):
        parts = [p.strip() for p in m.group(0).split("=")]
        if _half_visible(text[: m.start()], m.group(0)):
            parts[0] = ""
        for left, right in zip(parts, parts[1:]):
            if left and right and re.search(r"\d", left) and re.search(r"\d", right):
                pairs.append((left.strip(" ."), right.strip(" .")))
    return pairs


_HIDDEN_FACTOR = re.compile(r"(\b(of|twice|double|triple|thrice|half|times|per|x)|[%$])$", re.I)


def _half_visible(before: str, chain: str) -> bool:
    """True when the chain's first operand continues a phrase ("30% of 160", "12x3")."""
    glued = bool(before) and not chain[:1].isspace() and (before[-1].isalnum() or before[-1] in "%_")
    return glued or bool(_HIDDEN_FACTOR.search(before.rstrip()))


def false_equalities(text: str) -> list[tuple[str, str]]:
    """Claimed equalities that are wrong; parts that do not parse are not judged."""
    bad = []
    for left, right in claimed_equalities(text):
        try:
            if evaluate(left) != evaluate(right):
                bad.append((left, right))
        except (ValueError, ZeroDivisionError):
            continue
    return bad
