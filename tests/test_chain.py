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


# Wall-clock figures, throughput, the machine's free memory and disk, and where a resumed
# training run picked up: no two runs share them. BitNet's speed stage is decode tok/s.
VARYING = ("second", "timing", "ms_per", "sec_per", "tokens_per_s", "free", "resumed_from", "stage_resumed", "speed_target")
VARYING_PATHS = ("/reports/bitnet/stages/speed",)


def _figures(report, out: str):
    """The report's measured content: paths made relative to the run's folder, and what no
    two runs share (VARYING keys, VARYING_PATHS subtrees) dropped."""
    def strip(x, path: str):
        if isinstance(x, dict):
            return {k: strip(v, f"{path}/{k}") for k, v in x.items()
                    if not any(t in k for t in VARYING) and f"{path}/{k}" not in VARYING_PATHS}
        if isinstance(x, list):
            return [strip(v, path) for v in x]
        return x.replace(out, "<out>") if isinstance(x, str) else x
    return strip(report, "")


# Where the smoke chain from Cognate is killed: a file that exists only once the phase has
# something to resume from, and before it finishes. EvoMerge (the resume must skip a finished
# Cognate) and BitNet (it must skip three); each phase's own kill -9 test covers the others.
KILL_POINTS = (("evomerge", "evomerge", "search_state.json"),
               ("bitnet", "bitnet/qat/checkpoints", "step-*"))


@pytest.mark.slow
def test_sigkill_inside_two_phases_then_resume_gives_the_uninterrupted_report(tmp_path, forge_home):
    """The whole system on tiny models, `forge run --from cognate --to bitnet` (smoke), as
    processes: SIGKILL inside EvoMerge's search and BitNet's QAT, each followed by --resume:
    the report holds the same figures as a run that was never interrupted. On that run: each phase's input is the previous one's output and
    the last model's ancestry runs back through every phase to a Cognate model."""
    import os
    import subprocess
    import sys

    def forge(out, *extra):
        cfg = tmp_path / f"{out}.yaml"
        cfg.write_text(f"registry: {tmp_path / out / 'reg.sqlite'}\nquietstar:\n  fresh_seed: 7\n"  # not drawn per run
                       "  trace_bake_questions: 0\n  ab_test_rounds: 1\n  rl_enabled: false\n"
                       "bitnet:\n  qat:\n    steps: 8\n    save_every: 2\n")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        args = ["run", "--from", "cognate", "--to", "bitnet", "--preset", "smoke", "--force", "--tracking",
                "disabled", "--config", str(cfg), "--out", str(tmp_path / out)]
        with open(tmp_path / f"{out}.log", "a") as log:  # a file: a full pipe would stall the run
            return subprocess.Popen([sys.executable, "-m", "agent_forge", *args, *extra], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)

    def log(out):
        return (tmp_path / f"{out}.log").read_text()[-3000:]

    assert forge("ref").wait(1200) == 0, log("ref")
    victim, state_file = forge("run"), tmp_path / "run" / "run_state.json"
    order = ["cognate", "evomerge", "quietstar", "bitnet"]
    for phase, where, pattern in KILL_POINTS:
        sigkill_once_checkpointed(victim, tmp_path / "run" / where, timeout=900, pattern=pattern)
        done = list(json.loads(state_file.read_text())["stages"]) if state_file.exists() else []
        assert done == order[:order.index(phase)], f"not killed inside {phase}: {done}"
        victim = forge("run", "--resume")
    assert victim.wait(1200) == 0, log("run")
    got = json.loads((tmp_path / "run" / "forge_report.json").read_text())
    want = json.loads((tmp_path / "ref" / "forge_report.json").read_text())
    assert got["phases"] == want["phases"] == order
    assert _figures(got, str(tmp_path / "run")) == _figures(want, str(tmp_path / "ref"))

    res = want["results"]
    evo = want["reports"]["evomerge"]["config"]
    assert sorted(evo["models"]) == sorted(res["cognate"]["models"]) and evo["base"] == res["cognate"]["trunk"]
    assert want["reports"]["quietstar"]["model"] == res["evomerge"]["model"]
    assert want["reports"]["bitnet"]["model"] == res["quietstar"]["model"]
    for out, report in (("ref", want), ("run", got)):
        last = report["reports"]["bitnet"]["stages"]["register"]["model_id"]
        assert _ancestry(Registry(tmp_path / out / "reg.sqlite"), last) == [4, 3, 2, 1]
    assert (tmp_path / "ref" / "forge_report.html").exists()
