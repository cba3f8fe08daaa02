"""Generate videos, rollouts and rewards with a world model: `python sample.py --help`, docs/sampling.md."""

import sys

from vwm.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
