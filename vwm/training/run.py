"""The training job: config -> run directory -> model, data, trainer -> fit, resumable by rerunning the command.

The run directory is `<logdir>/<name>` with no timestamp, so every rank and every relaunch agree on it. It holds the
resolved config, the command line, the environment, `checkpoints/step-N/` (commit protocol), `metrics.jsonl`,
TensorBoard logs and sample videos.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.strategies import DeepSpeedStrategy
from pytorch_lightning.utilities.rank_zero import rank_zero_only

import vwm
from vwm.checkpoint import load_finetune
from vwm.checkpoint.manifest import read_manifest
from vwm.config import ConfigError, build_model, instantiate, load_config, to_container
from vwm.defaults import SEED
from vwm.training.activation_plan import apply_activation_plan
from vwm.training.callbacks import MetricsFile, ThroughputMonitor, VideoLogger
from vwm.training.checkpointing import CheckpointEvery, latest_checkpoint, resume_target
from vwm.training.flops import unet_forward_flops
from vwm.training.preflight import build_loggers, check_data, default_run_name, initial_weights, resolve_launch
from vwm.training.progress import StepProgressBar, summarize
from vwm.training.runlock import lock_run_directory
from vwm.training.settings import RunSettings
from vwm.training.strategy import build_strategy

log = logging.getLogger(__name__)

EXIT_SIGNAL_BASE = 128
"""A run stopped by signal N exits with 128 + N (143 for SIGTERM), like a shell."""

TRAINER_KEYS_OWNED_BY_VWM = ("strategy", "devices", "num_nodes", "precision", "accelerator",
                             "enable_checkpointing", "default_root_dir", "logger", "callbacks")
"""Trainer arguments that come from flags or vwm itself, not from `lightning.trainer` (max_steps comes from the
config unless --max_steps is given)."""


@dataclass
class TrainOptions:
    """Command-line options of `train.py` (see `vwm.cli.train` for their help)."""

    base: list[str]
    overrides: list[str] = field(default_factory=list)
    finetune: str | None = None
    from_scratch: bool = False
    resume: str | None = None
    num_nodes: int | None = None
    n_devices: int | None = None
    accelerator: str | None = None
    logdir: str = "logs"
    name: str | None = None
    seed: int = SEED
    no_test: bool = True
    scale_lr: bool = False
    enable_tf32: bool = False
    precision: str | None = None
    max_steps: int | None = None
    dry_run: bool = False


# ------------------------------------------------------------------------------------------------ run dir


def run_dir_for(opts: TrainOptions) -> tuple[str, str | None]:
    """(run directory, explicit checkpoint dir or None) from --logdir/--name/--resume."""
    if opts.resume not in (None, "", "auto"):
        path = os.path.abspath(opts.resume)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume {opts.resume!r} does not exist")
        if os.path.isfile(os.path.join(path, "MANIFEST.json")):  # a checkpoint directory
            return os.path.dirname(os.path.dirname(path)), path
        return path, None
    name = opts.name or default_run_name(opts.base)
    return os.path.abspath(os.path.join(opts.logdir, name)), None


def _environment() -> dict[str, Any]:
    import deepspeed

    env = {
        "python": sys.version.split()[0], "torch": torch.__version__, "pytorch_lightning": pl.__version__,
        "deepspeed": deepspeed.__version__, "vwm": vwm.__version__, "host": platform.node(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["git"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git"] = None
    return env


@rank_zero_only
def write_run_files(run_dir: str, cfg: DictConfig) -> None:
    """Resolved config, command line and environment into the run directory (rank 0)."""
    os.makedirs(run_dir, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)
    with open(os.path.join(run_dir, "command.txt"), "a") as f:
        f.write(shlex.join([sys.executable, *sys.argv]) + "\n")
    with open(os.path.join(run_dir, "env.json"), "w") as f:
        json.dump(_environment(), f, indent=1)


HARD_KEYS = ("model.params.network_config", "model.params.conditioner_config", "model.params.first_stage_config",
             "model.params.num_frames", "data.params")
"""Config parts a resumed run may not change (architecture, frame count, data order)."""


def check_resume_config(run_dir: str, cfg: DictConfig) -> None:
    """Refuse to resume with a different architecture or data order; warn about other changes."""
    saved_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(saved_path):
        return
    saved = OmegaConf.load(saved_path)
    for key in HARD_KEYS:
        old, new = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        if to_container(old) != to_container(new):
            raise ConfigError(f"{key} differs from the run being resumed ({saved_path}); start a new run (--name) "
                              f"or restore the original value")
    if to_container(saved) != to_container(cfg):
        log.warning("resuming %s with a config that differs in non-architectural values", run_dir)


@rank_zero_only
def _truncate_metrics(path: str, step: int) -> None:
    """Keep the rows of steps <= `step` (0 for a fresh start); a row torn by a kill mid-write is dropped."""
    if not os.path.isfile(path):
        return
    rows = []
    with open(path) as f:
        for line in filter(str.strip, f):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: dropping a torn row %r", path, line[:60])
                continue
            if row.get("step", 0) <= step:
                rows.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


@rank_zero_only
def _note_world_size_change(manifest: dict[str, Any], world: int, cfg: DictConfig) -> None:
    """Warn when a run resumes on another number of processes than the one that saved it."""
    saved = manifest.get("world_size")
    if saved is None or int(saved) == world:
        return
    run = RunSettings.from_config(cfg)
    batch = run.batch_size * run.accumulate_grad_batches
    log.warning("resuming step %s, saved by %s process(es), on %d: the optimizer state is re-partitioned (ZeRO) or "
                "reused (DDP), the data stream continues at the saved position, and a step now averages %d clips "
                "instead of %d (docs/training.md, \"Changing the number of GPUs on resume\")", manifest.get("step"),
                saved, world, batch * world, batch * int(saved))


# ----------------------------------------------------------------------------------------------- trainer


def trainer_kwargs(cfg: DictConfig, opts: TrainOptions) -> dict[str, Any]:
    """`pl.Trainer` arguments from the config's `lightning.trainer` section (checked against its signature)."""
    section = dict(to_container(OmegaConf.select(cfg, "lightning.trainer")) or {})
    allowed = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"lightning.trainer: unknown Trainer argument(s) {', '.join(unknown)}")
    for key in TRAINER_KEYS_OWNED_BY_VWM:
        section.pop(key, None)
    return section


def checkpoint_settings(cfg: DictConfig) -> tuple[int, int]:
    """(every_n_steps, keep_last) from `lightning.checkpoint` or the reference `lightning.modelcheckpoint.params`."""
    ours = to_container(OmegaConf.select(cfg, "lightning.checkpoint")) or {}
    ref = to_container(OmegaConf.select(cfg, "lightning.modelcheckpoint.params")) or {}
    every = ours.get("every_n_steps") or ref.get("every_n_train_steps")
    if every is None and ref.get("every_n_epochs"):
        data = to_container(OmegaConf.select(cfg, "data.params")) or {}
        steps_per_epoch = max(1, int(data.get("samples_per_epoch") or 1000) // int(data.get("batch_size") or 1))
        every = steps_per_epoch * int(ref["every_n_epochs"])
    return int(every or 1000), int(ours.get("keep_last", 3))


def build_callbacks(cfg: DictConfig, run_dir: str, run: RunSettings, world: int,
                    info: dict[str, Any]) -> tuple[list, CheckpointEvery]:
    """Checkpointing, metrics file, throughput/MFU, LR monitor, progress bar and the configured callbacks."""
    every, keep = checkpoint_settings(cfg)
    ckpt = CheckpointEvery(os.path.join(run_dir, "checkpoints"), every_n_steps=every, keep_last=keep, info=info)
    network = to_container(cfg.model.params.network_config)
    fwd = unet_forward_flops(network, run.num_frames, run.height, run.width, downsample=run.latent_downsample)
    clips = run.batch_size * world
    callbacks: list = [
        MetricsFile(os.path.join(run_dir, "metrics.jsonl")),  # before the checkpoint: a committed step has its row
        ckpt,
        ThroughputMonitor(clips, run.latent_pixels_per_clip, 3 * fwd),
        LearningRateMonitor(logging_interval="step"),
        StepProgressBar(clips_per_step=clips),
    ]
    for name, node in (to_container(OmegaConf.select(cfg, "lightning.callbacks")) or {}).items():
        extra = {"out_dir": os.path.join(run_dir, "videos")} if node.get("target", "").endswith("VideoLogger") else {}
        callbacks.append(instantiate(node, f"lightning.callbacks.{name}", **extra))
    return callbacks, ckpt


# -------------------------------------------------------------------------------------------------- entry


def prepare(opts: TrainOptions) -> tuple[DictConfig, str, str | None]:
    """Load the config and decide the run directory and the checkpoint to resume from."""
    cfg = load_config(opts.base, opts.overrides)
    if "data" not in cfg:
        raise ConfigError("the config has no data section (data.target / data.params)")
    if opts.finetune and not os.path.exists(opts.finetune):
        raise FileNotFoundError(f"--finetune {opts.finetune!r} does not exist (vwm never falls back to other weights)")
    run_dir, explicit = run_dir_for(opts)
    resume = None
    if explicit:
        read_manifest(explicit, checksums=True)
        resume = explicit
    elif opts.resume:
        found = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
        if found is None:
            log.info("--resume %s: no complete checkpoint in %s, starting fresh", opts.resume, run_dir)
        else:
            resume = found[0]
    elif latest_checkpoint(os.path.join(run_dir, "checkpoints"), checksums=False) is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume auto to continue it, or --name "
                              f"for a new run")
    return cfg, run_dir, resume


def train(opts: TrainOptions) -> int:
    """Run (or resume) training holding the run directory's lock; returns the process exit code."""
    lock = lock_run_directory(run_dir_for(opts)[0])
    try:
        return _train(opts)
    finally:
        if lock is not None:
            lock.release()


def _train(opts: TrainOptions) -> int:
    if opts.enable_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg, run_dir, resume = prepare(opts)
    if resume:
        check_resume_config(run_dir, cfg)
    weights = initial_weights(cfg, finetune=opts.finetune, from_scratch=opts.from_scratch, resume=resume)
    launch = resolve_launch(cfg, accelerator=opts.accelerator, n_devices=opts.n_devices, num_nodes=opts.num_nodes,
                            precision=opts.precision)
    data_plan = check_data(cfg)  # data roots, annotations, clip lists: fail before the model is built
    log.log(logging.INFO if weights.source in ("finetune", "resume") else logging.WARNING, weights.describe())
    log.info("launch: %s", launch.describe())
    if resume:
        _note_world_size_change(read_manifest(resume), launch.world_size, cfg)
    pl.seed_everything(opts.seed, workers=True)
    world = launch.world_size

    run = RunSettings.from_config(cfg)
    engine = build_model(cfg)
    engine.seed = opts.seed
    trainer_cfg = trainer_kwargs(cfg, opts)
    base_lr = float(cfg.model.get("base_learning_rate", 1e-4))
    accumulate = int(trainer_cfg.get("accumulate_grad_batches", 1))
    engine.learning_rate = base_lr * (accumulate * world * run.batch_size if opts.scale_lr else 1)
    log.info("learning rate %.3g (base %.3g%s)", engine.learning_rate, base_lr, ", scaled" if opts.scale_lr else "")
    if weights.source in ("finetune", "default"):
        load_finetune(engine, weights.path, to_container(cfg.model))
    gpu = launch.accelerator != "cpu" and torch.cuda.is_available()
    apply_activation_plan(engine, cfg, world_size=world, precision=launch.precision,
                          device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else None)
    datamodule = instantiate(cfg.data, "data.params", seed=opts.seed, subsets=data_plan.subsets)

    strategy = build_strategy(run.strategy, to_container(cfg.get("lightning")) or {})
    if hasattr(strategy, "config") and isinstance(strategy.config, dict):
        strategy.config["train_micro_batch_size_per_gpu"] = run.batch_size
    info = {"finetune": os.path.abspath(weights.path)} if weights.source in ("finetune", "default") else {}
    callbacks, ckpt = build_callbacks(cfg, run_dir, run, world, info)
    _truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), int(read_manifest(resume)["step"]) if resume else 0)
    write_run_files(run_dir, cfg)
    config_steps = trainer_cfg.pop("max_steps", -1)
    max_steps = opts.max_steps if opts.max_steps is not None else config_steps
    trainer_cfg.setdefault("enable_model_summary", False)  # the dry run prints the parameter table
    loggers = build_loggers(cfg, run_dir)
    if not loggers:  # metrics.jsonl only; Lightning's LR monitor needs a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = pl.Trainer(
        accelerator=launch.accelerator, devices=launch.devices, num_nodes=launch.num_nodes, strategy=strategy,
        precision=launch.precision, max_steps=max_steps,
        default_root_dir=run_dir, enable_checkpointing=False, callbacks=callbacks,
        logger=loggers or False, **trainer_cfg,
    )
    deepspeed = isinstance(strategy, DeepSpeedStrategy)
    ckpt_path = resume_target(resume, read_manifest(resume), deepspeed) if resume else None
    started, first_step = time.perf_counter(), int(read_manifest(resume)["step"]) if resume else 0
    trainer.fit(engine, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.is_global_zero:
        newest = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
        report = summarize(run_dir, first_step=first_step, last_step=trainer.global_step,
                           seconds=time.perf_counter() - started, clips_per_step=run.batch_size * world, checkpoint=newest[0] if newest else None, cfg=cfg,
                           stopped_by_signal=ckpt.stopped_by_signal,
                           compiled_check=getattr(engine, "compiled_check", None))
        logging.getLogger("vwm.summary").info("\n".join(report.lines()))
    if not opts.no_test:
        trainer.test(engine, datamodule=datamodule)
    if ckpt.stopped_by_signal is not None:
        return _after_signal(ckpt.stopped_by_signal)
    if trainer.is_global_zero:
        with open(os.path.join(run_dir, "FINISHED"), "w") as f:
            f.write(f"{trainer.global_step}\n")
    return 0


def _after_signal(signum: int) -> int:
    if signum == signal.SIGUSR1 and os.environ.get("SLURM_JOB_ID") and rank_zero_only.rank == 0:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
        try:  # best effort: the checkpoint is saved whatever happens here
            result = subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
            log.warning("requested SLURM requeue of job %s (scontrol exit %d)", job, result.returncode)
        except (OSError, subprocess.SubprocessError) as err:
            log.warning("SLURM requeue of job %s not requested: scontrol failed (%s); requeue it yourself "
                        "(scontrol requeue %s) or resubmit, with --resume auto", job, err, job)
    return EXIT_SIGNAL_BASE + int(signum)
