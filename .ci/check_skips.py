"""Fail CI when a test skipped because a package that `make setup` installs is missing.

Usage: python .ci/check_skips.py JUNIT_XML  (pytest's --junitxml report of `make test`).
Every skip is printed with its reason. Skips for other reasons (no chromium, ...) are
allowed; a skip whose reason names a missing module that belongs to a setup package
(agent-forge's requirements with the extras the Makefile installs, and the Makefile's
pins) makes the exit status 1, so a broken install can no longer pass CI as a quiet skip.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# "could not import 'lm_eval': No module named 'lm_eval'" (pytest.importorskip), or any
# reason naming a missing module.
MODULE_IN_REASON = re.compile(r"(?:could not import|No module named) '([\w.]+)'")


def setup_packages(makefile: str, requirements: list[str]) -> set[str]:
    """Canonical names of what `make setup` installs: the project's requirements (those of the
    extras the Makefile installs included) and the Makefile's own pins (torch, --no-deps)."""
    extras = {e for group in re.findall(r'-e "\.\[([\w,-]+)\]"', makefile) for e in group.split(",")}
    pins = [p for line in re.findall(r"^(?:TORCH|NODEPS)\s*:=(.*)$", makefile, re.M) for p in line.split()]
    if not extras or not pins:
        raise SystemExit("check_skips: cannot read the extras / pinned packages from the Makefile")
    names = set()
    for req in map(Requirement, requirements + pins):
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
            names.add(canonicalize_name(req.name))
    return names


def skipped_tests(junit_xml: Path) -> list[tuple[str, str]]:
    """(test id, reason) of every skipped test in a pytest junit report; exits if there is none."""
    if not junit_xml.is_file():
        raise SystemExit(f"check_skips: no test report at {junit_xml}")
    cases = ET.parse(junit_xml).getroot().iter("testcase")
    found = [(f"{c.get('classname')}::{c.get('name')}", c.find("skipped")) for c in cases]
    if not found:
        raise SystemExit(f"check_skips: {junit_xml} holds no test cases")
    return [(test, s.get("message", "")) for test, s in found if s is not None]


def missing_setup_package(reason: str, setup: set[str]) -> str | None:
    """The setup package a skip reason says is missing (by module name or its distribution), else None."""
    dists = packages_distributions()
    for module in MODULE_IN_REASON.findall(reason):
        top = module.split(".")[0]
        for name in [top, *dists.get(top, [])]:
            if canonicalize_name(name) in setup:
                return canonicalize_name(name)
    return None


def main(argv: list[str]) -> int:
    """Print every skip; 1 if any skipped for a missing setup package, else 0."""
    if len(argv) != 2:
        raise SystemExit(__doc__)
    setup = setup_packages((ROOT / "Makefile").read_text(), requires("agent-forge") or [])
    bad = []
    for test, reason in skipped_tests(Path(argv[1])):
        package = missing_setup_package(reason, setup)
        print(f"{'SKIP (setup package missing)' if package else 'skip (allowed)'}: {test}: {reason}")
        if package:
            bad.append(package)
    if bad:
        print(f"FAIL: {len(bad)} test(s) skipped because `make setup` did not install: "
              f"{', '.join(sorted(set(bad)))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
