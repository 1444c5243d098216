"""The llama.cpp engine: run a GGUF through llama-cpp-python wherever the project generates.

`LlamaCppModel` answers the part of a transformers causal LM that agent_forge.inference
uses: `generate(input_ids, ...)` (greedy, EOS, stopping criteria, min_new_tokens), one row
at a time (`max_generation_batch = 1`: llama.cpp's fast path is batch 1). Prompts are
tokenised by the Hugging Face tokenizer saved next to the GGUF, as for the PyTorch model,
so thinking on/off, the forced prefix and answer parsing are the same code; only the
forward pass is llama.cpp's. `llamacpp_speed` times decoding exactly as bitnet.speed does
(same prompts, exactly `new_tokens` greedy tokens, prefill included, median of runs), and
`llamacpp_speed_rows` adds the llama.cpp rows to Phase 4's speed table.

llama-cpp-python compiles llama.cpp when installed (minutes; `make setup LLAMACPP=yes`);
without it everything here says so in one line instead of failing.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

TERNARY_ROW, F16_ROW, Q8_ROW = ("llama.cpp ternary TQ2_0 (output)", "llama.cpp F16 (input model)",
                                "llama.cpp Q8_0 (input model)")
CPUINFO = Path("/proc/cpuinfo")  # where weight_repacking looks for AMX
INSTALL_HINT = "pip install -e '.[llamacpp]' (or make setup LLAMACPP=yes); it compiles llama.cpp"
GGML_TYPE_F32 = 0  # ggml_type of an fp32 tensor (llama.cpp caches keys and values as fp16, type 1)


def llamacpp_status() -> tuple[bool, str]:
    """(importable, a line saying which version, or why not)."""
    try:
        import llama_cpp
    except Exception as e:  # ImportError, or a broken shared library (OSError)
        return False, f"llama-cpp-python not installed ({type(e).__name__}: {e}); {INSTALL_HINT}"
    repack = "on" if weight_repacking() else "off (this CPU has AMX: see weight_repacking)"
    return True, f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}, weight repacking {repack}"


def weight_repacking() -> bool:
    """Whether llama.cpp may repack weights into its extra CPU buffer types. On a CPU with
    AMX (amx_int8) the 0.3.36 build's repacked Q4_0/Q8_0 matmul segfaults on any prompt of two
    or more tokens (F16 and TQ2_0 are unaffected: measured on this project's Xeon), so it is off
    there, for every GGUF alike; FORGE_LLAMACPP_REPACK=1 or 0 decides instead."""
    forced = os.environ.get("FORGE_LLAMACPP_REPACK")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return "amx_int8" not in CPUINFO.read_text()
    except OSError:
        return True


@contextlib.contextmanager
def _model_params(use_extra_bufts: bool):
    """llama-cpp-python's Llama() takes no use_extra_bufts argument: set it on the default
    model params it starts from, for the one construction."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = use_extra_bufts
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


class LlamaCppModel:
    """A GGUF in llama.cpp, shaped like a transformers causal LM for greedy generation."""

    max_generation_batch = 1
    training = False
    generation_config = None

    def __init__(self, path: str | Path, n_ctx: int = 2048, n_threads: int | None = None, f32_cache: bool = False):
        """f32_cache: keys and values cached in fp32 instead of llama.cpp's default fp16 (tests
        that compare logits with PyTorch's to the last rounding)."""
        ok, why = llamacpp_status()
        if not ok:
            raise RuntimeError(why)
        from llama_cpp import Llama

        self.path = str(path)
        threads = n_threads or torch.get_num_threads()
        with _model_params(use_extra_bufts=weight_repacking()):
            cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
            self.llm = Llama(model_path=self.path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                             logits_all=False, verbose=False, **cache)
        self.n_vocab = self.llm.n_vocab()

    # the bits of nn.Module the generation code touches
    def parameters(self):
        yield torch.zeros(0)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def _last_logits(self) -> np.ndarray:
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits, each position fed in turn (tests, small inputs)."""
        self.llm.reset()
        rows = []
        for t in ids:
            self.llm.eval([int(t)])
            rows.append(self._last_logits())
        return np.stack(rows)

    def greedy(self, ids: list[int], max_new: int, eos: set[int] = frozenset(), min_new: int = 0,
               stop=None) -> list[int]:
        """Greedy continuation of `ids`: stops at an EOS id (after `min_new` tokens), when
        stop(tokens so far) is true, or after `max_new` tokens."""
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        out: list[int] = []
        while len(out) < max_new:
            logits = self._last_logits()
            if len(out) < min_new and eos:
                logits[list(eos)] = -np.inf
            tok = int(np.argmax(logits))
            out.append(tok)
            if (tok in eos) or (stop is not None and stop(out)):
                break
            if len(out) < max_new:
                self.llm.eval([tok])
        return out

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, min_new_tokens: int = 0, do_sample: bool = False,
                 eos_token_id=None, pad_token_id=None, stopping_criteria=None, **_ignored) -> torch.Tensor:
        """transformers' generate for one row: the prompt ids followed by the new ids."""
        if do_sample:
            raise ValueError("the llama.cpp engine decodes greedily (do_sample=False)")
        if input_ids.shape[0] != 1:
            raise ValueError("the llama.cpp engine generates one row at a time (max_generation_batch = 1)")
        row = input_ids[0]
        if attention_mask is not None:
            row = row[attention_mask[0].bool()]
        ids = row.tolist()
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])

        def stop(new: list[int]) -> bool:
            if not stopping_criteria:
                return False
            seq = torch.tensor([ids + new], dtype=torch.long)
            return any(bool(c(seq, None).all()) for c in stopping_criteria)

        new = self.greedy(ids, max_new_tokens, eos, min_new_tokens, stop)
        return torch.tensor([input_ids[0].tolist() + new], dtype=torch.long)


def load_llamacpp(path: str | Path, tokenizer_dir: str | Path | None = None):
    """(LlamaCppModel, HF tokenizer) for a .gguf file (or a folder holding exactly one). The
    tokenizer is the one saved beside it (the BitNet phase puts it there), else read from
    the GGUF itself by transformers."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected exactly one .gguf file, found {len(found)}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    folder = Path(tokenizer_dir) if tokenizer_dir else path.parent
    if (folder / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(folder)
    else:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return LlamaCppModel(path), tok


def llamacpp_speed(model: LlamaCppModel, tokenizer, prompts: list[str], new_tokens: int = 64,
                   warmup: int = 1, repeats: int = 3) -> dict:
    """bitnet.speed.decode_speed for a GGUF: same prompts, same token counts, same statistics."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]

    def one_run() -> float:
        seconds = 0.0
        for ids in encoded:
            t0 = time.perf_counter()
            out = model.greedy(ids, new_tokens)
            seconds += time.perf_counter() - t0
            if len(out) != new_tokens:
                raise RuntimeError(f"llama.cpp returned {len(out)} new tokens, expected {new_tokens}")
        return new_tokens * len(encoded) / seconds

    for _ in range(warmup):
        one_run()
    runs = [one_run() for _ in range(repeats)]
    return {"tokens_per_s": statistics.median(runs), "runs": runs, "new_tokens": new_tokens,
            "prompts": len(prompts), "threads": torch.get_num_threads()}


def llamacpp_speed_rows(out_dir: str | Path, student, teacher, tokenizer, prompts: list[str],
                        new_tokens: int, repeats: int = 3) -> tuple[dict, dict]:
    """Write the GGUFs (ternary student; input model F16 and Q8_0) under out_dir with the
    tokenizer, and time each in llama.cpp when it is installed. Returns (speed rows to add,
    info: files, tensor types, what was not measured and why). Never raises for a missing
    llama.cpp or a model the GGUF export refuses: the info says so."""
    from agent_forge.bitnet.gguf_export import GGUFExportError, write_gguf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    info: dict = {"files": {}, "not_measured": []}
    for label, model, kind, fname in ((TERNARY_ROW, student, "tq2_0", "ternary-tq2_0.gguf"),
                                      (F16_ROW, teacher, "f16", "input-f16.gguf"),
                                      (Q8_ROW, teacher, "q8_0", "input-q8_0.gguf")):
        try:
            info["files"][label] = write_gguf(model, tokenizer, out_dir / fname, kind)
        except GGUFExportError as e:
            info["not_measured"].append(f"{label}: GGUF export refused: {e}")
    ok, why = llamacpp_status()
    info["llamacpp"] = why
    rows = {}
    if not ok and info["files"]:
        info["not_measured"].append(f"{', '.join(info['files'])}: {why}")
    for label, summary in info["files"].items():
        if not ok:
            continue
        try:
            rows[label] = llamacpp_speed(LlamaCppModel(summary["path"]), tokenizer, prompts, new_tokens,
                                         repeats=repeats)
        except (ValueError, RuntimeError) as e:  # llama.cpp would not load or run the file
            info["not_measured"].append(f"{label}: llama.cpp failed: {e}")
    return rows, info


def ternary_vs_q8_0(rows: dict) -> dict:
    """The second speed target: llama.cpp ternary ahead of llama.cpp Q8_0 of the input model.
    Empty when either row was not measured."""
    tern, q8 = rows.get(TERNARY_ROW), rows.get(Q8_ROW)
    if not tern or not q8:
        return {}
    ratio = tern["tokens_per_s"] / q8["tokens_per_s"]
    return {"ternary_vs_q8_0": ratio, "ahead_of_q8_0": ratio > 1.0}
