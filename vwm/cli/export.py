"""`bin_to_st.py`: export a training checkpoint as a verified inference safetensors file (see
docs/checkpoints.md)."""

from __future__ import annotations

import argparse
import logging
import sys

from vwm.cli.common import quiet, run_cli
from vwm.export import ExportOptions, export_checkpoint
from vwm.export_verify import VerificationError

EXIT_USAGE = 2
"""Exit code of a user error (bad arguments, missing file, unusable checkpoint)."""
EXIT_VERIFICATION = 1
"""Exit code when the written file does not reproduce the source (nothing is published)."""


def parser() -> argparse.ArgumentParser:
    """The bin_to_st.py argument parser."""
    p = argparse.ArgumentParser(
        prog="bin_to_st.py",
        description="Merge a DeepSpeed checkpoint (or read a zero_to_fp32 .bin, a Lightning .ckpt or a "
                    "safetensors file), fold EMA, merge LoRA, and write a verified safetensors file that "
                    "carries its inference model config (sample.py and train.py --finetune need no other "
                    "config).",
    )
    p.add_argument("src", metavar="SRC",
                   help="logs/<run>/checkpoints/step-N (any DeepSpeed dir with 'latest'), pytorch_model.bin "
                        "from zero_to_fp32 (ours or the reference's), a .ckpt, or a .safetensors")
    p.add_argument("dst", metavar="DST", help="output .safetensors (written atomically; never over SRC)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_const", const=True, default=None,
                     help="fold the EMA weights in (default when SRC has them; an error when it has none)")
    ema.add_argument("--no-ema", dest="ema", action="store_const", const=False, help="export the raw weights")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", dest="merge_lora", action="store_true", default=True,
                      help="W += lora_scale * up @ down and drop the adapters (default)")
    lora.add_argument("--keep-lora", dest="merge_lora", action="store_false",
                      help="keep the adapters (to continue them in a next stage)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="tensor dtype of DST")
    p.add_argument("--config", nargs="+", metavar="YAML", default=None,
                   help="training config of SRC (YAML files, then a.b=c overrides); default: the run's "
                        "config.yaml when SRC is inside logs/<run>/checkpoints, else the config a "
                        "safetensors SRC embeds")
    p.add_argument("--debug", action="store_true", help="full tracebacks for errors (also VWM_DEBUG=1)")
    p.add_argument("--frozen-from", metavar="PATH", default=None,
                   help="the weights the phase started from (its --finetune file): frozen weights DeepSpeed "
                        "stored in reduced precision (bf16 training) are restored to their exact fp32 values")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, export, print the summary; returns the exit code (2 for a user error, 1 for a failed
    verification)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet()
    return run_cli("bin_to_st.py", _main, argv)


def _main(argv: list[str]) -> int:
    args = vars(parser().parse_args(argv))
    args.pop("debug")
    try:
        result = export_checkpoint(ExportOptions(**args))
    except VerificationError as err:
        print(f"bin_to_st.py: verification failed: {err}", file=sys.stderr)
        return EXIT_VERIFICATION
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
