"""A/B harness: baseline vs candidate over several rounds, with paired significance tests.

Round 0 is greedy; later rounds sample (each round its own seed), or, with `subsample`,
draw a different seeded subset of items. Both arms see the same questions in a round, so
the comparison is paired.

The unit of analysis is the item, not the (round, item) pair: rounds ask the same
questions, and a model that is right on an item in one round tends to be right on it in
the next, so pooled pairs are not independent and a test over them finds differences that
are not there. Each arm's score on an item is its mean correctness over the rounds that
asked it; d_i = candidate - baseline. The effect is mean(d_i) in points, with a seeded
paired bootstrap interval over items, and significance is an exact two-sided sign test on
the items with d_i != 0 (with one round, exactly the exact McNemar test). `n_pairs` is the
number of distinct items. Per-round accuracies and per-round paired gains are description.

Winner: the candidate (or the baseline) only if it is ahead by more than `threshold`
points AND the item-level p < alpha; otherwise "tie" (no clear winner).

A direct-answer arm (a model without thinking tokens, e.g. the input model) is credited if
EITHER the strict reading (first number of its reply) or the flexible one (last number, as
lm-evaluation-harness does) is right: the baseline gets its best reading, so a gain claimed
for the thinking model is a conservative one.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from agent_forge.evaluation.answers import gsm8k_flexible
from agent_forge.evaluation.runner import score
from agent_forge.inference import GENERATION_BATCH, Generation, generate_answers
from agent_forge.validation.stats import bootstrap_mean_diff, paired_gain, sign_test


@dataclass
class Arm:
    """A named contestant: generate(questions, round_index) -> Generations."""

    name: str
    generate: Callable[[list[str], int], list[Generation]]


def model_arm(name: str, model, tokenizer, thinking: str = "auto", batch_size: int = GENERATION_BATCH,
              max_new_tokens: int | None = None, temperature: float = 0.7, seed: int = 0,
              thought_mode: str | None = None, model_dir: str | None = None) -> Arm:
    """An arm backed by a real model: greedy in round 0, sampled with seed+round afterwards;
    thought_mode / model_dir decode a token-level model with its silent thoughts."""
    def generate(questions: list[str], round_index: int) -> list[Generation]:
        sample = round_index > 0
        return generate_answers(model, tokenizer, questions, thinking=thinking, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, do_sample=sample,
                                temperature=temperature, seed=seed + round_index if sample else None,
                                thought_mode=thought_mode, model_dir=model_dir)
    return Arm(name, generate)


def replay_first_round(arm: Arm, recorded: list[Generation] | None, questions: list[str]) -> Arm:
    """`arm`, except that round 0 on exactly `questions` returns `recorded`: the same greedy
    generations made earlier (anti-theater's thinking-on pass), not made a second time."""
    if recorded is None:
        return arm

    def generate(qs: list[str], round_index: int) -> list[Generation]:
        if round_index == 0 and qs == questions:
            return recorded
        return arm.generate(qs, round_index)
    return Arm(arm.name, generate)


@dataclass
class ABReport:
    baseline: dict   # {name, per_round, mean (over items), std (over rounds)}
    candidate: dict
    rounds: int
    n_pairs: int     # distinct items: the unit the interval and the test run over
    diff_points: float
    diff_ci_points: list[float]
    mcnemar: dict    # {only_a, only_b, p, defined, test}: the item-level test, named in `test`
    threshold: float
    alpha: float
    winner: str      # "candidate" | "baseline" | "tie"
    sentence: str
    per_round_diff: list[dict] = field(default_factory=list)  # each round: points, ci95_points, mcnemar_p

    def to_dict(self) -> dict:
        return asdict(self)


def _round_items(n: int, r: int, subsample: float | None, seed: int) -> list[int]:
    """Indices of the items round r asks: all, or a seeded subset of them."""
    if not subsample:
        return list(range(n))
    k = max(1, round(subsample * n))
    return random.Random(seed + r).sample(range(n), k)


def _correct(items, gens) -> list[bool]:
    return [_best_reading(it, g) for it, g in zip(items, gens)]


def _best_reading(item, g: Generation) -> bool:
    if g.mode == "direct" and not item.choices:
        return score(item, g.answer_text)[0] or score(item, gsm8k_flexible(g.completion))[0]
    return score(item, g.answer_text if g.closed else None)[0]


def run_ab(baseline: Arm, candidate: Arm, items, rounds: int = 3, threshold: float = 2.0, *,
           alpha: float = 0.05, subsample: float | None = None, seed: int = 0,
           progress: bool = False, n_boot: int = 2000) -> ABReport:
    """Compare two arms on `items` over `rounds` rounds; see the module docstring."""
    items = list(items)
    if rounds < 1 or not items:
        raise ValueError("need at least one round and one item")
    (b, c), acc, per_round = _play(baseline, candidate, items, rounds, subsample, seed, progress, n_boot)
    cmp = compare_items(b, c, rounds, threshold=threshold, alpha=alpha, seed=seed, n_boot=n_boot)
    arms = [_arm_summary(a.name, acc[k], s) for a, k, s in ((baseline, "b", b), (candidate, "c", c))]
    return ABReport(baseline=arms[0], candidate=arms[1], rounds=rounds, **cmp, threshold=threshold, alpha=alpha,
                    per_round_diff=per_round,
                    sentence=_sentence(baseline.name, candidate.name, cmp, rounds, threshold, alpha))


def compare_items(b: np.ndarray, c: np.ndarray, rounds: int, *, threshold: float, alpha: float,
                  seed: int = 0, n_boot: int = 2000) -> dict:
    """The item-level verdict from each item's score per arm (its mean correctness over rounds):
    the part of the A/B whose error rate matters, kept apart so it can be simulated cheaply."""
    boot = bootstrap_mean_diff(b, c, n_boot=n_boot, seed=seed)
    diff = 100 * boot["mean_diff"]
    test = {**sign_test(b, c), "test": _test_name(rounds)}
    return {"n_pairs": len(b), "diff_points": diff, "diff_ci_points": [100 * x for x in boot["ci"]],
            "mcnemar": test, "winner": _winner(diff, test["p"], threshold, alpha)}


def _play(baseline: Arm, candidate: Arm, items: list, rounds: int, subsample: float | None, seed: int,
          progress: bool, n_boot: int) -> tuple[np.ndarray, dict, list[dict]]:
    """Run the rounds: each arm's mean correctness per item seen (2 x items seen), the per-round
    accuracies, and each round's paired gain."""
    hits, asked = np.zeros((2, len(items))), np.zeros(len(items))
    acc, per_round = {"b": [], "c": []}, []
    for r in _rounds(rounds, progress):
        idx = _round_items(len(items), r, subsample, seed)
        its = [items[i] for i in idx]
        qs = [it.question for it in its]
        ok = {key: _correct(its, arm.generate(qs, r)) for key, arm in (("b", baseline), ("c", candidate))}
        for row, key in enumerate(("b", "c")):
            hits[row, idx] += ok[key]
            acc[key].append(sum(ok[key]) / len(ok[key]))
        asked[idx] += 1
        per_round.append({"round": r, "sampled": r > 0, **paired_gain(ok["b"], ok["c"], seed=seed, n_boot=n_boot)})
    seen = asked > 0
    return hits[:, seen] / asked[seen], acc, per_round


def _test_name(rounds: int) -> str:
    """Which test the `mcnemar` field holds, so a reader of the JSON need not guess."""
    if rounds == 1:
        return "exact McNemar test over items"
    return f"exact sign test over items, each scored by its mean correctness over the rounds ({rounds})"


def _rounds(rounds: int, progress: bool):
    if not progress:
        return range(rounds)
    from tqdm.auto import tqdm

    return tqdm(range(rounds), desc="A/B rounds", unit="round")


def _arm_summary(name: str, per_round: list[float], item_scores: np.ndarray) -> dict:
    """Mean over items (what the difference is taken of); the spread over rounds as description."""
    std = float(np.std(per_round, ddof=1)) if len(per_round) > 1 else 0.0
    return {"name": name, "per_round": per_round, "mean": float(np.mean(item_scores)), "std": std}


def _winner(diff: float, p: float, threshold: float, alpha: float) -> str:
    if p < alpha and diff > threshold:
        return "candidate"
    if p < alpha and diff < -threshold:
        return "baseline"
    return "tie"


def _sentence(b: str, c: str, cmp: dict, rounds: int, threshold: float, alpha: float) -> str:
    """One sentence that claims no more than the item-level test supports."""
    diff, (lo, hi), p = cmp["diff_points"], cmp["diff_ci_points"], cmp["mcnemar"]["p"]
    name = "McNemar" if rounds == 1 else "sign test"
    head = (f"{c} vs {b}: {diff:+.1f} points over {cmp['n_pairs']} items and {rounds} round(s), 95% paired "
            f"bootstrap interval over items [{lo:+.1f}, {hi:+.1f}] (exact {name} over items p={p:.3g}, "
            f"threshold {threshold} points).")
    if cmp["winner"] != "tie":
        return head + f" Winner: {c if cmp['winner'] == 'candidate' else b}."
    if p >= alpha:
        return head + f" No clear winner: not significant at alpha={alpha}."
    return head + f" No clear winner: significant at alpha={alpha}, but not more than {threshold} points."
