"""Fitness of a merged model: held-out task accuracy, with its interval, never training data.

The search selects on the validation split (`val_set`); the champion and the best parent
are then measured once on the test split (`test_set`), question by question, so the gain
is a paired comparison. Both splits come from generator seeds that no training record
uses (data.evalsets), and the parents' training records are filtered against both.

A log-likelihood proxy is far cheaper than generating: the reference trace and answer of
each validation item (rebuilt by the procedural generator), scored teacher-forced, as
exp(mean log-prob per token), averaged over items. `loglik_weight` mixes it in:
value = (1 - w) * accuracy + w * proxy. The test split is always scored by accuracy.
"""

from __future__ import annotations

import dataclasses
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
    """0 = accuracy only; 1 = the trace-likelihood proxy only (selection; the test split
    is scored by accuracy whatever this says)."""


def load_items(name: str, limit: int):
    from agent_forge.data.evalsets import load_eval_set

    items = load_eval_set(name, limit=limit)
    if not items:
        raise ValueError(f"evaluation set {name!r} gave no items")
    return items


def measure(model, tokenizer, items, cfg: FitnessConfig) -> Fitness:
    """Accuracy (Wilson 95%) on `items`, the trace-likelihood proxy (bootstrap 95%), or the
    weighted mix `loglik_weight` asks for; weight 1 generates nothing."""
    w = cfg.loglik_weight
    if w >= 1:
        return Fitness.from_scores(trace_likelihood(model, tokenizer, items, cfg.batch_size),
                                   {"kind": "trace_likelihood"})
    acc = _accuracy(model, tokenizer, items, cfg)
    if w <= 0:
        return acc
    proxy = Fitness.from_scores(trace_likelihood(model, tokenizer, items, cfg.batch_size))
    value, low, high = ((1 - w) * a + w * p for a, p in ((acc.value, proxy.value), (acc.low, proxy.low),
                                                         (acc.high, proxy.high)))
    return Fitness(value, low, high, acc.n, {**acc.details, "kind": "mix", "trace_likelihood": proxy.value})


def _accuracy(model, tokenizer, items, cfg: FitnessConfig) -> Fitness:
    from agent_forge.evaluation.runner import evaluate

    res = evaluate(model, tokenizer, items, thinking=cfg.thinking, batch_size=cfg.batch_size,
                   max_new_tokens=cfg.max_new_tokens, loglik=False, progress=False)
    correct = [bool(r["correct"]) for r in res.per_example]
    return Fitness.from_correct(correct, {"kind": "accuracy", "correct": correct,
                                          "per_family": {k: v["accuracy"] for k, v in res.per_family.items()},
                                          "no_answer_rate": res.no_answer_rate})


def trace_records(items):
    """The verified reference trace for each procedural item (its generator's metadata
    rebuilds it, as for training records); items with no trace builder are left out."""
    from agent_forge.data.procedural import make_record

    out = []
    for it in items:
        try:
            out.append(make_record(it.family, {"question": it.question, "answer": it.answer,
                                               "metadata": it.meta}, it.id, "easy", 0))
        except (KeyError, ValueError):
            continue
    return out


def trace_likelihood(model, tokenizer, items, batch_size: int = 16) -> list[float]:
    """Per item: exp(mean log-prob of the reference trace and answer tokens), in (0, 1];
    the held-out form of what Step 1 trains, one forward pass per batch, no generation."""
    import torch

    from agent_forge.quietstar.bake_data import IGNORE, collate, encode_records, shifted

    examples, _ = encode_records(trace_records(items), tokenizer, max_len=384)
    if not examples:
        raise ValueError("no item has a reference trace: use loglik_weight 0 (accuracy) for this set")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: list[float] = []
    with torch.inference_mode():
        for s in range(0, len(examples), batch_size):
            batch = collate(examples[s:s + batch_size], pad)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels, _ = shifted(batch)
            mask = labels != IGNORE
            logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            per_item = (logp * mask).sum(1) / mask.sum(1).clamp(min=1)
            scores += per_item.exp().tolist()
    return scores


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


def accuracy_only(cfg: FitnessConfig) -> FitnessConfig:
    """The same settings scoring accuracy: what the test split is reported in."""
    return dataclasses.replace(cfg, loglik_weight=0.0)
