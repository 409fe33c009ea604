"""`python -m repa ...`: the same command as `repa ...`."""

import sys

from repa.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
