"""A/B harness: baseline vs candidate over several rounds, with paired significance tests.

Round 0 is greedy; later rounds sample (each round its own seed), or, with `subsample`,
draw a different seeded subset of items. Both arms see the same questions in a round, so
the comparison is paired: a paired t-test over per-round accuracies (R >= 2) and an exact
McNemar test over all (round, item) pairs. The effect is the mean difference in points
with a bootstrap interval over the pairs, and Cohen's d_z.

Winner: the candidate (or the baseline) only if it is ahead by more than `threshold`
points AND McNemar p < alpha; otherwise "tie" (no clear winner).

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
from agent_forge.validation.stats import (bootstrap_mean_diff, cohens_d_paired, mcnemar_exact,
                                          paired_gain, paired_ttest)


@dataclass
class Arm:
    """A named contestant: generate(questions, round_index) -> Generations."""

    name: str
    generate: Callable[[list[str], int], list[Generation]]


def model_arm(name: str, model, tokenizer, thinking: str = "auto", batch_size: int = GENERATION_BATCH,
              max_new_tokens: int | None = None, temperature: float = 0.7, seed: int = 0) -> Arm:
    """An arm backed by a real model: greedy in round 0, sampled with seed+round afterwards."""
    def generate(questions: list[str], round_index: int) -> list[Generation]:
        sample = round_index > 0
        return generate_answers(model, tokenizer, questions, thinking=thinking, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, do_sample=sample,
                                temperature=temperature, seed=seed + round_index if sample else None)
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
    baseline: dict   # {name, per_round, mean, std}
    candidate: dict
    rounds: int
    n_pairs: int
    diff_points: float
    diff_ci_points: list[float]
    cohens_d: float
    ttest: dict | None
    mcnemar: dict
    threshold: float
    winner: str      # "candidate" | "baseline" | "tie"
    sentence: str
    per_round_diff: list[dict] = field(default_factory=list)  # each round: points, ci95_points, mcnemar_p

    def to_dict(self) -> dict:
        return asdict(self)


def _round_items(items: list, r: int, subsample: float | None, seed: int) -> list:
    if not subsample:
        return items
    k = max(1, round(subsample * len(items)))
    return random.Random(seed + r).sample(items, k)


def _correct(items, gens) -> list[bool]:
    return [_best_reading(it, g) for it, g in zip(items, gens)]


def _best_reading(item, g: Generation) -> bool:
    if g.mode == "direct" and not item.choices:
        return score(item, g.answer_text)[0] or score(item, gsm8k_flexible(g.completion))[0]
    return score(item, g.answer_text if g.closed else None)[0]


def run_ab(baseline: Arm, candidate: Arm, items, rounds: int = 3, threshold: float = 2.0, *,
           alpha: float = 0.05, subsample: float | None = None, seed: int = 0,
           progress: bool = False) -> ABReport:
    """Compare two arms on `items` over `rounds` rounds; see the module docstring."""
    items = list(items)
    if rounds < 1 or not items:
        raise ValueError("need at least one round and one item")
    acc = {"b": [], "c": []}
    pooled = {"b": [], "c": []}
    per_round = []
    for r in _rounds(rounds, progress):
        its = _round_items(items, r, subsample, seed)
        qs = [it.question for it in its]
        ok = {key: _correct(its, arm.generate(qs, r)) for key, arm in (("b", baseline), ("c", candidate))}
        for key in ok:
            acc[key].append(sum(ok[key]) / len(ok[key]))
            pooled[key].extend(ok[key])
        per_round.append({"round": r, "sampled": r > 0, **paired_gain(ok["b"], ok["c"], seed=seed)})
    b_arr, c_arr = np.array(pooled["b"], float), np.array(pooled["c"], float)
    boot = bootstrap_mean_diff(b_arr, c_arr, seed=seed)
    ttest = paired_ttest(acc["b"], acc["c"]) if rounds >= 2 else None
    mc = mcnemar_exact(pooled["b"], pooled["c"])
    diff = 100 * float(np.mean(acc["c"]) - np.mean(acc["b"]))
    d = cohens_d_paired(acc["b"], acc["c"]) if rounds >= 2 else cohens_d_paired(b_arr, c_arr)
    winner = _winner(diff, mc["p"], threshold, alpha)
    arms = [_arm_summary(a.name, acc[k]) for a, k in ((baseline, "b"), (candidate, "c"))]
    return ABReport(baseline=arms[0], candidate=arms[1], rounds=rounds, n_pairs=len(b_arr),
                    diff_points=diff, diff_ci_points=[100 * x for x in boot["ci"]], cohens_d=d,
                    ttest=ttest, mcnemar=mc, threshold=threshold, winner=winner, per_round_diff=per_round,
                    sentence=_sentence(baseline.name, candidate.name, diff, [100 * x for x in boot["ci"]],
                                       mc["p"], winner, threshold))


def _rounds(rounds: int, progress: bool):
    if not progress:
        return range(rounds)
    from tqdm.auto import tqdm

    return tqdm(range(rounds), desc="A/B rounds", unit="round")


def _arm_summary(name: str, per_round: list[float]) -> dict:
    std = float(np.std(per_round, ddof=1)) if len(per_round) > 1 else 0.0
    return {"name": name, "per_round": per_round, "mean": float(np.mean(per_round)), "std": std}


def _winner(diff: float, p: float, threshold: float, alpha: float) -> str:
    if p < alpha and diff > threshold:
        return "candidate"
    if p < alpha and diff < -threshold:
        return "baseline"
    return "tie"


def _sentence(b: str, c: str, diff: float, ci: list[float], p: float, winner: str, threshold: float) -> str:
    head = (f"{c} vs {b}: {diff:+.1f} points, 95% paired bootstrap interval [{ci[0]:+.1f}, {ci[1]:+.1f}] "
            f"(McNemar p={p:.3g}, threshold {threshold} points).")
    if winner == "tie":
        return head + " No clear winner."
    return head + f" Winner: {c if winner == 'candidate' else b}."
