"""The job API: FastAPI routes (app.py), bearer auth (auth.py), job records and worker
processes (jobs.py), the worker entry point (worker.py), the whole-phase and chain kinds
(phases.py), override and path checks (checks.py, paths.py)."""
