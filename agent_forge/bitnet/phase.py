"""`forge bitnet`: Phase 4 end to end, from a Phase 3 model to a measured ternary model.

    validate_input -> data -> before -> qat -> after -> save -> speed -> agreement -> register -> handoff

Each stage's result goes to `out/bitnet_state.json` when it finishes, so `--resume` after a
kill continues from the first unfinished stage (QAT from its last checkpoint). Every figure
in the report is measured in this run: accuracy of the input model and of the ternary model
on the same test questions (paired, with an interval), anti-theater on the ternary model,
size on disk per component, sparsity, decode speed, and (with llama.cpp) how often the GGUF
gives the PyTorch ternary model's answer.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from agent_forge.bitnet.convert import DEFAULT_KEEP, BitNetError
from agent_forge.bitnet.qat import QATConfig, QATTrainer
from agent_forge.config import preset_config
from agent_forge.inference import GENERATION_BATCH
from agent_forge.quietstar.pipeline import DataConfig
from agent_forge.stages import PhaseContext, run_phase, stage_runner, timings

STATE_FILE = "bitnet_state.json"
REPORT_FILE = "bitnet_report.json"
STUDENT_FILE = "student.safetensors"
RELOAD_PROBES = 4  # test questions the saved model, reloaded with plain transformers, answers
# Design targets for the compression ratio against fp32, by model size (seeds/ design notes).
RATIO_TARGETS = {"tiny": 6.0, "small": 8.0, "medium": 10.0, "large": 12.0}


@dataclass
class BitNetConfig:
    """Everything `forge bitnet` does; presets below, YAML overrides any field."""

    model: str = "runs/demo/model"  # a Phase 3 output (or any HF causal LM: hub id, dir, default)
    out: str = "runs/bitnet"
    preset: str = "quick"
    device: str | None = None
    force: bool = False  # go on when the model's Phase 3 -> 4 handoff fails (recorded in the report)
    data_path: str | None = None  # reasoning JSONL (`forge data build`); None: Phase 3's procedural traces
    data: DataConfig = field(default_factory=lambda: DataConfig(n_records=1200, seed=7))
    qat: QATConfig = field(default_factory=QATConfig)
    keep: tuple[str, ...] = DEFAULT_KEEP  # linear layers (name patterns) kept in full precision
    # The paper's RMSNorm before activation quantisation. "shared": q/k/v (and gate/up) share
    # one that takes over the block norm's gains, o/down have their own: the layout both
    # transformers and llama.cpp's bitnet architecture run (see bitnet/gguf_export.py).
    # true: one per linear (transformers only); false: none.
    act_norm: bool | str = "shared"
    # gamma of each ternary matrix: "absmean" (the paper's mean|W|) or "mse" (the gamma that
    # rounds the trained weights with the least squared error; see bitnet/quantize.py).
    weight_scale: str = "absmean"
    # how each ternary matmul's input is rounded to 8 bits: "token" (the paper's per-token
    # absmax, which the saved HF file runs exactly) or "llamacpp" (per block, as the GGUF runs
    # it: the model trained and measured is the GGUF's arithmetic, and the HF file's logits
    # differ by the rounding, which the reload row reports). See bitnet/quantize.py.
    act_quant: str = "token"
    # kept matrices (embeddings, head) on disk, one of export.STORE_DTYPES; the model evaluated
    # is rounded alike, and the store_cost stage measures what the rounding alone costs.
    store_dtype: str | None = "float8_e4m3fn"
    calibrate_batches: int = 4  # batches that set each act-norm's initial scale
    eval_dataset: str | None = None  # test set; None: the one the Phase 3 run used (else easy_arithmetic)
    eval_samples: int = 150
    max_new_tokens: int = 128  # thinking budget in every evaluation
    check_honesty_threshold: float = 0.95
    max_relative_drop: float = 0.10  # target: accuracy (thinking on) drops by less than this fraction
    min_sparsity: float = 0.30  # target: fraction of zero ternary weights
    min_speedup: float = 2.0  # target: ternary decode >= this x fp32 PyTorch
    min_gguf_agreement: float = 0.90  # target: llama.cpp's ternary GGUF gives our model's answer this often
    speed_prompts: int = 2  # prompts timed per engine
    speed_tokens: int = 32  # new tokens per timed prompt
    speed_repeats: int = 3  # timed runs per engine (the median is reported), after one warm-up run
    min_baking_accuracy: float = 0.85  # the Phase 3 -> 4 gate, as Phase 3 applies it
    tracking: str = "offline"
    registry: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # seconds on a tiny model; proves every stage runs.
    "smoke": {"data": {"n_records": 40}, "eval_samples": 8, "max_new_tokens": 48, "calibrate_batches": 1,
              "speed_prompts": 1, "speed_tokens": 8,
              "qat": {"steps": 4, "batch_size": 2, "save_every": 2, "strength_warmup": 2, "warmup_steps": 1}},
    # `make demo` after Phase 3: <= 10 minutes on a 2-core CPU for the default model.
    # Sized with Phase 3's quick preset so `make demo` (both phases, setup included) fits 35 min.
    "quick": {"eval_samples": 40, "speed_prompts": 1, "speed_repeats": 2,
              "qat": {"steps": 16, "batch_size": 8, "save_every": 8, "strength_warmup": 8, "warmup_steps": 2}},
    # a GPU's hours; the batch (up to 32) is chosen from the device's free memory.
    "standard": {"data": {"n_records": 20000}, "eval_samples": 1000,
                 "qat": {"steps": 4000, "batch_size": 0, "strength_warmup": 1000, "warmup_steps": 100,
                         "save_every": 250, "eval_every": 500, "eval_samples": 200}},
}


def make_config(preset: str = "quick", yaml_path: str | Path | None = None, **overrides) -> BitNetConfig:
    """The preset, then the YAML, then the overrides; a bad schedule fails here, before any work."""
    from agent_forge.bitnet.export import STORE_DTYPES
    from agent_forge.bitnet.qat import strengths_at
    from agent_forge.bitnet.quantize import ACT_QUANTS, WEIGHT_SCALES

    cfg = preset_config(BitNetConfig(preset=preset), PRESETS, preset, yaml_path, overrides, "bitnet config")
    strengths_at(0, cfg.qat.strength_warmup, 1, cfg.qat.progressive)
    if cfg.qat.init not in QAT_INITS:
        raise ValueError(f"qat.init must be one of {', '.join(QAT_INITS)}, not {cfg.qat.init!r}")
    if cfg.qat.init == "gptq" and cfg.qat.strength_warmup:
        raise ValueError("qat.init gptq starts from GPTQ's ternary codes, fully quantised: set qat.strength_warmup "
                         f"to 0 (it is {cfg.qat.strength_warmup}; a warm-in would blend those codes with themselves)")
    if cfg.weight_scale not in WEIGHT_SCALES:
        raise ValueError(f"weight_scale must be one of {', '.join(WEIGHT_SCALES)}, not {cfg.weight_scale!r}")
    if cfg.act_quant not in ACT_QUANTS:
        raise ValueError(f"act_quant must be one of {', '.join(ACT_QUANTS)}, not {cfg.act_quant!r}")
    if cfg.store_dtype is not None and cfg.store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {', '.join(STORE_DTYPES)} (or null), not {cfg.store_dtype!r}")
    return cfg


QAT_INITS = ("nearest", "gptq")
Context = PhaseContext  # the stages of this phase take one (agent_forge/stages.py)


class BitNetPhaseError(RuntimeError):
    """A stage found a problem the user must fix; the message says what."""


# ---------------------------------------------------------------------------------------
# Models, loaded once per process


def teacher(ctx: Context):
    """(the input model, frozen, its tokenizer)."""
    if "teacher" not in ctx.cache:
        from agent_forge.models import load_model

        model, tok = load_model(ctx.cfg.model, device=ctx.cfg.device)
        ctx.cache["teacher"], ctx.cache["tokenizer"] = model.eval().requires_grad_(False), tok
    return ctx.cache["teacher"], ctx.cache["tokenizer"]


def fresh_student(ctx: Context):
    """A copy of the input model with its linear layers converted to BitLinear."""
    import copy

    from agent_forge.bitnet.convert import convert_to_bitnet

    model, _ = teacher(ctx)
    student = copy.deepcopy(model).requires_grad_(True)
    convert_to_bitnet(student, keep=tuple(ctx.cfg.keep), act_norm=ctx.cfg.act_norm,
                      scale_method=ctx.cfg.weight_scale, act_method=ctx.cfg.act_quant)
    return student


def trained_student(ctx: Context):
    """The student QAT finished with (rebuilt from its saved state after a resume), lambda = 1."""
    if "student" not in ctx.cache:
        from safetensors.torch import load_file

        from agent_forge.bitnet.convert import set_strength

        student = fresh_student(ctx)
        student.load_state_dict(load_file(ctx.out / "qat" / STUDENT_FILE), strict=False)
        if hasattr(student, "tie_weights"):
            student.tie_weights()
        set_strength(student, 1.0)
        ctx.cache["student"] = _as_stored(ctx, student.eval())
    return ctx.cache["student"]


def _as_stored(ctx: Context, student):
    """The student with its kept matrices rounded to the dtype they are saved in: the model
    every later stage evaluates is the model on disk."""
    from agent_forge.bitnet.export import round_kept_matrices

    round_kept_matrices(student, ctx.cfg.store_dtype)
    return student


def thinking_mode(tokenizer) -> str:
    from agent_forge.vocab import has_thinking_tokens

    return "on" if has_thinking_tokens(tokenizer) else "auto"


def eval_items(ctx: Context):
    from agent_forge.data.evalsets import load_eval_set

    return load_eval_set(ctx.state.result("validate_input")["eval_dataset"], limit=ctx.cfg.eval_samples)


# ---------------------------------------------------------------------------------------
# The stages


def stage_validate_input(ctx: Context) -> dict:
    """The input must be a causal LM that is not already ternary; a Phase 3 output must pass
    its 3 -> 4 handoff (unless --force, which the report records); memory and disk must hold
    QAT (a pre-flight check, before any work)."""
    from agent_forge.bitnet.convert import is_ternary
    from agent_forge.handoff import format_result, validate_phase3_to_4
    from agent_forge.models import measure_model, read_meta
    from agent_forge.preflight import check

    cfg = ctx.cfg
    meta = read_meta(cfg.model) if Path(cfg.model).is_dir() else {}
    out = {"input_phase": meta.get("phase"), "forced": False,
           "eval_dataset": cfg.eval_dataset or _phase3_eval_set(meta)}
    if meta.get("phase") not in (None, 3):
        raise BitNetPhaseError(f"{cfg.model} is a phase {meta['phase']} output; BitNet takes a Phase 3 model "
                               "(or a plain HF causal LM with no forge_meta.json)")
    if meta.get("phase") == 3:
        result = validate_phase3_to_4(cfg.model, cfg.min_baking_accuracy)
        out["handoff_3_4"] = result.to_dict()
        if not result.ok and not cfg.force:
            raise BitNetPhaseError(f"{format_result(result)}\nThis model's Phase 3 -> 4 handoff fails; "
                                   "fix Phase 3, or pass --force to compress it anyway (the report says so)")
        out["forced"] = not result.ok
    model, _ = teacher(ctx)
    if is_ternary(model):
        raise BitNetPhaseError(f"{cfg.model} is already ternary (BitLinear layers or a bitnet quantization_config)")
    size, vocab = measure_model(model, cfg.device), model.config.vocab_size
    out["model_size"] = size.to_dict()
    out["qat_batch_size"] = qat_batch_size(cfg.qat, size, vocab)
    qat = dataclasses.replace(cfg.qat, batch_size=out["qat_batch_size"])
    out["preflight"] = check(ctx.out, qat_needs(qat, size.n_bytes, vocab), size.free_memory_bytes)
    return out


def qat_batch_size(qat: QATConfig, size, vocab_size: int) -> int:
    """qat.batch_size, or for 0 the largest power of two up to 32 sequences whose QAT needs
    (qat_needs) fit in 60% of the free memory: bigger models and vocabularies get smaller
    batches. At least 1 (the pre-flight check then says whether even that fits)."""
    if qat.batch_size > 0:
        return qat.batch_size
    batch = 32
    while batch > 1 and qat_needs(dataclasses.replace(qat, batch_size=batch), size.n_bytes,
                                  vocab_size).memory_bytes > 0.6 * size.free_memory_bytes:
        batch //= 2
    return batch


def qat_config(ctx: Context) -> QATConfig:
    """The QAT settings with the batch size validate_input chose (batch_size 0 = by memory)."""
    chosen = ctx.state.result("validate_input").get("qat_batch_size") or ctx.cfg.qat.batch_size
    return dataclasses.replace(ctx.cfg.qat, batch_size=chosen)


def qat_needs(qat: QATConfig, n_bytes: int, vocab_size: int):
    """Memory and disk QAT needs beyond the input model already loaded.

    Memory: 6 copies of the model (the student's weights, gradients, two AdamW moments, its
    quantised weights saved for backward and cached for decoding) plus 15 float32 copies of a
    micro-batch's logits (batch x max_len x vocab: student and teacher logits, their float and
    softmax copies, gradients, hidden activations). Fit to one measurement: the default model
    (0.54 GB, vocabulary 49164) at 8 x 256 peaked at 10.3 GB resident for the whole process;
    this gives 9.3 GB, plus the loaded input model and the Python process. Disk: the checkpoints
    QAT holds at its peak (weights and two moments each), the student's weights, the saved
    model and the GGUFs (at most two more copies), plus a tenth."""
    from agent_forge.preflight import Needs, checkpoints_on_disk

    micro = max(1, qat.batch_size // max(1, qat.grad_accum))
    logits = 15 * 4 * micro * qat.max_len * vocab_size
    copies = 3 * checkpoints_on_disk(qat.steps, qat.save_every) + 3
    return Needs(disk_bytes=int(n_bytes * copies * 1.1), memory_bytes=6 * n_bytes + logits)


def _phase3_eval_set(meta: dict) -> str:
    return ((meta.get("pipeline") or {}).get("config") or {}).get("eval_dataset") or "easy_arithmetic"


def stage_data(ctx: Context) -> dict:
    """Reasoning traces to fine-tune on: the JSONL given, else Phase 3's procedural mixture,
    built fresh (its own seed) with the test and validation questions kept out."""
    from agent_forge.data.general import build_mixture
    from agent_forge.data.overlap import asked_by, eval_sets_for, filter_overlap
    from agent_forge.data.schema import read_records, write_records

    cfg, path = ctx.cfg, ctx.out / "data" / "train.jsonl"
    test = ctx.state.result("validate_input")["eval_dataset"]
    if cfg.data_path:
        records = list(read_records(cfg.data_path))
    else:
        records, _ = build_mixture(cfg.data, exclude=asked_by(eval_sets_for(test, "easy_arithmetic_val")),
                                   exclude_general=asked_by(("arc_easy", "commonsense_qa")))
    records, leaked = filter_overlap(records)
    if not records:
        raise BitNetPhaseError(f"no usable training records ({cfg.data_path or 'procedural'})")
    write_records(path, records)
    return {"path": str(path), "records": len(records), "dropped_overlap": len(leaked),
            "source": cfg.data_path or f"procedural {cfg.data.difficulty} (seed {cfg.data.seed})"}


def stage_before(ctx: Context) -> dict:
    """The input model on the test questions, thinking on: the paired 'before'. A Phase 3
    model's own greedy pass over them is replayed instead of generated again."""
    from agent_forge.evaluation.metrics import accuracy_summary
    from agent_forge.evaluation.runner import evaluate, score

    items = eval_items(ctx)
    recorded = phase3_greedy_on(ctx.cfg, items)
    if recorded is not None:
        correct = [score(it, g.answer_text if g.closed else None)[0] for it, g in zip(items, recorded)]
        summary = accuracy_summary(correct)
        return {"accuracy_on": summary["accuracy"], "ci95_on": summary["ci95"], "n": summary["n"],
                "ms_per_example": 1000 * sum(g.seconds for g in recorded) / len(recorded),
                "correct_on": correct, "replayed": True}
    model, tok = teacher(ctx)
    r = evaluate(model, tok, items, thinking=thinking_mode(tok), max_new_tokens=ctx.cfg.max_new_tokens,
                 batch_size=GENERATION_BATCH, loglik=False)
    return {"accuracy_on": r.accuracy, "ci95_on": r.ci95, "n": r.n, "ms_per_example": r.ms_per_example,
            "correct_on": [bool(x["correct"]) for x in r.per_example], "replayed": False}


def stage_store_cost(ctx: Context) -> dict:
    """What storing the kept matrices (embeddings, head) in store_dtype costs on its own: the
    input model with exactly those matrices rounded, on the test questions (thinking on,
    greedy), paired with 'before'. The ternary model's change includes this cost."""
    import copy

    from agent_forge.bitnet.export import kept_matrices, round_kept_matrices
    from agent_forge.evaluation.runner import evaluate
    from agent_forge.validation.stats import paired_gain

    cfg, (model, tok) = ctx.cfg, teacher(ctx)
    if cfg.store_dtype in (None, "float32"):
        return {"measured": False, "reason": f"store_dtype {cfg.store_dtype}: the kept matrices are not rounded"}
    names = set(kept_matrices(fresh_student(ctx)))
    rounded = copy.deepcopy(model)
    round_kept_matrices(rounded, cfg.store_dtype, names)
    r = evaluate(rounded, tok, eval_items(ctx), thinking=thinking_mode(tok), max_new_tokens=cfg.max_new_tokens,
                 batch_size=GENERATION_BATCH, loglik=False)
    correct = [bool(x["correct"]) for x in r.per_example]
    return {"measured": True, "store_dtype": cfg.store_dtype, "rounded": sorted(names), "accuracy_on": r.accuracy,
            "ci95_on": r.ci95, "n": r.n, "change": paired_gain(ctx.state.result("before")["correct_on"], correct)}


def phase3_greedy_on(cfg: BitNetConfig, items) -> list | None:
    """The generations Phase 3 recorded (its anti-theater's greedy thinking-on pass) for these
    questions, if the input is the model that made them (same weights digest), with this
    budget and batch size; else None."""
    from agent_forge.inference import load_generations
    from agent_forge.models import read_meta, weights_digest

    record = read_meta(cfg.model).get("greedy_on") if Path(cfg.model).is_dir() else None
    if not record:
        return None
    key = {**record["key"], "mode": "on", "max_new_tokens": cfg.max_new_tokens, "batch_size": GENERATION_BATCH}
    if key != record["key"] or weights_digest(cfg.model) != record["weights_sha256"]:
        return None
    return load_generations(Path(cfg.model) / record["file"], key, [it.question for it in items], subset=True)


def stage_qat(ctx: Context) -> dict:
    """Convert, calibrate the activation norms, fine-tune; the student's weights are saved."""
    from safetensors.torch import save_file

    from agent_forge.bitnet.bitlinear import calibrate_act_norms
    from agent_forge.bitnet.convert import bitlinears
    from agent_forge.data.schema import read_records
    from agent_forge.quietstar.bake_data import encode_records
    from agent_forge.training.checkpoint import trainable_state
    from agent_forge.vocab import has_thinking_tokens

    cfg, (model, tok) = ctx.cfg, teacher(ctx)
    qat = qat_config(ctx)
    examples, dropped = encode_records(list(read_records(ctx.state.result("data")["path"])), tok,
                                       max_len=qat.max_len, direct=not has_thinking_tokens(tok))
    student = fresh_student(ctx)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    calib = first_batches(examples, qat.batch_size, cfg.calibrate_batches, pad) if cfg.act_norm else []
    calibrated = calibrate_act_norms(student, calib) if calib else 0
    start = _gptq_start(ctx, student, examples, qat, pad)
    trainer = QATTrainer(student, model, tok, qat, ctx.out / "qat", tracker=ctx.tracker,
                         evaluate=_curve_point(ctx) if qat.eval_every else None)
    result = trainer.run(examples, resume=ctx.resume, progress=ctx.progress)
    trained = trainer.loop.unwrapped()
    save_file(trainable_state(trained), ctx.out / "qat" / STUDENT_FILE)
    ctx.cache["student"] = _as_stored(ctx, trained.eval())
    return {**result, "dropped_for_length": dropped, "calibrated_norms": calibrated, "gptq": start,
            "converted_layers": len(bitlinears(trained)), "config": qat.to_dict()}


def first_batches(examples, batch_size: int, n: int, pad: int) -> list[dict]:
    """Up to n collated batches of the first training examples, in order: what act-norm
    calibration and the GPTQ fit look at."""
    from agent_forge.quietstar.bake_data import collate

    per = max(1, batch_size)
    return [collate(examples[i * per:(i + 1) * per], pad) for i in range(n) if examples[i * per:(i + 1) * per]]


def _gptq_start(ctx: Context, student, examples, qat: QATConfig, pad: int) -> dict | None:
    """qat.init "gptq": the student starts from GPTQ's codes, fitted on the first gptq_batches
    training batches. Not when resuming from a checkpoint, which holds the trained weights."""
    from agent_forge.bitnet.gptq import gptq_initialise

    if qat.init != "gptq":
        return None
    if ctx.resume and any((ctx.out / "qat").glob("**/step-*")):
        return {"skipped": "resumed from a checkpoint"}
    t0 = time.time()
    batches = first_batches(examples, qat.batch_size, qat.gptq_batches, pad)
    return {**gptq_initialise(student, batches), "batches": len(batches), "seconds": time.time() - t0}


def _curve_point(ctx: Context):
    """Validation accuracy (thinking on) of the student as QAT goes: the tokens-vs-accuracy curve."""
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.evaluation.runner import evaluate

    items = load_eval_set("easy_arithmetic_val", limit=ctx.cfg.qat.eval_samples)

    def point(step: int, model) -> dict:
        tok = ctx.cache["tokenizer"]
        r = evaluate(model, tok, items, thinking=thinking_mode(tok), max_new_tokens=ctx.cfg.max_new_tokens,
                     batch_size=GENERATION_BATCH, loglik=False, progress=False)
        model.train()
        return {"val_accuracy_on": r.accuracy, "val_ci95_on": r.ci95, "val_n": r.n}
    return point


def stage_after(ctx: Context) -> dict:
    """Anti-theater on the ternary model (thinking on and off, the same test questions); its
    thinking-on pass is the paired 'after' of the accuracy comparison. A model without
    thinking tokens (any HF causal LM) answers directly, and there are no thoughts to test."""
    from agent_forge.evaluation.metrics import accuracy_summary
    from agent_forge.validation.anti_theater import run_anti_theater
    from agent_forge.vocab import has_thinking_tokens

    student, tok = trained_student(ctx), ctx.cache["tokenizer"]
    if not has_thinking_tokens(tok):
        return _after_without_thinking(ctx, student, tok)
    report = run_anti_theater(student, tok, eval_items(ctx), batch_size=GENERATION_BATCH,
                              max_new_tokens=ctx.cfg.max_new_tokens,
                              thresholds={"check_honesty": ctx.cfg.check_honesty_threshold})
    rows = report.per_example
    off = accuracy_summary([bool(r["correct_off"]) for r in rows])
    return {**_paired_after(ctx, [bool(r["correct_on"]) for r in rows]), "thinking": True,
            "accuracy_off": off["accuracy"], "ci95_off": off["ci95"],
            "closed_rate": sum(r["closed_on"] for r in rows) / max(len(rows), 1),
            # closed is not enough: a broken model can close a block full of openers and noise
            "well_formed_rate": sum(r["well_formed_on"] for r in rows) / max(len(rows), 1),
            "answers_on": [{k: r[k] for k in ("id", "on", "closed_on")} for r in rows],
            "anti_theater": report.to_dict()}


def _after_without_thinking(ctx: Context, student, tok) -> dict:
    """The 'after' of a model that cannot think: its direct answers, paired with 'before'."""
    from agent_forge.evaluation.runner import evaluate

    r = evaluate(student, tok, eval_items(ctx), thinking="auto", max_new_tokens=ctx.cfg.max_new_tokens,
                 batch_size=GENERATION_BATCH, loglik=False, progress=False)
    rows = r.per_example
    return {**_paired_after(ctx, [bool(x["correct"]) for x in rows]), "thinking": False,
            "accuracy_off": None, "ci95_off": None, "closed_rate": None, "well_formed_rate": None,
            "answers_on": [{"id": x["id"], "on": x["reply"], "closed_on": x["closed"]} for x in rows],
            "anti_theater": {"passed": None, "sentence": "not run: the model has no thinking tokens, so it "
                                                         "answers directly and has no thoughts to test"}}


def _paired_after(ctx: Context, on: list[bool]) -> dict:
    """Accuracy after on the test questions, its change from 'before' (paired) and the
    relative drop against the target."""
    from agent_forge.evaluation.metrics import accuracy_summary
    from agent_forge.validation.stats import paired_gain, relative_drop

    before = ctx.state.result("before")["correct_on"]
    drop, summary = relative_drop(before, on), accuracy_summary(on)
    return {"accuracy_on": summary["accuracy"], "ci95_on": summary["ci95"], "n": len(on),
            "change": paired_gain(before, on), "relative_drop": drop["drop"], "relative_drop_ci95": drop["ci95"],
            "drop_target_met": drop["drop"] is not None and drop["drop"] < ctx.cfg.max_relative_drop}


def stage_save(ctx: Context) -> dict:
    """The ternary model in transformers' BitNet format; sizes and sparsity from what was
    written; the saved directory reloaded with plain transformers must give our logits."""
    from agent_forge.bitnet.convert import sparsity
    from agent_forge.bitnet.export import compression, disk_sizes, save_hf_bitnet
    from agent_forge.models import measure_model, read_meta, update_meta

    cfg, student = ctx.cfg, trained_student(ctx)
    (model, tok), dst = teacher(ctx), ctx.out / "model"
    size = measure_model(model)
    parent_meta = read_meta(cfg.model) if Path(cfg.model).is_dir() else {}
    meta = {"phase": 4, "parent": cfg.model, "parent_meta": parent_meta,
            "thinking_tokens": parent_meta.get("thinking_tokens"),
            "bitnet": {"original_params": size.n_params, "keep": list(cfg.keep), "act_norm": cfg.act_norm,
                       "weight_scale": cfg.weight_scale, "act_quant": cfg.act_quant,
                       "store_dtype": cfg.store_dtype, "size_category": size.category},
            "metrics": _metrics_for_meta(ctx)}
    save_hf_bitnet(student, tok, dst, meta, store_dtype=cfg.store_dtype)
    sizes = disk_sizes(dst)
    ratios = compression(sizes, size.n_params)
    sparse = sparsity(student)
    out = {"model_dir": str(dst), "sizes": sizes, **ratios, "size_category": size.category,
           "ratio_target_vs_fp32": RATIO_TARGETS[size.category], "sparsity": sparse,
           "sparsity_target_met": sparse["overall"] > cfg.min_sparsity,
           "reload": _reload_check(dst, student, tok, cfg.max_new_tokens, eval_items(ctx)[:RELOAD_PROBES])}
    meta["metrics"].update({"ratio_vs_fp32": ratios["ratio_vs_fp32"], "ratio_vs_bf16": ratios["ratio_vs_bf16"],
                            "total_bytes": sizes["total"], "sparsity": sparse["overall"]})
    update_meta(dst, meta)
    return out


def _metrics_for_meta(ctx: Context) -> dict:
    before, after = ctx.state.result("before"), ctx.state.result("after")
    return {"accuracy_before_on": before["accuracy_on"], "accuracy_on": after["accuracy_on"],
            "accuracy_off": after["accuracy_off"], "change_points": after["change"]["points"],
            "change_ci95_points": after["change"]["ci95_points"], "relative_drop": after["relative_drop"],
            "relative_drop_ci95": after.get("relative_drop_ci95"),
            "anti_theater_passed": after["anti_theater"]["passed"],
            "forced_past_handoff": ctx.state.result("validate_input").get("forced", False)}


def _reload_check(model_dir: Path, student, tokenizer, max_new_tokens: int, items) -> dict:
    """Plain `AutoModelForCausalLM.from_pretrained(dir)` against our in-memory ternary model.

    Logits on a probe, ours with activations rounded per token as the HF file runs them: this
    checks the stored weights (`rounding_logit_diff`: against the rounding the model trained
    with, non-zero under act_quant llamacpp). Then both answer `items` (a few test questions)
    in the same single batch, ours again rounding per token, so that any answer that differs
    is the file's doing, not batch layout's; and how often the reload's thinking closes and
    is well-formed (closed alone passes a block full of openers and noise)."""
    from agent_forge.bitnet.convert import activation_rounding
    from agent_forge.bitnet.export import eager, load_plain

    plain = load_plain(model_dir)
    ids = tokenizer(["Question: What is 12 + 7?", "Question: Solve x + 3 = 10."], return_tensors="pt",
                    padding=True)
    with torch.no_grad(), eager():
        a = plain(**ids).logits
        trained = student(**ids).logits
        with activation_rounding(student, "token"):
            b = student(**ids).logits
            ours = _answers(student, tokenizer, items, max_new_tokens)
        gens = _answers(plain, tokenizer, items, max_new_tokens)
    mask = ids["attention_mask"].bool()
    diff = float((a - b).abs()[mask].max())
    agree = answer_agreement(items, [{"id": it.id, "on": g.answer_text, "closed_on": g.closed}
                                     for it, g in zip(items, ours)], gens)
    return {"max_abs_logit_diff": diff, "logits_match": diff < 1e-3,
            "rounding_logit_diff": float((a - trained).abs()[mask].max()), "probes": len(items),
            "same_answer_rate": agree["agreement"], "accuracy_on": agree["gguf_accuracy_on"],
            "same_text_rate": sum(g.completion == o.completion for g, o in zip(gens, ours)) / len(items),
            "closed_rate": agree["gguf_closed_rate"], "well_formed_rate": agree["gguf_well_formed_rate"],
            "sample": gens[0].completion[:300], "loaded_class": type(plain).__name__}


def _answers(model, tokenizer, items, max_new_tokens: int) -> list:
    """Greedy thinking-on answers to `items`, all in one batch."""
    from agent_forge.inference import generate_answers

    return generate_answers(model, tokenizer, [it.question for it in items], thinking=thinking_mode(tokenizer),
                            max_new_tokens=max_new_tokens, batch_size=len(items), progress=False)


def stage_speed(ctx: Context) -> dict:
    """Decode tokens/s, same prompts and lengths: fp32 PyTorch (the input model), our
    BitLinear model in PyTorch, and transformers' packed BitNet model; ratios to fp32."""
    from agent_forge.bitnet.export import eager, load_plain
    from agent_forge.bitnet.speed import decode_speed, speed_table

    cfg, (model, tok) = ctx.cfg, teacher(ctx)
    prompts = [it.question for it in eval_items(ctx)[:cfg.speed_prompts]]
    n, repeats = cfg.speed_tokens, cfg.speed_repeats
    rows = {"fp32 PyTorch (input model)": decode_speed(model, tok, prompts, n, repeats=repeats),
            "BitLinear PyTorch (our training form)": decode_speed(trained_student(ctx), tok, prompts, n,
                                                                  repeats=repeats)}
    with eager():
        rows["transformers BitNet (packed; unpacks per call)"] = decode_speed(
            load_plain(ctx.out / "model"), tok, prompts, n, repeats=repeats)
    from agent_forge.llamacpp_engine import llamacpp_speed_rows, ternary_vs_q8_0

    cpp_rows, cpp = llamacpp_speed_rows(ctx.out / "gguf", trained_student(ctx), model, tok, prompts, n, repeats)
    rows.update(cpp_rows)
    table = speed_table(rows, baseline="fp32 PyTorch (input model)")
    best = max(r["ratio"] for r in table[1:] if "input model" not in r["name"])  # ternary rows only
    return {"rows": table, "threads": torch.get_num_threads(), "best_ternary_ratio": best,
            "speed_target_met": best >= cfg.min_speedup, "llamacpp": cpp, **ternary_vs_q8_0(rows),
            "not_measured": "; ".join(cpp["not_measured"]) or "nothing"}


def stage_agreement(ctx: Context) -> dict:
    """Does the GGUF answer what our ternary model answers? llama.cpp's ternary GGUF on the
    test questions (thinking on, greedy, the same budget), each answer read from the answer
    slot and compared with the PyTorch ternary model's from the after stage ("no answer"
    matches only "no answer"). Skipped, saying why, without llama.cpp or a ternary GGUF."""
    from agent_forge.inference import generate_answers
    from agent_forge.llamacpp_engine import TERNARY_ROW, LlamaCppModel, llamacpp_status

    cfg, tok = ctx.cfg, teacher(ctx)[1]
    cpp = ctx.state.result("speed")["llamacpp"]
    gguf = cpp["files"].get(TERNARY_ROW)
    ok, why = llamacpp_status()
    if gguf is None:
        why = next((m for m in cpp["not_measured"] if m.startswith(TERNARY_ROW)), "no ternary GGUF was written")
    if "answers_on" not in ctx.state.result("after"):
        ok, why = False, "the after stage of this run predates the answers it records"
    if gguf is None or not ok:
        return {"measured": False, "why": why}
    items = eval_items(ctx)
    gens = generate_answers(LlamaCppModel(gguf["path"]), tok, [it.question for it in items],
                            thinking=thinking_mode(tok), max_new_tokens=cfg.max_new_tokens, batch_size=1,
                            progress=False)
    result = answer_agreement(items, ctx.state.result("after")["answers_on"], gens)
    return {"measured": True, **result, "target": cfg.min_gguf_agreement,
            "target_met": result["agreement"] >= cfg.min_gguf_agreement}


def answer_agreement(items, ours: list[dict], gens) -> dict:
    """How often `gens` (another engine's Generations, in item order) give the answer our model
    gave (`ours`: rows with "id", "on" (the answer slot's text), "closed_on"), with its interval."""
    from agent_forge.evaluation.runner import score
    from agent_forge.validation.stats import wilson_interval
    from agent_forge.vocab import is_well_formed

    by_id = {r["id"]: r for r in ours}
    same, correct = [], []
    for it, g in zip(items, gens, strict=True):
        mine = by_id[it.id]
        theirs_ok, theirs = score(it, g.answer_text if g.closed else None)
        _, pred = score(it, mine["on"] if mine["closed_on"] else None)
        same.append(_same_answer(pred, theirs))
        correct.append(theirs_ok)
    n, k = len(same), sum(same)
    return {"agreement": k / n, "ci95": list(wilson_interval(k, n)), "n": n, "agreed": same,
            "gguf_accuracy_on": sum(correct) / n, "gguf_closed_rate": sum(g.closed for g in gens) / n,
            "gguf_well_formed_rate": sum(is_well_formed(g.completion) for g in gens) / n}


def _same_answer(a: str | None, b: str | None) -> bool:
    """Two answers read from the answer slot: equal numbers, or equal text; None only equals None."""
    from agent_forge.evaluation.answers import is_numeric, numbers_equal

    if a is None or b is None:
        return a is b
    return numbers_equal(a, b) if is_numeric(a) and is_numeric(b) else a.strip() == b.strip()


def stage_register(ctx: Context) -> dict:
    from agent_forge.registry import Registry

    reg = Registry(ctx.cfg.registry)
    parent = reg.find_by_path(ctx.cfg.model, phase=3)
    metrics = {**_metrics_for_meta(ctx), "ratio_vs_fp32": ctx.state.result("save")["ratio_vs_fp32"],
               "ratio_vs_bf16": ctx.state.result("save")["ratio_vs_bf16"],
               "sparsity": ctx.state.result("save")["sparsity"]["overall"],
               "speedup_vs_fp32": ctx.state.result("speed")["best_ternary_ratio"],
               "gguf_agreement": ctx.state.result("agreement").get("agreement")}
    model_id = reg.register_model(f"bitnet:{ctx.out.name}", 4, ctx.out / "model", parent_id=parent, metrics=metrics)
    return {"model_id": model_id, "parent_id": parent, "registry": str(reg.path)}


def stage_handoff(ctx: Context) -> dict:
    from agent_forge.bitnet.export_check import validate_phase4
    from agent_forge.registry import Registry

    save = ctx.state.result("save")
    result = validate_phase4(ctx.out / "model", {"ratio_vs_fp32": save["ratio_vs_fp32"],
                                                 "ratio_vs_bf16": save["ratio_vs_bf16"],
                                                 "total_bytes": save["sizes"]["total"],
                                                 "reload_max_abs_logit_diff": save["reload"]["max_abs_logit_diff"]})
    Registry(ctx.cfg.registry).update_handoff(ctx.state.result("register")["model_id"],
                                              "passed" if result.ok else "failed", result.to_dict())
    return result.to_dict()


STAGES = [("validate_input", stage_validate_input), ("data", stage_data), ("before", stage_before),
          ("store_cost", stage_store_cost), ("qat", stage_qat), ("after", stage_after), ("save", stage_save),
          ("speed", stage_speed), ("agreement", stage_agreement), ("register", stage_register),
          ("handoff", stage_handoff)]


# ---------------------------------------------------------------------------------------
# Running


def run_bitnet(cfg: BitNetConfig, resume: bool = False, on_stage: Callable | None = None,
               progress: Callable | None = None) -> dict:
    """Run (or resume) every stage; returns the report also written to out/bitnet_report.json."""
    out = Path(cfg.out)
    state = run_phase(STAGES, out, STATE_FILE, resume, lambda st, tr: Context(cfg, out, st, tr, progress, resume),
                      BitNetPhaseError, cfg.tracking, cfg.to_dict(), on_stage,
                      stage_runner(BitNetPhaseError, _user_errors(), "qat.lr"))
    per_stage, total = timings(state)
    report = {"model": cfg.model, "preset": cfg.preset, "out": cfg.out, "config": cfg.to_dict(),
              "stages": state.data["stages"], "timings": per_stage, "total_seconds": total}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return report


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can act on (a model that cannot be converted or does not load)."""
    from agent_forge.models import ModelLoadError
    from agent_forge.preflight import PreflightError

    return BitNetError, ModelLoadError, PreflightError
