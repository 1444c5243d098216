"""Phase handoffs: is this model fit to be the next phase's input?

Each validator runs named checks and keeps going after a failure, so one report lists
everything that is wrong. A check is an error (blocks the handoff) or a warning (worth
reading, does not block): a plain HF model with no forge_meta.json is a fine Phase 3
input, it just has no recorded fitness gain.

2 -> 3: the model loads, is a causal LM whose forward pass gives finite logits for every
token, and (when recorded) its metrics.fitness_gain meets the threshold.
3 -> 4: forge_meta.json exists, the model passes the same forward check, every thinking
token of its vocabulary is in the tokenizer with the recorded id and an embedding row,
metrics.baking_accuracy meets the threshold, and metrics.anti_theater_passed is true.
Fractions are in [0, 1].
4 -> out: the BitNet export's checks, in agent_forge/bitnet/export_check.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from agent_forge.vocab import ThinkingVocab, get_vocab

META_FILE = "forge_meta.json"
PROBE_TEXT = "Question: What is 2 + 3?\nAnswer:"


@dataclass
class Check:
    name: str
    ok: bool
    value: Any = None
    threshold: Any = None
    message: str = ""
    severity: str = "error"  # "error" blocks the handoff; "warning" does not


@dataclass
class HandoffResult:
    transition: str
    model: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.severity == "error")

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.severity == "error"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.severity == "warning"]

    def to_dict(self) -> dict:
        return {"transition": self.transition, "model": self.model, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks]}


# ---------------------------------------------------------------------------------------
# Shared checks


def short_error(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _load(spec: str):
    """(model, tokenizer) on CPU through the project's loader, or plain transformers."""
    try:
        from agent_forge.models import load_model
    except ImportError:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(spec).eval(), AutoTokenizer.from_pretrained(spec)
    return load_model(spec, device="cpu")


def read_meta(spec: str, checks: list[Check], missing_severity: str, missing_message: str) -> dict | None:
    """forge_meta.json of a model directory, recording a "metadata" check; None when absent or broken."""
    path = Path(spec).expanduser() / META_FILE
    if not path.is_file():
        checks.append(Check("metadata", False, severity=missing_severity, message=missing_message))
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("top level is not an object")
    except ValueError as exc:
        checks.append(Check("metadata", False, message=f"{path} is unreadable: {short_error(exc)}"))
        return None
    checks.append(Check("metadata", True, message=f"{META_FILE} present"))
    return meta


def _check_loads(spec: str, checks: list[Check]):
    try:
        model, tokenizer = _load(spec)
    except Exception as exc:  # noqa: BLE001 - any loading failure is a failed check
        checks.append(Check("loads", False, message=f"cannot load {spec}: {short_error(exc)}"))
        return None, None
    n = sum(p.numel() for p in model.parameters())
    checks.append(Check("loads", True, value=n, message=f"{type(model).__name__}, {n / 1e6:.2f}M parameters"))
    return model, tokenizer


def check_causal_lm(model, tokenizer, checks: list[Check]) -> None:
    """A real forward pass: logits over the whole tokenizer vocabulary, all finite."""
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"][:, :32]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("causal_lm", False, message=f"forward pass failed: {short_error(exc)}"))
        return
    want = (1, ids.shape[1])
    if logits.dim() != 3 or tuple(logits.shape[:2]) != want or logits.shape[-1] < len(tokenizer):
        checks.append(Check("causal_lm", False, value=list(logits.shape), message=(
            f"logits shape {list(logits.shape)} is not [1, {want[1]}, >= {len(tokenizer)} tokens]: "
            "not a causal LM head covering the tokenizer")))
    elif not torch.isfinite(logits).all():
        checks.append(Check("causal_lm", False, message="forward pass gives NaN/inf logits"))
    else:
        checks.append(Check("causal_lm", True, value=list(logits.shape),
                            message=f"next-token logits over {logits.shape[-1]} ids, all finite"))


def check_phase(meta: dict, expected: int, checks: list[Check], severity: str = "warning") -> None:
    phase = meta.get("phase")
    ok = phase == expected
    message = f"forge_meta phase is {phase}" + ("" if ok else f", expected {expected}")
    checks.append(Check("phase", ok, value=phase, threshold=expected, message=message, severity=severity))


def required_meta(spec: str, checks: list[Check], phase: int, missing: str, phase_severity: str = "warning") -> dict:
    """forge_meta.json that must exist (an error if not), its phase checked; {} when absent or broken."""
    meta = read_meta(spec, checks, "error", f"no {META_FILE} in {spec}: {missing}")
    if meta is None:
        return {}
    check_phase(meta, phase, checks, severity=phase_severity)
    return meta


def _check_min(metrics: dict, key: str, threshold: float, checks: list[Check], hint: str) -> None:
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        checks.append(Check(key, False, value, threshold, f"forge_meta metrics.{key} is not recorded ({value!r})"))
    elif value > 1.0 >= threshold:
        checks.append(Check(key, False, value, threshold,
                            f"metrics.{key} = {value} looks like a percentage; record a fraction in [0, 1]"))
    elif value < threshold:
        checks.append(Check(key, False, value, threshold, f"{value:.4f} < required {threshold:.4f}: {hint}"))
    else:
        checks.append(Check(key, True, value, threshold, f"{value:.4f} >= {threshold:.4f}"))


# ---------------------------------------------------------------------------------------
# Phase 2 -> 3


def validate_phase2_to_3(model_dir_or_spec: str | Path, min_fitness_gain: float | None = None) -> HandoffResult:
    """Can this model enter Phase 3? Needs no metadata; checks fitness gain when given one."""
    spec = str(model_dir_or_spec)
    result = HandoffResult("2->3", spec)
    checks = result.checks
    model, tokenizer = _check_loads(spec, checks)
    if model is not None:
        check_causal_lm(model, tokenizer, checks)
    meta = read_meta(spec, checks, "warning", f"no {META_FILE}: a plain HF model, so no Phase 2 fitness "
                     "gain to check")
    if meta is None:
        return result
    check_phase(meta, 2, checks)
    metrics = meta.get("metrics") or {}
    if min_fitness_gain is not None:
        _check_min(metrics, "fitness_gain", min_fitness_gain, checks, "the merge did not beat its parents enough")
    elif "fitness_gain" in metrics:
        checks.append(Check("fitness_gain", True, metrics["fitness_gain"], None, "recorded; no threshold asked"))
    return result


# ---------------------------------------------------------------------------------------
# Phase 3 -> 4


def check_thinking_tokens(meta: dict, model, tokenizer, checks: list[Check]) -> None:
    vocab = ThinkingVocab.from_dict(meta["vocab"]) if meta.get("vocab") else get_vocab("default")
    known = tokenizer.get_vocab()
    missing = [t for t in vocab.tokens if t not in known]
    recorded = meta.get("thinking_tokens") or {}
    moved = [f"{t} {recorded[t]}->{known[t]}" for t in vocab.tokens if t in known and t in recorded
             and recorded[t] != known[t]]
    if missing:
        message = f"tokenizer lacks {len(missing)} of {len(vocab.tokens)} thinking tokens: {' '.join(missing)}"
    elif moved:
        message = f"token ids differ from forge_meta.thinking_tokens: {', '.join(moved)}"
    else:
        message = f"all {len(vocab.tokens)} thinking tokens present with their recorded ids"
    checks.append(Check("thinking_tokens", not missing and not moved, len(vocab.tokens) - len(missing),
                        len(vocab.tokens), message))
    if missing:
        return
    rows = min(model.get_input_embeddings().weight.shape[0],
               getattr(model.get_output_embeddings(), "out_features", float("inf")))
    top = max(known[t] for t in vocab.tokens)
    checks.append(Check("token_embeddings", top < rows, top, rows, (
        f"highest thinking-token id {top} {'<' if top < rows else '>='} {rows} embedding rows")))


def validate_phase3_to_4(model_dir: str | Path, min_baking_accuracy: float = 0.85,
                         require_anti_theater: bool = True) -> HandoffResult:
    """Is this Phase 3 output ready for BitNet? Needs forge_meta.json from Phase 3."""
    spec = str(model_dir)
    result = HandoffResult("3->4", spec)
    checks = result.checks
    meta = required_meta(spec, checks, 3, "not a Phase 3 output (save it with agent_forge.models.save_model)")
    model, tokenizer = _check_loads(spec, checks)
    if model is not None:
        check_causal_lm(model, tokenizer, checks)
        check_thinking_tokens(meta, model, tokenizer, checks)
    metrics = meta.get("metrics") or {}
    _check_min(metrics, "baking_accuracy", min_baking_accuracy, checks,
               "Step 1 baking has not converged; bake longer or with more data")
    passed = metrics.get("anti_theater_passed")
    if not require_anti_theater:
        checks.append(Check("anti_theater_passed", True, passed, True, "not required for this handoff"))
    else:
        ok = passed is True
        message = "anti-theater tests passed" if ok else (
            "anti-theater tests not recorded" if passed is None else
            "anti-theater tests FAILED: the thoughts do not help; roll back to the baked model")
        checks.append(Check("anti_theater_passed", ok, passed, True, message))
    general = metrics.get("general_passed")
    if general is not None:
        checks.append(Check("general_no_regression", general is True, general, True,
                            "no regression on general tasks (ARC-Easy, CommonsenseQA) vs the input model"
                            if general else "the model answers general questions worse than the input "
                            "model, or its thinking does not close there: see the report's general rows"))
    return result


# ---------------------------------------------------------------------------------------
# Reporting


def format_result(result: HandoffResult) -> str:
    """A plain-text report: one line per check, PASS / FAIL / WARN first."""
    verdict = "PASSED" if result.ok else f"FAILED ({len(result.failures)} failing)"
    lines = [f"Phase {result.transition.replace('->', ' -> ')} handoff for {result.model}: {verdict}"]
    width = max((len(c.name) for c in result.checks), default=0)
    for c in result.checks:
        tag = "PASS" if c.ok else ("WARN" if c.severity == "warning" else "FAIL")
        lines.append(f"  {tag}  {c.name:<{width}}  {c.message}")
    return "\n".join(lines)


def record_handoff(registry, model_id: int, result: HandoffResult) -> None:
    """Store the verdict and the full report on the model's registry row."""
    registry.update_handoff(model_id, "passed" if result.ok else "failed", result.to_dict())
