"""Does the thinking hold beyond the test split, and did baking cost the model elsewhere?

Two measurements the pipeline makes on its final model, each against the input model:

- fresh split: accuracy with thinking on `easy_arithmetic_fresh:<seed>` (the whole easy
  range, a seed drawn at run time, nothing chosen on it), with the questions any training
  file of the run asks left out. It sits beside the test split's figure in the report so
  a template that only fits the test split's shape shows.
- general tasks (ARC-Easy, CommonsenseQA by default): the thinking model answering with
  thinking vs the input model answering directly (generated answers, paired per question),
  how often the thinking block closes, and log-likelihood accuracy (lm-eval's `acc`, paired).
  The model passes when, on every set, the paired interval of the generated-accuracy change
  reaches zero or above, the block closes on >= `min_closed` of questions, and the
  log-likelihood change's paired interval reaches zero or above.

The input model's generated answer gets its best reading (the answer slot, or the last
number of its reply as lm-eval's flexible match reads it), as in the A/B harness.
"""

from __future__ import annotations

from agent_forge.evaluation.runner import EvalResult, evaluate
from agent_forge.validation.stats import paired_gain

MIN_CLOSED = 0.95


def _best_reading(result: EvalResult) -> list[bool]:
    return [bool(r["correct"] or r["flexible"]) for r in result.per_example]


def _correct(result: EvalResult) -> list[bool]:
    return [bool(r["correct"]) for r in result.per_example]


def _loglik_correct(result: EvalResult) -> list[bool]:
    return [row["pred"] == row["gold"] for row in (result.loglik or {}).get("per_example", [])]


def compare_on(items, model, tokenizer, base_model, base_tokenizer, *, max_new_tokens: int,
               batch_size: int, loglik: bool = False) -> dict:
    """Thinking model (thinking on) vs input model (direct) on the same items, paired."""
    think = evaluate(model, tokenizer, items, thinking="on", max_new_tokens=max_new_tokens,
                     batch_size=batch_size, loglik=loglik, progress=False)
    base = evaluate(base_model, base_tokenizer, items, thinking="auto", batch_size=batch_size, loglik=loglik,
                    progress=False)  # a direct answer: inference's default budget (48 tokens, lm-eval's stops)
    closed = sum(r["closed"] for r in think.per_example) / think.n
    out = {"n": think.n, "accuracy_on": think.accuracy, "ci95_on": think.ci95,
           "per_family_on": think.per_family, "closed_rate": closed,
           "input_accuracy": sum(_best_reading(base)) / base.n,
           "gain": paired_gain(_best_reading(base), _correct(think)),
           "ms_per_example_on": think.ms_per_example}
    if loglik and think.loglik and base.loglik:
        out["loglik"] = {"input_acc": base.loglik["acc"], "acc": think.loglik["acc"],
                         "gain": paired_gain(_loglik_correct(base), _loglik_correct(think))}
    return out


def general_verdict(per_set: dict[str, dict], min_closed: float = MIN_CLOSED) -> dict:
    """Pass/fail per set and overall, with the reasons a set fails."""
    reasons = []
    for name, r in per_set.items():
        hi = r["gain"]["ci95_points"][1]
        if hi < 0:
            reasons.append(f"{name}: answers worse than the input model "
                           f"({r['gain']['points']:+.1f} points, interval ends at {hi:+.1f})")
        if r["closed_rate"] < min_closed:
            reasons.append(f"{name}: thinking closed on {100 * r['closed_rate']:.0f}% (< {100 * min_closed:.0f}%)")
        ll = (r.get("loglik") or {}).get("gain")
        if ll and ll["ci95_points"][1] < 0:
            reasons.append(f"{name}: log-likelihood accuracy fell ({ll['points']:+.1f} points)")
    return {"passed": not reasons, "reasons": reasons, "min_closed": min_closed}
