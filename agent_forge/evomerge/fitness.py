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
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

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


SCORE_CACHE = "evomerge_fitness_cache.json"


def measure_dir(model_dir, items, cfg: FitnessConfig, load) -> Fitness:
    """`measure` on a saved model (`load(dir)` gives (model, tokenizer)), reused when these
    weights were already measured on these items with these settings.

    A parent that `--make-parents` trained keeps its scores in its own directory
    (SCORE_CACHE, keyed by the weights' digest, the items and the settings that change a
    score), so a later search from the cached parents does not score them again: greedy
    decoding of the same weights gives the same replies. Other models are measured every
    time; their folders are not ours to write in."""
    from agent_forge.models import read_meta

    d = Path(model_dir)
    if not (d.is_dir() and "evomerge_parent" in read_meta(d)):
        return measure(*load(model_dir), items, cfg)
    key, path = _score_key(d, items, cfg), d / SCORE_CACHE
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key in cache:
        return Fitness.from_dict({**cache[key], "details": {**cache[key]["details"], "cached": True}})
    fit = measure(*load(model_dir), items, cfg)
    cache[key] = fit.to_dict()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache))
    tmp.replace(path)
    return fit


def _score_key(model_dir: Path, items, cfg: FitnessConfig) -> str:
    from agent_forge.models import weights_digest

    what = {"weights": weights_digest(model_dir), "items": [[it.id, it.question, it.answer] for it in items],
            "settings": [cfg.thinking, cfg.max_new_tokens, cfg.batch_size, cfg.loglik_weight]}
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


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
    the held-out form of what Step 1 trains, one forward pass per batch, no generation.

    Rows are batched by length and LEFT-padded, so the labelled tokens (everything after
    the prompt) share the last columns and the LM head runs only there: on a 135M model
    the head over a 49k vocabulary is a fifth of the forward pass, and the prompt's share
    of it is skipped."""
    import torch

    from agent_forge.quietstar.bake_data import IGNORE, encode_records
    from agent_forge.training.logprobs import sample_logits, token_logprobs

    examples, _ = encode_records(trace_records(items), tokenizer, max_len=384)
    if not examples:
        raise ValueError("no item has a reference trace: use loglik_weight 0 (accuracy) for this set")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    scores = [0.0] * len(examples)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            rows = [examples[i] for i in order[s:s + batch_size]]
            width = max(len(e.input_ids) for e in rows)
            n_new = max(len(e.input_ids) - e.prompt_len for e in rows)
            left = [width - len(e.input_ids) for e in rows]
            ids = torch.tensor([[pad] * k + e.input_ids for k, e in zip(left, rows)], device=device)
            mask = torch.tensor([[0] * k + [1] * len(e.input_ids) for k, e in zip(left, rows)], device=device)
            labels = torch.tensor([[IGNORE] * k + e.labels for k, e in zip(left, rows)], device=device)[:, -n_new:]
            logp = token_logprobs(sample_logits(model, ids, mask, n_new), labels.clamp(min=0))
            keep = labels != IGNORE
            per_item = (logp * keep).sum(1) / keep.sum(1).clamp(min=1)
            for i, v in zip(order[s:s + batch_size], per_item.exp().tolist()):
                scores[i] = v
    return scores


def paired_report(best_parent: Fitness, champion: Fitness, target_relative: float = 0.20) -> dict:
    """The champion against the best parent on the same test items: the gain in points with
    a bootstrap interval and McNemar's p, and whether the relative target was met."""
    from agent_forge.validation.stats import paired_gain, relative_drop

    before, after = best_parent.details["correct"], champion.details["correct"]
    if len(before) != len(after):
        raise ValueError("paired comparison needs the same test items for both models")
    gain, drop = paired_gain(before, after), relative_drop(before, after)
    base = gain["before"]
    relative = (gain["after"] - base) / base if base > 0 else math.inf if gain["after"] > 0 else 0.0
    # the gain is the drop's negative, and so is its interval (None when nothing was right before)
    ci = None if drop["ci95"] is None else [0.0 - drop["ci95"][1], 0.0 - drop["ci95"][0]]  # no -0.0
    return {**gain, "relative_gain": relative, "relative_gain_ci95": ci, "target_relative": target_relative,
            "target_met": relative >= target_relative and gain["ci95_points"][0] > 0}


def accuracy_only(cfg: FitnessConfig) -> FitnessConfig:
    """The same settings scoring accuracy: what the test split is reported in."""
    return dataclasses.replace(cfg, loglik_weight=0.0)
