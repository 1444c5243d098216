"""`python -m agent_forge ...`: the same as `forge ...`."""

from agent_forge.cli import main

if __name__ == "__main__":
    main()
