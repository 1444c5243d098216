"""Token-level Step 2's held-out evaluation: greedy accuracy on evaluation questions before
training, after it with the trained head's silent thoughts, and after it without them,
paired on the same questions (what the thoughts add, and what Step 2 changed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent_forge.quietstar.token_rl import TokenRLConfig


def eval_items(eval_data: str | None, limit: int) -> list:
    if not eval_data:
        return []
    from agent_forge.data.evalsets import load_eval_set

    return load_eval_set(eval_data, limit=limit)


def eval_pass(model, tokenizer, items: list, cfg: "TokenRLConfig", model_dir) -> dict | None:
    """Thinking-on accuracy on `items`; with the silent thoughts of the head in `model_dir` if given."""
    if not items:
        return None
    from agent_forge.evaluation.runner import evaluate

    mode = cfg.eval_thought_positions if model_dir is not None else None
    res = evaluate(model, tokenizer, items, thinking="on", max_new_tokens=cfg.eval_max_new_tokens,
                   loglik=False, progress=False, thought_mode=mode, model_dir=str(model_dir) if mode else None)
    return {"accuracy": res.accuracy, "ci95": res.ci95, "n": res.n, "ms_per_example": res.ms_per_example,
            "thought_positions": mode or "none", "correct": [bool(r["correct"]) for r in res.per_example]}


def held_out_eval(model, tokenizer, items: list, cfg: "TokenRLConfig", model_dir: Path, before: dict) -> dict:
    """The trained model with its silent thoughts against itself without them (what the thoughts
    add) and against the model before training (what Step 2 changed), paired on the same items.
    `before` used the input model's head if it had one, else plain decoding (a fresh head's
    zero mixing weight makes thoughts change nothing)."""
    from agent_forge.validation.stats import paired_gain

    after = eval_pass(model, tokenizer, items, cfg, model_dir)
    plain = eval_pass(model, tokenizer, items, cfg, None)
    ok = {k: v.pop("correct") for k, v in (("before", before), ("after", after), ("plain", plain))}
    return {"n": len(items), "before": before, "after": after, "after_no_thoughts": plain,
            "gain_vs_before": paired_gain(ok["before"], ok["after"]),
            "gain_vs_no_thoughts": paired_gain(ok["plain"], ok["after"])}
