"""The job API: FastAPI routes (app.py), bearer auth (auth.py), job records and worker
processes (jobs.py), the worker entry point (worker.py), path confinement (paths.py)."""
