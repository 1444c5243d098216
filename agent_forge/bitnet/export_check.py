"""Phase 4 -> out handoff: is a BitNet export usable by anyone with plain transformers?

Checked: forge_meta.json says phase 4 (an error here, unlike the earlier phase warnings: any other
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
from pathlib import Path

import torch

from agent_forge.handoff import Check, HandoffResult, check_causal_lm, check_thinking_tokens, required_meta, short_error


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
        checks.append(Check("bitnet_config", False, message=f"cannot read config.json: {short_error(exc)}"))
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
        checks.append(Check("loads", False, message=f"plain transformers cannot load {spec}: {short_error(exc)}"))
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
    tensor data alone (without the safetensors header, as export.disk_sizes counts it); and
    "reload_max_abs_logit_diff", the save stage's comparison of the reload with the student,
    which must be below 1e-3.
    """
    spec = str(model_dir)
    path = Path(spec).expanduser()
    result = HandoffResult("4->out", spec)
    checks = result.checks
    meta = required_meta(spec, checks, 4, "not a Phase 4 output (export it with agent_forge.bitnet)",
                         phase_severity="error")
    _check_bitnet_config(path, checks)
    files = _weight_files(path)
    try:
        tensors = _packed_tensors(files)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is a failed check
        checks.append(Check("ternary_weights", False,
                            message=f"cannot read the safetensors file(s): {short_error(exc)}"))
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
            check_causal_lm(model, tokenizer, checks)
            check_thinking_tokens(meta, model, tokenizer, checks)
    if reported is not None:
        _check_reported(meta, files, reported, checks)
        if "reload_max_abs_logit_diff" in reported:
            _check_reload(reported["reload_max_abs_logit_diff"], checks)
    return result


def _check_reload(diff, checks: list[Check], tol: float = 1e-3) -> None:
    """The export, reloaded by plain transformers, gives the logits of the model that was
    evaluated (the save stage's measurement): else the figures describe another model."""
    ok = isinstance(diff, (int, float)) and diff < tol
    shown = f"{diff:.3g}" if isinstance(diff, (int, float)) else repr(diff)
    checks.append(Check("reload_matches_student", ok, diff, tol, (
        f"max |logit difference| {shown} after reloading with plain transformers"
        + ("" if ok else f" (>= {tol:g}): the saved model is not the one the report measured"))))
