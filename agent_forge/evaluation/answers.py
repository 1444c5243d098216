"""Reading answers out of model replies: the answer slot, numbers, choice letters.

Why a slot: a model with its thinking block forced empty writes its working into the
answer ("72 + 23 = 95"); reading the *last* number of the reply would then credit
thinking to the no-thinking arm. So we read the answer slot and take its FIRST number.

Rules (all documented here, tested in tests/test_evaluation_answers.py):

- answer_slot(text, vocab): `text` is the completion from where the thinking block starts
  (the forced "[thinking]" included) or the reply of a plain model.
  * vocab given (a model with thinking tokens): the text after the FIRST closing token,
    cut at EOS (if `eos` is given) and at the first newline that follows some answer
    text; thinking tokens are removed from it; surrounding whitespace stripped. If no
    closing token appears, the block was never closed: None (no answer).
  * vocab None (plain model): the reply cut at the first of DIRECT_UNTIL ("Question:" and
    the EOS texts, lm-eval's GSM8K stop sequences), then its first non-empty line, stripped.
- extract_number(s): the first number in s. Thousands commas ("1,234"), "$" and a
  trailing "." are ignored; negatives ("-5", "−5") and decimals ("3.25", ".5") kept;
  a simple fraction "3/4" is one number. Returned as a clean string ("1234", "-0.5").
- numbers_equal(a, b): exact rational comparison of two number strings (so "5", "5.0",
  "$5" and "10/2" are equal); False when either does not parse.
- extract_choice(s, n_choices, choices=None), first rule that applies:
  1. a reply equal to a choice's text (case-insensitive) maps to that letter;
  2. a letter written as one: "B" or "b" alone, "(B)", "B)", "B.", "B: text" at the start,
     "(B)" anywhere, "answer is B" / "answer: (B)" (the letter upper-case, as in lm-eval's
     mmlu_pro "answer is" regex: "The answer is a fox" is no letter);
  3. lm-eval's fallback: the first choice text found in the reply (case-insensitive,
     longest choice first where two start at the same place), so "The answer is a fox"
     reads as the choice "a fox";
  4. an upper-case letter standing alone, unless an "A"/"I" starts an English sentence
     ("A cat ...").
- GSM8K as lm-evaluation-harness scores it (for plain-model replies): strict match takes
  the number after the first "#### "; flexible match takes the LAST number-like run in
  the reply; both then drop ",", "$" and a trailing ".".

Where we differ from lm-evaluation-harness 0.4 (tasks gsm8k, arc_*, mmlu_pro, bbh):
- A plain model's reply is generated, as lm-eval's gsm8k does, until "Question:" or EOS
  (inference.py, DIRECT_UNTIL), and the flexible reading looks at all of it. But our score
  (strict) is the FIRST number of its first line, not lm-eval's "#### N", which only its
  few-shot context asks for; the A/B gives a plain model the better of the two readings.
- Prompts: zero-shot "Question: ...\nAnswer:" (or the chat template with " Give only the
  final answer."), not lm-eval's 5-shot GSM8K context; at most 48 new tokens for a direct
  answer (DEFAULT_MAX_NEW), not lm-eval's 256.
- A thinking model's answer is the line after its closed thinking block; lm-eval has no
  such slot (lm_eval_adapter.py strips the thoughts before lm-eval's own filters run).
- Multiple choice: lm-eval's ARC and CommonsenseQA rank the choices by log-likelihood
  (runner.choice_loglik_accuracy does the same); reading a generated letter follows its
  generative tasks' filters (rules 2-3 above) with two additions: a lone lower-case letter
  and a lone upper-case letter anywhere (rule 4) count. Choice texts must match on word
  boundaries ("cat" is not found in "category"); lm-eval matches any substring.
- Comparing numbers: we compare values (numbers_equal), lm-eval's exact_match compares
  strings after its filters, so "18.00" or "05" against gold 18 / 5 is right here and
  wrong there (tests/test_evaluation_lm_eval_adapter.py records the cases).
"""

from __future__ import annotations

import re
import string
from fractions import Fraction

from agent_forge.vocab import ThinkingVocab, get_vocab

# A number: optional sign, then thousands-grouped or plain digits, optional decimals; or
# a fraction; or a bare decimal ".5". A sign must not follow a word character ("3-5").
# lm-eval's gsm8k `until`: where a plain model's reply ends.
DIRECT_UNTIL = ("Question:", "</s>", "<|im_end|>")

_NUM = re.compile(
    r"(?<![\w.])[-−]?\$?(?:\d+/\d+(?![\d/])|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
)


def answer_slot(text: str, vocab: ThinkingVocab | str | None = None, eos: str | None = None) -> str | None:
    """The user-visible answer of a reply (see the module rules); None if never closed."""
    if eos:
        text = text.split(eos, 1)[0]
    if vocab is None:
        for line in cut_at_until(text).splitlines():
            if line.strip():
                return line.strip()
        return ""
    vocab = get_vocab(vocab)
    if vocab.close not in text:
        return None
    after = strip_thinking_tokens(text.split(vocab.close, 1)[1], vocab)
    for line in after.splitlines():
        if line.strip():
            return line.strip()
    return ""


def cut_at_until(text: str) -> str:
    """A plain model's reply up to the first DIRECT_UNTIL sequence (lm-eval's gsm8k stops)."""
    for stop in DIRECT_UNTIL:
        text = text.split(stop, 1)[0]
    return text


def strip_thinking_tokens(text: str, vocab: ThinkingVocab | str = "default") -> str:
    """Remove every thinking token so none can leak into what a user sees."""
    for token in get_vocab(vocab).tokens:
        text = text.replace(token, "")
    return text


def _clean_number(raw: str) -> str:
    s = raw.replace(",", "").replace("$", "").replace("−", "-")
    return s.rstrip(".")


def extract_number(s: str | None) -> str | None:
    """The first number in `s`, cleaned; None if there is none."""
    if not s:
        return None
    m = _NUM.search(s)
    return _clean_number(m.group(0)) if m else None


def to_fraction(s: str | None) -> Fraction | None:
    """Parse a cleaned or raw number string exactly; None if it is not a number."""
    if s is None:
        return None
    t = _clean_number(str(s).strip())
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(a: str | None, b: str | None) -> bool:
    fa, fb = to_fraction(a), to_fraction(b)
    return fa is not None and fb is not None and fa == fb


def is_numeric(s: str | None) -> bool:
    return to_fraction(s) is not None


# ---------------------------------------------------------------------------------------
# Multiple choice


def choice_letters(n_choices: int) -> str:
    return string.ascii_uppercase[:n_choices]


def extract_choice(s: str | None, n_choices: int, choices: list[str] | None = None) -> str | None:
    """The chosen letter (A.. for n_choices options), or None; rules 1-4 of the module docstring."""
    if not s:
        return None
    letters = choice_letters(n_choices)
    text = s.strip()
    if choices:
        low = text.lower().rstrip(".")
        for letter, choice in zip(letters, choices):
            if low == choice.strip().lower():
                return letter
    cls = f"[{letters}]"
    patterns = (
        (rf"^\(?({cls})\)?\s*$", re.IGNORECASE),          # "B", "b", "(B)"
        (rf"^\(?({cls})[).:]", 0),                          # "B)", "B.", "B: text"
        (rf"\(({cls})\)", 0),                               # "... (B) ..."
        (rf"(?i:answer)\s*(?:is|:)?\s*\(?({cls})\b", 0),   # "the answer is B"
    )
    for p, flags in patterns:
        m = re.search(p, text, flags=flags)
        if m:
            return m.group(1).upper()
    return _choice_text_in(text, letters, choices) or _lone_letter(text, cls)


def _choice_text_in(text: str, letters: str, choices: list[str] | None) -> str | None:
    """lm-eval's fallback: the letter of the first choice text found in the reply."""
    texts = {c.strip().lower(): letter for letter, c in zip(letters, choices or []) if c.strip()}
    if not texts:
        return None
    alternation = "|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))
    m = re.search(rf"(?<!\w)(?:{alternation})(?!\w)", text.lower())
    return texts[m.group(0)] if m else None


def _lone_letter(text: str, cls: str) -> str | None:
    """An upper-case letter standing alone that is not an English "A" or "I"."""
    for m in re.finditer(rf"\b({cls})\b", text):
        follows = text[m.end():m.end() + 2]
        if m.group(1) in "AI" and re.match(r" [a-z]", follows):
            continue  # "A cat", "I think": an English word, not a letter
        return m.group(1)
    return None


def letter_index(letter: str) -> int:
    return string.ascii_uppercase.index(letter)


# ---------------------------------------------------------------------------------------
# GSM8K, the lm-evaluation-harness way

_GSM_STRICT = re.compile(r"#### (-?[0-9.,]+)")
_GSM_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _gsm_clean(s: str) -> str:
    s = re.sub(r"(?s).*#### ", "", s)
    return re.sub(r"\.$", "", s.replace(",", "").replace("$", ""))


def gsm8k_strict(reply: str) -> str | None:
    m = _GSM_STRICT.search(reply)
    return _gsm_clean(m.group(1)) if m else None


def gsm8k_flexible(reply: str) -> str | None:
    found = _GSM_FLEX.findall(reply)
    if not found:
        return None
    last = [g for g in found[-1] if g][0]
    return _gsm_clean(last)


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K answer ("... #### 72" -> "72"); plain numbers pass through."""
    return _gsm_clean(answer.split("####")[-1].strip())
