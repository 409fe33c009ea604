"""`python -m benchmarks.convergence [options]` (the same as `repa bench convergence`)."""

import sys

from benchmarks.convergence.cli import main

if __name__ == "__main__":
    sys.exit(main())
