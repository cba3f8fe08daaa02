"""The schema of a config's sections beside the `{target, params}` nodes: which keys the top level, `model`,
`data` and every `lightning.*` section take, their types and ranges, and which Trainer arguments vwm applies,
rejects or passes through. `vwm.config.load_config` runs `validate_sections` on every config it loads, so a typo
or an unusable value fails before anything is built, naming the dotted key, the value and what is allowed.

Nodes (`target`/`params`) are checked against their constructor signatures by `vwm.config.validate`; this module
covers the rest. New keys of a section go into its table here (the tests check that every shipped config passes).
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from vwm.config import ConfigError, _matches


class SchemaError(ConfigError):
    """A config key or value outside the schema; the message names the dotted key."""


def _suggest(name: str, allowed: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except InterpolationResolutionError:  # an overlay config loaded alone: check what is there
            return OmegaConf.to_container(value, resolve=False)
    return value


# -------------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Rule:
    """One key of a section: a check that returns an error text (what is allowed) or None, and a help line."""

    check: Callable[[Any], str | None]
    help: str


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           integer: bool = False, optional: bool = False) -> Callable[[Any], str | None]:
    """A check for a finite (integer) number in [low, high] (`low_open`: low excluded)."""

    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        kind = "an integer" if integer else "a finite number"
        bound = ""
        if low is not None:
            bound += f" {'>' if low_open else '>='} {low:g}"
        if high is not None:
            bound += f"{' and' if bound else ''} <= {high:g}"
        wanted = f"{kind}{bound}" + (" or null" if optional else "")
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                return f"allowed: {wanted}"
            return (f"allowed: {wanted} (YAML reads {value!r} as text: write it with a decimal point, e.g. "
                    f"{_decimal(value)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"allowed: {wanted}"
        if integer and not isinstance(value, int):
            return f"allowed: {wanted}"
        if not math.isfinite(value):
            return f"allowed: {wanted}"
        if low is not None and (value <= low if low_open else value < low):
            return f"allowed: {wanted}"
        if high is not None and value > high:
            return f"allowed: {wanted}"
        return None

    return check


def _decimal(text: str) -> str:
    mantissa, _, exponent = text.lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exponent}" if exponent else mantissa


def boolean(value: Any) -> str | None:
    """A check for true/false."""
    return None if isinstance(value, bool) else "allowed: true or false"


def _check(path: str, value: Any, rule: Rule) -> None:
    problem = rule.check(value)
    if problem is not None:
        raise SchemaError(f"{path}={value!r} is invalid; {problem} ({rule.help})")


def _check_keys(path: str, section: Any, allowed: Mapping[str, Any], rejected: Mapping[str, str] = {}) -> None:
    if not isinstance(section, (Mapping, DictConfig)):
        raise SchemaError(f"{path} must be a mapping, got {section!r}")
    for key in section:
        key = str(key)
        if key in rejected:
            raise SchemaError(f"{path}.{key}: {rejected[key]}")
        if key not in allowed:
            raise SchemaError(f"{path}.{key}: unknown key{_suggest(key, allowed)}; allowed: "
                              f"{', '.join(sorted(allowed))}")


# --------------------------------------------------------------------------------------------- top level

TOP_LEVEL: dict[str, str] = {
    "model": "the model node (vwm.models.engine.DiffusionEngine)",
    "data": "the data node (vwm.data.datamodule.VideoDataModule)",
    "lightning": "trainer, checkpoint, callbacks, deepspeed, logger settings",
    "from_scratch": "true: train from random weights when no --finetune is given (tiny and demo configs)",
}
"""Top-level keys of a config."""

MODEL_KEYS: dict[str, Rule] = {
    "base_learning_rate": Rule(number(0.0), "learning rate of the optimizer, >= 0 (0 freezes the weights, e.g. "
                               "to measure evaluation noise); "
                               "--scale_lr multiplies it by accumulation x world size x batch size"),
}
"""Keys of the model node beside target/params (all other non-reserved keys are constructor arguments)."""

OPTIMIZER_PARAMS: dict[str, Rule] = {
    "lr": Rule(number(0.0), "optimizer learning rate, >= 0"),
    "weight_decay": Rule(number(0.0), "optimizer weight decay, >= 0"),
    "eps": Rule(number(0.0, low_open=True), "optimizer epsilon, > 0"),
}
"""Range rules for `model.params.optimizer_config.params` (types are checked against the optimizer's signature)."""

MODEL_PARAMS: dict[str, Rule] = {
    "ema_decay_rate": Rule(number(0.0, 1.0), "EMA decay per optimizer step, in [0, 1]"),
    "num_frames": Rule(number(1, integer=True), "frames per clip"),
    "scale_factor": Rule(number(0.0, low_open=True), "latent scale"),
    "en_and_decode_n_samples_a_time": Rule(number(1, integer=True, optional=True), "frames per VAE call"),
}
"""Range rules for `model.params` (types are checked against DiffusionEngine's signature)."""

DATA_PARAMS: dict[str, Rule] = {
    "batch_size": Rule(number(1, integer=True), "clips per batch per GPU"),
    "num_workers": Rule(number(0, integer=True), "DataLoader worker processes per GPU"),
    "target_height": Rule(lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 64 == 0
                          else "allowed: a positive multiple of 64 (e.g. 320, 576)",
                          "frame height in pixels"),
    "target_width": Rule(lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 64 == 0
                         else "allowed: a positive multiple of 64 (e.g. 576, 1024)",
                         "frame width in pixels"),
    "samples_per_epoch": Rule(number(1, integer=True, optional=True), "clips per epoch over all GPUs"),
}
"""Range rules for `data.params`."""

# ------------------------------------------------------------------------------------------------ lightning

LIGHTNING_SECTIONS: dict[str, str] = {
    "trainer": "pytorch_lightning.Trainer arguments",
    "checkpoint": "vwm checkpoints: every_n_steps, keep_last",
    "modelcheckpoint": "the reference's ModelCheckpoint section (params.every_n_train_steps / every_n_epochs)",
    "callbacks": "{name: {target, params}} callbacks (the reference's image_logger maps to the video logger)",
    "deepspeed": "DeepSpeed ZeRO settings (zero_optimization)",
    "logger": "false, or a logger node {target: pytorch_lightning.loggers.X, params}, or {name: node}",
}
"""Sections of `lightning`."""

CHECKPOINT_KEYS: dict[str, Rule] = {
    "every_n_steps": Rule(number(1, integer=True), "optimizer steps between checkpoints"),
    "keep_last": Rule(number(1, integer=True), "committed checkpoints kept"),
}
"""Keys of `lightning.checkpoint`."""

MODELCHECKPOINT_PARAMS: dict[str, Rule] = {
    "every_n_train_steps": Rule(number(1, integer=True, optional=True), "optimizer steps between checkpoints"),
    "every_n_epochs": Rule(number(1, integer=True, optional=True),
                           "epochs (samples_per_epoch / batch / world) between checkpoints"),
}
MODELCHECKPOINT_REJECTED: dict[str, str] = {
    name: f"not applied: vwm writes checkpoints/step-N every lightning.checkpoint.every_n_steps steps and keeps "
          f"lightning.checkpoint.keep_last of them ({reason}); remove it"
    for name, reason in {
        "save_top_k": "use keep_last", "save_last": "the newest is always kept", "filename": "names are step-N",
        "dirpath": "the directory is <logdir>/<name>/checkpoints", "monitor": "no metric-based selection",
        "mode": "no metric-based selection", "save_weights_only": "resumable checkpoints only",
        "every_n_val_epochs": "no validation loop", "verbose": "the log names every save",
        "save_on_train_epoch_end": "saves are step-based", "train_time_interval": "use every_n_steps",
        "auto_insert_metric_name": "names are step-N", "enable_version_counter": "names are step-N",
    }.items()
}
"""ModelCheckpoint parameters the reference's section could carry that vwm does not apply."""

TRAINER_APPLIED: dict[str, str] = {
    "strategy": "deepspeed_stage_1, deepspeed_stage_2, ddp or auto",
    "devices": "processes per node (an int, or GPU indices such as 0,1); --n_devices and torchrun override it",
    "num_nodes": "nodes; --num_nodes overrides it",
    "precision": "bf16-mixed (GPU default), 16-mixed, 32-true (CPU default), bf16-true; --precision overrides it",
    "accelerator": "auto, gpu, cuda or cpu; --accelerator overrides it",
    "max_steps": "optimizer steps; --max_steps overrides it",
    "logger": "false (metrics.jsonl only) or true (TensorBoard); loggers go in lightning.logger",
}
"""Trainer arguments vwm reads itself (and what they take)."""

TRAINER_REJECTED: dict[str, str] = {
    "callbacks": "vwm builds the callbacks: add yours under lightning.callbacks as {name: {target, params}}",
    "enable_checkpointing": "vwm always writes resumable checkpoints: set lightning.checkpoint.every_n_steps "
                            "(and keep_last) instead",
    "default_root_dir": "the run directory is <--logdir>/<--name>: use those flags",
    "enable_progress_bar": "vwm shows its own progress bar (steps toward max_steps, clips/s, ETA)",
}
"""Trainer arguments a config may not set, with what to do instead."""

PRECISIONS = ("bf16-mixed", "16-mixed", "32-true", "bf16-true", "32", "16", "bf16")
STRATEGIES = ("deepspeed_stage_1", "deepspeed_stage_2", "deepspeed", "ddp", "auto", "single_device")

ZERO_KEYS: dict[str, Rule | None] = {
    "overlap_comm": Rule(boolean, "overlap gradient reduction with backward"),
    "contiguous_gradients": Rule(boolean, "copy gradients into one buffer"),
    "reduce_bucket_size": Rule(number(1, integer=True), "elements per reduce bucket"),
    "allgather_bucket_size": Rule(number(1, integer=True), "elements per all-gather bucket"),
    "parameter_alignment": Rule(boolean, "16-byte aligned weights (fast kernels)"),
    "reduce_scatter": Rule(boolean, "reduce-scatter instead of all-reduce"),
    "allgather_partitions": Rule(boolean, "all-gather the partitions after the step"),
    "round_robin_gradients": Rule(boolean, "stage 1/2 gradient partitioning order"),
    "use_multi_rank_bucket_allreduce": None, "load_from_fp32_weights": None, "elastic_checkpoint": None,
    "sub_group_size": None, "ignore_unused_parameters": None, "legacy_stage1": None, "compute_grad_norm": None,
    "zero_hpz_partition_size": None, "zero_quantized_weights": None, "zero_quantized_nontrainable_weights": None,
    "zero_quantized_gradients": None, "memory_efficient_linear": None, "log_trace_cache_warnings": None,
    "enable_sanity_checks": None, "offload_optimizer": None, "offload_param": None,
}
"""DeepSpeed `zero_optimization` keys for ZeRO stages 1 and 2 (DeepSpeed 0.17-0.19); None: passed through
unchecked."""
ZERO_REJECTED = {"stage": "the ZeRO stage comes from lightning.trainer.strategy (deepspeed_stage_1 or "
                          "deepspeed_stage_2)"}

LOGGER_PACKAGES: dict[str, str] = {
    "WandbLogger": "wandb", "MLFlowLogger": "mlflow", "CometLogger": "comet_ml", "NeptuneLogger": "neptune",
}
"""Logger classes and the package each needs (checked when the config loads, not after the model is built)."""


# ------------------------------------------------------------------------------------------------- checks


def validate_sections(cfg: DictConfig) -> None:
    """Check the top level and every section of a loaded config (see the module docstring)."""
    _check_keys("<top level>", cfg, TOP_LEVEL)
    if "from_scratch" in cfg:
        _check("from_scratch", cfg.from_scratch, Rule(boolean, TOP_LEVEL["from_scratch"]))
    model = cfg.get("model")
    if isinstance(model, DictConfig):
        _model(model)
    data = cfg.get("data")
    if isinstance(data, DictConfig):
        for key, rule in DATA_PARAMS.items():
            params = data.get("params") or {}
            if key in params:
                _check(f"data.params.{key}", params[key], rule)
    lightning = cfg.get("lightning")
    if lightning is not None:
        _lightning(lightning)


def _model(model: DictConfig) -> None:
    for key, rule in MODEL_KEYS.items():
        if key in model:
            _check(f"model.{key}", model[key], rule)
    params = model.get("params") or {}
    for key, rule in MODEL_PARAMS.items():
        if key in params:
            _check(f"model.params.{key}", params[key], rule)
    optimizer = (params.get("optimizer_config") or {}) if isinstance(params, (Mapping, DictConfig)) else {}
    opt_params = (optimizer.get("params") or {}) if isinstance(optimizer, (Mapping, DictConfig)) else {}
    for key, rule in OPTIMIZER_PARAMS.items():
        if key in opt_params:
            _check(f"model.params.optimizer_config.params.{key}", opt_params[key], rule)


def _lightning(section: Any) -> None:
    _check_keys("lightning", section, LIGHTNING_SECTIONS)
    if section.get("trainer") is not None:
        check_trainer_section(section.trainer)
    if section.get("checkpoint") is not None:
        _check_keys("lightning.checkpoint", section.checkpoint, CHECKPOINT_KEYS)
        for key, value in section.checkpoint.items():
            _check(f"lightning.checkpoint.{key}", value, CHECKPOINT_KEYS[str(key)])
    if section.get("modelcheckpoint") is not None:
        mc = section.modelcheckpoint
        _check_keys("lightning.modelcheckpoint", mc, {"params": None, "target": None})
        if mc.get("target") is not None and not str(mc.target).endswith("ModelCheckpoint"):
            raise SchemaError(f"lightning.modelcheckpoint.target={mc.target!r}: only ModelCheckpoint settings are "
                              "understood here; put other callbacks under lightning.callbacks")
        params = mc.get("params") or {}
        _check_keys("lightning.modelcheckpoint.params", params, MODELCHECKPOINT_PARAMS, MODELCHECKPOINT_REJECTED)
        for key, value in params.items():
            _check(f"lightning.modelcheckpoint.params.{key}", value, MODELCHECKPOINT_PARAMS[str(key)])
    callbacks = section.get("callbacks")
    if callbacks is not None:
        if not isinstance(callbacks, DictConfig):
            raise SchemaError(f"lightning.callbacks must be a mapping {{name: {{target, params}}}}, got {callbacks!r}")
        for name, node in callbacks.items():
            if not isinstance(node, DictConfig) or "target" not in node:
                raise SchemaError(f"lightning.callbacks.{name} must be a {{target, params}} node, got {node!r}")
    if section.get("deepspeed") is not None:
        _check_keys("lightning.deepspeed", section.deepspeed, ZERO_KEYS, ZERO_REJECTED)
        for key, value in section.deepspeed.items():
            rule = ZERO_KEYS[str(key)]
            if rule is not None:
                _check(f"lightning.deepspeed.{key}", value, rule)
    if "logger" in section:
        logger_nodes(section.logger)


def logger_nodes(value: Any, path: str = "lightning.logger") -> dict[str, dict[str, Any]]:
    """The logger nodes of `lightning.logger` by name ({} for false/null), after checking their packages."""
    value = _plain(value)
    if value is None or value is False:
        return {}
    if isinstance(value, Mapping) and "target" in value:
        nodes = {"logger": value}
    elif isinstance(value, Mapping):
        nodes = dict(value)
    else:
        raise SchemaError(f"{path}={value!r} is invalid; allowed: false, a {{target: pytorch_lightning.loggers.X, "
                          "params}} node, or {name: node}")
    for name, node in nodes.items():
        where = path if nodes.keys() == {"logger"} and "target" in value else f"{path}.{name}"
        if not isinstance(node, Mapping) or not isinstance(node.get("target"), str):
            raise SchemaError(f"{where} must be a {{target, params}} node, got {node!r}")
        target = node["target"]
        if not target.startswith("pytorch_lightning.loggers."):
            raise SchemaError(f"{where}.target={target!r}: loggers must be pytorch_lightning.loggers classes "
                              "(TensorBoardLogger, CSVLogger, WandbLogger, MLFlowLogger, CometLogger, NeptuneLogger)")
        package = LOGGER_PACKAGES.get(target.rsplit(".", 1)[-1])
        if package is not None and importlib.util.find_spec(package) is None:
            raise SchemaError(f"{where}.target={target!r} needs the {package!r} package, which is not installed: "
                              f"pip install {package} (or choose another logger)")
    return nodes


def check_trainer_section(section: Any) -> None:
    """Check `lightning.trainer` against pytorch_lightning.Trainer's signature and vwm's ownership rules."""
    params = inspect.signature(pl.Trainer.__init__).parameters
    allowed = {name for name in params if name != "self"}
    _check_keys("lightning.trainer", section, allowed, TRAINER_REJECTED)
    try:
        hints = typing.get_type_hints(pl.Trainer.__init__)
    except (NameError, TypeError):  # a Lightning version whose hints do not resolve: keys are still checked
        hints = {}
    for key, value in section.items():
        key, value = str(key), _plain(value)
        path = f"lightning.trainer.{key}"
        if key == "strategy":
            if value not in STRATEGIES:
                raise SchemaError(f"{path}={value!r} is invalid; allowed: {', '.join(STRATEGIES)}")
            continue
        if key == "precision":
            if str(value) not in PRECISIONS:
                raise SchemaError(f"{path}={value!r} is invalid; allowed: {', '.join(PRECISIONS)}")
            continue
        if key == "devices":
            devices_count(value, path)
            continue
        if key == "logger":
            if not isinstance(value, bool):
                raise SchemaError(f"{path}={value!r} is invalid; allowed: true or false here; put logger nodes "
                                  "under lightning.logger")
            continue
        tp = hints.get(key)
        if tp is not None and value is not None and not _matches(value, tp):
            raise SchemaError(f"{path}={value!r} is invalid; allowed: {_describe_type(tp)} "
                              "(a pytorch_lightning.Trainer argument)")
        if key in ("max_epochs", "max_steps", "min_steps", "min_epochs") and isinstance(value, int) and value < -1:
            raise SchemaError(f"{path}={value!r} is invalid; allowed: -1 (no limit) or an integer >= 0")
        if key == "accumulate_grad_batches" and isinstance(value, int) and value < 1:
            raise SchemaError(f"{path}={value!r} is invalid; allowed: an integer >= 1")
        if key == "gradient_clip_val" and value is not None:
            _check(path, value, Rule(number(0.0), "gradient norm clip, >= 0 (0 or null: off)"))


def _describe_type(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    text = str(tp).replace("typing.", "").replace("NoneType", "null")
    for prefix in ("pytorch_lightning.", "lightning_fabric.", "datetime."):
        text = text.replace(prefix, "")
    return text


def devices_count(value: Any, path: str = "lightning.trainer.devices") -> int | None:
    """Processes per node a `devices` value asks for (None for 'auto'/-1: all visible GPUs)."""
    value = _plain(value)
    if value in ("auto", -1, "-1", None):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if parts and all(p.isdigit() for p in parts):
            return len(parts) if "," in value else int(parts[0])
    if isinstance(value, list) and value and all(isinstance(v, int) and v >= 0 for v in value):
        return len(value)
    raise SchemaError(f"{path}={value!r} is invalid; allowed: a number of processes per node (>= 1), GPU indices "
                      "such as 0,1 or [0, 1], or auto")
