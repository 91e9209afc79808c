"""`python -m sparsekd` runs the CLI (the guard matters: vLLM spawns processes)."""

import sys

from sparsekd.cli import main

if __name__ == "__main__":
    sys.exit(main())
