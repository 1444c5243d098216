"""FastAPI routes of the job API. Every route, the OpenAPI document included, needs the token.

    POST /jobs                  start a job: {kind, model, out, preset, overrides, device}
                                kinds: step1 | step2 | anti_theater | complete (Phase 3 slices),
                                cognate | evomerge | bitnet (a whole phase), run (the chain)
    GET  /jobs                  list jobs (?status=, ?kind=)
    GET  /jobs/{id}             one job, with progress read from its run directory
    POST /jobs/{id}/pause       stop the worker; the last checkpoint is kept
    POST /jobs/{id}/resume      relaunch from the last checkpoint
    POST /jobs/{id}/cancel      stop for good
    GET  /jobs/{id}/log         the worker's last log lines
    GET  /health, GET /openapi.json
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, Literal, Optional

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent_forge.server.auth import bearer_dependency
from agent_forge.server.jobs import JobError, JobManager

Kind = Literal["step1", "step2", "anti_theater", "complete", "cognate", "evomerge", "bitnet", "run"]
Status = Literal["queued", "running", "paused", "completed", "failed", "cancelled"]
PRESET_NAMES = ("smoke", "quick", "standard")  # every phase's PRESETS (checked in tests)
JobId = Path(ge=1, le=2**53, description="job id")


class JobRequest(BaseModel):
    """What to run. Paths must lie under the server's allowed roots."""

    model_config = ConfigDict(extra="forbid")
    kind: Kind = Field(description="Phase 3 slices: step1 | step2 | anti_theater | complete (every stage still "
                                   "to do); whole phases: cognate | evomerge | bitnet; the chain: run")
    model: Optional[str] = Field(None, min_length=1, max_length=4096,
                                 description="input model dir, or 'default' (bitnet: the Phase 3 model; evomerge: "
                                             "the parents' base, optional with overrides.models; run: the first "
                                             "phase's input). Required except for evomerge; cognate takes none "
                                             "(it trains from scratch)")
    out: str = Field(min_length=1, max_length=4096, description="run directory (relative: under the runs root)")
    preset: Literal["smoke", "quick", "standard"] = "quick"
    overrides: dict[str, Any] = Field(default_factory=dict, description="the phase config's fields: PipelineConfig "
                                      '(Phase 3 kinds, e.g. {"bake": {"steps": 40}, "tracking": "disabled"}), '
                                      "CognatePhaseConfig (cognate), EvoMergeConfig (evomerge: models or "
                                      "make_parents), BitNetConfig (bitnet), "
                                      "or the chain YAML's (run: start, stop, force, one section per phase)")
    device: Optional[Literal["cpu", "cuda", "mps"]] = None

    @model_validator(mode="after")
    def _needs_model(self):
        if self.model is None and self.kind not in ("evomerge", "cognate"):
            raise ValueError(f"a {self.kind} job needs a model")
        if self.model is not None and self.kind == "cognate":
            raise ValueError("a cognate job trains from scratch and takes no model (overrides.tokenizer "
                             "picks the tokenizer)")
        return self


class PhaseProgress(BaseModel):
    phase: str
    stages_done: list[str]
    stages_total: list[str]
    stage: Optional[str] = Field(None, description="the first stage not yet done")


class TrainingStep(BaseModel):
    stage: Optional[str] = Field(None, description="the training stage, as metrics.jsonl names it")
    step: int = Field(description="its newest logged step")
    steps: Optional[int] = Field(None, description="the stage's total steps")


class Progress(BaseModel):
    stages_done: list[str] = Field(description="stages done (run jobs: phases done)")
    stages_total: list[str] = Field(description="every stage of the job's phase (run jobs: the chain's phases)")
    finished: bool = Field(description="the phase's (or the chain's) report is written")
    stage: Optional[str] = Field(None, description="phase jobs: the first stage (run: phase) not yet done")
    step1: Optional[dict[str, Optional[int]]] = Field(None, description="Phase 3 jobs: Step 1 steps done / total")
    step2: Optional[dict[str, Optional[int]]] = Field(None, description="Phase 3 jobs: Step 2 steps done / total")
    phase: Optional[PhaseProgress] = Field(None, description="run jobs: the unfinished phase's own stages")
    training: Optional[TrainingStep] = Field(None, description="phase and run jobs, while a stage trains: its "
                                                               "newest step of its total")


class Job(BaseModel):
    id: int
    kind: str
    status: Status
    model: Optional[str]
    out: Optional[str]
    preset: Optional[str]
    overrides: dict[str, Any]
    created: str
    updated: str
    attempts: int
    pid: Optional[int]
    returncode: Optional[int]
    note: Optional[str]
    log: Optional[str]
    progress: Optional[Progress]


class LogTail(BaseModel):
    id: int
    lines: list[str]


class Health(BaseModel):
    ok: bool
    jobs_running: int


def create_app(manager: JobManager, token: str | None) -> FastAPI:
    """The app; `token=None` only for an --insecure-local server on 127.0.0.1."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.recover()
        yield
        await run_in_threadpool(manager.shutdown)

    app = FastAPI(title="Agent Forge job API", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None, dependencies=[Depends(bearer_dependency(token))])

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError):
        return JSONResponse(status_code=exc.status, content={"detail": exc.message})

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.get("/health", response_model=Health)
    def health():
        return {"ok": True, "jobs_running": len(manager.list(status="running"))}

    @app.post("/jobs", response_model=Job, status_code=201,
              responses={400: {"description": "bad input or path"}, 409: {"description": "conflict"},
                         501: {"description": "kind not available"}})
    def start_job(request: JobRequest):
        return manager.submit(request.model_dump())

    @app.get("/jobs", response_model=list[Job])
    def list_jobs(status: Optional[Status] = None, kind: Optional[Kind] = None):
        return manager.list(status=status, kind=kind)

    @app.get("/jobs/{job_id}", response_model=Job, responses={404: {"description": "no such job"}})
    def get_job(job_id: int = JobId):
        return manager.get(job_id)

    @app.post("/jobs/{job_id}/pause", response_model=Job, responses={404: {}, 409: {}})
    def pause_job(job_id: int = JobId):
        return manager.pause(job_id)

    @app.post("/jobs/{job_id}/resume", response_model=Job, responses={404: {}, 409: {}})
    def resume_job(job_id: int = JobId):
        return manager.resume(job_id)

    @app.post("/jobs/{job_id}/cancel", response_model=Job, responses={404: {}, 409: {}})
    def cancel_job(job_id: int = JobId):
        return manager.cancel(job_id)

    @app.get("/jobs/{job_id}/log", response_model=LogTail, responses={404: {}})
    def job_log(job_id: int = JobId, lines: int = Query(100, ge=1, le=5000)):
        return {"id": job_id, "lines": manager.log_tail(job_id, lines)}

    return app
