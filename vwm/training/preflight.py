"""Everything a training run decides or checks before the model is built, shared by `train.py` and
`train.py --dry-run` so the dry run fails on whatever a real run would fail on at start-up:

- the starting weights (`--finetune`, the reference's default `ckpts/svd_xt.safetensors`, `--from-scratch`, or a
  checkpoint being resumed), said loudly;
- the launch: accelerator, devices per node, nodes and precision, each from its flag, else the config's
  `lightning.trainer`, else vwm's default, with where the value came from;
- the data: the DataModule's arguments, and every subset built as the run will build it (data roots, annotation
  files, clip counts), errors naming the dotted config key and the override that fixes it.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from safetensors import SafetensorError, safe_open

from vwm.checkpoint import CheckpointError, check_handoff, read_config_metadata
from vwm.config import ConfigError, REFERENCE_SUBSETS, instantiate, locate, to_container
from vwm.data.datamodule import VideoDataModule
from vwm.data.sources import build_subset
from vwm.schema import devices_count, logger_nodes

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = os.path.join("ckpts", "svd_xt.safetensors")
"""The reference's starting weights when `--finetune` is not given (relative to the working directory)."""
WEIGHTS_SOURCES = {
    "svd_xt.safetensors": "https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt "
                          "(file svd_xt.safetensors; accept the license there)",
    "vista.safetensors": "https://huggingface.co/OpenDriveLab/Vista (file vista.safetensors)",
}
"""Where users get the weights the reference's recipe starts from."""


# ---------------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class InitialWeights:
    """Where the model's weights come from at the start of a run."""

    source: Literal["resume", "finetune", "default", "scratch"]
    path: str | None = None

    def describe(self) -> str:
        """One loud line for the log and the dry run."""
        if self.source == "resume":
            return f"weights: resumed from checkpoint {self.path} (--finetune is ignored when resuming)"
        if self.source == "finetune":
            return f"weights: initialised from {self.path} (--finetune)"
        if self.source == "default":
            return (f"weights: initialised from {self.path} (no --finetune given: the reference's default, found "
                    "in the working directory)")
        return ("weights: RANDOM initialisation (training from scratch: --from-scratch or the config's "
                "from_scratch: true); no pretrained weights are loaded")


def initial_weights(cfg: DictConfig, *, finetune: str | None, from_scratch: bool, resume: str | None
                    ) -> InitialWeights:
    """Decide the starting weights: a resumed checkpoint, else --finetune, else --from-scratch (or the config's
    `from_scratch: true`), else the reference's default `ckpts/svd_xt.safetensors` when present; else refuse, so
    a run never trains from random weights by accident."""
    if finetune and from_scratch:
        raise ConfigError("--finetune and --from-scratch both given: choose the starting weights or random ones")
    if resume:
        return InitialWeights("resume", resume)
    if finetune:
        if not os.path.exists(finetune):
            raise FileNotFoundError(f"--finetune {finetune!r} does not exist (vwm never falls back to other "
                                    "weights)")
        return InitialWeights("finetune", finetune)
    if from_scratch or bool(cfg.get("from_scratch", False)):
        return InitialWeights("scratch")
    if os.path.isfile(DEFAULT_WEIGHTS):
        return InitialWeights("default", DEFAULT_WEIGHTS)
    raise ConfigError(
        f"no starting weights: --finetune was not given and the reference's default {DEFAULT_WEIGHTS} is not in "
        f"{os.getcwd()}. Pass --finetune PATH (SVD-XT: {WEIGHTS_SOURCES['svd_xt.safetensors']}; the next phase "
        "starts from the previous phase's bin_to_st.py export), or --from-scratch to train from random weights")


def check_weights_config(weights: InitialWeights, model_config: Any) -> str | None:
    """For the dry run: compare the config a safetensors export embeds with the training config (the handoff
    check a real run does when it loads the file); returns a note when the file carries no config."""
    if weights.source not in ("finetune", "default") or not str(weights.path).endswith(".safetensors"):
        return None

    try:
        with safe_open(weights.path, framework="pt", device="cpu") as f:
            embedded = read_config_metadata(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights.path}: not a readable safetensors file ({err})") from err
    if embedded is None:
        return f"{weights.path} embeds no config: its tensors are checked when a run loads it"
    check_handoff(embedded["model"], to_container(model_config), str(weights.path))
    return f"{weights.path}: its embedded model config fits this phase"


# ----------------------------------------------------------------------------------------------------- launch


@dataclass
class Launch:
    """Accelerator, processes per node, nodes and precision of a run, and where each value came from."""

    accelerator: str
    devices: Any
    devices_per_node: int
    num_nodes: int
    precision: str
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        """Processes in the run."""
        return self.devices_per_node * self.num_nodes

    def describe(self) -> str:
        """One line: what runs where, with the source of each value."""
        src = self.sources
        return (f"{self.world_size} process(es) = {self.num_nodes} node(s) [{src['num_nodes']}] x "
                f"{self.devices_per_node} device(s) [{src['devices']}]; accelerator {self.accelerator} "
                f"[{src['accelerator']}]; precision {self.precision} [{src['precision']}]")


def resolve_launch(cfg: DictConfig, *, accelerator: str | None, n_devices: int | None, num_nodes: int | None,
                   precision: str | None, planning: bool = False) -> Launch:
    """Flags first, then `lightning.trainer.{accelerator,devices,num_nodes,precision}`, then the defaults (devices:
    torchrun's LOCAL_WORLD_SIZE, else all visible GPUs, else 1; precision: bf16-mixed on GPUs, 32-true on CPU).
    `planning` (the dry run): assume a GPU machine for the precision default unless the accelerator is cpu."""
    trainer = to_container(OmegaConf.select(cfg, "lightning.trainer")) or {}
    sources: dict[str, str] = {}

    def pick(name: str, flag: Any, flag_name: str) -> Any:
        if flag is not None:
            sources[name] = flag_name
            return flag
        if trainer.get(name) is not None:
            sources[name] = f"lightning.trainer.{name}"
            return trainer[name]
        sources[name] = "default"
        return None

    acc = pick("accelerator", accelerator, "--accelerator") or "auto"
    gpu = acc in ("auto", "gpu", "cuda") and (torch.cuda.is_available() or (planning and acc != "cpu"))
    nodes = int(pick("num_nodes", num_nodes, "--num_nodes") or 1)
    if nodes < 1:
        raise ConfigError(f"num_nodes={nodes} is invalid; allowed: >= 1 ({sources['num_nodes']})")
    devices: Any = pick("devices", n_devices, "--n_devices")
    torchrun = os.environ.get("LOCAL_WORLD_SIZE")
    if torchrun is not None and n_devices is None:
        if devices is not None and devices_count(devices) not in (None, int(torchrun)):
            log.warning("lightning.trainer.devices=%s ignored: torchrun started %s processes per node", devices,
                        torchrun)
        devices, sources["devices"] = int(torchrun), "torchrun LOCAL_WORLD_SIZE"
    count = devices_count(devices, sources["devices"]) if devices is not None else None
    if count is None:
        count = torch.cuda.device_count() if gpu and torch.cuda.is_available() else 1
        devices = count
        sources["devices"] = "all visible GPUs" if gpu and torch.cuda.is_available() else "default"
    if isinstance(devices, str) and "," not in devices:
        devices = int(devices)
    prec = pick("precision", precision, "--precision")
    if prec is None:
        prec = "bf16-mixed" if gpu else "32-true"
    prec = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(str(prec), str(prec))
    return Launch(accelerator=acc, devices=devices, devices_per_node=count, num_nodes=nodes, precision=prec,
                  sources=sources)


# ------------------------------------------------------------------------------------------------------- data


@dataclass
class DataPlan:
    """The subsets of a run, built and checked before the model (handed to the DataModule)."""

    subsets: list[Any]
    lines: list[str]


def _subset_label(spec: Any, index: int) -> tuple[str, str]:
    """(dotted key of the subset, the name an override uses for it)."""
    spec = to_container(spec)
    key = f"data.params.subsets[{index}]"
    if isinstance(spec, str):
        return key, spec
    if isinstance(spec, dict) and isinstance(spec.get("target"), str):
        for name, (target, _) in REFERENCE_SUBSETS.items():
            if target == spec["target"]:
                return key, name
        return key, spec["target"].rsplit(".", 1)[-1]
    return key, str(index)


def check_data(cfg: DictConfig, *, build: bool = True) -> DataPlan:
    """Instantiate the DataModule's arguments and build every subset (data roots, annotation files, clip lists)
    as the run will; errors name the dotted key and the override that fixes it."""
    if "data" not in cfg or not isinstance(cfg.data, DictConfig):
        raise ConfigError("the config has no data section (data.target / data.params)")
    datamodule = instantiate(cfg.data, "data.params")  # a constructor error names data.params
    if not isinstance(datamodule, VideoDataModule):
        return DataPlan([], [f"data: {type(datamodule).__name__} (not checked)"])
    subsets, lines = [], []
    specs = list(cfg.data.params.subsets)
    for i, spec in enumerate(specs):
        key, name = _subset_label(spec, i)
        if not build:
            continue
        try:
            subset = build_subset(spec, num_frames=datamodule.num_frames, target_height=datamodule.target_height,
                                  target_width=datamodule.target_width)
        except (ValueError, FileNotFoundError, NotADirectoryError) as err:
            field_name = next((f for f in ("data_root", "anno_file", "cache_dir") if f"{f}=" in str(err)), None)
            fix = (f"; set it with data.params.subsets.{name}.{field_name}=PATH" if field_name else "")
            raise ConfigError(f"{key} ({name}): {err}{fix}") from err
        if len(subset) == 0:
            raise ConfigError(f"{key} ({name}): no clips")
        subsets.append(subset)
        lines.append(f"data: {key} {name}: {len(subset)} clips ({type(subset).__name__})")
    return DataPlan(subsets, lines)


# ---------------------------------------------------------------------------------------------------- loggers


def build_loggers(cfg: DictConfig, run_dir: str) -> list[Any]:
    """The run's Lightning loggers: the nodes of `lightning.logger` (W&B, CSV, MLflow, ...; `save_dir` defaults to
    the run directory), none when `lightning.trainer.logger` or `lightning.logger` is false, else TensorBoard in
    `<run>/tensorboard`. metrics.jsonl is written in every case."""
    if OmegaConf.select(cfg, "lightning.trainer.logger") is False:
        return []
    lightning = cfg.get("lightning")
    if lightning is None or "logger" not in lightning:
        return [TensorBoardLogger(run_dir, name="tensorboard", version="")]
    loggers = []
    for name, node in logger_nodes(lightning.logger).items():
        cls = locate(node["target"], f"lightning.logger.{name}.target")
        params = dict(node.get("params") or {})
        accepted = inspect.signature(cls).parameters
        if "save_dir" in accepted and "save_dir" not in params:
            params["save_dir"] = run_dir
        loggers.append(cls(**params))
    return loggers


def describe_loggers(cfg: DictConfig) -> str:
    """One line naming the loggers a run will use (without building them)."""
    if OmegaConf.select(cfg, "lightning.trainer.logger") is False:
        return "loggers: none (lightning.trainer.logger=false); metrics.jsonl only"
    lightning = cfg.get("lightning")
    if lightning is not None and "logger" in lightning:
        nodes = logger_nodes(lightning.logger)
        if not nodes:
            return "loggers: none (lightning.logger=false); metrics.jsonl only"
        return "loggers: " + ", ".join(f"{n} ({node['target'].rsplit('.', 1)[-1]})" for n, node in nodes.items()) \
            + " + metrics.jsonl"
    return "loggers: TensorBoard (<run>/tensorboard) + metrics.jsonl"


# ------------------------------------------------------------------------------------------------------ names


def default_run_name(bases: list[str]) -> str:
    """The run name when --name is not given: each config's path below `configs/` (else its folder and stem),
    joined by '-', configs chained with '+': `configs/training/vista_phase1.yaml` -> `training-vista_phase1`. Two
    configs with the same file name in different folders get different runs; every rank and every relaunch
    compute the same name (no date), so `--resume auto` finds the run."""
    names = []
    for base in bases:
        path = os.path.normpath(os.path.abspath(base))
        parts = path.split(os.sep)
        stem = os.path.splitext(parts[-1])[0]
        if "configs" in parts[:-1]:
            last = max(i for i, part in enumerate(parts[:-1]) if part == "configs")
            below = parts[last + 1:-1]
        else:
            below = [parts[-2]] if len(parts) > 1 and parts[-2] else []
        names.append("-".join([*below, stem]))
    return "+".join(names)
