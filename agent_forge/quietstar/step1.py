"""Step 1 as a recipe: load -> data -> bake -> measure -> save. Used by `forge bake` and the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

from agent_forge.config import load_yaml, update_dataclass
from agent_forge.inference import GENERATION_BATCH
from agent_forge.quietstar.bake import Baker, BakeConfig


def split_heldout(records: list, fraction: float = 0.05, minimum: int = 32) -> tuple[list, list]:
    """The file's last records are held out for teacher-forced token accuracy."""
    n_held = min(len(records) // 2, max(minimum, int(len(records) * fraction)))
    return records[:-n_held] if n_held else records, records[-n_held:] if n_held else []


def generation_metrics(model, tokenizer, items, max_new_tokens: int, batch_size: int = GENERATION_BATCH,
                       with_off: bool = True, per_item: bool = False) -> dict:
    """Task accuracy with thinking on (and forced off unless `with_off` is False: the pipeline
    measures that on the test set anyway), token usage, and the honesty of the thoughts' checks
    (validation.check_honesty) on held-out questions.
    `per_item` adds "correct_on", one bool per question, for paired before/after comparisons."""
    from agent_forge.evaluation.runner import evaluate
    from agent_forge.validation.check_honesty import check_honesty

    on = evaluate(model, tokenizer, items, thinking="on", max_new_tokens=max_new_tokens, batch_size=batch_size)
    off = (evaluate(model, tokenizer, items, thinking="off", max_new_tokens=max_new_tokens, batch_size=batch_size)
           if with_off else None)
    honesty = check_honesty([r["thinking"] for r in on.per_example])
    return {"accuracy_thinking_on": on.accuracy, "ci95_on": on.ci95,
            "check_honesty": {k: honesty[k] for k in ("honesty_rate", "n_checks", "correction_rate",
                                                      "n_failed_checks", "n_thoughts_with_checks")},
            "accuracy_thinking_off": off and off.accuracy, "ci95_off": off and off.ci95,
            "no_answer_rate": on.no_answer_rate, "per_family_on": on.per_family,
            "usage": on.usage, "ms_per_example_on": on.ms_per_example,
            "ms_per_example_off": off and off.ms_per_example, "n": on.n,
            **({"correct_on": [bool(r["correct"]) for r in on.per_example]} if per_item else {})}


def make_config(overrides: dict | None = None, config_path: str | Path | None = None,
                base: BakeConfig | None = None) -> BakeConfig:
    cfg = base or BakeConfig()
    if config_path:
        cfg = update_dataclass(cfg, load_yaml(config_path), "bake config")
    return update_dataclass(cfg, overrides or {}, "bake config")


def run_step1(model_spec: str, data_path, out, overrides=None, config_path=None,
              eval_data: str = "easy_arithmetic", resume: bool = False, device=None,
              tracker=None, progress=None) -> dict:
    """Bake `model_spec` on the records in `data_path`; writes `out/model` and `out/step1.json`."""
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.data.overlap import filter_overlap
    from agent_forge.data.schema import read_records
    from agent_forge.models import load_model, read_meta, save_model

    cfg = make_config(overrides, config_path)
    out = Path(out)
    records = list(read_records(data_path))
    records, leaked = filter_overlap(records)
    if not records:
        raise ValueError(f"{data_path}: no usable training records")
    train, held = split_heldout(records)
    model, tokenizer = load_model(model_spec, device=device)
    baker = Baker(model, tokenizer, cfg, out, tracker=tracker)
    result = baker.run(train, held, resume=resume, progress=progress)
    if not baker.accelerator.is_main_process:  # other ranks only helped train
        return result.metrics
    model = baker.merged_model()
    items = load_eval_set(eval_data, limit=cfg.eval_samples)
    measured = generation_metrics(model, tokenizer, items, cfg.eval_max_new_tokens, with_off=cfg.eval_thinking_off)
    metrics = {**result.metrics, **measured,
               "eval_data": eval_data, "train_records": len(train), "dropped_overlap": len(leaked)}
    metrics["baking_accuracy"] = metrics["token_accuracy"]
    from agent_forge.vocab import get_vocab, thinking_token_ids

    meta = {"phase": 3, "step": 1, "parent": model_spec, "thinking_tokens": thinking_token_ids(tokenizer),
            "vocab": get_vocab("default").to_dict(), "config": cfg.to_dict(), "metrics": metrics,
            "parent_meta": read_meta(model_spec) if Path(str(model_spec)).is_dir() else {}}
    save_model(model, tokenizer, out / "model", meta)
    (out / "step1.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics
