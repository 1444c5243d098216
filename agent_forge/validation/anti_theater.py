"""Anti-theater tests: do the thoughts carry the answer, or are they decoration?

Four tests on the same items, each answered twice (thinking on, and the block forced
empty), greedy:

1. divergence  > 0.30: mean normalised edit distance between the two answer slots. If
   the answer is the same with and without thinking, the thinking did nothing. A thinking
   block that never closes has no answer; it scores 0 (it changed no answer, it lost it),
   so thinking that runs on cannot buy divergence, and the unclosed rate is reported.
2. ablation    > 2 points AND exact McNemar p < 0.05: accuracy(on) - accuracy(off). The
   points alone are not enough: on 32 items one item is 3.1 points.
3. correlation > 0.5: Pearson r between a per-example coherence score of the thinking and
   its per-example utility. Utility is "logprob" (log p(gold | thinking) - log p(gold |
   empty block), continuous; needs the real model) or "correctness" (correct_on -
   correct_off). Coherence is a callable (thoughts, questions) -> per thought a score in
   [0, 1] or a coherence.ThoughtCoherence. The default, used by the pipeline and by
   `forge anti-theater` alike, is coherence.anti_theater_coherence (semantic + syntactic
   over the parts that apply); the test reports on how many items each part applied
   (`coherence_parts`).

4. check honesty >= 0.95: do the checks check? Every `<doubt>`/`<falsify>`/`<correct>`
   segment of the thinking-on pass that states arithmetic and a verdict is judged
   (validation.check_honesty): the verdict must agree with the arithmetic it states. Not
   applicable (passed, value None) when no thought has such a check.

All four must pass; otherwise the recommendation is "roll back", said plainly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from rapidfuzz.distance import Levenshtein

from agent_forge.evaluation.runner import PerExampleReport, continuation_logprobs, score
from agent_forge.evaluation.answers import gsm8k_gold
from agent_forge.inference import GENERATION_BATCH, Generation, generate_answers
from agent_forge.evaluation.metrics import wilson_interval
from agent_forge.quietstar.coherence import PARTS, ThoughtCoherence, anti_theater_coherence
from agent_forge.validation.check_honesty import check_honesty
from agent_forge.validation.stats import mcnemar_exact, pearson
from agent_forge.vocab import get_vocab, is_well_formed

THRESHOLDS = {"divergence": 0.30, "ablation": 2.0, "ablation_alpha": 0.05, "correlation": 0.5,
              "check_honesty": 0.95}
GenerateFn = Callable[[list[str], str], list[Generation]]
CoherenceFn = Callable[[list[str | None], list[str]], list[float | ThoughtCoherence]]


@dataclass
class AntiTheaterReport(PerExampleReport):
    tests: list[dict]
    passed: bool
    recommendation: str  # "keep" | "roll back"
    sentence: str
    n: int
    per_example: list[dict] = field(default_factory=list)


def run_anti_theater(model, tokenizer, items, *, generate_fn: GenerateFn | None = None,
                     coherence_fn: CoherenceFn | None = None,
                     utility: str = "auto", thresholds: dict | None = None,
                     batch_size: int = GENERATION_BATCH, max_new_tokens: int | None = None,
                     vocab="default", progress: bool = False, thought_mode: str | None = None,
                     model_dir: str | None = None) -> AntiTheaterReport:
    """Run the four tests; `generate_fn(questions, thinking)` replaces real generation in tests.
    thought_mode / model_dir: a token-level model's silent thoughts join the thinking-on pass
    (the off pass has no thinking of either kind)."""
    items = list(items)
    if len(items) < 3:
        raise ValueError("anti-theater needs at least 3 items")
    th = {**THRESHOLDS, **(thresholds or {})}
    if generate_fn is None:
        def generate_fn(questions, thinking):
            return generate_answers(model, tokenizer, questions, thinking=thinking, vocab=vocab,
                                    batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    progress=progress, model_dir=model_dir,
                                    thought_mode=thought_mode if thinking == "on" else None)
    questions = [it.question for it in items]
    on, off = generate_fn(questions, "on"), generate_fn(questions, "off")
    ok_on = [score(it, g.answer_text if g.closed else None)[0] for it, g in zip(items, on)]
    ok_off = [score(it, g.answer_text if g.closed else None)[0] for it, g in zip(items, off)]
    coh, parts = _coherence(coherence_fn or anti_theater_coherence(model, tokenizer, vocab), on, items)
    if utility == "auto":
        utility = "correctness" if model is None else "logprob"
    util = (_logprob_gain(model, tokenizer, items, on, vocab, batch_size) if utility == "logprob"
            else [float(a) - float(b) for a, b in zip(ok_on, ok_off)])
    tests = [_divergence(on, off, th["divergence"]), _ablation(ok_on, ok_off, th["ablation"], th["ablation_alpha"]),
             _correlation(coh, util, utility, th["correlation"], parts),
             check_honesty([g.thinking for g in on], th["check_honesty"], vocab)]
    rows = [{"id": it.id, "on": g1.answer_text, "off": g0.answer_text, "closed_on": g1.closed,
             "well_formed_on": is_well_formed(g1.completion, vocab), "correct_on": a,
             "correct_off": b, "coherence": c, "utility": u}
            for it, g1, g0, a, b, c, u in zip(items, on, off, ok_on, ok_off, coh, util)]
    return _report(tests, rows)


def _coherence(coherence_fn: CoherenceFn, on: list[Generation], items) -> tuple[list[float], dict | None]:
    """Per-item coherence, and on how many items each part applied (None: a plain-float scorer)."""
    results = list(coherence_fn([g.thinking for g in on], [it.question for it in items]))
    if not all(isinstance(r, ThoughtCoherence) for r in results):
        return [float(r) for r in results], None
    applied = {p: sum(r.parts.get(p) is not None for r in results) for p in PARTS}
    return [r.value for r in results], {**applied, "n": len(results)}


def _divergence(on: list[Generation], off: list[Generation], threshold: float) -> dict:
    """Mean edit distance of the answers; an unclosed thinking-on block scores 0 (no answer)."""
    dist = [Levenshtein.normalized_distance(a.answer_text, b.answer_text) if a.closed else 0.0
            for a, b in zip(on, off)]
    value = sum(dist) / len(dist)
    closed = [d for d, g in zip(dist, on) if g.closed]
    unclosed_rate = 1 - len(closed) / len(on)
    value_closed = sum(closed) / len(closed) if closed else None
    closed_text = "-" if value_closed is None else f"{value_closed:.3f}"
    return {"name": "divergence", "value": value, "threshold": threshold, "passed": value > threshold,
            "unclosed_rate": unclosed_rate, "value_closed": value_closed,
            "detail": f"mean normalised edit distance of answers on vs off, unclosed thinking scored 0; "
                      f"unclosed {100 * unclosed_rate:.1f}%, {closed_text} over closed ones"}


def _ablation(ok_on: list[bool], ok_off: list[bool], threshold: float, alpha: float) -> dict:
    """Passes on a gain of more than `threshold` points that McNemar also finds significant."""
    n = len(ok_on)
    points = 100 * (sum(ok_on) - sum(ok_off)) / n
    mc = mcnemar_exact(ok_off, ok_on)
    return {"name": "ablation", "value": points, "threshold": threshold, "alpha": alpha,
            "passed": points > threshold and mc["p"] < alpha,
            "detail": f"accuracy on {100 * sum(ok_on) / n:.1f}% vs off {100 * sum(ok_off) / n:.1f}%: "
                      f"{points:+.1f} points (needs > {threshold}), McNemar p={mc['p']:.3g} (needs < {alpha})",
            "p": mc["p"],
            "accuracy_on": sum(ok_on) / n, "ci95_on": list(wilson_interval(sum(ok_on), n)),
            "accuracy_off": sum(ok_off) / n, "ci95_off": list(wilson_interval(sum(ok_off), n)), "n": n}


def _correlation(coh: list[float], util: list[float], kind: str, threshold: float, parts: dict | None) -> dict:
    """Does coherence track utility? Pearson r, with the coherence parts that went into it."""
    res = pearson(coh, util)
    note = "" if res["defined"] else " (undefined: a side is constant)"
    return {"name": "correlation", "value": res["r"], "threshold": threshold,
            "passed": res["defined"] and res["r"] > threshold, "p": res["p"], "coherence_parts": parts,
            "detail": f"Pearson r of coherence vs {kind} utility, p={res['p']:.3g}{note}; {parts_text(parts)}"}


def parts_text(parts: dict | None) -> str:
    """Which coherence parts applied, e.g. "coherence parts: semantic 40/40, structure 40/40, claims 0/40"."""
    if not parts:
        return "coherence: a custom scorer"
    return "coherence parts: " + ", ".join(f"{p} {parts[p]}/{parts['n']}" for p in PARTS)


def _logprob_gain(model, tokenizer, items, on: list[Generation], vocab, batch_size: int) -> list[float]:
    """log p(" gold" | prompt + own thinking block) - log p(" gold" | prompt + empty block)."""
    v = get_vocab(vocab)
    pairs = []
    for it, g in zip(items, on):
        gold = " " + gold_text(it)
        base = g.prompt[: len(g.prompt) - len(v.open)] if g.prompt.endswith(v.open) else g.prompt
        pairs.append((base + v.open + (g.thinking or "") + v.close, gold))
        pairs.append((base + v.open + v.close, gold))
    lls = continuation_logprobs(model, tokenizer, pairs, batch_size)
    return [lls[2 * i] - lls[2 * i + 1] for i in range(len(items))]


def gold_text(item) -> str:
    """The gold as the answer slot should state it: the letter for a multiple-choice item
    (upper case, as runner.score reads it), the number of a numeric one, else the text."""
    return item.answer.strip().upper() if item.choices else gsm8k_gold(item.answer)


def needs(test: dict) -> str:
    """What a test needs to pass, with the p-value where it also needs significance."""
    if "alpha" in test:
        return f"p={test['p']:.2g}; needs > {test['threshold']} and p < {test['alpha']}"
    return f"needs {comparison(test)} {test['threshold']}"


def comparison(test: dict) -> str:
    return ">=" if test.get("at_least") else ">"


def value_text(test: dict, spec: str = ".2f") -> str:
    """A test's value, or "n/a" for a test that does not apply to these thoughts."""
    return "n/a" if test["value"] is None else format(test["value"], spec)


def _report(tests: list[dict], rows: list[dict]) -> AntiTheaterReport:
    passed = all(t["passed"] for t in tests)
    parts = ", ".join(f"{t['name']} {value_text(t)} ({needs(t)})" for t in tests)
    if passed:
        sentence = f"The thoughts carry the answer: {parts}. Keep this model."
    else:
        failed = ", ".join(t["name"] for t in tests if not t["passed"])
        sentence = (f"The thoughts look like theater (failed: {failed}); {parts}. "
                    "Roll back to the previous checkpoint.")
    return AntiTheaterReport(tests=tests, passed=passed, recommendation="keep" if passed else "roll back",
                             sentence=sentence, n=len(rows), per_example=rows)
