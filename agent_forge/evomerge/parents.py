"""Parents for a merge when only one model ships offline: specialists of one base model.

Merging pays when the parents share a trunk (fine-tuned from one model, so their neurons
line up) and are good at different things. `make_parents` fine-tunes the base model with
Step 1's baker (supervised on verified thinking traces) once per task family, each on
that family only, so each parent is strong on its family and weaker on the others.
`make_control` trains the fair alternative to merging: one model on all the families with
the parents' summed step budget.

A parent whose directory already holds a model made with the same settings is reused
(`cached: true` in the summary): the first build pays, later searches do not.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ParentsConfig:
    families: tuple[str, ...] = ("chain_sum", "basic_arithmetic", "simple_equations")
    """One parent per family; defaults to the families of the evaluation sets."""
    records: int = 400
    """Training records per parent (verified traces of its family)."""
    steps: int = 60
    """Optimiser steps per parent."""
    batch_size: int = 8
    lr: float = 2e-4
    seed: int = 0
    eval_sets: tuple[str, ...] = ("easy_arithmetic", "easy_arithmetic_val")
    """Questions no parent may train on: the fitness's validation and test splits."""


def _bake_overrides(cfg: ParentsConfig, steps: int) -> dict:
    return {"steps": steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
            "save_every": 0, "eval_samples": 16, "eval_thinking_off": False, "eval_max_new_tokens": 96}


def train_parent(base: str, families: tuple[str, ...], n_records: int, steps: int, cfg: ParentsConfig,
                 out: Path, progress=None) -> dict:
    """One Step 1 bake of `base` on `families`; reuses `out/model` when its settings match."""
    from agent_forge.data.overlap import asked_by
    from agent_forge.data.procedural import build_gym_records
    from agent_forge.data.schema import write_records
    from agent_forge.models import read_meta, update_meta
    from agent_forge.quietstar.step1 import run_step1

    settings = json.loads(json.dumps({"base": str(base), "families": list(families), "records": n_records,
                                      "steps": steps, **{k: v for k, v in asdict(cfg).items()
                                                         if k not in ("families", "records", "steps")}}))
    model_dir = out / "model"
    if model_dir.exists() and read_meta(model_dir).get("evomerge_parent") == settings:
        return {"path": str(model_dir), "cached": True, **settings}
    records = build_gym_records(n_records, seed=cfg.seed, families=families, exclude=asked_by(cfg.eval_sets))
    write_records(out / "train.jsonl", records)
    metrics = run_step1(str(base), out / "train.jsonl", out, _bake_overrides(cfg, steps),
                        eval_data=cfg.eval_sets[-1], progress=progress)
    update_meta(model_dir, {"phase": 2, "role": "parent", "evomerge_parent": settings})  # the cache's identity
    return {"path": str(model_dir), "cached": False, "token_accuracy": metrics.get("token_accuracy"), **settings}


def prepare_base(base: str, out: str | Path) -> str:
    """The base with the thinking tokens added (`out/base/model`), what every parent is
    fine-tuned from: the parents' common ancestor, weight for weight and token for token,
    so task vectors (parent - base) exist for the new rows too. Made once, then reused."""
    from agent_forge.models import load_model, read_meta, save_model
    from agent_forge.vocab import add_thinking_tokens, has_thinking_tokens

    dst = Path(out) / "base" / "model"
    if dst.exists() and read_meta(dst).get("evomerge_base") == str(base):
        return str(dst)
    model, tok = load_model(base)
    if not has_thinking_tokens(tok):
        add_thinking_tokens(model, tok)
    save_model(model, tok, dst, {"phase": 0, "evomerge_base": str(base)})
    return str(dst)


def make_parents(base: str, out: str | Path, cfg: ParentsConfig | None = None, progress=None) -> list[dict]:
    """One specialist per family under `out/<family>/model`, each fine-tuned from
    `prepare_base(base)` (which `out/base/model` holds); returns a summary per parent."""
    cfg = cfg or ParentsConfig()
    if len(cfg.families) < 2:
        raise ValueError("a merge needs at least two parents: give two or more families")
    out = Path(out)
    start = prepare_base(base, out)
    return [train_parent(start, (fam,), cfg.records, cfg.steps, cfg, out / fam, progress) for fam in cfg.families]


def make_control(base: str, out: str | Path, cfg: ParentsConfig | None = None, progress=None) -> dict:
    """The control: one model trained on every family with all the parents' data and steps."""
    cfg = cfg or ParentsConfig()
    return train_control(prepare_base(base, out), cfg, Path(out), progress)


def train_control(start: str, cfg: ParentsConfig, out: Path, progress=None) -> dict:
    """`out/control/model`: `start` trained on all of `cfg.families` with n x the records and steps."""
    n = len(cfg.families)
    return train_parent(start, tuple(cfg.families), cfg.records * n, cfg.steps * n, cfg, out / "control", progress)


def recipe_of(paths) -> tuple[str, ParentsConfig]:
    """(the common start, the ParentsConfig) that made these parents, read from their
    `forge_meta.json`, so a control can repeat the recipe on all their families. A ValueError
    naming the model when one was not made by `make_parents`, or the recipes differ."""
    from agent_forge.models import read_meta

    settings = []
    for path in paths:
        s = read_meta(path).get("evomerge_parent")
        if not s:
            raise ValueError(f"--control repeats the parents' training recipe on all their families, and {path} "
                             "was not made by --make-parents (no evomerge_parent in its forge_meta.json); "
                             "use --make-parents, or leave out --control")
        settings.append(s)
    shared = [{k: v for k, v in s.items() if k != "families"} for s in settings]
    if any(s != shared[0] for s in shared[1:]):
        diff = sorted(k for k in shared[0] if any(s.get(k) != shared[0][k] for s in shared[1:]))
        raise ValueError(f"--control: the parents were made with different settings ({', '.join(diff)}), "
                         "so there is no one recipe to repeat")
    fields = {k: v for k, v in shared[0].items() if k in ParentsConfig.__dataclass_fields__}
    families = tuple(f for s in settings for f in s["families"])
    return shared[0]["base"], ParentsConfig(**{**fields, "eval_sets": tuple(fields["eval_sets"]), "families": families})

