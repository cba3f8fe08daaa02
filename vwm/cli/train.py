"""`train.py`: train or fine-tune a world model (the reference's flags, plus --dry-run)."""

from __future__ import annotations

import argparse
import logging
import sys


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def parser() -> argparse.ArgumentParser:
    """The train.py argument parser."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a latent video diffusion world model. Trailing a.b=c arguments override config values.",
    )
    p.add_argument("-b", "--base", nargs="+", required=True, metavar="YAML",
                   help="config files, merged left to right")
    p.add_argument("--finetune", metavar="PATH",
                   help="start from these weights (safetensors, .bin from zero_to_fp32, .ckpt, or a DeepSpeed "
                        "checkpoint dir); a missing path is an error")
    p.add_argument("-r", "--resume", metavar="auto|DIR",
                   help="'auto': continue the run in --logdir/--name from its newest complete checkpoint; or a run "
                        "directory; or a checkpoint directory (logs/<run>/checkpoints/step-N)")
    p.add_argument("--num_nodes", type=int, default=1, help="number of nodes (torchrun --nnodes / SLURM nodes)")
    p.add_argument("--n_devices", type=int, default=None,
                   help="processes per node (default: torchrun's LOCAL_WORLD_SIZE, else all visible GPUs, else 1)")
    p.add_argument("--accelerator", default="auto", choices=["auto", "gpu", "cuda", "cpu"])
    p.add_argument("-l", "--logdir", default="logs", help="root of run directories")
    p.add_argument("-n", "--name", default=None, help="run name (default: the last config's file name)")
    p.add_argument("-s", "--seed", type=int, default=23)
    p.add_argument("--no_test", type=_bool, default=True, nargs="?", const=True,
                   help="skip the test pass after fitting (default true, as in the reference)")
    p.add_argument("--scale_lr", type=_bool, default=False, nargs="?", const=True,
                   help="lr = accumulate x world size x batch size x base_learning_rate")
    p.add_argument("--enable_tf32", type=_bool, default=False, nargs="?", const=True)
    p.add_argument("--precision", default=None,
                   choices=["bf16-mixed", "16-mixed", "32-true", "bf16-true", "32"],
                   help="default bf16-mixed on GPUs, 32-true on CPU")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the resolved config, parameter counts and a memory estimate, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run training; returns the exit code."""
    import vwm  # noqa: F401  (torchvision shim before Lightning)
    from vwm.training.run import TrainOptions, prepare, train

    args, rest = parser().parse_known_args(argv)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser().error(f"unrecognised arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = TrainOptions(overrides=overrides, **{k: v for k, v in vars(args).items()})
    if opts.precision == "32":
        opts.precision = "32-true"
    if opts.dry_run:
        from vwm.training.dry_run import describe

        cfg, run_dir, resume = prepare(opts)
        print(describe(cfg, opts, run_dir, resume))
        return 0
    return train(opts)


if __name__ == "__main__":
    sys.exit(main())
