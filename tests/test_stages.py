"""Resumable stages: a stage killed midway and resumed says its seconds count from the resume."""

import pytest

from agent_forge.stages import PhaseContext, StageState, resumed_note, run_stages


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
