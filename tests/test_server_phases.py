"""The job API's phase kinds (cognate, evomerge, bitnet, run) on a real uvicorn on 127.0.0.1: a
BitNet, an EvoMerge and a Cognate job run to their reports on tiny models, a `run` (chain) job
is paused mid-QAT (its progress showing the step) and resumed from its checkpoint, bad
requests are refused before anything starts, and every route still needs the token. All traffic goes to 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from agent_forge.models import save_model
from agent_forge.registry import Registry

from conftest import make_tiny_model, make_tiny_tokenizer
from test_server import AUTH, Server, _wait

BITNET_STAGES = ["validate_input", "data", "before", "store_cost", "qat", "after", "save", "speed", "agreement", "register", "handoff"]
QAT_STEPS = 120  # enough that a pause after the first checkpoint lands mid-QAT, even on a busy CPU


def _phase3_model(path: Path, phase=3) -> str:
    """A tiny model as Phase 3 leaves it: thinking tokens, a passed 3 -> 4 handoff in its meta."""
    from agent_forge.vocab import add_thinking_tokens, thinking_token_ids

    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    add_thinking_tokens(model, tok)
    meta = {"phase": phase, "thinking_tokens": thinking_token_ids(tok),
            "metrics": {"baking_accuracy": 0.9, "anti_theater_passed": True}}
    return str(save_model(model, tok, path, meta))


def _family(models: Path) -> tuple[str, list[str]]:
    """A base and two children that differ from it in one layer each (merge parents)."""
    import torch

    tok = make_tiny_tokenizer()
    save_model(make_tiny_model("llama", len(tok)), tok, models / "base")
    children = []
    for k in range(2):
        child = make_tiny_model("llama", len(tok))
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for name, p in child.named_parameters():
                if f"layers.{k}." in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        children.append(str(save_model(child, tok, models / f"child{k}")))
    return str(models / "base"), children


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-phases")
    _phase3_model(root / "models" / "p3")
    _phase3_model(root / "models" / "p2", phase=2)
    _family(root / "models")
    (root / "runs").mkdir()
    return root


@pytest.fixture(scope="module")
def server(root):
    s = Server(root, max_running=2)
    yield s
    s.stop()


def _post(server, body: dict, status: int) -> dict:
    r = server.client.post("/jobs", json=body, headers=AUTH)
    assert r.status_code == status, (body, r.status_code, r.text)
    return r.json()


def _log_steps(run: Path, stage: str) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r.get("stage") == stage]


def test_phase_kinds_agree_with_the_phases():
    """The names the server keeps without importing torch match the phases' own."""
    from agent_forge import chain
    from agent_forge.bitnet import phase as bitnet
    from agent_forge.cognate import phase as cognate
    from agent_forge.evomerge import phase as evomerge
    from agent_forge.quietstar import pipeline
    from agent_forge.server import app, jobs, phases

    assert set(typing.get_args(app.Kind)) == set(jobs.KINDS) and set(phases.PHASE_KINDS) <= set(jobs.RESUMABLE)
    assert phases.CHAIN_PHASES == chain.PHASES
    for kind, module in (("evomerge", evomerge), ("bitnet", bitnet), ("cognate", cognate)):
        assert phases.STATE_FILES[kind] == module.STATE_FILE and phases.REPORT_FILES[kind] == module.REPORT_FILE
    assert [name for name, _ in bitnet.STAGES] == BITNET_STAGES
    assert (phases.STATE_FILES["run"], phases.REPORT_FILES["run"]) == (chain.STATE_FILE, chain.REPORT_FILE)
    for module in (evomerge, bitnet, pipeline, cognate):
        assert tuple(module.PRESETS) == app.PRESET_NAMES


def _text_fields(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _text_fields(value, f"{prefix}{f.name}.")
        elif "str" in str(f.type):
            yield prefix + f.name


def test_every_path_field_of_a_phase_config_is_checked():
    """Each string field of the Cognate, EvoMerge, BitNet and chain configs is a checked path, a request
    field, or named here as not a path: a new field must be classed before a job can set it."""
    from agent_forge.bitnet.phase import make_config as bitnet_config
    from agent_forge.chain import ChainConfig
    from agent_forge.cognate.phase import make_config as cognate_config
    from agent_forge.evomerge.phase import make_config as evomerge_config
    from agent_forge.server.checks import PATH_FIELDS
    from agent_forge.server.phases import RESERVED

    not_paths = {
        "bitnet": {"data.difficulty", "data.families", "data.general_train_sets", "qat.optimizer", "qat.progressive",
                   "qat.mixed_precision", "qat.init", "keep", "store_dtype", "act_norm", "weight_scale",
                   "act_quant", "tracking"},
        "evomerge": {"parents.families", "search.strategy", "fitness.thinking", "tracking"},
        "cognate": {"data.families", "controls", "train.optimizer", "train.mixed_precision", "tracking"},
        "run": {"start", "stop", "tracking"},
    }
    configs = {"bitnet": bitnet_config("quick"), "evomerge": evomerge_config("quick"), "run": ChainConfig(),
               "cognate": cognate_config("quick")}
    for kind, cfg in configs.items():
        unclassed = (set(_text_fields(cfg)) - not_paths[kind] - set(PATH_FIELDS.get(kind, {}))
                     - set(RESERVED[kind]))
        assert not unclassed, f"class these {kind} fields in server/checks.py or here: {unclassed}"


def test_bad_phase_requests_start_nothing(server, root):
    models = root / "models"
    p3, child0, child1 = str(models / "p3"), str(models / "child0"), str(models / "child1")
    bitnet = {"kind": "bitnet", "model": p3, "out": "refused", "preset": "smoke"}
    evo = {"kind": "evomerge", "out": "refused", "preset": "smoke", "overrides": {"models": [child0, child1]}}
    run = {"kind": "run", "model": p3, "out": "refused", "preset": "smoke"}
    cog = {"kind": "cognate", "out": "refused", "preset": "smoke"}
    cases = [
        ({**bitnet, "kind": "gguf"}, 422, "kind"), ({**cog, "model": p3}, 422, "takes no model"),
        ({**cog, "overrides": {"tokenizer": "/etc"}}, 400, "outside the allowed roots"),
        ({**cog, "overrides": {"tokenizer": str(models / "nope")}}, 400, "does not exist"),
        ({**cog, "overrides": {"data": {"text_files": ["/etc/passwd"]}}}, 400, "outside the allowed roots"),
        ({**cog, "overrides": {"data": {"text_files": "notes.txt"}}}, 400, "must be a list of files"),
        ({**cog, "overrides": {"data": {"hub_datasets": ["../models/p3"]}}}, 400, "not a hub dataset id"),
        ({**cog, "overrides": {"data": {"hub_datasets": ["/etc/x"]}}}, 400, "not a hub dataset id"),
        ({**cog, "overrides": {"train": {"foundation_steps": "ten"}}}, 400, "overrides.train.foundation_steps"),
        ({"kind": "bitnet", "out": "x"}, 422, "needs a model"),
        ({**bitnet, "model": str(models / "missing")}, 400, "does not exist"),
        ({**bitnet, "model": "/etc"}, 400, "outside the allowed roots"),
        ({**bitnet, "out": "../escape"}, 400, "outside the allowed roots"),
        ({**bitnet, "out": "/etc/forge"}, 400, "outside the allowed roots"),
        ({**bitnet, "model": str(models / "p2")}, 400, "phase 2 output"),
        ({**bitnet, "overrides": {"no_such_field": 1}}, 400, "unknown bitnet config field 'no_such_field'"),
        ({**bitnet, "overrides": {"qat": {"steps": "many"}}}, 400, "overrides.qat.steps"),
        ({**bitnet, "overrides": {"registry": "/tmp/x.sqlite"}}, 400, "may not set registry"),
        ({**bitnet, "overrides": {"data_path": "/etc/passwd"}}, 400, "outside the allowed roots"),
        ({**bitnet, "overrides": {"eval_dataset": "easy_arithmetic+/etc/passwd"}}, 400, "outside the allowed roots"),
        ({**evo, "overrides": {}}, 400, "make_parents"),
        ({**evo, "overrides": {"models": child0}}, 400, "must be a list"),
        ({**evo, "overrides": {"models": [child0]}}, 400, "two or more"),
        ({**evo, "overrides": {"models": [child0, "/etc"]}}, 400, "outside the allowed roots"),
        ({**evo, "overrides": {"models": [child0, str(models / "nope")]}}, 400, "does not exist"),
        ({**evo, "overrides": {"models": [child0, child1], "make_parents": True}}, 400, "not both"),
        ({**evo, "model": "default"}, 400, "common ancestor"),
        ({**evo, "overrides": {"models": [child0, child1], "fitness": {"test_set": "/etc/passwd"}}}, 400, "outside"),
        ({**evo, "overrides": {"models": [child0, child1], "base": child0}}, 400, "may not set base"),
        ({**run, "overrides": {"start": "gguf"}}, 400, "unknown phase"),
        ({**run, "overrides": {"start": "cognate", "cognate": {"out": "x"}}}, 400, "the chain sets them"),
        ({**run, "overrides": {"start": "cognate", "cognate": {"tokenizer": "/etc"}}}, 400, "outside the allowed"),
        ({**run, "overrides": {"start": "bitnet", "stop": "quietstar"}}, 400, "comes after"),
        ({**run, "overrides": {"bitnet": 5}}, 400, "must be an object"),
        ({**run, "overrides": {"bitnet": {"model": p3}}}, 400, "the chain sets them"),
        ({**run, "overrides": {"quietstar": {"bake": {"stepz": 1}}}}, 400, "'stepz'"),
        ({**run, "overrides": {"quietstar": {"eval_dataset": "/etc/passwd"}}}, 400, "outside the allowed roots"),
        ({**run, "overrides": {"phases": {}}}, 400, "one section per phase"),
        ({**run, "overrides": {"force": "yes"}}, 400, "true or false"),
        ({**run, "overrides": {"start": "bitnet"}, "model": str(models / "p2")}, 400, "phase 2 output"),
    ]
    for body, status, words in cases:
        detail = json.dumps(_post(server, body, status)["detail"])
        assert words in detail, (body, detail)
    assert not (root / "runs" / "refused").exists()
    assert server.client.get("/jobs", headers=AUTH).json() == []


def test_phase_jobs_need_the_token(server, root):
    c = server.client
    body = {"kind": "bitnet", "model": str(root / "models" / "p3"), "out": "no-token", "preset": "smoke"}
    assert c.post("/jobs", json=body).status_code == 401
    assert c.post("/jobs", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert c.get("/jobs", params={"kind": "bitnet"}).status_code == 401
    assert not (root / "runs" / "no-token").exists()
    kinds = c.get("/openapi.json", headers=AUTH).json()["components"]["schemas"]["JobRequest"]["properties"]["kind"]
    assert {"evomerge", "bitnet", "run"} <= set(kinds["enum"])


def test_bitnet_job_runs_to_its_report(server, root):
    c = server.client
    body = {"kind": "bitnet", "model": str(root / "models" / "p3"), "out": "bn", "preset": "smoke",
            "overrides": {"tracking": "disabled"}}
    job = _post(server, body, 201)
    assert job["kind"] == "bitnet" and job["status"] == "running"
    done = _wait(c, job["id"], lambda j: j["status"] == "completed", timeout=300)
    assert done["returncode"] == 0 and done["attempts"] == 1
    assert done["progress"] == {"stages_done": BITNET_STAGES, "stages_total": BITNET_STAGES, "stage": None,
                                "finished": True, "step1": None, "step2": None, "phase": None, "training": None}
    report = json.loads((root / "runs" / "bn" / "bitnet_report.json").read_text())
    assert report["model"] == body["model"] and list(report["stages"]) == BITNET_STAGES
    entry = Registry(root / "reg.sqlite").get_model(report["stages"]["register"]["model_id"])
    assert entry.phase == 4 and entry.handoff_status == "passed"
    assert any("worker: done" in line for line in c.get(f"/jobs/{job['id']}/log", headers=AUTH).json()["lines"])
    assert [j["id"] for j in c.get("/jobs", params={"kind": "bitnet"}, headers=AUTH).json()] == [job["id"]]
    assert "already holds a run" in _post(server, body, 409)["detail"]  # a finished run is not redone
    step1 = {**body, "kind": "step1", "overrides": {}}
    assert "already holds a bitnet run" in _post(server, step1, 409)["detail"]  # no mixed run directories


def test_evomerge_job_with_given_parents(server, root):
    models = root / "models"
    parents = [str(models / "child0"), str(models / "child1")]
    body = {"kind": "evomerge", "model": str(models / "base"), "out": "evo", "preset": "smoke",
            "overrides": {"models": parents, "tracking": "disabled"}}
    job = _post(server, body, 201)
    done = _wait(server.client, job["id"], lambda j: j["status"] == "completed", timeout=300)
    from agent_forge.evomerge.phase import STAGES

    assert done["progress"]["stages_done"] == [name for name, _ in STAGES] and done["progress"]["finished"]
    report = json.loads((root / "runs" / "evo" / "evomerge_report.json").read_text())
    assert report["models"] == parents and report["config"]["base"] == body["model"]
    reg = Registry(root / "reg.sqlite")
    champion = report["stages"]["register"]["model_id"]
    assert [reg.get_model(i).path for i in reg.parents(champion)] == parents


def test_cognate_job_runs_to_its_report(server, root):
    """Phase 1 through the API: no model, a tokenizer under a model root, the smoke preset
    (with its controls, so the stage list grows past the default one)."""
    tok_dir = root / "models" / "tok"
    make_tiny_tokenizer().save_pretrained(tok_dir)
    body = {"kind": "cognate", "out": "cog", "preset": "smoke",
            "overrides": {"tokenizer": str(tok_dir), "tracking": "disabled"}}
    job = _post(server, body, 201)
    assert job["kind"] == "cognate" and job["model"] is None
    done = _wait(server.client, job["id"], lambda j: j["status"] == "completed", timeout=300)
    report = json.loads((root / "runs" / "cog" / "cognate_report.json").read_text())
    assert done["progress"]["stages_done"] == done["progress"]["stages_total"] == list(report["stages"])
    assert "control_transformer" in report["stages"] and done["progress"]["finished"]
    assert done["progress"]["training"] is None
    entry = Registry(root / "reg.sqlite").get_model(report["stages"]["register"]["model_ids"]["speed"])
    assert entry.phase == 1 and Path(entry.path).resolve() == (root / "runs" / "cog" / "models" / "speed").resolve()


def test_run_job_pauses_mid_qat_and_resumes_from_its_checkpoint(server, root):
    c = server.client
    body = {"kind": "run", "model": str(root / "models" / "p3"), "out": "chain", "preset": "smoke",
            "overrides": {"start": "bitnet", "stop": "bitnet", "tracking": "disabled",
                          "bitnet": {"qat": {"steps": QAT_STEPS, "save_every": 4}}}}
    job = _post(server, body, 201)
    run, phase_dir = root / "runs" / "chain", root / "runs" / "chain" / "bitnet"
    inner = {"kind": "bitnet", "model": body["model"], "out": "chain/bitnet", "preset": "smoke"}
    assert "already running" in _post(server, inner, 409)["detail"]  # the chain's own phase directory
    ckpts = phase_dir / "qat" / "checkpoints"
    _wait(c, job["id"], lambda j: ckpts.is_dir() and any(ckpts.glob("step-*")), timeout=300)
    paused = c.post(f"/jobs/{job['id']}/pause", headers=AUTH).json()
    assert paused["status"] == "paused" and paused["returncode"] != 0, paused
    assert "unfinished phase" in paused["note"]
    assert c.post(f"/jobs/{job['id']}/pause", headers=AUTH).status_code == 409
    progress = paused["progress"]
    assert progress["stages_total"] == ["bitnet"] and progress["stages_done"] == [] and not progress["finished"]
    assert progress["phase"] == {"phase": "bitnet", "stages_done": BITNET_STAGES[:4], "stages_total": BITNET_STAGES,
                                 "stage": "qat"}
    steps_before = _log_steps(phase_dir, "bitnet_qat")
    assert progress["training"] == {"stage": "bitnet_qat", "step": steps_before[-1], "steps": QAT_STEPS}
    assert steps_before and steps_before[-1] < QAT_STEPS
    saved = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    first = json.loads((phase_dir / "bitnet_state.json").read_text())["stages"]

    assert c.post(f"/jobs/{job['id']}/resume", headers=AUTH).json()["status"] == "running"
    done = _wait(c, job["id"], lambda j: j["status"] == "completed", timeout=300)
    assert done["attempts"] == 2 and done["returncode"] == 0
    assert done["progress"]["stages_done"] == ["bitnet"] and done["progress"]["finished"] is True
    stages = json.loads((phase_dir / "bitnet_state.json").read_text())["stages"]
    assert all(stages[name] == first[name] for name in first)  # the finished stages were not redone
    assert stages["qat"]["steps"] == QAT_STEPS
    steps = _log_steps(phase_dir, "bitnet_qat")
    assert steps[len(steps_before)] == max(saved) + 1 and steps[-1] == QAT_STEPS  # resumed at the checkpoint
    report = json.loads((run / "forge_report.json").read_text())
    assert report["phases"] == ["bitnet"] and report["reports"]["bitnet"]["stages"]["qat"]["steps"] == QAT_STEPS
