"""Fitness of a merged model: held-out task accuracy, with its interval, never training data.

The search selects on the validation split (`val_set`); the champion and the best parent
are then measured once on the test split (`test_set`), question by question, so the gain
is a paired comparison. Both splits come from generator seeds that no training record
uses (data.evalsets), and the parents' training records are filtered against both.

A log-likelihood proxy (the gold answer's mean log-probability behind an empty thinking
block) is cheaper than generating; `loglik_weight` mixes it in:
value = (1 - w) * accuracy + w * exp(mean log-prob per answer token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent_forge.evomerge.search import Fitness  # noqa: F401  (the one Fitness; re-exported)


@dataclass
class FitnessConfig:
    val_set: str = "easy_arithmetic_val"
    """Items the search selects on (any evaluation set name or a JSONL path)."""
    test_set: str = "easy_arithmetic"
    """Items the champion and the best parent are reported on; never seen by the search."""
    samples: int = 60
    """Validation items per candidate."""
    test_samples: int = 300
    """Test items for the final paired comparison."""
    thinking: str = "auto"
    """Generation mode: "auto" lets a thinking model think; "off" forces the answer slot."""
    max_new_tokens: int = 96
    batch_size: int = 16
    loglik_weight: float = 0.0
    """0 = accuracy only; 1 = the log-likelihood proxy only."""


def load_items(name: str, limit: int):
    from agent_forge.data.evalsets import load_eval_set

    items = load_eval_set(name, limit=limit)
    if not items:
        raise ValueError(f"evaluation set {name!r} gave no items")
    return items


def measure(model, tokenizer, items, cfg: FitnessConfig) -> Fitness:
    """Accuracy (Wilson 95%) on `items`, mixed with the log-likelihood proxy when asked."""
    from agent_forge.evaluation.runner import evaluate

    res = evaluate(model, tokenizer, items, thinking=cfg.thinking, batch_size=cfg.batch_size,
                   max_new_tokens=cfg.max_new_tokens, loglik=False, progress=False)
    correct = [bool(r["correct"]) for r in res.per_example]
    details = {"accuracy": res.accuracy, "ci95": res.ci95, "correct": correct,
               "per_family": {k: v["accuracy"] for k, v in res.per_family.items()},
               "no_answer_rate": res.no_answer_rate}
    value, (low, high) = res.accuracy, res.ci95
    if cfg.loglik_weight > 0:
        proxy = answer_likelihood(model, tokenizer, items, cfg.batch_size)
        details["answer_likelihood"] = proxy
        w = cfg.loglik_weight
        value, low, high = ((1 - w) * x + w * proxy for x in (value, low, high))
    return Fitness(value=value, low=low, high=high, n=len(items), details=details)


def answer_likelihood(model, tokenizer, items, batch_size: int = 16) -> float:
    """exp(mean log-prob per gold-answer token) behind an empty thinking block: in (0, 1],
    higher when the model puts its mass on the right answer, no generation needed."""
    from agent_forge.evaluation.runner import continuation_logprobs, loglik_context

    pairs = [(loglik_context(tokenizer, it), " " + it.answer.strip()) for it in items]
    lls = continuation_logprobs(model, tokenizer, pairs, batch_size)
    n_tokens = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in pairs]
    return math.exp(sum(lls) / max(1, sum(n_tokens)))


def paired_report(best_parent: Fitness, champion: Fitness, target_relative: float = 0.20) -> dict:
    """The champion against the best parent on the same test items: the gain in points with
    a bootstrap interval and McNemar's p, and whether the relative target was met."""
    from agent_forge.validation.stats import paired_gain

    before, after = best_parent.details["correct"], champion.details["correct"]
    if len(before) != len(after):
        raise ValueError("paired comparison needs the same test items for both models")
    gain = paired_gain(before, after)
    base = gain["before"]
    relative = (gain["after"] - base) / base if base > 0 else math.inf if gain["after"] > 0 else 0.0
    return {**gain, "relative_gain": relative, "target_relative": target_relative,
            "target_met": relative >= target_relative and gain["ci95_points"][0] > 0}
