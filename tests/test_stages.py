"""stages: how every phase turns the errors a user can act on into its own error, and marks a
stage killed midway and resumed (its seconds count from the resume)."""

import pytest

from agent_forge.stages import PhaseContext, StageState, resumed_note, run_stages, stage_runner


class PhaseError(RuntimeError):
    pass


def _raise(exc):
    def stage(ctx):
        raise exc
    return stage


def test_user_errors_become_the_phase_error_and_others_pass_through():
    run = stage_runner(PhaseError, (ValueError,), "qat.lr", name_stage=True)
    assert run("data", lambda ctx: {"ok": ctx}, 1) == {"ok": 1}
    with pytest.raises(PhaseError, match=r"^stage data: bad input$") as info:
        run("data", _raise(ValueError("bad input")), None)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(KeyError):  # a bug, not the user's problem: not dressed up
        run("data", _raise(KeyError("x")), None)
    with pytest.raises(PhaseError, match=r"^bad input$"):
        stage_runner(PhaseError, (ValueError,))("data", _raise(ValueError("bad input")), None)


def test_a_stopped_training_says_how_to_resume_only_when_the_phase_names_its_lr():
    stopped = _raise(FloatingPointError("loss is nan at step 7"))
    with pytest.raises(PhaseError, match=r"stage qat stopped: loss is nan at step 7\. Rerun with --resume after "
                                         r"lowering qat\.lr in --config"):
        stage_runner(PhaseError, (ValueError,), "qat.lr")("qat", stopped, None)
    with pytest.raises(FloatingPointError):
        stage_runner(PhaseError, (ValueError,))("qat", stopped, None)


def test_a_stage_killed_midway_is_marked_resumed_and_no_other(tmp_path):
    calls = {"b": 0}

    def b(ctx):
        calls["b"] += 1
        if calls["b"] == 1:
            raise KeyboardInterrupt  # killed inside b
        return {"ok": True}

    stages = [("a", lambda ctx: {"x": 1}), ("b", b), ("c", lambda ctx: {"y": 2})]
    state = StageState(tmp_path, resume=False)
    with pytest.raises(KeyboardInterrupt):
        run_stages(stages, PhaseContext(None, tmp_path, state, None), state)
    assert StageState(tmp_path, resume=True).data["running"] == "b"  # on disk at the kill
    state = StageState(tmp_path, resume=True)
    run_stages(stages, PhaseContext(None, tmp_path, state, None, resume=True), state)
    st = StageState(tmp_path, resume=True).data
    assert "running" not in st and st["stages"]["b"]["stage_resumed"] is True
    assert "stage_resumed" not in st["stages"]["a"] and "stage_resumed" not in st["stages"]["c"]
    assert resumed_note(st["stages"]) == " (resumed: b counted from the resume)"
    assert resumed_note({"a": {"stage_seconds": 1.0}}) == ""


def test_config_changes_names_each_differing_setting_but_the_free_ones():
    from agent_forge.stages import RESUME_FREE, config_changes

    saved = {"preset": "hour", "qat": {"steps": 200, "lr": 1e-3, "sub": {"k": 1}}, "keep": ["lm_head"],
             "device": "cpu", "tracking": "offline", "force": False}
    new = {"preset": "quick", "qat": {"steps": 16, "lr": 1e-3, "sub": {"k": 2}}, "keep": ["lm_head"],
           "device": "cuda", "tracking": "disabled", "force": True, "added": 1}
    assert config_changes(saved, new) == ["added: None -> 1", "preset: 'hour' -> 'quick'", "qat.steps: 200 -> 16",
                                          "qat.sub.k: 1 -> 2"]
    assert set(RESUME_FREE) >= {"device", "tracking", "force"}
    assert config_changes(saved, saved) == []


def test_a_resume_with_other_settings_is_refused_before_any_stage(tmp_path):
    from agent_forge.stages import run_phase

    ran = []

    def stage(name, fail=False):
        def fn(ctx):
            ran.append(name)
            if fail:
                raise PhaseError("killed")
            return {"ok": True}
        return fn

    def run(config, stages, resume):
        return run_phase(stages, tmp_path / "run", "state.json", resume, lambda st, tr: PhaseContext(None, tmp_path, st, tr),
                         PhaseError, "disabled", config)

    config = {"preset": "hour", "qat": {"steps": 200}, "device": "cpu"}
    with pytest.raises(PhaseError, match="killed"):
        run(config, [("a", stage("a")), ("b", stage("b", fail=True))], resume=False)
    with pytest.raises(PhaseError, match=r"was started with other settings \(preset: 'hour' -> 'quick'; "
                                         r"qat\.steps: 200 -> 16\); --resume continues a run only with"):
        run({**config, "preset": "quick", "qat": {"steps": 16}}, [("a", stage("a")), ("b", stage("b"))], resume=True)
    assert ran == ["a", "b"]  # nothing ran on the refused resume
    state = run({**config, "device": "cuda"}, [("a", stage("a")), ("b", stage("b"))], resume=True)
    assert ran == ["a", "b", "b"] and state.data["config"] == config  # the settings it began with
