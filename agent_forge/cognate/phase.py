"""`forge cognate`: Phase 1 end to end, three small TRM x Titans-MAG models from scratch.

    data -> foundation -> specialise_reasoning -> specialise_memory -> specialise_speed
         [-> control_independent -> control_transformer] -> evaluate -> register

One trunk is trained on the foundation stage of the curriculum; each specialisation starts
from it (same shapes, so the three stay mergeable) and trains on the reasoning then the
advanced stage with its own behaviour: halting threshold and recursion cap, attention
window, memory write strength and chunk, ponder weight. Shapes cannot differ between
specialisations (Phase 2 merges weights), so "memory size" is the memory's effective
capacity: how hard it writes (memory_lr_max), how finely (memory_chunk_size), and how much
the model must lean on it (a short attention window).

Each stage's result goes to `out/cognate_state.json` when it finishes, so `--resume` after
a kill continues from the first unfinished stage (training from its last checkpoint).
Outputs: out/models/{reasoning,memory,speed} (HF dirs loadable with trust_remote_code),
out/cognate_report.json, registry rows (phase 1).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from agent_forge.cognate.data import CognateDataConfig, build_curriculum, load_stage
from agent_forge.cognate.train import CognateTrainConfig, CurriculumTrainer
from agent_forge.config import preset_config
from agent_forge.stages import PhaseContext, run_phase, stage_runner, timings

STATE_FILE = "cognate_state.json"
CONTROLS = ("independent", "transformer")
REPORT_FILE = "cognate_report.json"
# CognateConfig fields a specialisation may change (they leave every weight shape alone).
BEHAVIOUR_FIELDS = frozenset({"act_threshold", "max_recursion_steps", "sliding_window", "memory_lr_max",
                              "memory_chunk_size", "ponder_cost_weight", "latent_steps"})
SPECIALISATIONS = {
    "reasoning": {"act_threshold": 0.99, "max_recursion_steps": 8, "sliding_window": 128,
                  "memory_lr_max": 0.1, "memory_chunk_size": 16, "ponder_cost_weight": 0.002},
    "memory": {"act_threshold": 0.99, "max_recursion_steps": 6, "sliding_window": 32,
               "memory_lr_max": 0.3, "memory_chunk_size": 8, "ponder_cost_weight": 0.01},
    "speed": {"act_threshold": 0.9, "max_recursion_steps": 4, "sliding_window": 64,
              "memory_lr_max": 0.1, "memory_chunk_size": 16, "ponder_cost_weight": 0.05},
}


@dataclass
class CognatePhaseConfig:
    """Everything `forge cognate` does; presets below, YAML overrides any field."""

    out: str = "runs/cognate"
    preset: str = "quick"
    tokenizer: str = "default"  # "default": SmolLM2's, from the packaged default model; else an HF tokenizer dir
    device: str | None = None
    model: dict = field(default_factory=dict)  # CognateConfig shape fields; {} = the ~25M default
    foundation: dict = field(default_factory=lambda: {"act_threshold": 0.99, "max_recursion_steps": 6,
                                                      "sliding_window": 64})  # behaviour of the shared trunk
    specialisations: dict = field(default_factory=lambda: json.loads(json.dumps(SPECIALISATIONS)))
    data: CognateDataConfig = field(default_factory=CognateDataConfig)
    train: CognateTrainConfig = field(default_factory=CognateTrainConfig)
    # controls trained and measured beside the three (controls.py): "transformer" (a plain
    # transformer of the same size on one specialisation's token budget), "independent" (a
    # second trunk from another seed, for the merge control); true / false = both / none
    controls: tuple[str, ...] = ("transformer",)
    eval_blocks: int = 64  # validation blocks every model is measured on
    eval_questions: int = 40  # easy_arithmetic_val questions each model answers (greedy; 0 = skip)
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 8
    tracking: str = "offline"
    registry: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SMOKE_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                "memory_dim": 8, "memory_hidden_size": 16, "recursion_intermediate_size": 64,
                "recursion_after_layer": 1, "latent_steps": 1}
_QUICK_MODEL = {"hidden_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4, "intermediate_size": 192,
                "memory_dim": 16, "memory_hidden_size": 32, "recursion_intermediate_size": 128, "latent_steps": 1}
PRESETS: dict[str, dict] = {
    # seconds, tiny dims: proves every stage runs (tests).
    "smoke": {"model": _SMOKE_MODEL, "eval_blocks": 4, "eval_batch_size": 4, "controls": CONTROLS,
              "eval_questions": 4, "eval_max_new_tokens": 8,
              "foundation": {"max_recursion_steps": 3, "sliding_window": 8},
              "specialisations": {"reasoning": {"max_recursion_steps": 4, "sliding_window": 16},
                                  "memory": {"max_recursion_steps": 3, "sliding_window": 4, "memory_lr_max": 0.3,
                                             "memory_chunk_size": 4},
                                  "speed": {"max_recursion_steps": 2, "act_threshold": 0.9, "sliding_window": 8,
                                            "ponder_cost_weight": 0.05}},
              "data": {"records_per_stage": 24, "seq_len": 32, "val_fraction": 0.2},
              "train": {"foundation_steps": 4, "specialise_steps": 4, "batch_size": 2, "save_every": 2,
                        "warmup_steps": 1}},
    # a small 8-layer model (3.7M parameters, most of them the embeddings) on the 2-core CPU,
    # with the same-size transformer control: 300 + 3 x 100 steps took 18.0 min without the
    # control (1.6 s per step); 200 + 3 x 80 leave it room within 20 minutes.
    "quick": {"model": _QUICK_MODEL, "eval_blocks": 32,
              "data": {"records_per_stage": 1500, "seq_len": 128},
              "train": {"foundation_steps": 200, "specialise_steps": 80, "batch_size": 4, "save_every": 50,
                        "warmup_steps": 20}},
    # ~25M parameters each, the full curriculum: a GPU's hours; batch and sequence length
    # from the device's free memory (sizing.py).
    "standard": {"data": {"records_per_stage": 20000}, "eval_blocks": 256, "controls": CONTROLS,
                 "eval_questions": 300,
                 "train": {"foundation_steps": 20000, "specialise_steps": 5000, "save_every": 500,
                           "warmup_steps": 200}},
}


def make_config(preset: str = "quick", yaml_path: str | Path | None = None, **overrides) -> CognatePhaseConfig:
    cfg = preset_config(CognatePhaseConfig(preset=preset), {k: _merged_specs(v) for k, v in PRESETS.items()},
                        preset, yaml_path, overrides, "cognate config")
    for name, spec in cfg.specialisations.items():
        unknown = set(spec) - BEHAVIOUR_FIELDS
        if unknown:
            raise ValueError(f"specialisation {name!r} changes {sorted(unknown)}; a specialisation may only change "
                             f"{sorted(BEHAVIOUR_FIELDS)} (shapes must match for merging)")
    cfg.controls = control_names(cfg.controls)
    if len(cfg.specialisations) < 2:
        raise ValueError("cognate needs at least two specialisations (diversity is measured between them)")
    return cfg


def control_names(controls) -> tuple[str, ...]:
    """The controls to train, from a list of names or true / false (all / none)."""
    if isinstance(controls, bool):
        return CONTROLS if controls else ()
    names = (controls,) if isinstance(controls, str) else tuple(controls)
    unknown = set(names) - set(CONTROLS)
    if unknown:
        raise ValueError(f"unknown controls {sorted(unknown)}; choose from {list(CONTROLS)} (or true / false)")
    return tuple(c for c in CONTROLS if c in names)


def _merged_specs(preset: dict) -> dict:
    """A preset's specialisations are overrides of the default ones, not replacements."""
    if "specialisations" not in preset:
        return preset
    specs = {k: {**SPECIALISATIONS.get(k, {}), **v} for k, v in preset["specialisations"].items()}
    return {**preset, "specialisations": specs}


Context = PhaseContext  # the stages of this phase take one (agent_forge/stages.py)


class CognatePhaseError(RuntimeError):
    """A stage found a problem the user must fix; the message says what."""


def tokenizer(ctx: Context):
    if "tokenizer" not in ctx.cache:
        from transformers import AutoTokenizer

        from agent_forge.models import default_model_dir

        spec = ctx.cfg.tokenizer
        tok = AutoTokenizer.from_pretrained(default_model_dir() if spec == "default" else spec)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        ctx.cache["tokenizer"] = tok
    return ctx.cache["tokenizer"]


def model_config(ctx: Context, behaviour: dict):
    from agent_forge.cognate.config import CognateConfig

    tok = tokenizer(ctx)
    return CognateConfig(**{**ctx.cfg.model, **behaviour, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id})


def device(ctx: Context) -> str:
    from agent_forge.models import default_device

    return ctx.cfg.device or default_device()


# ---------------------------------------------------------------------------------------
# The stages


def stage_data(ctx: Context) -> dict:
    """The curriculum's token blocks, with evaluation questions kept out; a batch size or
    sequence length of 0 is chosen from the free memory here and recorded (sizing.py)."""
    from agent_forge.data.overlap import asked_by, eval_sets_for

    cfg, sizing = ctx.cfg, None
    batch_size, seq_len = cfg.train.batch_size, cfg.data.seq_len
    if not (batch_size and seq_len):
        from agent_forge.cognate.sizing import resolve

        sizing = resolve(widest_model_kwargs(ctx), cfg.train, batch_size, seq_len, device(ctx)).to_dict()
        batch_size, seq_len = sizing["batch_size"], sizing["seq_len"]
    exclude = asked_by(eval_sets_for("easy_arithmetic_val"))
    data = build_curriculum(dataclasses.replace(cfg.data, seq_len=seq_len), tokenizer(ctx), ctx.out / "data", exclude)
    return {**data, "batch_size": batch_size, "sizing": sizing}


def widest_model_kwargs(ctx: Context) -> dict:
    """The model's config with the most recursion steps any stage uses: the memory-hungriest."""
    behaviours = [ctx.cfg.foundation, *({**ctx.cfg.foundation, **s} for s in ctx.cfg.specialisations.values())]
    widest = max(behaviours, key=lambda b: b.get("max_recursion_steps", 0))
    return model_config(ctx, widest).to_dict()


def train_config(ctx: Context, **changes) -> CognateTrainConfig:
    """The training settings with the batch size the data stage settled on."""
    batch = trained_batch_size(ctx.state.result("data"), ctx.cfg)
    return dataclasses.replace(ctx.cfg.train, batch_size=batch, **changes)


def trained_batch_size(data: dict, cfg: CognatePhaseConfig) -> int:
    """The batch the data stage recorded; the configured one for a run whose data stage
    predates the record."""
    return data.get("batch_size") or cfg.train.batch_size


def stage_foundation(ctx: Context) -> dict:
    """The shared trunk: a fresh model (seeded) trained on the foundation stage."""
    from agent_forge.cognate.model import CognateForCausalLM
    from agent_forge.models import measure_model

    cfg = ctx.cfg
    torch.manual_seed(cfg.train.seed)
    model = CognateForCausalLM(model_config(ctx, cfg.foundation)).to(device(ctx))
    pools = [load_stage(ctx.out / "data", "foundation")["train"]]
    result = _train_and_save(ctx, model, pools, cfg.train.foundation_steps, train_config(ctx), ctx.out / "foundation",
                             "cognate_foundation", {"role": "foundation", "behaviour": cfg.foundation})
    return {**result, "n_params": measure_model(model).n_params}


def stage_specialise(ctx: Context, name: str, index: int) -> dict:
    """One specialisation: the trunk with its behaviour, trained on reasoning then advanced
    blocks (its own batch order, seed + index + 1)."""
    from agent_forge.cognate.model import CognateForCausalLM

    cfg, spec = ctx.cfg, ctx.cfg.specialisations[name]
    behaviour = {**cfg.foundation, **spec}
    model = CognateForCausalLM.from_pretrained(ctx.out / "foundation" / "model", **behaviour).to(device(ctx))
    pools = [load_stage(ctx.out / "data", stage)["train"] for stage in ("reasoning", "advanced")]
    train = train_config(ctx, seed=cfg.train.seed + index + 1)
    return _train_and_save(ctx, model, pools, cfg.train.specialise_steps, train, ctx.out / "runs" / name,
                           f"cognate_{name}", {"role": "specialisation", "specialisation": name,
                                               "behaviour": behaviour}, ctx.out / "models" / name)


def _train_and_save(ctx: Context, model, pools, steps: int, train: CognateTrainConfig, run_dir: Path, stage: str,
                    meta: dict, model_dir: Path | None = None) -> dict:
    from agent_forge.models import save_model

    trainer = CurriculumTrainer(model, pools, steps, train, run_dir, stage, tracker=ctx.tracker)
    result = trainer.run(resume=ctx.resume, progress=ctx.progress)
    model_dir = model_dir or run_dir / "model"
    save_model(trainer.loop.unwrapped(), tokenizer(ctx), model_dir,
               {"phase": 1, "cognate": meta,
                "parent": str(ctx.out / "foundation" / "model") if meta["role"] == "specialisation" else None})
    shutil.rmtree(trainer.ckpt_dir, ignore_errors=True)  # the model is saved; resume checkpoints are spent
    return {**result, "model_dir": str(model_dir)}


def validation_blocks(ctx: Context) -> torch.Tensor:
    """The first eval_blocks validation blocks, taken round-robin over the curriculum stages."""
    vals = [load_stage(ctx.out / "data", s)["val"] for s in ("foundation", "reasoning", "advanced")]
    rows = [v[i] for i in range(max(len(v) for v in vals)) for v in vals if i < len(v)]
    return torch.stack(rows[:ctx.cfg.eval_blocks])


def stage_evaluate(ctx: Context) -> dict:
    """Every model on the same validation blocks and questions; diversity of the
    specialisations; a merge (and the controls when on). Losses come with 95% intervals over
    the blocks, and comparisons (against the unigram baseline, a merge's parent, a control)
    are paired over the same blocks."""
    from agent_forge.cognate.metrics import diversity, diversity_ci, evaluate_model, merge_check, reasoning_accuracy
    from agent_forge.cognate.model import CognateForCausalLM
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.evaluation.metrics import clearly_below, paired_difference
    from agent_forge.models import update_meta

    cfg, blocks = ctx.cfg, validation_blocks(ctx)
    questions = load_eval_set("easy_arithmetic_val", limit=cfg.eval_questions) if cfg.eval_questions else []
    unigram_blocks = unigram_on(ctx, blocks)
    unigram = float(sum(unigram_blocks) / len(unigram_blocks))
    dirs = {"foundation": ctx.out / "foundation" / "model",
            **{n: ctx.out / "models" / n for n in cfg.specialisations}}
    models, figures, preds, steps = {}, {}, {}, {}
    for name, path in dirs.items():
        models[name] = CognateForCausalLM.from_pretrained(path).to(device(ctx)).eval()
        figures[name], preds[name], steps[name] = evaluate_model(models[name], blocks, cfg.eval_batch_size)
        figures[name]["vs_unigram"] = paired_difference(figures[name]["block_losses"], unigram_blocks)
        figures[name]["beats_unigram"] = clearly_below(figures[name]["vs_unigram"])
        if cfg.eval_questions:
            figures[name]["easy_accuracy"] = reasoning_accuracy(models[name], tokenizer(ctx), questions,
                                                                cfg.eval_max_new_tokens, cfg.eval_batch_size)
    specialists = {n: models[n] for n in cfg.specialisations}
    div = diversity({n: preds[n] for n in specialists}, {n: steps[n] for n in specialists})
    div["ci95"] = diversity_ci({n: preds[n] for n in specialists}, {n: steps[n] for n in specialists}, len(blocks))
    merge = merge_check(specialists, blocks, cfg.eval_batch_size, unigram_blocks,
                        {n: figures[n]["block_losses"] for n in specialists})
    for name in cfg.specialisations:
        kept = {k: v for k, v in figures[name].items() if k != "block_losses"}
        update_meta(dirs[name], {"metrics": {**kept, "unigram_val_loss": unigram, "diversity": div["diversity"]}})
    result = {"unigram_val_loss": unigram, "unigram_block_losses": unigram_blocks,
              "unigram_val_loss_all": ctx.state.result("data")["unigram_val_loss"], "eval_blocks": len(blocks),
              "models": figures, "diversity": div, "merge": merge, "diversity_target_met": div["diversity"] > 0.3}
    if cfg.controls:
        from agent_forge.cognate.controls import evaluate_controls

        result["controls"] = evaluate_controls(ctx, {n: figures[n] for n in specialists}, blocks, merge)
    return result


def unigram_on(ctx: Context, blocks: torch.Tensor) -> list[float]:
    """The unigram baseline (the training tokens of every curriculum stage) on each of `blocks`."""
    from agent_forge.cognate.data import unigram_block_losses

    train = torch.cat([load_stage(ctx.out / "data", s)["train"].flatten()
                       for s in ("foundation", "reasoning", "advanced")])
    return unigram_block_losses(train, blocks, ctx.state.result("data")["vocab_size"]).tolist()


def stage_register(ctx: Context) -> dict:
    """One registry row per specialisation (phase 1)."""
    from agent_forge.registry import Registry

    reg, figures = Registry(ctx.cfg.registry), ctx.state.result("evaluate")["models"]
    ids = {}
    for name in ctx.cfg.specialisations:
        keys = ("val_loss", "val_loss_ci95", "mean_halting_steps", "ponder", "beats_unigram")
        metrics = {k: figures[name].get(k) for k in keys}
        metrics["diversity"] = ctx.state.result("evaluate")["diversity"]["diversity"]
        ids[name] = reg.register_model(f"cognate:{ctx.out.name}:{name}", 1, ctx.out / "models" / name,
                                       metrics=metrics)
    return {"model_ids": ids, "registry": str(reg.path)}


def stages(cfg: CognatePhaseConfig) -> list:
    specialise = [(f"specialise_{name}", partial(stage_specialise, name=name, index=i))
                  for i, name in enumerate(cfg.specialisations)]
    from agent_forge.cognate.controls import stage_control_independent, stage_control_transformer

    control_stages = {"independent": stage_control_independent, "transformer": stage_control_transformer}
    controls = [(f"control_{name}", control_stages[name]) for name in CONTROLS if name in cfg.controls]
    return [("data", stage_data), ("foundation", stage_foundation), *specialise, *controls,
            ("evaluate", stage_evaluate), ("register", stage_register)]


# ---------------------------------------------------------------------------------------
# Running


def _batch_and_seq(data: dict, cfg: CognatePhaseConfig) -> dict:
    """What the run trained with (the data stage may have chosen them from the free memory)."""
    return {"batch_size": trained_batch_size(data, cfg), "seq_len": data["seq_len"],
            "sizing": data.get("sizing")}


def run_cognate(cfg: CognatePhaseConfig, resume: bool = False, on_stage: Callable | None = None,
                progress: Callable | None = None) -> dict:
    """Run (or resume) every stage; returns the report also written to out/cognate_report.json."""
    out = Path(cfg.out)
    state = run_phase(stages(cfg), out, STATE_FILE, resume, lambda st, tr: Context(cfg, out, st, tr, progress, resume),
                      CognatePhaseError, cfg.tracking, cfg.to_dict(), on_stage,
                      stage_runner(CognatePhaseError, (ValueError, OSError), "train.lr", name_stage=True))
    per_stage, total = timings(state)
    ev = state.result("evaluate")
    report = {"preset": cfg.preset, "out": cfg.out, "config": cfg.to_dict(), "stages": state.data["stages"],
              "models": {n: str(out / "models" / n) for n in cfg.specialisations},
              "unigram_val_loss": ev["unigram_val_loss"], "diversity": ev["diversity"]["diversity"],
              "mean_halting_steps": {n: ev["models"][n]["mean_halting_steps"] for n in cfg.specialisations},
              "val_loss": {n: m["val_loss"] for n, m in ev["models"].items()},
              **_batch_and_seq(state.result("data"), cfg), "timings": per_stage, "total_seconds": total}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return report
