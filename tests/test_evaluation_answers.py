"""Answer extraction rules: answer slot, numbers, choices and lm-eval's GSM8K filters."""

import pytest

from agent_forge.evaluation.answers import (
    answer_slot, cut_at_until, extract_choice, extract_number, gsm8k_flexible, gsm8k_gold, gsm8k_strict,
    numbers_equal, strip_thinking_tokens,
)
from agent_forge.vocab import THINK_CLOSE, THINK_OPEN


@pytest.mark.parametrize("text,expected", [
    (f"{THINK_OPEN}<step> 3+4=7{THINK_CLOSE} 7", "7"),
    (f"{THINK_OPEN}<step> 3+4=7{THINK_CLOSE} 7\nQuestion: next", "7"),
    (f"{THINK_OPEN}{THINK_CLOSE} 72 + 23 = 95", "72 + 23 = 95"),
    (f"{THINK_OPEN}<step> thinking and never closing", None),
    (f"{THINK_OPEN}<step> a{THINK_CLOSE}<doubt> 12", "12"),   # leaked token stripped
    (f"{THINK_OPEN}<step> a{THINK_CLOSE} 5<|endoftext|>junk", "5"),
    (f"{THINK_OPEN}<step> a{THINK_CLOSE}", ""),
])
def test_answer_slot_with_thinking(text, expected):
    assert answer_slot(text, "default", eos="<|endoftext|>") == expected


def test_answer_slot_plain_is_first_nonempty_line():
    assert answer_slot("\n  42 apples\nmore text", None) == "42 apples"
    assert answer_slot("", None) == ""


def test_strip_thinking_tokens_removes_every_token():
    text = f"a{THINK_OPEN}b<step>c<uncertain>d{THINK_CLOSE}e"
    assert strip_thinking_tokens(text) == "abcde"


@pytest.mark.parametrize("s,expected", [
    ("The answer is 42.", "42"),
    ("$1,234.50 total", "1234.50"),
    ("-17 degrees", "-17"),
    ("x = −3", "-3"),
    ("about 3.25 or 4", "3.25"),
    ("72 + 23 = 95", "72"),          # FIRST number of the slot, by design
    ("3-5 is a range", "3"),          # hyphen after a digit is not a sign
    ("half is 1/2", "1/2"),
    ("value .5", ".5"),
    ("the list 3, 4, 5", "3"),        # a comma list is not a thousands group
    ("no digits here", None),
    (None, None),
])
def test_extract_number(s, expected):
    assert extract_number(s) == expected


def _slow_number_equal(a, b):
    """Obviously-right comparison for plain decimal strings."""
    from decimal import Decimal

    clean = lambda x: Decimal(x.replace(",", "").replace("$", "").rstrip("."))
    return clean(a) == clean(b)


@pytest.mark.parametrize("a,b", [("5", "5.0"), ("1,000", "1000"), ("$7", "7."), ("-2.50", "-2.5"),
                                 ("3", "4"), ("0.1", "0.10"), ("12", "120")])
def test_numbers_equal_matches_decimal(a, b):
    assert numbers_equal(a, b) == _slow_number_equal(a, b)


def test_numbers_equal_fractions_and_garbage():
    assert numbers_equal("10/2", "5")
    assert numbers_equal("0.5", "1/2")
    assert not numbers_equal("abc", "5")
    assert not numbers_equal(None, "5")


@pytest.mark.parametrize("s,expected", [
    ("B", "B"), ("b", "B"), ("(C)", "C"), ("D) because", "D"), ("A. a fruit", "A"), ("C: blue", "C"),
    ("The answer is B", "B"), ("I think (B) fits", "B"), ("A cat is an animal", None),
    ("E", None),  # out of range for 4 choices
    ("blue", "C"),  # the text of choice C
    ("", None),
])
def test_extract_choice(s, expected):
    assert extract_choice(s, 4, choices=["red", "green", "blue", "black"]) == expected


def test_the_answer_is_a_fox_is_no_letter():
    """After "answer is" only an upper-case letter is a letter (lm-eval's mmlu_pro regex);
    the choice text it introduces is read instead (lm-eval's fallback)."""
    animals = ["a dog", "a fox", "a cat", "a cow"]
    assert extract_choice("The answer is a fox", 4) is None
    assert extract_choice("The answer is a fox.", 4, choices=animals) == "B"
    assert extract_choice("the answer is b", 4) is None
    assert extract_choice("The answer is (C), a cat", 4, choices=animals) == "C"
    assert extract_choice("The answer is D", 4, choices=animals) == "D"
    assert extract_choice("It is a category error", 4, choices=["cat", "dog", "cow", "ox"]) is None


def test_plain_reply_ends_at_lm_evals_stop_sequences():
    reply = " 3 + 4\nmakes 7\nQuestion: What is 1 + 1?"
    assert cut_at_until(reply) == " 3 + 4\nmakes 7\n"
    assert gsm8k_flexible(cut_at_until(reply)) == "7"
    assert answer_slot("Question: 5", None) == ""          # the stop comes first: no answer
    assert answer_slot(" 12<|im_end|>9", None) == "12"


# gsm8k_flexible / gsm8k_strict against lm-eval's own filter objects and metric:
# tests/test_evaluation_lm_eval_adapter.py (test_gsm8k_readings_match_the_harness_filters).


def test_gsm8k_strict_and_gold():
    assert gsm8k_strict("so 7 apples\n#### 7") == "7"
    assert gsm8k_strict("#### 1,000.") == "1000"
    assert gsm8k_strict("the answer is 7") is None
    assert gsm8k_gold("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert gsm8k_gold("18") == "18"
