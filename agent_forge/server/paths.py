"""Confine user-given paths to allowed roots.

A job request names a model and an output directory; the server must never read or write
outside the folders it was given. Paths are resolved (symlinks and `..` followed) before
the check, so `runs/../../etc` and a symlink pointing out of a root are both refused.
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
