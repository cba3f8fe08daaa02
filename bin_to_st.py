"""Export a training checkpoint as a verified inference safetensors file: `python bin_to_st.py --help`,
docs/checkpoints.md."""

import sys

from vwm.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
