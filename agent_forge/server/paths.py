"""Confine user-given paths to allowed roots.

A job request names a model, an output directory and evaluation sets; the server must never
read or write outside the folders it was given. Paths are resolved (symlinks and `..`
followed) before the check, so `runs/../../etc` and a symlink pointing out of a root are
both refused. An evaluation-set string is checked the way the loader reads it: split on
"+", each part a built-in set or a file, and every file part confined.
"""

from __future__ import annotations

from pathlib import Path


class PathRejected(ValueError):
    """The path is malformed or lies outside every allowed root."""


def confine(path: str, roots: list[Path], what: str) -> Path:
    """`path` resolved; relative paths are taken from the first root. Raises PathRejected."""
    if not roots:
        raise PathRejected(f"no allowed roots configured for {what}")
    if not path or "\x00" in path:
        raise PathRejected(f"{what}: empty path or NUL byte")
    try:
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            candidate = roots[0] / candidate
        resolved = candidate.resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, odd bytes
        raise PathRejected(f"{what}: cannot resolve {path!r} ({e})") from None
    for root in roots:
        if resolved == root.resolve() or resolved.is_relative_to(root.resolve()):
            return resolved
    allowed = ", ".join(str(r) for r in roots)
    raise PathRejected(f"{what} {path!r} resolves to {resolved}, outside the allowed roots ({allowed})")


def confine_dataset(name: str, roots: list[Path], what: str) -> str:
    """`name` with each file part replaced by its confined absolute path, so the loader
    (agent_forge.data.evalsets.load_eval_set: "a+b" is set a then set b) opens only checked
    files. Built-in sets stay as they are. Raises PathRejected."""
    if "+" in name and _is_file_under(name, roots, what):
        raise PathRejected(f"{what}: a file name may not contain '+' (the loader may split it): {name!r}")
    parts = [_dataset_part(part, roots, what) for part in name.split("+")]
    checked = "+".join(parts)
    if len(parts) > 1 and Path(checked).exists():  # the loader would read it whole, not split it
        raise PathRejected(f"{what} {name!r} is ambiguous: {checked} exists as one path")
    return checked


def _dataset_part(part: str, roots: list[Path], what: str) -> str:
    """A built-in set name as is, or an existing file under the roots as its absolute path."""
    from agent_forge.data.evalsets import NAMES

    if part in NAMES or part.startswith("gym:"):
        return part
    path = confine(part, roots, what)
    if "+" in str(path):
        raise PathRejected(f"{what}: a file path may not contain '+' (the loader splits on it): {path}")
    if not path.is_file():
        raise PathRejected(f"{what} {part!r} is neither a built-in set nor a file under the allowed roots")
    return str(path)


def _is_file_under(name: str, roots: list[Path], what: str) -> bool:
    """Whether `name`, whole, is a file under the roots (the loader then reads it unsplit)."""
    try:
        return confine(name, roots, what).is_file()
    except PathRejected:
        return False
