"""Export a converted model to the Hugging Face transformers BitNet format, and size it on disk.

The directory loads with plain `AutoModelForCausalLM.from_pretrained`: config.json carries a
`quantization_config` (quant_method "bitnet", linear_class "bitlinear", offline), and every
BitLinear is stored as transformers' BitLinear expects it: `weight` ternary packed four to a
byte (uint8, out/4 x in), `weight_scale` (1,) = 1 / gamma (its forward divides by it), bias,
and `rms_norm.weight`. The kept weight matrices (embeddings, an untied head, linears left in
full precision) can be stored in bfloat16, or in one byte as float8_e4m3fn: they are most of a
small model's bytes once the linears are packed. Round the in-memory model first
(`round_kept_matrices`) so that what is evaluated is what is stored; the loader upcasts them
to the config's float32 and reproduces the logits exactly. Everything
else (norms, biases, scales) is stored as is, a tied head once.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from agent_forge import __version__
from agent_forge.bitnet.bitlinear import BitLinear
from agent_forge.bitnet.convert import BitNetError, bitlinears
from agent_forge.bitnet.quantize import pack_ternary
from agent_forge.models import META_FILE, _swap_into_place, safetensors_header

WEIGHTS_FILE = "model.safetensors"
# Dtypes the kept matrices can be stored in. float8_e4m3fn: one byte, 3 mantissa bits, no
# scale (a plain loader has nowhere to read one from); on the default model's embedding its
# rounding error is 2.6% of the norm (bfloat16: 0.14%), see README "BitNet" for its cost.
STORE_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn")


def save_hf_bitnet(model, tokenizer, out_dir: str | Path, meta: dict | None = None,
                   store_dtype: str | None = None) -> Path:
    """Write `model` (converted, any strength: the export is the fully ternary model) as an HF
    BitNet directory plus forge_meta.json; atomic (a crash leaves the old dir or none).

    store_dtype (STORE_DTYPES; None: as in memory) for the kept weight matrices;
    refused unless the model already holds values of that dtype (round_kept_matrices)."""
    layers = bitlinears(model)
    if store_dtype is not None:
        _check_rounded(model, _dtype(store_dtype))
    kept = _check_exportable(model, layers)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_weights(model, layers, tmp / WEIGHTS_FILE, store_dtype)
        _export_config(model, layers, kept).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        full = {"forge_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
        (tmp / META_FILE).write_text(json.dumps(full, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_into_place(tmp, out)
    return out


# ---------------------------------------------------------------------------------------
# What transformers will rebuild on load, checked before anything is written


def _check_exportable(model, layers: list[tuple[str, BitLinear]]) -> list[str]:
    """Refuse what transformers' bitnet loader cannot rebuild; return the kept nn.Linear names.

    The loader builds the model from its config and swaps in BitLinear for every nn.Linear
    not listed in modules_to_not_convert, so our BitLinears must be exactly those layers."""
    from transformers.pytorch_utils import Conv1D

    name = type(model).__name__
    if not layers:
        raise BitNetError(f"{name} has no BitLinear layers; convert it before exporting")
    skeleton = _skeleton(model)
    conv1d = [n for n, m in skeleton.named_modules() if isinstance(m, Conv1D)]
    if conv1d:
        raise BitNetError(f"{name} uses GPT-2 style Conv1D layers ({conv1d[0]}, ...), which transformers' "
                          "bitnet loader does not convert (it converts nn.Linear only); cannot export")
    odd = [n for n, m in layers if m.out_features % 4]
    if odd:
        raise BitNetError(f"{odd[0]}: out_features {dict(layers)[odd[0]].out_features} is not a multiple of 4, "
                          "which transformers' packed BitLinear requires")
    ours = {n for n, _ in layers}
    linears = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
    if not ours <= set(linears):
        extra = sorted(ours - set(linears))
        raise BitNetError(f"{extra[0]} is not an nn.Linear in a freshly built {name}; cannot export")
    kept = [n for n in linears if n not in ours]
    _check_loader_agrees(model, linears, ours, kept)
    return kept


def _skeleton(model) -> nn.Module:
    """The model transformers builds from the config, on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return type(model)._from_config(copy.deepcopy(model.config))


def _check_loader_agrees(model, linears: list[str], ours: set[str], kept: list[str]) -> None:
    """Replay transformers' name matching (patterns, suffixes) on our modules_to_not_convert."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # an older or newer transformers: exact names are all we can rely on
        return
    skips = kept + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    wrong = [n for n in linears if should_convert_module(n, skips) != (n in ours)]
    if wrong:
        raise BitNetError(f"{wrong[0]}: transformers' bitnet loader would treat this layer differently "
                          "from the model being exported; cannot export")


def _export_config(model, layers: list[tuple[str, BitLinear]], kept: list[str]):
    """The model config with the bitnet quantization_config, as save_pretrained would write it."""
    config = copy.deepcopy(model.config)
    norms = [m.rms_norm for _, m in layers]
    use_rms_norm = norms[0] is not None
    if any((n is not None) != use_rms_norm for n in norms):
        raise BitNetError("every BitLinear must have an rms_norm, or none: transformers stores one setting")
    eps = norms[0].eps if use_rms_norm else 1e-6
    if use_rms_norm and any(n.eps != eps for n in norms):
        raise BitNetError("every BitLinear rms_norm must use the same eps: transformers stores one setting")
    config.quantization_config = {
        "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
        "use_rms_norm": use_rms_norm, "rms_norm_eps": eps, "modules_to_not_convert": kept,
    }
    config.architectures = [type(model).__name__]
    config.dtype = str(layers[0][1].weight.dtype).removeprefix("torch.")
    return config


# ---------------------------------------------------------------------------------------
# Weights


def _dtype(name: str) -> torch.dtype:
    if name not in STORE_DTYPES:
        raise BitNetError(f"store_dtype {name!r}: choose one of {', '.join(STORE_DTYPES)}")
    return getattr(torch, name)


def kept_matrices(model) -> dict[str, nn.Parameter]:
    """The full-precision weight matrices (2-D or more, floating) outside the BitLinears, by
    every name they have (a tied head under both)."""
    ternary_owned = {f"{n}." for n, _ in bitlinears(model)}
    return {name: p for name, p in model.named_parameters(remove_duplicate=False)
            if p.dim() >= 2 and p.is_floating_point() and not any(name.startswith(t) for t in ternary_owned)}


@torch.no_grad()
def round_kept_matrices(model, store_dtype: str | None, names: set[str] | None = None) -> int:
    """Round the kept matrices in place to `store_dtype` values (held in their own dtype), so
    the model in memory is the model save_hf_bitnet(store_dtype=...) writes; returns how many.
    names: round these parameters instead (a full-precision model rounded as its converted
    copy would be, to measure what the storage alone costs)."""
    if store_dtype is None:
        return 0
    dtype, seen = _dtype(store_dtype), set()
    params = kept_matrices(model) if names is None else {
        n: p for n, p in model.named_parameters(remove_duplicate=False) if n in names}
    for p in params.values():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            p.copy_(p.to(dtype).to(p.dtype))
    return len(seen)


def _check_rounded(model, dtype: torch.dtype) -> None:
    for name, p in kept_matrices(model).items():
        if not torch.equal(p.detach().to(dtype).to(p.dtype), p.detach()):
            raise BitNetError(f"{name} holds values a {str(dtype)[6:]} file cannot store exactly; "
                              "call round_kept_matrices first, so what is evaluated is what is saved")


@torch.no_grad()
def _write_weights(model, layers: list[tuple[str, BitLinear]], path: Path, store_dtype: str | None = None) -> None:
    """model.safetensors: packed BitLinears, kept matrices in store_dtype, every other tensor
    as is, tied weights once."""
    from safetensors.torch import save_file

    state = dict(model.state_dict())
    for name, layer in layers:
        q, gamma = layer.ternary()
        state[f"{name}.weight"] = pack_ternary(q)
        state[f"{name}.weight_scale"] = (1.0 / gamma).reshape(1).to(layer.weight.dtype)
    state = _drop_tied(state, model)
    if store_dtype is not None:
        for name in kept_matrices(model):
            if name in state:
                state[name] = state[name].to(_dtype(store_dtype))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _tied_names(model) -> set[str]:
    """Names transformers re-ties on load (the tied copies, e.g. lm_head.weight)."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied)


def _drop_tied(state: dict, model) -> dict:
    """Keep one tensor per shared storage, as save_pretrained does: the tied copies go (the
    loader ties them back); other accidental aliases are stored as separate copies."""
    tied = _tied_names(model)
    groups = defaultdict(list)
    for name, tensor in state.items():
        groups[(tensor.device, tensor.untyped_storage().data_ptr())].append(name)
    for names in groups.values():
        if len(names) < 2:
            continue
        dropped = [n for n in names if any(n == t or re.fullmatch(t, n) for t in tied)]
        if len(dropped) == len(names):
            dropped = dropped[1:]
        for n in dropped:
            del state[n]
        for n in [n for n in names if n not in dropped][1:]:
            state[n] = state[n].clone()
    return state


# ---------------------------------------------------------------------------------------
# Sizes


def _component(name: str, packed: set[str]) -> str:
    """Which part of the model a stored tensor belongs to, by its name."""
    parts = name.split(".")
    owner = name.rsplit(".", 1)[0]
    if owner in packed and parts[-1] in ("weight", "weight_scale"):
        return "packed_linears"
    if any("embed" in p or p in ("wte", "wpe") for p in parts):
        return "embeddings"
    if any("norm" in p or re.fullmatch(r"ln(_\w+)?", p) for p in parts[:-1]):
        return "norms"
    if "lm_head" in parts:
        return "head"
    return "other"


def disk_sizes(model_dir: str | Path) -> dict:
    """Bytes per component of the stored weights, read from the safetensors headers only."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise BitNetError(f"{model_dir}: no .safetensors weights found")
    entries = {}
    for f in files:
        entries.update(safetensors_header(f)[0])
    packed = {k.rsplit(".", 1)[0] for k, v in entries.items() if k.endswith(".weight") and v["dtype"] == "U8"}
    sizes = dict.fromkeys(("packed_linears", "embeddings", "norms", "head", "other"), 0)
    for name, info in entries.items():
        start, end = info["data_offsets"]
        sizes[_component(name, packed)] += end - start
    sizes["total"] = sum(sizes.values())
    return sizes


def compression(sizes: dict, n_params_original: int) -> dict:
    """How much smaller the export is than the original at 4 (fp32) and 2 (bf16) bytes per
    parameter; count tied weights once in n_params_original (models.measure_model does)."""
    total = int(sizes["total"])
    if n_params_original <= 0 or total <= 0:
        raise BitNetError("compression needs a positive parameter count and stored size")
    fp32, bf16 = 4 * n_params_original, 2 * n_params_original
    return {"fp32_bytes": fp32, "bf16_bytes": bf16, "ratio_vs_fp32": fp32 / total, "ratio_vs_bf16": bf16 / total}


def eager():
    """A context in which transformers' BitLinear runs uncompiled. Its unpacking and
    activation quantisation are torch.compile'd: on a CPU the first call compiles for tens of
    seconds (and again for each new shape), and the compiled decode measured slower than the
    eager one on a toy model. Same Python code, same logits."""
    return torch.compiler.set_stance("force_eager")


def load_plain(model_dir: str | Path):
    """The saved directory through plain `AutoModelForCausalLM.from_pretrained`, as any user
    loads it (transformers' own BitNet quantizer unpacks the weights); eval mode, CPU."""
    from transformers import AutoModelForCausalLM

    with eager():
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()
