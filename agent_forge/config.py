"""Shared configuration helpers: where Agent Forge keeps its files, and YAML loading."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml


def forge_home() -> Path:
    """FORGE_HOME, else the user's cache dir; holds the default model cache and the registry."""
    env = os.environ.get("FORGE_HOME")
    if env:
        path = Path(env).expanduser()
    else:
        from platformdirs import user_cache_dir

        path = Path(user_cache_dir("agent-forge"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def update_dataclass(obj, overrides: dict, where: str = "config"):
    """Return a copy of dataclass `obj` with `overrides` applied; unknown keys are an error.

    Nested dataclass fields take nested dicts.
    """
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ValueError(f"unknown {where} field {key!r}; known: {', '.join(sorted(fields))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = update_dataclass(current, value, f"{where}.{key}")
        changes[key] = value
    return dataclasses.replace(obj, **changes)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def preset_config(default, presets: dict[str, dict], preset: str, yaml_path: str | Path | None,
                  overrides: dict, where: str):
    """A phase's config: `default` with the preset's fields, then the YAML's, then the
    command line's (None = not given), each layer checked for unknown fields."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(presets)}")
    cfg = update_dataclass(default, presets[preset], where)
    if yaml_path:
        cfg = update_dataclass(cfg, load_yaml(yaml_path), where)
    return update_dataclass(cfg, {k: v for k, v in overrides.items() if v is not None}, where)
