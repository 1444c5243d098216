"""Anti-theater tests: do the thoughts carry the answer, or are they decoration?

Three tests on the same items, each answered twice (thinking on, and the block forced
empty), greedy:

1. divergence  > 0.30: mean normalised edit distance between the two answer slots. If
   the answer is the same with and without thinking, the thinking did nothing.
2. ablation    > 2 points: accuracy(on) - accuracy(off), with an exact McNemar p-value.
3. correlation > 0.5: Pearson r between a per-example coherence score of the thinking and
   its per-example utility. Utility is "logprob" (log p(gold | thinking) - log p(gold |
   empty block), continuous; needs the real model) or "correctness" (correct_on -
   correct_off). Coherence is a callable (thinking, question) -> [0, 1]; the default is
   syntactic well-formedness * (1 - repetition rate) until the full scorer plugs in.

All three must pass; otherwise the recommendation is "roll back", said plainly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from rapidfuzz.distance import Levenshtein

from agent_forge.evaluation.runner import continuation_logprobs, score
from agent_forge.evaluation.answers import gsm8k_gold, strip_thinking_tokens
from agent_forge.inference import GENERATION_BATCH, Generation, generate_answers
from agent_forge.evaluation.metrics import wilson_interval
from agent_forge.validation.stats import mcnemar_exact, pearson
from agent_forge.vocab import get_vocab, is_well_formed

THRESHOLDS = {"divergence": 0.30, "ablation": 2.0, "correlation": 0.5}
GenerateFn = Callable[[list[str], str], list[Generation]]


@dataclass
class AntiTheaterReport:
    tests: list[dict]
    passed: bool
    recommendation: str  # "keep" | "roll back"
    sentence: str
    n: int
    per_example: list[dict] = field(default_factory=list)

    def to_dict(self, with_examples: bool = False) -> dict:
        d = asdict(self)
        if not with_examples:
            d.pop("per_example")
        return d


def repetition_rate(text: str) -> float:
    """Share of words that repeat an earlier word (0 = all distinct, -> 1 = one word looped)."""
    words = text.split()
    return 0.0 if not words else 1 - len(set(words)) / len(words)


def default_coherence(thinking: str | None, question: str = "", vocab="default") -> float:
    """Well-formed block (1/0) * (1 - repetition rate of its words); 0 for no thinking."""
    if not thinking:
        return 0.0
    v = get_vocab(vocab)
    block = f"{v.open}{thinking}{v.close} x"
    body = strip_thinking_tokens(thinking, v)
    return float(is_well_formed(block, v) and bool(body.strip())) * (1 - repetition_rate(body))


def run_anti_theater(model, tokenizer, items, *, generate_fn: GenerateFn | None = None,
                     coherence_fn: Callable[[str | None, str], float] | None = None,
                     utility: str = "auto", thresholds: dict | None = None,
                     batch_size: int = GENERATION_BATCH, max_new_tokens: int | None = None,
                     vocab="default", progress: bool = False) -> AntiTheaterReport:
    """Run the three tests; `generate_fn(questions, thinking)` replaces real generation in tests."""
    items = list(items)
    if len(items) < 3:
        raise ValueError("anti-theater needs at least 3 items")
    th = {**THRESHOLDS, **(thresholds or {})}
    if generate_fn is None:
        def generate_fn(questions, thinking):
            return generate_answers(model, tokenizer, questions, thinking=thinking, vocab=vocab,
                                    batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    progress=progress)
    questions = [it.question for it in items]
    on, off = generate_fn(questions, "on"), generate_fn(questions, "off")
    ok_on = [score(it, g.answer_text if g.closed else None)[0] for it, g in zip(items, on)]
    ok_off = [score(it, g.answer_text if g.closed else None)[0] for it, g in zip(items, off)]
    coherence_fn = coherence_fn or (lambda t, q: default_coherence(t, q, vocab))
    coh = [float(coherence_fn(g.thinking, it.question)) for g, it in zip(on, items)]
    if utility == "auto":
        utility = "correctness" if model is None else "logprob"
    util = (_logprob_gain(model, tokenizer, items, on, vocab, batch_size) if utility == "logprob"
            else [float(a) - float(b) for a, b in zip(ok_on, ok_off)])
    tests = [_divergence(on, off, th["divergence"]), _ablation(ok_on, ok_off, th["ablation"]),
             _correlation(coh, util, utility, th["correlation"])]
    rows = [{"id": it.id, "on": g1.answer_text, "off": g0.answer_text, "correct_on": a,
             "correct_off": b, "coherence": c, "utility": u}
            for it, g1, g0, a, b, c, u in zip(items, on, off, ok_on, ok_off, coh, util)]
    return _report(tests, rows)


def _divergence(on: list[Generation], off: list[Generation], threshold: float) -> dict:
    dist = [Levenshtein.normalized_distance(a.answer_text, b.answer_text) for a, b in zip(on, off)]
    value = sum(dist) / len(dist)
    unclosed = sum(not g.closed for g in on)
    return {"name": "divergence", "value": value, "threshold": threshold, "passed": value > threshold,
            "detail": f"mean normalised edit distance of answers on vs off; {unclosed} unclosed"}


def _ablation(ok_on: list[bool], ok_off: list[bool], threshold: float) -> dict:
    n = len(ok_on)
    points = 100 * (sum(ok_on) - sum(ok_off)) / n
    mc = mcnemar_exact(ok_off, ok_on)
    return {"name": "ablation", "value": points, "threshold": threshold, "passed": points > threshold,
            "detail": f"accuracy on {100 * sum(ok_on) / n:.1f}% vs off {100 * sum(ok_off) / n:.1f}%, "
                      f"McNemar p={mc['p']:.3g}", "p": mc["p"],
            "accuracy_on": sum(ok_on) / n, "ci95_on": list(wilson_interval(sum(ok_on), n)),
            "accuracy_off": sum(ok_off) / n, "ci95_off": list(wilson_interval(sum(ok_off), n)), "n": n}


def _correlation(coh: list[float], util: list[float], kind: str, threshold: float) -> dict:
    res = pearson(coh, util)
    note = "" if res["defined"] else " (undefined: a side is constant)"
    return {"name": "correlation", "value": res["r"], "threshold": threshold,
            "passed": res["defined"] and res["r"] > threshold, "p": res["p"],
            "detail": f"Pearson r of coherence vs {kind} utility, p={res['p']:.3g}{note}"}


def _logprob_gain(model, tokenizer, items, on: list[Generation], vocab, batch_size: int) -> list[float]:
    """log p(" gold" | prompt + own thinking block) - log p(" gold" | prompt + empty block)."""
    v = get_vocab(vocab)
    pairs = []
    for it, g in zip(items, on):
        gold = " " + gsm8k_gold(it.answer)
        base = g.prompt[: len(g.prompt) - len(v.open)] if g.prompt.endswith(v.open) else g.prompt
        pairs.append((base + v.open + (g.thinking or "") + v.close, gold))
        pairs.append((base + v.open + v.close, gold))
    lls = continuation_logprobs(model, tokenizer, pairs, batch_size)
    return [lls[2 * i] - lls[2 * i + 1] for i in range(len(items))]


def _report(tests: list[dict], rows: list[dict]) -> AntiTheaterReport:
    passed = all(t["passed"] for t in tests)
    parts = ", ".join(f"{t['name']} {t['value']:.2f} (needs > {t['threshold']})" for t in tests)
    if passed:
        sentence = f"The thoughts carry the answer: {parts}. Keep this model."
    else:
        failed = ", ".join(t["name"] for t in tests if not t["passed"])
        sentence = (f"The thoughts look like theater (failed: {failed}); {parts}. "
                    "Roll back to the previous checkpoint.")
    return AntiTheaterReport(tests=tests, passed=passed, recommendation="keep" if passed else "roll back",
                             sentence=sentence, n=len(rows), per_example=rows)
