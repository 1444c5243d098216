"""The merge engine: turn a Genome and N parent models into one model, in memory.

The search calls this hundreds of times on the same parents, so the parents' weights are
read once (ParentSet caches them) and every stage runs on tensors in memory, tensor by
tensor, with no disk round trip. Only the tensors the layer stage keeps are merged at all:
a layer a route takes from a raw parent is never interpolated.

The math comes from mergekit where it has it (SLERP, the TIES sign election); what it
lacks or does too slowly we write: chained multi-parent SLERP, a top-k trim (mergekit's
sorts the whole tensor: ~6 s for a 135M model's embedding on one core, topk ~1 s), a
seedable DARE mask with the paper's 1/density rescale (mergekit's uses the global RNG and
an L1-norm rescale), and the layer routing of frankenmerge and DFS.
"""

from __future__ import annotations

import copy
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agent_forge.evomerge.genome import Genome

# What must agree for parents' weights to line up tensor by tensor.
ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings")

_NUMBERED = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


class MergeError(ValueError):
    """Parents or a genome the engine cannot merge; the message is one line, fit for a CLI."""


# ---------------------------------------------------------------------------------------
# Parents


@dataclass
class ParentSet:
    """N >= 2 checked parent directories (and an optional common ancestor).

    Weights are loaded on first use and kept: the search merges the same parents again
    and again, and re-reading 135M parameters per candidate would dominate its time."""

    paths: list[Path]
    config: object
    """Parent 1's config; all parents share the ARCH_FIELDS values."""
    tokenizer: object
    """Parent 1's tokenizer; all parents share its vocabulary."""
    base: Path | None = None
    stream: bool = False
    """Map the weight files instead of loading them (`mapped_state`): what the memory plan
    picks when the parents do not fit in memory together."""
    _states: list | None = field(default=None, repr=False)
    _base_state: dict | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def architecture(self) -> str:
        return str(self.config.model_type)

    def states(self) -> list[dict[str, torch.Tensor]]:
        if self._states is None:
            self._states = [self._load(p) for p in self.paths]
        return self._states

    def base_state(self) -> dict[str, torch.Tensor] | None:
        if self.base is not None and self._base_state is None:
            self._base_state = self._load(self.base)
        return self._base_state

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        return mapped_state(path) if self.stream else load_state(path)


def check_parents(paths, base=None) -> ParentSet:
    """Read the parents' configs and tokenizers; refuse any that cannot be merged weight for
    weight (other shapes, other vocabulary) with one message that lists every difference."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise MergeError(f"merging needs at least 2 parents, got {len(paths)}")
    labelled = [(f"parent {i + 1} ({p})", p) for i, p in enumerate(paths)]
    if base is not None:
        labelled.append((f"base ({base})", Path(base)))
    configs = [_read(label, path, "AutoConfig") for label, path in labelled]
    tokenizers = [_read(label, path, "AutoTokenizer") for label, path in labelled]
    labels = [label for label, _ in labelled]
    problems = _config_differences(labels, configs)
    problems += _vocab_differences(labels, [t.get_vocab() for t in tokenizers])
    if problems:
        raise MergeError("parents cannot be merged: " + "; ".join(problems))
    return ParentSet(paths, configs[0], tokenizers[0], Path(base) if base is not None else None)


def memory_plan(dirs: list, free_bytes: int | None = None) -> dict:
    """What the search will hold, from the weight files' sizes before any is loaded. In
    memory: every parent and the base as stored (ParentSet keeps them), then the merged
    state, the model built from it and one more model's worth for the evaluation. Streamed
    (`mapped_state`): those last three only, the parents' pages read from disk as the merge
    touches them. `mode` is the first that fits in 90% of the memory free now (or
    `free_bytes`), None when neither does. A hub id (not a local folder) counts nothing
    here: its files sit in the hub cache. `dirs`: the parents, then the base if any."""
    from agent_forge.models import free_memory

    sizes = [sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) for d in dirs]
    held, streamed = sum(sizes) + 3 * max(sizes), 3 * max(sizes)
    free = free_memory("cpu") if free_bytes is None else int(free_bytes)
    mode = "in memory" if held <= 0.9 * free else "streamed" if streamed <= 0.9 * free else None
    return {"weights_bytes": sizes, "need_bytes": held, "streamed_need_bytes": streamed, "free_bytes": free,
            "mode": mode}


def plan_problem(plan: dict, n_parents: int) -> str | None:
    """One sentence when the plan does not fit, None when it does."""
    if plan["mode"] is not None:
        return None
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    return (f"the merge search would hold about {gb(plan['need_bytes'])} ({n_parents} parents"
            f"{' and the base' if len(plan['weights_bytes']) > n_parents else ''} at "
            f"{gb(max(plan['weights_bytes']))} each, the merged model and its evaluation), or "
            f"{gb(plan['streamed_need_bytes'])} streaming the parents from disk, and "
            f"{gb(plan['free_bytes'])} is free: give smaller parents, or free memory")


def _read(label: str, path: Path, kind: str):
    import transformers

    try:
        return getattr(transformers, kind).from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MergeError(f"{label}: cannot read its {kind[4:].lower()} ({first})") from e


def _config_differences(labels: list[str], configs: list) -> list[str]:
    out = []
    for name in ARCH_FIELDS:
        values = [getattr(c, name, None) for c in configs]
        if len(set(map(repr, values))) > 1:
            out.append(f"{name} differs (" + ", ".join(f"{l}: {v}" for l, v in zip(labels, values)) + ")")
    return out


def _vocab_differences(labels: list[str], vocabs: list[dict]) -> list[str]:
    """Tokens present in one vocabulary only, or under another id: either way token i would
    mean different things in different parents and their embedding rows must not mix."""
    out, first = [], vocabs[0]
    for label, vocab in zip(labels[1:], vocabs[1:]):
        only_first = sorted(set(first) - set(vocab), key=first.get)
        only_this = sorted(set(vocab) - set(first), key=vocab.get)
        moved = sorted(t for t in set(first) & set(vocab) if first[t] != vocab[t])
        if not (only_first or only_this or moved):
            continue
        parts = [f"{len(first)} tokens in {labels[0]} vs {len(vocab)} in {label}"]
        for what, tokens in ((f"only in {labels[0]}", only_first), (f"only in {label}", only_this),
                             ("ids differ", moved)):
            if tokens:
                parts.append(f"{what}: {', '.join(tokens[:6])}{' ...' if len(tokens) > 6 else ''}")
        out.append("tokenizer vocabulary differs (" + "; ".join(parts) + ")")
    return out


def load_state(path) -> dict[str, torch.Tensor]:
    """A parent's weights as stored (dtype kept), a tied head held once under its embedding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.data_ptr() if tensor.numel() else None
        if ptr is not None and ptr in seen:
            continue
        seen.add(ptr)
        state[name] = tensor.detach()
    return state


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def mapped_state(path) -> dict[str, torch.Tensor]:
    """`load_state`'s weights as views of the safetensors files mapped copy-on-write: a
    tensor is read from disk when a merge touches it, and the OS may drop the pages again,
    so parents that do not fit in memory together can still be merged. The file's names must
    be the model's own (as `save_pretrained` writes them); a checkpoint named otherwise is
    refused, since its tensors cannot be matched without loading it."""
    import mmap

    from agent_forge.models import safetensors_header

    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        header, data = safetensors_header(file)
        with open(file, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, info in header.items():
            dtype, (start, end) = _SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            flat = torch.frombuffer(buf, dtype=dtype, count=(end - start) // dtype.itemsize, offset=data + start) \
                if end > start else torch.empty(0, dtype=dtype)
            state[name] = flat.reshape(info["shape"])
    names = _state_names(path)
    unknown, missing = sorted(set(state) - names["all"]), sorted(names["needed"] - set(state))
    if unknown or missing:
        raise MergeError(f"{path}: its weight files are not named as the model's state dict (unknown "
                         f"{unknown[:3]}, missing {missing[:3]}), so it cannot be streamed")
    return {k: state[k] for k in names["order"] if k in state}


def meta_model(path):
    """The model at `path` built on the meta device: its shapes and names, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def _state_names(path) -> dict:
    """The model's state-dict names (built on the meta device: no memory), in order, and
    which of them is a head tied to the embedding (held once, under the embedding's name,
    as `load_state` holds it)."""
    model = meta_model(path)
    params = model.state_dict(keep_vars=True)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = set()
    if head is not None and embed is not None and head.weight is embed.weight:
        own = next(f"{name}.weight" for name, m in model.named_modules() if m is embed)
        tied = {k for k, v in params.items() if v is head.weight} - {own}
    return {"order": [k for k in params if k not in tied], "all": set(params), "needed": set(params) - tied}


# ---------------------------------------------------------------------------------------
# The techniques, on single tensors


def linear(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted sum (weights already normalised), in float32 or wider."""
    out = torch.zeros_like(tensors[0], dtype=_work_dtype(tensors[0]))
    for tensor, w in zip(tensors, weights):
        out.add_(tensor.to(out.dtype), alpha=float(w))
    return out


def slerp_chain(tensors: list[torch.Tensor], t: float) -> torch.Tensor:
    """SLERP parent by parent: m = slerp(t, m, next). mergekit's slerp works on a batch of
    tensors, each flattened; near-parallel pairs fall back to linear interpolation."""
    from mergekit.merge_methods.slerp import slerp

    out = tensors[0].to(_work_dtype(tensors[0]))
    t_batch = torch.tensor([float(t)], device=out.device)
    for other in tensors[1:]:
        out = slerp(t_batch, out.unsqueeze(0), other.to(out.dtype).unsqueeze(0))[0]
    return out


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density * n)) entries of largest magnitude, zero the rest:
    mergekit's sparsify.magnitude, with topk in place of its full argsort (5x faster)."""
    if density >= 1 or delta.numel() == 0:
        return delta
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES: trim each task vector to `density`, elect each entry's sign by the summed
    weighted mass (mergekit's get_mask), average only the entries that agree with it."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    with ThreadPoolExecutor(len(deltas)) as pool:  # topk runs on one core: trim the parents side by side
        weighted = torch.stack(list(pool.map(lambda d: trim_magnitude(d, density), deltas)))
    w = torch.tensor(weights, dtype=weighted.dtype, device=weighted.device)
    w = w.reshape(-1, *([1] * (weighted.dim() - 1)))
    weighted.mul_(w)
    agree = get_mask(weighted, method="sum", mask_dtype=torch.int8)  # int8: a quarter the memory
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return weighted.masked_fill_(~agree, 0).sum(0) / divisor


def dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density, scale survivors by 1/density so
    the task vector keeps its expected value. The mask is drawn as rand < density."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    return delta * keep / density


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _generator(seed: int, name: str, parent: int, device) -> torch.Generator:
    """A DARE generator per (seed, tensor, parent): the masks do not depend on which other
    tensors are merged or in what order, so skipping routed-away layers changes nothing."""
    derived = zlib.crc32(f"{seed}:{name}:{parent}".encode())
    return torch.Generator(device=device).manual_seed(derived)


# ---------------------------------------------------------------------------------------
# Stages 1 and 2, per tensor


def merge_tensor(genome: Genome, name: str, tensors: list[torch.Tensor], weights: list[float],
                 base: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Stage 1 (interpolate the parents) then stage 2 (the merged task vector), in float32,
    cast back to parent 1's dtype. Without a base the task vectors are the parents' offsets
    from the stage-1 model and `taskvec_scale` times their merge is added to it. With a
    base (the common ancestor) the stage-1 model already holds the plain weighted task vector
    sum(w_i (p_i - base)), so stage 2 replaces it with `taskvec_scale` times the sparsified
    one: after a linear stage 1 the result is base + lambda * TIES/DARE(p_i - base), the
    papers' merge at lambda 1 and task arithmetic's sum of whole vectors at lambda = N with
    equal weights and density 1; at lambda 0, the base (a SLERP stage 1 minus its plain
    vector). Integer tensors come from parent 1. As the genome says, SLERP reads slerp_t
    only; the weights weight linear and the task vectors."""
    first = tensors[0]
    if not first.is_floating_point():
        return first
    work = [t.to(_work_dtype(first)) for t in tensors]
    merged = linear(work, weights) if genome.interp == "linear" else slerp_chain(work, genome.slerp_t)
    if base is None and genome.taskvec_scale == 0:
        return merged.to(first.dtype)  # stage 2 off: no task vectors to compute
    anchor = merged if base is None else base.to(merged.dtype)
    deltas = [t - anchor for t in work]
    if base is not None:  # stage 1 already holds the plain weighted task vector: take it out
        merged = merged - sum(w * d for w, d in zip(weights, deltas))
    if genome.taskvec_scale != 0:
        if genome.taskvec == "ties":
            vector = ties(deltas, weights, genome.density)
        else:
            vector = sum(w * dare(d, genome.density, _generator(seed, name, k, d.device))
                         for k, (d, w) in enumerate(zip(deltas, weights)))
        merged = merged + genome.taskvec_scale * vector
    return merged.to(first.dtype)


def normalised_weights(genome: Genome, n_parents: int) -> list[float]:
    """The genome's weights scaled to sum to 1 (empty = equal)."""
    weights = list(genome.weights) or [1.0] * n_parents
    if len(weights) != n_parents:
        raise MergeError(f"genome has {len(weights)} weights for {n_parents} parents")
    total = sum(weights)
    if total <= 0:
        raise MergeError(f"genome weights must sum to more than 0, got {weights}")
    return [w / total for w in weights]


# ---------------------------------------------------------------------------------------
# Stage 3: layers


def layer_prefix(keys) -> str:
    """The prefix of the numbered decoder blocks ('model.layers', 'transformer.h'): the
    numbered prefix that most keys carry."""
    counts: dict[str, int] = {}
    for key in keys:
        m = _NUMBERED.match(key)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    if not counts:
        raise MergeError("no numbered layers found in the state dict")
    return max(counts, key=counts.get)


def split_layers(state: dict, prefix: str) -> tuple[dict[int, dict], dict]:
    """({layer index: {suffix: tensor}}, the non-layer tensors)."""
    layers: dict[int, dict] = {}
    others = {}
    for key, tensor in state.items():
        m = _NUMBERED.match(key)
        if m and m.group(1) == prefix:
            layers.setdefault(int(m.group(2)), {})[m.group(3)] = tensor
        else:
            others[key] = tensor
    return layers, others


def layer_path(genome: Genome, n_layers: int, n_parents: int) -> list[tuple[int, int]]:
    """The (source, layer) pairs the merged model's layers come from, in order; source 0 is
    the stage-2 model, k parent k. Frankenmerge is the depth-preserving case."""
    if genome.layers == "frankenmerge":
        route = list(genome.route) or [0] * n_layers
        if len(route) != n_layers or not all(isinstance(s, int) for s in route):
            raise MergeError(f"frankenmerge route needs one source per layer ({n_layers}), "
                             f"got {genome.route}")
        path = [(s, i) for i, s in enumerate(route)]
    else:
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in genome.route):
            raise MergeError(f"dfs route needs (source, layer) pairs, got {genome.route}")
        path = [tuple(p) for p in genome.route] or [(0, i) for i in range(n_layers)]
    for source, layer in path:
        if not (0 <= source <= n_parents and 0 <= layer < n_layers):
            raise MergeError(f"route entry ({source}, {layer}) out of range: sources 0..{n_parents}, "
                             f"layers 0..{n_layers - 1}")
    return [(int(s), int(l)) for s, l in path]


# ---------------------------------------------------------------------------------------
# The whole merge


def merge_state_dicts(genome: Genome, parent_states: list[dict], base_state: dict | None = None,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """The genome's three stages on in-memory state dicts; returns the merged state dict.

    The task vectors are the parents' differences from `base_state` (a common ancestor)
    or, without one, from the stage-1 model. Same genome and seed, same result. Tensors a
    route takes from a parent are the parent's own (not copies): clone before editing."""
    n = len(parent_states)
    if n < 2:
        raise MergeError(f"merging needs at least 2 parents, got {n}")
    _check_keys(parent_states, base_state)
    weights = normalised_weights(genome, n)
    prefix = layer_prefix(parent_states[0])
    parent_layers = [split_layers(s, prefix)[0] for s in parent_states]
    n_layers = len(parent_layers[0])
    if sorted(parent_layers[0]) != list(range(n_layers)):
        raise MergeError(f"layers under {prefix} are not numbered 0..n-1: {sorted(parent_layers[0])}")
    path = layer_path(genome, n_layers, n)
    own_layers = {layer for source, layer in path if source == 0}
    wanted = [k for k in parent_states[0] if _wanted(k, prefix, own_layers)]
    stage2 = {k: merge_tensor(genome, k, [s[k] for s in parent_states], weights,
                              None if base_state is None else base_state[k], seed) for k in wanted}
    merged_layers, out = split_layers(stage2, prefix)
    sources = [merged_layers, *parent_layers]
    for j, (source, layer) in enumerate(path):
        out.update({f"{prefix}.{j}.{suffix}": t for suffix, t in sources[source][layer].items()})
    return out


def _wanted(key: str, prefix: str, own_layers: set[int]) -> bool:
    m = _NUMBERED.match(key)
    return not (m and m.group(1) == prefix) or int(m.group(2)) in own_layers


def _check_keys(states: list[dict], base: dict | None) -> None:
    named = [(f"parent {i + 1}", s) for i, s in enumerate(states)] + ([("base", base)] if base else [])
    first = states[0]
    for label, state in named[1:]:
        missing, extra = sorted(set(first) - set(state)), sorted(set(state) - set(first))
        shapes = [k for k in first if k in state and first[k].shape != state[k].shape]
        if missing or extra or shapes:
            raise MergeError(f"{label} weights do not match parent 1: missing {missing[:3]}, "
                             f"extra {extra[:3]}, other shapes {shapes[:3]}")


# ---------------------------------------------------------------------------------------
# Models and directories


def merged_config(parents: ParentSet, genome: Genome):
    """Parent 1's config at the depth the genome's layer path gives (per-layer lists such as
    Qwen2's layer_types follow the path)."""
    config = copy.deepcopy(parents.config)
    n_layers = config.num_hidden_layers
    path = layer_path(genome, n_layers, len(parents))
    config.num_hidden_layers = len(path)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n_layers:
        config.layer_types = [layer_types[layer] for _, layer in path]
    return config


def build_model(state: dict[str, torch.Tensor], config):
    """A model holding `state`: built without random init (the weights are overwritten), and
    refused if any weight other than a tied head is left unset."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    params = model.state_dict()
    loaded = {params[k].data_ptr() for k in state if k in params}
    unset = [k for k in missing if params[k].data_ptr() not in loaded]
    if unset or unexpected:
        raise MergeError(f"merged weights do not fit {type(model).__name__}: "
                         f"unset {unset[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def merge_to_model(genome: Genome, parents: ParentSet, seed: int = 0):
    """The merged model in memory, ready to evaluate: what the search scores."""
    state = merge_state_dicts(genome, parents.states(), parents.base_state(), seed=seed)
    return build_model(state, merged_config(parents, genome))


def save_merged(state: dict[str, torch.Tensor], parents: ParentSet, out_dir, genome: Genome,
                meta: dict | None = None) -> Path:
    """A plain HF directory (config at the merged depth, parent 1's tokenizer, safetensors),
    written atomically, with the genome and parents in forge_meta.json."""
    from agent_forge.models import save_model

    model = build_model(state, merged_config(parents, genome))
    _copy_generation_config(model, parents.paths[0])
    info = {"phase": 2, "genome": genome.to_dict(), "combination": genome.combination,
            "parents": [str(p) for p in parents.paths],
            "base": str(parents.base) if parents.base is not None else None, **(meta or {})}
    return save_model(model, parents.tokenizer, out_dir, info)


def _copy_generation_config(model, parent: Path) -> None:
    """Keep parent 1's generation settings (eos, sampling defaults) when it has them."""
    from transformers import GenerationConfig

    if (parent / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(parent)
