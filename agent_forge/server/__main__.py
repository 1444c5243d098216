"""`python -m agent_forge.server ...`: the same as `forge serve` (used by tests and scripts)."""

import typer

from agent_forge.server_commands import serve_cmd

if __name__ == "__main__":
    typer.run(serve_cmd)
