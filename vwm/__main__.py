"""`python -m vwm COMMAND ...`: the same as the `vwm` command (vwm.cli.main)."""

import sys

from vwm.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
