"""Evaluate a world model (FID, FVD, action following): `python evaluate.py --help`, docs/evaluation.md."""

import sys

from vwm.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
