"""Train a world model: `python train.py --base configs/training/vista_phase1.yaml --finetune ckpts/svd_xt.safetensors`.

See `python train.py --help` and docs/training.md.
"""

import sys

from vwm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
