"""Checks on a job's `overrides` before any worker starts: field types, and every field the
worker would read a file from confined to the server's roots.

Each phase config has a few string fields that name files: evaluation sets ("a+b", each
part a built-in set or a JSONL file), training JSONL, parent model directories. They are
listed here per phase (PATH_FIELDS), rewritten to their checked absolute paths, and a test
makes sure every string field of every phase config is either listed here or named as not
a path, so a new field cannot slip through unchecked.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from agent_forge.server.paths import PathRejected, confine, confine_dataset

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")  # owner/name[:config]

# Per phase: dotted field -> how it is read. "dataset": an evaluation-set string; "datasets":
# a list of them; "file": one JSONL file; "files": a list of them; "models": a list of model
# directories; "tokenizer": "default" or a tokenizer (model) directory; "hub": a list of hub
# dataset ids, which must not name a local path (load_dataset would read one).
PATH_FIELDS: dict[str, dict[str, str]] = {
    "cognate": {"tokenizer": "tokenizer", "data.text_files": "files", "data.hub_datasets": "hub"},
    "quietstar": {"eval_dataset": "dataset", "val_dataset": "dataset", "general_sets": "datasets"},
    "bitnet": {"eval_dataset": "dataset", "data_path": "file"},
    "evomerge": {"models": "models", "fitness.val_set": "dataset", "fitness.test_set": "dataset",
                 "parents.eval_sets": "datasets"},
}


class OverrideRejected(ValueError):
    """An override has the wrong type or names a path outside the allowed roots."""


def type_errors(default, overrides: dict, where: str) -> list[str]:
    """Overrides whose type does not match the config field's (update_dataclass checks names only)."""
    errors = []
    for key, value in overrides.items():
        current = getattr(default, key, None)
        name = f"{where}.{key}"
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                errors.append(f"{name} must be an object")
            else:
                errors += type_errors(current, value, name)
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                errors.append(f"{name} must be true or false")
        elif isinstance(current, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    isinstance(current, int) and not isinstance(value, int)):
                errors.append(f"{name} must be a {type(current).__name__}")
        elif isinstance(current, str) and not isinstance(value, str):
            errors.append(f"{name} must be a string")
        elif isinstance(current, (tuple, list)):
            errors += _sequence_errors(current, value, name)
    return errors


def _sequence_errors(current, value, name: str) -> list[str]:
    """A list whose items have the type of the default's items (strings unless it holds numbers)."""
    numbers = bool(current) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in current)
    if numbers:
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return [] if ok else [f"{name} must be a list of numbers"]
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return [] if ok else [f"{name} must be a list of strings"]


def confine_overrides(phase: str, overrides: dict, model_roots: list[Path], data_roots: list[Path]) -> dict:
    """A copy of `overrides` with the phase's path fields checked and made absolute; raises
    OverrideRejected. `data_roots` are where data files may be read from."""
    out = _copy(overrides)
    for dotted, how in PATH_FIELDS.get(phase, {}).items():
        *parents, key = dotted.split(".")
        holder = out
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or key not in holder or holder[key] is None:
            continue
        try:
            holder[key] = _confine_one(holder[key], how, dotted, model_roots, data_roots)
        except PathRejected as e:
            raise OverrideRejected(str(e)) from None
    return out


def _confine_one(value, how: str, name: str, model_roots: list[Path], data_roots: list[Path]):
    if how in ("datasets", "models", "files", "hub"):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            what = {"models": "model directories", "files": "files", "hub": "hub dataset ids"}.get(
                how, "dataset names or paths")
            raise OverrideRejected(f"{name} must be a list of {what}")
        if how == "hub":
            bad = [x for x in value if not HUB_ID.fullmatch(x) or ".." in x]
            if bad:
                raise OverrideRejected(f"{name}: {bad[0]!r} is not a hub dataset id (owner/name[:config])")
            return list(value)
        if how == "models":
            return [str(checked_model(x, model_roots, name)) for x in value]
        if how == "files":
            return [_confine_one(x, "file", name, model_roots, data_roots) for x in value]
        return [confine_dataset(x, data_roots, name) for x in value]
    if not isinstance(value, str):
        raise OverrideRejected(f"{name} must be a string")
    if how == "dataset":
        return confine_dataset(value, data_roots, name)
    if how == "tokenizer":
        return value if value == "default" else str(checked_model(value, model_roots, name))
    path = confine(value, data_roots, name)
    if not path.is_file():
        raise OverrideRejected(f"{name} {value!r} is not a file under the allowed roots")
    return str(path)


def checked_model(path: str, roots: list[Path], what: str = "model") -> Path:
    """A model directory under the roots that exists; raises PathRejected / OverrideRejected."""
    resolved = confine(path, roots, what)
    if not resolved.exists():
        raise OverrideRejected(f"{what} {path!r} does not exist")
    return resolved


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
