"""`forge run`: the phases as one chain on a tiny model (smoke presets), lineage from the
last model back to the input, the chain's refusals, and resume after a phase crashed."""

import json
from pathlib import Path

import pytest

from agent_forge.chain import ChainConfig, ChainError, run_chain
from agent_forge.models import save_model
from agent_forge.registry import Registry

from conftest import make_tiny_model, make_tiny_tokenizer, sigkill_once_checkpointed


@pytest.fixture
def base_dir(tmp_path):
    tok = make_tiny_tokenizer()
    return str(save_model(make_tiny_model("llama", len(tok)), tok, tmp_path / "base"))


def _cfg(tmp_path, base, **kw):
    return ChainConfig(**{"start": "evomerge", "stop": "bitnet", "model": base, "out": str(tmp_path / "chain"),
                          "preset": "smoke", "force": True, "tracking": "disabled",
                          "registry": str(tmp_path / "reg.db"), **kw})


def _ancestry(reg: Registry, model_id: int) -> list[int]:
    """Phases from a model back to its first ancestor, following the first parent."""
    phases = []
    while model_id is not None:
        entry = reg.get_model(model_id)
        phases.append(entry.phase)
        parents = reg.parents(model_id)
        model_id = parents[0] if parents else None
    return phases


@pytest.mark.slow
def test_chain_evomerge_to_bitnet_with_lineage(tmp_path, base_dir, forge_home, monkeypatch):
    """Each phase's output is the next one's input; the ternary model's ancestry runs back
    through Phase 3, the Phase 2 champion and a parent to the input model; a crash in the
    last phase resumes there without rerunning the others."""
    import agent_forge.chain as chain

    real = chain.RUNNERS["bitnet"]
    monkeypatch.setitem(chain.RUNNERS, "bitnet", lambda ctx: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        run_chain(_cfg(tmp_path, base_dir))
    state = json.loads((tmp_path / "chain" / "run_state.json").read_text())
    assert list(state["stages"]) == ["evomerge", "quietstar"]
    monkeypatch.setitem(chain.RUNNERS, "bitnet", real)
    with pytest.raises(ChainError, match="--resume"):
        run_chain(_cfg(tmp_path, base_dir))
    report = run_chain(_cfg(tmp_path, base_dir), resume=True)
    res = report["results"]
    assert report["phases"] == ["evomerge", "quietstar", "bitnet"]
    assert res["quietstar"]["stage_seconds"] == state["stages"]["quietstar"]["stage_seconds"]  # not rerun
    q = report["reports"]["quietstar"]
    assert q["model"] == res["evomerge"]["model"]  # Phase 3's input is the champion
    assert report["reports"]["bitnet"]["model"] == res["quietstar"]["model"]
    assert res["bitnet"]["forced"]  # the tiny model cannot pass 3 -> 4: forced, and it says so
    before = report["reports"]["bitnet"]["stages"]["before"]
    assert before["replayed"]  # Phase 3's greedy pass, not generated again
    reg = Registry(tmp_path / "reg.db")
    last = report["reports"]["bitnet"]["stages"]["register"]["model_id"]
    assert _ancestry(reg, last) == [4, 3, 2, 2, 0]
    assert (tmp_path / "chain" / "forge_report.json").exists()
    page = (tmp_path / "chain" / "forge_report.html").read_text()
    assert page.count("<img") >= 2 and "EvoMerge fitness per generation" in page
    assert "bitnet" in page and "chain time" in page


@pytest.mark.slow
def test_chain_cognate_to_bitnet(tmp_path, forge_home):
    """The whole system on tiny models: Cognate's three models (one trunk) are EvoMerge's
    parents, the champion is baked, then made ternary; the last model's ancestry runs back
    through every phase to a Cognate model."""
    report = run_chain(_cfg(tmp_path, "default", start="cognate"))
    res = report["results"]
    assert report["phases"] == ["cognate", "evomerge", "quietstar", "bitnet"]
    evo = report["reports"]["evomerge"]["config"]
    assert sorted(evo["models"]) == sorted(res["cognate"]["models"]) and evo["base"] == res["cognate"]["trunk"]
    assert report["reports"]["quietstar"]["model"] == res["evomerge"]["model"]
    assert report["reports"]["bitnet"]["model"] == res["quietstar"]["model"]
    reg = Registry(tmp_path / "reg.db")
    last = report["reports"]["bitnet"]["stages"]["register"]["model_id"]
    assert _ancestry(reg, last) == [4, 3, 2, 1]
    assert (tmp_path / "chain" / "forge_report.html").exists()


def test_chain_refuses_what_it_cannot_run(tmp_path, base_dir):
    with pytest.raises(ValueError, match="comes after"):
        run_chain(_cfg(tmp_path, base_dir, start="bitnet", stop="quietstar"))
    with pytest.raises(ValueError, match="unknown phase"):
        run_chain(_cfg(tmp_path, base_dir, stop="gguf"))
    assert not (tmp_path / "chain").exists()


def test_resume_from_another_directory_finds_what_the_phases_made(tmp_path, monkeypatch):
    """A chain started with a relative --out (and a relative input model) records absolute
    paths, so `--resume` from another working directory hands the next phase a model that
    exists. Fake phases: no model is trained."""
    from agent_forge import chain

    seen = []

    class Crash(Exception):
        pass

    def fake_quietstar(ctx):
        seen.append(("quietstar", ctx.input_for("quietstar")))
        model = ctx.phase_dir("quietstar") / "model"
        model.mkdir(parents=True)
        return {"model": str(model), "report": str(model / "report.json")}

    def fake_bitnet(ctx):
        seen.append(("bitnet", ctx.input_for("bitnet")))
        raise Crash()

    monkeypatch.setitem(chain.RUNNERS, "quietstar", fake_quietstar)
    monkeypatch.setitem(chain.RUNNERS, "bitnet", fake_bitnet)
    first, other = tmp_path / "first", tmp_path / "other"
    (first / "input").mkdir(parents=True)
    other.mkdir()
    monkeypatch.chdir(first)
    with pytest.raises(Crash):
        run_chain(ChainConfig(start="quietstar", stop="bitnet", model="input", out="chain"))
    monkeypatch.chdir(other)
    with pytest.raises(Crash):
        run_chain(ChainConfig(start="quietstar", stop="bitnet", model="default", out=str(first / "chain")),
                  resume=True)
    assert seen[0] == ("quietstar", str((first / "input").resolve()))
    assert seen[1][1] == seen[2][1] == str((first / "chain" / "quietstar" / "model").resolve())
    assert Path(seen[2][1]).is_dir()


# Wall-clock figures and the machine's free memory and disk: no two runs share them.
VARYING = ("second", "timing", "ms_per", "sec_per", "speed", "free")


def _figures(report, out: str):
    """The report's measured content: paths made relative to the run's folder, and what no
    two runs share (VARYING) dropped."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not any(t in k for t in VARYING)}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x.replace(out, "<out>") if isinstance(x, str) else x
    return strip(report)


@pytest.mark.slow
def test_sigkill_mid_phase_then_resume_gives_the_uninterrupted_report(tmp_path, base_dir, forge_home):
    """`forge run --from quietstar --to bitnet`: SIGKILL inside BitNet's QAT (after its first
    checkpoint), then --resume: the chain's report holds the same figures as a run that was
    never interrupted."""
    import os
    import subprocess
    import sys

    def forge(out, *extra, stdout=subprocess.DEVNULL):
        cfg = tmp_path / f"{out}.yaml"
        cfg.write_text(f"registry: {tmp_path / out / 'reg.sqlite'}\nquietstar:\n  fresh_seed: 7\n"  # not drawn per run
                       "bitnet:\n  qat:\n    steps: 12\n    save_every: 2\n")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        args = ["run", "--from", "quietstar", "--to", "bitnet", "--model", base_dir, "--preset", "smoke",
                "--force", "--tracking", "disabled", "--config", str(cfg), "--out", str(tmp_path / out)]
        return subprocess.Popen([sys.executable, "-m", "agent_forge", *args, *extra], env=env, stdout=stdout,
                                stderr=subprocess.STDOUT, text=True)

    assert forge("ref").wait(900) == 0
    victim = forge("run")
    sigkill_once_checkpointed(victim, tmp_path / "run" / "bitnet" / "qat" / "checkpoints", timeout=600)
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert list(state["stages"]) == ["quietstar"]  # it died inside BitNet
    resumed = forge("run", "--resume", stdout=subprocess.PIPE)
    log = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, log
    got = json.loads((tmp_path / "run" / "forge_report.json").read_text())
    want = json.loads((tmp_path / "ref" / "forge_report.json").read_text())
    assert got["phases"] == want["phases"] == ["quietstar", "bitnet"]
    assert _figures(got, str(tmp_path / "run")) == _figures(want, str(tmp_path / "ref"))
