"""`python -m sparsekd` runs the CLI (the guard matters: vLLM spawns processes)."""

from sparsekd.cli import run

if __name__ == "__main__":
    run()
