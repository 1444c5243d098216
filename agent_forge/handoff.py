"""Phase handoffs: is this model fit to be the next phase's input?

Each validator runs named checks and keeps going after a failure, so one report lists
everything that is wrong. A check is an error (blocks the handoff) or a warning (worth
reading, does not block): a plain HF model with no forge_meta.json is a fine Phase 3
input, it just has no recorded fitness gain.

2 -> 3: the model loads, is a causal LM whose forward pass gives finite logits for every
token, and (when recorded) its metrics.fitness_gain meets the threshold.
3 -> 4: forge_meta.json exists, the model passes the same forward check, every thinking token of its vocabulary is in the tokenizer
with the recorded id and an embedding row, metrics.baking_accuracy meets the threshold,
and metrics.anti_theater_passed is true. Fractions are in [0, 1].
4 -> out: the Phase 4 (BitNet) output must be usable by anyone with plain transformers:
forge_meta.json says phase 4 (an error here, unlike the earlier phase warnings: any other
phase is not a BitNet export); config.json has quantization_config.quant_method "bitnet";
every packed uint8 weight in the safetensors file(s) holds only ternary codes (each of a
byte's four 2-bit fields is value+1 in {0, 1, 2}; code 3 would decode to +2); the directory
loads with AutoModelForCausalLM / AutoTokenizer (not the project loader), and every
BitLinear layer that builds gets a uint8 packed weight and a weight_scale from the file
(transformers only warns about a missing one and leaves it uninitialised memory); it gives
finite logits; the thinking tokens recorded in the metadata are in the tokenizer; and, when
the export's reported numbers are given, the weight file size matches total_bytes and the
compression ratios (original fp32 / bf16 bytes, from meta.bitnet.original_params, over that
size) match within 1%; the size may be taken on disk or without the safetensors header.
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


def _short(exc: Exception) -> str:
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


def _read_meta(spec: str, checks: list[Check], missing_severity: str, missing_message: str) -> dict | None:
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
        checks.append(Check("metadata", False, message=f"{path} is unreadable: {_short(exc)}"))
        return None
    checks.append(Check("metadata", True, message=f"{META_FILE} present"))
    return meta


def _check_loads(spec: str, checks: list[Check]):
    try:
        model, tokenizer = _load(spec)
    except Exception as exc:  # noqa: BLE001 - any loading failure is a failed check
        checks.append(Check("loads", False, message=f"cannot load {spec}: {_short(exc)}"))
        return None, None
    n = sum(p.numel() for p in model.parameters())
    checks.append(Check("loads", True, value=n, message=f"{type(model).__name__}, {n / 1e6:.2f}M parameters"))
    return model, tokenizer


def _check_causal_lm(model, tokenizer, checks: list[Check]) -> None:
    """A real forward pass: logits over the whole tokenizer vocabulary, all finite."""
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"][:, :32]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("causal_lm", False, message=f"forward pass failed: {_short(exc)}"))
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


def _check_phase(meta: dict, expected: int, checks: list[Check], severity: str = "warning") -> None:
    phase = meta.get("phase")
    ok = phase == expected
    message = f"forge_meta phase is {phase}" + ("" if ok else f", expected {expected}")
    checks.append(Check("phase", ok, value=phase, threshold=expected, message=message, severity=severity))


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
        _check_causal_lm(model, tokenizer, checks)
    meta = _read_meta(spec, checks, "warning", f"no {META_FILE}: a plain HF model, so no Phase 2 fitness "
                      "gain to check")
    if meta is None:
        return result
    _check_phase(meta, 2, checks)
    metrics = meta.get("metrics") or {}
    if min_fitness_gain is not None:
        _check_min(metrics, "fitness_gain", min_fitness_gain, checks, "the merge did not beat its parents enough")
    elif "fitness_gain" in metrics:
        checks.append(Check("fitness_gain", True, metrics["fitness_gain"], None, "recorded; no threshold asked"))
    return result


# ---------------------------------------------------------------------------------------
# Phase 3 -> 4


def _check_thinking_tokens(meta: dict, model, tokenizer, checks: list[Check]) -> None:
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
    meta = _read_meta(spec, checks, "error", f"no {META_FILE} in {spec}: not a Phase 3 output "
                      "(save it with agent_forge.models.save_model)")
    if meta is None:
        meta = {}
    else:
        _check_phase(meta, 3, checks)
    model, tokenizer = _check_loads(spec, checks)
    if model is not None:
        _check_causal_lm(model, tokenizer, checks)
        _check_thinking_tokens(meta, model, tokenizer, checks)
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
# Phase 4 -> out (BitNet export)


BITNET_LAYER_CLASSES = ("BitLinear", "AutoBitLinear")


def _weight_files(path: Path) -> list[Path]:
    """The model's safetensors file(s): model.safetensors, or the shards its index names."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            return []
        return [path / n for n in names if (path / n).is_file()]
    return []


def _check_bitnet_config(path: Path, checks: list[Check]) -> dict:
    """config.json's quantization_config must name the bitnet method; returns it ({} if not)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        checks.append(Check("bitnet_config", False, message=f"cannot read config.json: {_short(exc)}"))
        return {}
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "bitnet":
        message = ("config.json has no quantization_config: not a BitNet model (a plain full-precision "
                   "save_pretrained?); export it with agent_forge.bitnet" if qc is None else
                   f"quantization_config.quant_method is {method!r}, not 'bitnet'")
        checks.append(Check("bitnet_config", False, method, "bitnet", message))
        return {}
    checks.append(Check("bitnet_config", True, method, "bitnet", (
        f"quant_method bitnet, linear_class {qc.get('linear_class', 'bitlinear')}, "
        f"quantization_mode {qc.get('quantization_mode', 'offline')}, use_rms_norm {qc.get('use_rms_norm', False)}")))
    return qc


def _packed_tensors(files: list[Path]) -> dict[str, tuple[Path, str]]:
    """{tensor name: (file, dtype name)} over the weight files, read from the headers only."""
    from safetensors import safe_open

    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                found[key] = (file, str(f.get_slice(key).get_dtype()))
    return found


def _check_ternary(files: list[Path], tensors: dict[str, tuple[Path, str]], checks: list[Check]) -> None:
    """Every uint8 `.weight` holds four 2-bit fields per byte, each value+1 in {0, 1, 2}."""
    from safetensors import safe_open

    packed = {k for k, (_, dtype) in tensors.items() if k.endswith(".weight") and dtype == "U8"}
    if not files:
        checks.append(Check("ternary_weights", False, message="no model.safetensors (or index of shards) found"))
        return
    if not packed:
        checks.append(Check("ternary_weights", False, 0, message=(
            "no packed uint8 weights in the safetensors file(s): the linear layers were not converted")))
        return
    bad: dict[str, int] = {}
    n_bytes = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key not in packed:
                    continue
                raw = f.get_tensor(key)
                n_bytes += raw.numel()
                # a field equal to 3 (both bits set) is the code for +2: never a ternary value
                code3 = torch.zeros_like(raw, dtype=torch.bool)
                for shift in (0, 2, 4, 6):
                    code3 |= ((raw >> shift) & 3) == 3
                if code3.any():
                    bad[key] = int(code3.sum())
    if bad:
        first = next(iter(bad))
        checks.append(Check("ternary_weights", False, len(bad), 0, (
            f"{sum(bad.values())} bytes in {len(bad)} of {len(packed)} packed weights hold the 2-bit code 3 "
            f"(+2, not ternary), first {first} ({bad[first]} bytes)")))
    else:
        checks.append(Check("ternary_weights", True, len(packed), None,
                            f"{len(packed)} packed weights ({n_bytes} bytes) hold only {{-1, 0, +1}}"))


def _load_plain(spec: str, checks: list[Check]):
    """(model, tokenizer, loading info) through plain transformers, as a user of the export loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model, info = AutoModelForCausalLM.from_pretrained(spec, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except Exception as exc:  # noqa: BLE001 - any loading failure is a failed check
        checks.append(Check("loads", False, message=f"plain transformers cannot load {spec}: {_short(exc)}"))
        return None, None, {}
    model.eval()
    layers = [n for n, m in model.named_modules() if type(m).__name__ in BITNET_LAYER_CLASSES]
    checks.append(Check("loads", True, len(layers), message=(
        f"AutoModelForCausalLM: {type(model).__name__} with {len(layers)} BitNet linear layers")))
    return model, tokenizer, info


def _check_packed_layers(model, info: dict, tensors: dict[str, tuple[Path, str]], checks: list[Check]) -> None:
    """Every BitLinear layer transformers built has its packed weight and scale in the file.

    transformers only warns about a buffer missing from the checkpoint and leaves it as
    uninitialised memory (a weight_scale of 5e-33 or -1e12, different each load), so the
    load itself succeeding proves little.
    """
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ in BITNET_LAYER_CLASSES]
    problems = []
    if not layers:
        problems.append("the loaded model has no BitLinear layers")
    for name, module in layers:
        weight = tensors.get(f"{name}.weight")
        if weight is None:
            problems.append(f"{name}.weight missing")
        elif type(module).__name__ == "BitLinear" and weight[1] != "U8":
            problems.append(f"{name}.weight is {weight[1]}, not packed uint8")
        if type(module).__name__ == "BitLinear" and f"{name}.weight_scale" not in tensors:
            problems.append(f"{name}.weight_scale missing")
    missing = sorted(info.get("missing_keys") or [])
    problems += [f"{k} not in the checkpoint" for k in missing if not any(k.startswith(n + ".") for n, _ in layers)]
    if problems:
        n = len(problems)
        checks.append(Check("packed_layers", False, n, 0,
                            f"{n} problem{'s' if n > 1 else ''}: " + "; ".join(problems[:5])))
    else:
        checks.append(Check("packed_layers", True, len(layers), None,
                            f"all {len(layers)} BitLinear layers have a packed weight and a scale"))


def _within(actual: float, expected: float, rel: float) -> bool:
    return abs(actual - expected) <= rel * abs(expected)


def _stored_bytes(files: list[Path]) -> tuple[int, int]:
    """(bytes on disk, tensor-data bytes: the same minus each file's 8-byte length and JSON header).

    An export may report either: the header is a few KB, nothing for a real model but over 1%
    of a toy one, so both are accepted as "the size".
    """
    on_disk = data = 0
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
        on_disk += size
        data += max(size - 8 - header, 0)
    return on_disk, data


def _check_reported(meta: dict, files: list[Path], reported: dict, checks: list[Check],
                    rel: float = 0.01) -> None:
    """The export's reported size and compression ratios against the file(s) on disk."""
    on_disk, data = _stored_bytes(files)
    keys = [k for k in ("total_bytes", "ratio_vs_fp32", "ratio_vs_bf16") if k in reported]
    if not keys:
        checks.append(Check("reported", False, sorted(reported), message=(
            "reported has none of total_bytes, ratio_vs_fp32, ratio_vs_bf16")))
        return
    where = f"{on_disk} B on disk ({data} B of tensor data)"
    if "total_bytes" in keys:
        value = reported["total_bytes"]
        ok = on_disk > 0 and isinstance(value, (int, float)) and (
            _within(value, on_disk, rel) or _within(value, data, rel))
        checks.append(Check("total_bytes", ok, value, on_disk, (
            f"reported {value} B, {where}" + ("" if ok else f": differs from both by more than {rel:.0%}"))))
    original = (meta.get("bitnet") or {}).get("original_params")
    for key, bytes_per_param in (("ratio_vs_fp32", 4), ("ratio_vs_bf16", 2)):
        if key not in keys:
            continue
        value = reported[key]
        if not isinstance(original, int) or original <= 0 or data <= 0:
            checks.append(Check(key, False, value, None, (
                f"cannot recompute: forge_meta bitnet.original_params is {original!r}, {where}")))
            continue
        original_bytes = original * bytes_per_param
        expected = original_bytes / on_disk
        ok = isinstance(value, (int, float)) and (_within(value, expected, rel)
                                                  or _within(value, original_bytes / data, rel))
        checks.append(Check(key, ok, value, round(expected, 4), (
            f"reported {value}, recomputed {expected:.4f} ({original} params x {bytes_per_param} B / "
            f"{on_disk} B; {original_bytes / data:.4f} over tensor data only)"
            + ("" if ok else f": differs from both by more than {rel:.0%}"))))


def validate_phase4(model_dir: str | Path, reported: dict | None = None) -> HandoffResult:
    """Is this Phase 4 output a valid BitNet model for plain transformers? Needs forge_meta.json.

    `reported`: the export's own numbers ({"total_bytes", "ratio_vs_fp32", "ratio_vs_bf16"},
    any subset), checked within 1% against the weight file(s): their size on disk, or their
    tensor data alone (without the safetensors header, as export.disk_sizes counts it).
    """
    spec = str(model_dir)
    path = Path(spec).expanduser()
    result = HandoffResult("4->out", spec)
    checks = result.checks
    meta = _read_meta(spec, checks, "error", f"no {META_FILE} in {spec}: not a Phase 4 output "
                      "(export it with agent_forge.bitnet)")
    if meta is None:
        meta = {}
    else:
        _check_phase(meta, 4, checks, severity="error")
    _check_bitnet_config(path, checks)
    files = _weight_files(path)
    try:
        tensors = _packed_tensors(files)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is a failed check
        checks.append(Check("ternary_weights", False, message=f"cannot read the safetensors file(s): {_short(exc)}"))
        files, tensors = [], {}
    else:
        _check_ternary(files, tensors, checks)
    # transformers' BitLinear wraps its weight unpacking and activation quantization in
    # @torch.compile. On CPU the first forward pass then compiles them with inductor: ~30 s
    # for a 2-layer toy model (a C++ toolchain needed; far longer for a real model) to run
    # one probe. force_eager runs the same Python code uncompiled, giving the same logits,
    # and the previous stance is restored on exit.
    with torch.compiler.set_stance("force_eager"):
        model, tokenizer, info = _load_plain(spec, checks)
        if model is not None:
            _check_packed_layers(model, info, tensors, checks)
            _check_causal_lm(model, tokenizer, checks)
            _check_thinking_tokens(meta, model, tokenizer, checks)
    if reported is not None:
        _check_reported(meta, files, reported, checks)
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
