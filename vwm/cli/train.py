"""`train.py`: train or fine-tune a world model (the reference's flags, plus --dry-run and --from-scratch).

Vista's own flags are understood where they mean something here (`--resume_from_checkpoint`, a bare `-r`, `-f`,
`--no_date`, `-d`, any `--<Trainer argument> value`); the others name the vwm spelling (`VISTA_FLAGS`).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys

import pytorch_lightning as pl

from vwm.cli.common import quiet, run_cli
from vwm.config import ConfigError
from vwm.defaults import SEED
from vwm.training.dry_run import describe
from vwm.training.preflight import default_run_name
from vwm.training.run import TrainOptions, prepare, train

VISTA_FLAGS: dict[str, str] = {
    "-p": "the reference parsed --project and ignored it; name the run with --name (run directory "
          "<--logdir>/<name>) and a logger's project under lightning.logger (e.g. WandbLogger params.project)",
    "--project": "the reference parsed --project and ignored it; name the run with --name (run directory "
                 "<--logdir>/<name>) and a logger's project under lightning.logger (e.g. WandbLogger params.project)",
    "--legacy_naming": "vwm names runs after the configs' paths below configs/ (training-vista_phase1); choose "
                       "another name with --name",
    "--no_base_name": "vwm names runs after the configs' paths below configs/; choose another name with --name",
    "--gpus": "use --n_devices N (processes per node) and --num_nodes",
    "--strategy": "set lightning.trainer.strategy=deepspeed_stage_2 (or ddp, auto) as an override",
    "--callbacks": "add callbacks under lightning.callbacks in a config",
    "--default_root_dir": "use --logdir DIR and --name NAME",
    "--enable_checkpointing": "vwm always checkpoints: lightning.checkpoint.every_n_steps=N",
    "--devices": "use --n_devices N (processes per node)",
    "--logger": "set loggers under lightning.logger, or lightning.trainer.logger=false",
}
"""Reference (Vista / sgm main.py) flags vwm does not take, with what to use instead."""

TRAINER_FLAG_OWNED = {"max_steps", "precision", "num_nodes", "accelerator"}
"""Trainer arguments that are train.py flags of their own (parsed with types, not as config overrides)."""


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
        description="Train a latent video diffusion world model. Arguments of the form a.b=c (anywhere after "
                    "--base) override config values; --<Trainer argument> VALUE sets lightning.trainer.<argument>.",
    )
    p.add_argument("-b", "--base", nargs="+", required=True, metavar="YAML",
                   help="config files, merged left to right (configs/... also finds the installed package's)")
    weights = p.add_argument_group("starting weights (exactly one source; the log and --dry-run name it)")
    weights.add_argument("--finetune", metavar="PATH",
                         help="start from these weights (safetensors, .bin from zero_to_fp32, .ckpt, or a DeepSpeed "
                              "checkpoint dir); default: ckpts/svd_xt.safetensors when it exists, as in the "
                              "reference; a missing path is an error")
    weights.add_argument("--from-scratch", "--from_scratch", dest="from_scratch", action="store_true",
                         help="train from random weights (without it, vwm refuses to start with no weights)")
    p.add_argument("-r", "--resume", "--resume_from_checkpoint", metavar="auto|DIR", nargs="?", const="auto",
                   help="'auto' (also a bare -r): continue the run in --logdir/--name from its newest complete "
                        "checkpoint; or a run directory; or a checkpoint directory (logs/<run>/checkpoints/step-N)")
    p.add_argument("--num_nodes", type=int, default=None,
                   help="number of nodes (torchrun --nnodes / SLURM nodes); default lightning.trainer.num_nodes, "
                        "else 1")
    p.add_argument("--n_devices", type=int, default=None,
                   help="processes per node (default: torchrun's LOCAL_WORLD_SIZE, else lightning.trainer.devices, "
                        "else all visible GPUs, else 1)")
    p.add_argument("--accelerator", default=None, choices=["auto", "gpu", "cuda", "cpu"],
                   help="default lightning.trainer.accelerator, else auto")
    p.add_argument("-l", "--logdir", default="logs", help="root of run directories")
    p.add_argument("-n", "--name", default=None,
                   help="run name (default: the configs' paths below configs/, e.g. training-vista_phase1)")
    p.add_argument("-f", "--postfix", default="", help="appended to the run name (as in the reference)")
    p.add_argument("--no_date", action="store_true",
                   help="accepted for the reference's commands: vwm run names never carry a date")
    p.add_argument("-t", "--train", type=_bool, default=True, nargs="?", const=True,
                   help="accepted for the reference's commands (true); for a check without training use --dry-run")
    p.add_argument("-d", "--debug", action="store_true",
                   help="full tracebacks for errors (also VWM_DEBUG=1); the reference started a debugger")
    p.add_argument("-s", "--seed", type=int, default=SEED)
    p.add_argument("--no_test", type=_bool, default=True, nargs="?", const=True,
                   help="skip the test pass after fitting (default true, as in the reference)")
    p.add_argument("--scale_lr", type=_bool, default=False, nargs="?", const=True,
                   help="lr = accumulate x world size x batch size x base_learning_rate")
    p.add_argument("--enable_tf32", type=_bool, default=False, nargs="?", const=True)
    p.add_argument("--precision", default=None,
                   choices=["bf16-mixed", "16-mixed", "32-true", "bf16-true", "32", "16", "bf16"],
                   help="default lightning.trainer.precision, else bf16-mixed on GPUs, 32-true on CPU")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps (default lightning.trainer.max_steps)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="check everything a run checks at start-up (config, weights, data, launch), print the "
                        "resolved config, parameter counts and a memory estimate, then exit")
    return p


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(arguments for argparse, config overrides): every `a.b=c` token that is not an option's value is an
    override, wherever it stands (also between --base files); `--<Trainer argument> VALUE` (or `=VALUE`) becomes
    `lightning.trainer.<argument>=VALUE`; the reference's dropped flags are errors naming the vwm spelling."""
    trainer_args = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    ours = {opt for action in parser()._actions for opt in action.option_strings}
    args: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, inline = token.partition("=")
        if token.startswith("-") and flag not in ours:
            if flag in VISTA_FLAGS:
                raise ValueError(f"{flag} is not a vwm flag: {VISTA_FLAGS[flag]}")
            name = flag.lstrip("-")
            if flag.startswith("--") and name in trainer_args and name not in TRAINER_FLAG_OWNED:
                if eq:
                    value, i = inline, i + 1
                elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = argv[i + 1], i + 2
                else:
                    raise ValueError(f"{flag} needs a value (it sets lightning.trainer.{name})")
                overrides.append(f"lightning.trainer.{name}={value}")
                continue
            args.append(token)
        elif not token.startswith("-") and "=" in token and not _is_option_value(argv, i):
            overrides.append(token)
        else:
            args.append(token)
        i += 1
    return args, overrides


VALUE_OPTIONS = {"--finetune", "--logdir", "-l", "--name", "-n", "--postfix", "-f"}
"""Options whose single value may contain '=' (a path or a name)."""


def _is_option_value(argv: list[str], i: int) -> bool:
    return i > 0 and argv[i - 1] in VALUE_OPTIONS


def parse(argv: list[str]):
    """Parsed TrainOptions from a command line (reference flags translated, overrides collected)."""
    args_list, overrides = split_arguments(argv)
    p = parser()
    args, rest = p.parse_known_args(args_list)
    if rest:
        raise ConfigError(f"unrecognised arguments: {' '.join(rest)} (train.py --help lists the flags; a.b=c "
                          "overrides config values)")
    if args.resume not in (None, "auto") and "=" in args.resume and not _exists(args.resume):
        overrides.insert(0, args.resume)  # `-r a.b=c`: a bare -r followed by an override
        args.resume = "auto"
    if args.train is False:
        raise ConfigError("-t/--train false: vwm's train.py always trains; check a run without training with "
                          "--dry-run")
    if args.postfix:
        args.name = (args.name or default_run_name(args.base)) + args.postfix
    values = {k: v for k, v in vars(args).items() if k not in ("postfix", "no_date", "train", "debug")}
    if values["precision"] == "32":
        values["precision"] = "32-true"
    return TrainOptions(overrides=overrides, **values)


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = logging.getLogger("vwm.summary")
    summary.propagate = False
    if not summary.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        summary.addHandler(handler)
        summary.setLevel(logging.INFO)
    quiet()


def _main(argv: list[str]) -> int:
    opts = parse(argv)
    _configure_logging()
    if opts.dry_run:
        cfg, run_dir, resume = prepare(opts)
        print(describe(cfg, opts, run_dir, resume))
        return 0

    return train(opts)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run training; returns the exit code (2 for a user error, with a one-line message)."""
    return run_cli("train.py", _main, argv, short_debug=True)


if __name__ == "__main__":
    sys.exit(main())
