"""Write a model as a GGUF file for llama.cpp: the ternary model with real ternary tensor
types (TQ2_0 / TQ1_0), and the full-precision input model as F16 or Q8_0 for the speed
comparison. Only the PyPI `gguf` package is needed to write; llama.cpp runs the result.

Where the act-norms go (the one hard question). BitNet b1.58 puts an RMSNorm before every
activation quantiser. llama.cpp's `bitnet` architecture has exactly four norms per block:
`attn_norm` (read by q, k and v), `attn_sub_norm` (before o_proj), `ffn_norm` (read by gate
and up) and `ffn_sub_norm` (before down_proj); its LM head is the token embedding. Its
`llama` architecture has no norm before o_proj or down_proj. So:

- act_norm "shared" (the phase's default, convert.share_block_norms): q/k/v share one
  act-norm that holds the block norm's gains while the block norm is frozen at ones, and so
  do gate/up; o_proj and down_proj keep their own. This is the bitnet architecture norm for
  norm: attn_norm = the shared q/k/v norm (RMSNorm(RMSNorm(x; 1); g) = RMSNorm(x; g) up
  to eps: a relative eps / (2 mean(x^2)) per token), sub-norms = the o/down norms. Transformers' BitNet format stores it too (each
  BitLinear's rms_norm, the shared one three times), so one trained model loads in both.
- act_norm false: no extra norms; the model is a Llama with ternary linears (`llama` arch).
- act_norm true (one norm per linear): only exportable when each block's q/k/v (and
  gate/up) norms are equal and its block norm is constant; otherwise export refuses with
  one error naming the layer, because llama.cpp has one norm where that model has three.

Ternary tensors: TQ2_0 (or TQ1_0) blocks hold 256 weights of one row, so a linear whose
in_features is not a multiple of 256 (SmolLM2-135M's hidden size is 576: every linear but
down_proj) is written as Q4_0 blocks that hold the same ternary codes (nibbles 7/8/9, block
scale = gamma): exact, but 4.5 bits per weight and llama.cpp's 4-bit kernel. The summary
says how many weights got a ternary type. Either way the dequantised weight is
code x f16(gamma). llama.cpp quantises activations per block of the row (Q8_K: 256, with
Q8_0 for a Q4_0 row: 32; both 127/absmax) where the paper and transformers quantise per token,
so its logits differ from a model trained with `act_quant: token` by that rounding (tests
bound it); `act_quant: llamacpp` trains and measures with llama.cpp's blocks instead.

llama.cpp's `llama` architecture applies rotary embeddings to adjacent pairs, Hugging Face
to the two halves of each head, so q/k rows are permuted for it; `bitnet` uses halves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from agent_forge.bitnet.bitlinear import BitLinear
from agent_forge.bitnet.convert import BitNetError
from agent_forge.bitnet.quantize import QK8_0, QK_K

QK4_0 = 32
TERNARY_TYPES = ("tq2_0", "tq1_0")
TERNARY_FALLBACK = "Q4_0 (ternary codes)"  # the type of ternary rows that do not fill 256-blocks
# HF names inside a Llama decoder layer -> GGUF names inside blk.N
LAYER_TENSORS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
ARCH_MODEL_TYPES = ("llama",)  # HF model types whose layout maps onto llama.cpp's llama / bitnet


class GGUFExportError(BitNetError):
    """The model cannot be written as a GGUF llama.cpp computes the same way; one line why."""


def write_gguf(model, tokenizer, path: str | Path, weight_type: str = "tq2_0", name: str | None = None) -> dict:
    """Write `model` to `path` (atomically). weight_type: for a model with BitLinear layers
    "tq2_0" or "tq1_0"; for a full-precision model "f16", "q8_0" or "f32". Returns a summary:
    architecture, tensor types and weight counts, bytes."""
    import gguf

    _check_layout(model)
    ternary = any(isinstance(m, BitLinear) for m in model.modules())
    if ternary != (weight_type in TERNARY_TYPES):
        kind = "a ternary (BitLinear) model" if ternary else "a full-precision model"
        raise GGUFExportError(f"weight_type {weight_type!r} does not fit {kind}; use "
                              + ("tq2_0 or tq1_0" if ternary else "f16, q8_0 or f32"))
    arch, norms = _norm_plan(model) if ternary else ("llama", {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _add_hparams(writer, model, arch, name or type(model).__name__)
        _add_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
        counts = _add_tensors(writer, model, arch, norms, weight_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "arch": arch, "weight_type": weight_type, "bytes": path.stat().st_size,
            "tensor_types": counts, "ternary_share": _ternary_share(counts, weight_type)}


def _ternary_share(counts: dict, weight_type: str) -> float | None:
    """Fraction of the linear weights stored with a ternary type (the rest: Q4_0 codes)."""
    if weight_type not in TERNARY_TYPES:
        return None
    tern = counts.get(weight_type.upper(), {}).get("weights", 0)
    fallback = counts.get(TERNARY_FALLBACK, {}).get("weights", 0)
    return tern / (tern + fallback) if tern + fallback else 0.0


# ---------------------------------------------------------------------------------------
# What can be exported


def _check_layout(model) -> None:
    """Refuse what llama.cpp's llama/bitnet graphs cannot compute as our model does."""
    cfg = model.config
    if cfg.model_type not in ARCH_MODEL_TYPES:
        raise GGUFExportError(f"{type(model).__name__} (model_type {cfg.model_type!r}): GGUF export supports "
                              f"the Llama layout only ({', '.join(ARCH_MODEL_TYPES)})")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise GGUFExportError("linear biases are not supported by the GGUF export")
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", None):
        raise GGUFExportError(f"rope scaling {kind!r} is not supported by the GGUF export")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"hidden_act {cfg.hidden_act!r}: llama.cpp's llama/bitnet graphs here use silu")


def _layers(model):
    return model.model.layers


def _norm_plan(model) -> tuple[str, dict]:
    """(architecture, {gguf name: weight}) of the extra norms; raises naming the first layer
    whose act-norms llama.cpp cannot represent (see the module docstring)."""
    linears = [m for m in model.modules() if isinstance(m, BitLinear)]
    with_norm = [m.rms_norm is not None for m in linears]
    if not any(with_norm):
        return "llama", {}
    if not all(with_norm):
        raise GGUFExportError("some BitLinears have an act-norm and some do not; cannot map to llama.cpp")
    if not model.config.tie_word_embeddings:
        raise GGUFExportError("llama.cpp's bitnet architecture uses the token embedding as LM head; "
                              "this model's head is untied")
    if model.config.hidden_size != model.config.num_attention_heads * _head_dim(model.config):
        raise GGUFExportError("llama.cpp's bitnet architecture needs heads x head_dim == hidden_size")
    norms = {}
    for i, layer in enumerate(_layers(model)):
        for block_norm, group, gguf_name in (("input_layernorm", ("q_proj", "k_proj", "v_proj"), "attn_norm"),
                                             ("post_attention_layernorm", ("gate_proj", "up_proj"), "ffn_norm")):
            owner = layer.self_attn if gguf_name == "attn_norm" else layer.mlp
            prefix = f"model.layers.{i}.{'self_attn' if gguf_name == 'attn_norm' else 'mlp'}"
            norms[f"blk.{i}.{gguf_name}.weight"] = _merged_norm(getattr(layer, block_norm).weight,
                                                                [getattr(owner, n) for n in group], prefix, group)
        norms[f"blk.{i}.attn_sub_norm.weight"] = _act_norm(layer.self_attn.o_proj, f"model.layers.{i}.self_attn.o_proj")
        norms[f"blk.{i}.ffn_sub_norm.weight"] = _act_norm(layer.mlp.down_proj, f"model.layers.{i}.mlp.down_proj")
    return "bitnet", norms


def _act_norm(module, name: str) -> torch.Tensor:
    if not isinstance(module, BitLinear) or module.rms_norm is None:
        raise GGUFExportError(f"{name}: not a BitLinear with an act-norm; llama.cpp's bitnet "
                              "architecture needs one there")
    return module.rms_norm.weight.detach()


@torch.no_grad()
def _merged_norm(block_weight: torch.Tensor, linears: list, prefix: str, names: tuple) -> torch.Tensor:
    """The one norm llama.cpp applies before `linears`: RMSNorm(RMSNorm(x; c); w) = RMSNorm(x; w)
    (up to eps) when the block norm's gains are one constant c > 0 and every linear has the same w."""
    first = _act_norm(linears[0], f"{prefix}.{names[0]}")
    for lin, n in zip(linears[1:], names[1:]):
        if not torch.equal(_act_norm(lin, f"{prefix}.{n}"), first):
            raise GGUFExportError(f"{prefix}.{n}: its act-norm differs from {names[0]}'s, and llama.cpp has one norm "
                                  "before them all; train with act_norm: shared (the default) to export to GGUF")
    b = block_weight.detach().float()
    if not (b > 0).all() or not torch.allclose(b, b[0].expand_as(b), rtol=1e-6, atol=0):
        raise GGUFExportError(f"{prefix}: the block norm before {', '.join(names)} has per-channel gains, which "
                              "llama.cpp cannot apply before the act-norm; train with act_norm: shared")
    return first


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# ---------------------------------------------------------------------------------------
# Metadata


def _add_hparams(writer, model, arch: str, name: str) -> None:
    import gguf

    cfg = model.config
    writer.add_name(name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(cfg.num_attention_heads))
    writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    writer.add_rope_dimension_count(_head_dim(cfg))
    if arch == "llama":
        writer.add_key_length(_head_dim(cfg))
        writer.add_value_length(_head_dim(cfg))
    writer.add_rope_freq_base(float(_rope_theta(cfg)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(model.get_input_embeddings().weight.shape[0]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return theta


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for the HF tokenizer's pre-tokenizer, so both split text alike."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)
    if spec and byte_level(spec):
        return "gpt-2"
    parts = (spec or {}).get("pretokenizers") or []
    if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") \
            and byte_level(parts[1]):
        return "smollm"
    raise GGUFExportError(f"pre-tokenizer {json.dumps(spec)[:120]} has no llama.cpp equivalent the export knows")


def _add_tokenizer(writer, tokenizer, n_vocab: int) -> None:
    """A byte-level BPE vocabulary with merges; tokens added later (thinking tokens) are
    USER_DEFINED so llama.cpp parses and prints them as text, the special ones CONTROL;
    rows of the embedding past the tokenizer get unused filler tokens."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; cannot export it")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise GGUFExportError(f"tokenizer model {spec['model']['type']}: only byte-level BPE is exported")
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise GGUFExportError(f"the tokenizer has {len(vocab)} tokens but the embedding only {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    control = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    added = {a["id"] for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in control else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = spec["model"].get("merges") or []
    if not merges:
        raise GGUFExportError("the tokenizer's BPE has no merges, and llama.cpp refuses a BPE vocabulary without them")
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(int(getattr(tokenizer, attr)))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------------------------------
# Tensors


def _add_tensors(writer, model, arch: str, norms: dict, weight_type: str) -> dict:
    """Every tensor under its GGUF name; returns {type: {"tensors", "weights"}}."""
    counts: dict[str, dict] = {}

    def add(name, array, raw_type, shape, label):
        writer.add_tensor(name, array, raw_dtype=raw_type)  # a quantised array's shape is in bytes
        c = counts.setdefault(label, {"tensors": 0, "weights": 0})
        c["tensors"] += 1
        c["weights"] += int(np.prod(shape))

    emb = model.get_input_embeddings().weight.detach()
    add("token_embd.weight", *_float_tensor(emb, "f32" if weight_type == "f32" else "f16"))
    add("output_norm.weight", *_float_tensor(model.model.norm.weight.detach(), "f32"))
    head = model.get_output_embeddings().weight
    if arch == "llama" and head.data_ptr() != emb.data_ptr():
        add("output.weight", *_float_tensor(head.detach(), "f32" if weight_type == "f32" else "f16"))
    cfg = model.config
    heads = {"attn_q": cfg.num_attention_heads,
             "attn_k": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}
    for i, layer in enumerate(_layers(model)):
        for hf_name, g_name in LAYER_TENSORS.items():
            module = layer.get_submodule(hf_name)
            name = f"blk.{i}.{g_name}.weight"
            if name in norms:
                add(name, *_float_tensor(norms[name], "f32"))
            elif g_name.endswith("norm"):
                add(name, *_float_tensor(module.weight.detach(), "f32"))
            else:
                permute = heads.get(g_name) if arch == "llama" else None
                add(name, *_linear_tensor(module, weight_type, permute))
    for name in norms:
        if "sub_norm" in name:
            add(name, *_float_tensor(norms[name], "f32"))
    return counts


def _rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from [first half, second half] order to interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _float_tensor(t: torch.Tensor, kind: str):
    import gguf

    if kind == "f16":
        return t.float().cpu().numpy().astype(np.float16), gguf.GGMLQuantizationType.F16, list(t.shape), "F16"
    return t.float().cpu().numpy().astype(np.float32), gguf.GGMLQuantizationType.F32, list(t.shape), "F32"


@torch.no_grad()
def _linear_tensor(module, weight_type: str, permute_heads: int | None):
    """(data, type, shape, label) of one linear: ternary codes x gamma for a BitLinear."""
    import gguf

    if isinstance(module, BitLinear):
        q, gamma = module.ternary()
        if permute_heads:
            q = _rope_permute(q, permute_heads)
        return _ternary_blocks(q, gamma, weight_type)
    w = module.weight.detach().float()
    if permute_heads:
        w = _rope_permute(w, permute_heads)
    if weight_type == "q8_0" and w.shape[-1] % QK8_0 == 0:
        qt = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(w.cpu().numpy(), qt), qt, list(w.shape), "Q8_0"
    return _float_tensor(w, "f32" if weight_type == "f32" else "f16")


def _ternary_blocks(q: torch.Tensor, gamma: torch.Tensor, weight_type: str):
    """TQ2_0/TQ1_0 when a row fills whole 256-blocks, else Q4_0 blocks of the same codes.

    TQ: the quantiser's block scale is max|block| = gamma (exact in float32), so every code
    comes back as written. Q4_0 blocks are built here (gguf's own Q4_0 quantiser scales by
    the signed maximum / -8 and would turn -gamma into -7/8 gamma): scale f16(gamma), nibble
    code + 8, so each weight dequantises to exactly code x f16(gamma) at 4.5 bits."""
    import gguf

    shape = list(q.shape)
    if shape[-1] % QK_K == 0:
        qt = gguf.GGMLQuantizationType[weight_type.upper()]
        values = q.float().numpy() * np.float32(gamma)
        return gguf.quants.quantize(values, qt), qt, shape, weight_type.upper()
    if shape[-1] % QK4_0:
        raise GGUFExportError(f"a ternary linear of {shape[-1]} inputs fits neither 256-weight TQ blocks nor "
                              "32-weight Q4_0 blocks")
    return q4_0_codes(q, float(gamma)), gguf.GGMLQuantizationType.Q4_0, shape, TERNARY_FALLBACK


def q4_0_codes(q: torch.Tensor, scale: float) -> np.ndarray:
    """ggml's block_q4_0 bytes of integer codes in [-8, 7]: per 32 weights an f16 scale, then
    16 bytes whose low nibbles hold weights 0-15 (+8) and high nibbles weights 16-31 (+8)."""
    codes = (q.numpy().astype(np.int16) + 8).astype(np.uint8).reshape(-1, QK4_0)
    nibbles = codes[:, :QK4_0 // 2] | (codes[:, QK4_0 // 2:] << 4)
    d = np.full((codes.shape[0], 1), scale, dtype=np.float16).view(np.uint8)
    return np.concatenate([d, nibbles], axis=1).reshape(q.shape[0], -1)


# ---------------------------------------------------------------------------------------
# Reading back


def read_tensor(path: str | Path, name: str) -> tuple[np.ndarray, str]:
    """(float32 array in the model's (out, in) shape, type name) of one tensor of a GGUF."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name == name:
            shape = [int(x) for x in reversed(t.shape)]
            return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), t.tensor_type.name
    raise KeyError(f"{path}: no tensor {name}")
