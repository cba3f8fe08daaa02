"""Export a training checkpoint as a verified inference safetensors file (what `bin_to_st.py` runs).

Steps: read the source safely (DeepSpeed dir merged, `_forward_module.` stripped); optionally restore
frozen weights that DeepSpeed stored in reduced precision from the phase's starting weights; fill base
weights a reference PEFT `.bin` lost from their EMA shadows; fold the EMA (every shadow must find its
weight); merge LoRA with the configured scale; cast; write `DST` atomically with the inference model config
and provenance in its metadata; verify before publishing (`vwm.export_verify`): the file loads strictly into
the model built from the embedded config, and a denoiser forward on fixed random inputs matches the source
weights' forward (EMA in, LoRA unmerged) within its tolerances.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file

import vwm
from vwm.checkpoint import (
    check_ema_shadows,
    check_state_dict,
    ema_shadows,
    family_of,
    fill_from_ema,
    fold_ema,
    merge_lora,
    read_state_dict,
    restore_reduced_precision,
)
from vwm.config import build_model, load_config, to_container
from vwm.dtypes import DTYPES, DtypeName
from vwm.export_verify import (
    Verification,
    VerificationError,
    config_from_metadata,
    configured_lora_scale,
    denoiser_output,
    verify_export,
)
from vwm.fsio import atomic_write_text, fsync_path, honour_umask

log = logging.getLogger(__name__)


TRAINING_ONLY_PARAMS = (
    "loss_fn_config", "sampler_config", "scheduler_config", "optimizer_config", "ema_decay_rate",
    "train_peft_adapters", "slow_spatial_layers", "slow_spatial_lr_scale", "replace_cond_frames",
    "fixed_cond_frames",
)
"""DiffusionEngine params the inference config drops, as the reference's inference YAML does."""

LoraMode = Literal["merged", "kept", "none"]


@dataclass
class ExportOptions:
    """What `bin_to_st.py` was asked to do (see `vwm.cli.export` for the flags)."""

    src: str
    dst: str
    ema: bool | None = None
    """True: fold EMA (error without one); False: raw weights; None: EMA when the source has it."""
    merge_lora: bool = True
    dtype: DtypeName = "fp32"
    config: list[str] | None = None
    """YAML files (then `a.b=c` overrides) of the source's training config; default: the run's or the
    embedded one."""
    frozen_from: str | None = None
    """The phase's starting weights: frozen weights stored in reduced precision are restored from them."""


@dataclass
class ExportResult:
    """What an export did; `summary()` is the CLI's one-screen report."""

    src: str
    dst: str
    config_source: str
    step: str | None
    dtype: str
    ema_folded: int = 0
    ema_shadows: int = 0
    lora: LoraMode = "none"
    lora_pairs: int = 0
    lora_scale: float = 1.0
    filled_from_ema: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    reduced_precision: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    tensors_sha256: str = ""
    file_sha256: str = ""
    size: int = 0
    verification: Verification | None = None

    def summary(self) -> str:
        """A one-screen report of the export."""
        ema = (f"folded {self.ema_folded} of {self.ema_shadows} shadows into the weights" if self.ema_folded
               else "not used (raw weights)" if self.ema_shadows else "none in the source")
        lora = {"merged": f"merged {self.lora_pairs} adapter pairs into their base weights "
                          f"(scale {self.lora_scale:g})",
                "kept": f"kept {self.lora_pairs} adapter pairs (add_lora stays true)",
                "none": "none in the source"}[self.lora]
        lines = [
            f"exported {self.src}",
            f"      -> {self.dst} ({self.size / 2**20:.1f} MiB, {self.dtype})",
            f"  step      {self.step if self.step is not None else 'unknown'}",
            f"  config    {self.config_source}; inference form embedded as vwm_config",
            f"  EMA       {ema}",
            f"  LoRA      {lora}",
        ]
        if self.filled_from_ema:
            lines.append(f"  filled    {len(self.filled_from_ema)} weights missing from the source from "
                         f"their EMA shadows (reference PEFT .bin, its issue #16)")
        if self.restored:
            lines.append(f"  restored  {len(self.restored)} reduced-precision frozen weights from "
                         f"--frozen-from")
        if self.reduced_precision:
            lines.append(f"  WARNING   {len(self.reduced_precision)} source tensors are in reduced precision"
                         f" (e.g. {self.reduced_precision[0]}; DeepSpeed stores frozen weights in the"
                         f" training dtype): pass --frozen-from <the phase's --finetune file> for exact fp32")
        if self.dropped:
            lines.append(f"  dropped   {len(self.dropped)} training-only tensors ({_list(self.dropped, 3)})")
        for prefix, (n, numel) in self.counts.items():
            lines.append(f"  tensors   {prefix:<22} {n:6d} tensors {numel / 1e6:10.3f} M values")
        lines.append(f"  sha256    tensors {self.tensors_sha256}")
        lines.append(f"            file    {self.file_sha256} (also in {os.path.basename(self.dst)}.sha256)")
        if self.verification is not None:
            lines.append(f"  verified  {self.verification.describe()}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- config


def find_run_config(src: str) -> str | None:
    """`logs/<run>/config.yaml` of a source inside a vwm run dir (`logs/<run>/checkpoints/...`), if any."""
    path = os.path.abspath(src)
    for _ in range(4):
        parent = os.path.dirname(path)
        if os.path.basename(parent) == "checkpoints":
            candidate = os.path.join(os.path.dirname(parent), "config.yaml")
            return candidate if os.path.isfile(candidate) else None
        if parent == path:
            return None
        path = parent
    return None


def resolve_source_config(opts: ExportOptions, metadata: Mapping[str, str]) -> tuple[DictConfig, str]:
    """(config the source was trained with, where it came from): --config, else the run's config.yaml, else
    the config embedded in a safetensors source."""
    if opts.config:
        files = [c for c in opts.config if "=" not in c]
        if not files:
            raise ValueError(f"--config {' '.join(opts.config)}: needs a YAML file, not only a.b=c overrides")
        return load_config(files, [c for c in opts.config if "=" in c]), "--config " + " ".join(opts.config)
    run_config = find_run_config(opts.src)
    if run_config is not None:
        return load_config(run_config), f"{run_config} (the run's)"
    embedded = config_from_metadata(metadata)
    if embedded is not None:
        return embedded, f"embedded in {opts.src}"
    raise ValueError(
        f"no model config for {opts.src!r}: it is not inside a vwm run directory "
        f"(logs/<run>/checkpoints/...) and carries no vwm_config metadata; pass --config with the YAML files "
        f"it was trained with"
    )


def inference_config(model_node: Mapping[str, Any], lora: LoraMode) -> dict[str, Any]:
    """`{"model": node}`: the training model node in inference form (EMA folded, LoRA merged unless kept, no
    loss/sampler/scheduler/optimizer, no training-only switches); action control and the rest unchanged."""
    node = copy.deepcopy(to_container(model_node))
    node.pop("base_learning_rate", None)
    params = node.setdefault("params", {})
    for key in TRAINING_ONLY_PARAMS:
        params.pop(key, None)
    params["use_ema"] = False
    network = params["network_config"].setdefault("params", {})
    network["use_checkpoint"] = False
    network["add_lora"] = lora == "kept"
    if lora != "kept":
        network.pop("lora_rank", None)
        network.pop("lora_scale", None)
    return {"model": node}


def _list(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------- tensors


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor in name order: content, not file layout."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prefix_counts(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """(tensors, values) per top-level part: model.diffusion_model, conditioner, first_stage_model, ..."""
    counts: dict[str, list[int]] = {}
    for key, value in tensors.items():
        prefix = key.split(".")[0]
        if key.startswith("model.diffusion_model."):
            prefix = "model.diffusion_model"
        entry = counts.setdefault(prefix, [0, 0])
        entry[0] += 1
        entry[1] += value.numel()
    return {k: (n, numel) for k, (n, numel) in sorted(counts.items())}


# ------------------------------------------------------------------------------------------------- export


def _check_options(opts: ExportOptions) -> None:
    if opts.dtype not in DTYPES:
        raise ValueError(f"dtype={opts.dtype!r}: expected one of {', '.join(DTYPES)}")
    if not os.path.exists(opts.src):
        raise FileNotFoundError(f"SRC {opts.src!r} does not exist")
    if not opts.dst.endswith(".safetensors"):
        raise ValueError(f"DST {opts.dst!r} must end with .safetensors")
    same = os.path.exists(opts.dst) and os.path.samefile(opts.dst, opts.src)
    if same or os.path.realpath(opts.dst) == os.path.realpath(opts.src):
        raise ValueError(f"DST {opts.dst!r} is the source itself; write the export to a new file")
    if os.path.isdir(opts.dst):
        raise ValueError(f"DST {opts.dst!r} is a directory; give a file name ending with .safetensors")
    if opts.frozen_from is not None and not os.path.exists(opts.frozen_from):
        raise FileNotFoundError(f"--frozen-from {opts.frozen_from!r} does not exist")


def _prepare_weights(sd: dict[str, torch.Tensor], opts: ExportOptions, train_cfg: DictConfig,
                     result: ExportResult) -> dict[str, torch.Tensor]:
    """Source weights in the training layout, checked against the training model, EMA folded if chosen."""
    if opts.frozen_from is not None:
        sd, result.restored = restore_reduced_precision(sd, read_state_dict(opts.frozen_from)[0], opts.src)
    result.reduced_precision = sorted(k for k, v in sd.items()
                                      if v.is_floating_point() and v.dtype != torch.float32)
    expected = build_model(train_cfg, device="meta").state_dict()
    sd, result.filled_from_ema = fill_from_ema(sd, expected)
    check_ema_shadows(sd, expected, opts.src)
    check_state_dict(expected, sd, opts.src, allow_missing=("ema",))
    shadows = ema_shadows(sd)
    result.ema_shadows = len(shadows)
    use_ema = bool(shadows) if opts.ema is None else opts.ema
    if use_ema and not shadows:
        raise ValueError(f"--ema: {opts.src} has no EMA weights (model_ema.*); use --no-ema for raw weights")
    result.dropped = sorted(k for k in sd if k.startswith("model_ema.") and (not use_ema or k not in shadows))
    if use_ema:
        sd, result.ema_folded = fold_ema(sd)
    return {k: v for k, v in sd.items() if not k.startswith("model_ema.")}


def _final_tensors(weights: dict[str, torch.Tensor], opts: ExportOptions, train_model: Mapping,
                   result: ExportResult) -> dict[str, torch.Tensor]:
    """LoRA merged (unless kept) and cast to the requested dtype; records counts and the content hash."""
    has_lora = any(family_of(k) == "lora" for k in weights)
    result.lora = "none" if not has_lora else "merged" if opts.merge_lora else "kept"
    result.lora_pairs = sum(k.endswith("_adapter_down.weight") and k.startswith("model.") for k in weights)
    result.lora_scale = configured_lora_scale(train_model)
    if result.lora == "merged":
        weights, _ = merge_lora(weights, result.lora_scale)
    dtype = DTYPES[opts.dtype]
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    result.counts = prefix_counts(tensors)
    result.tensors_sha256 = tensors_sha256(tensors)
    return tensors


def _publish_verified(tensors: dict[str, torch.Tensor], metadata: dict[str, str], config: dict,
                      reference: torch.Tensor, opts: ExportOptions, result: ExportResult) -> None:
    """Write a temporary file next to DST, verify it, then rename it to DST; on any failure remove it."""
    folder = os.path.dirname(result.dst)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.basename(result.dst)[: -len(".safetensors")]
    tmp = os.path.join(folder, f".{stem}.tmp-{os.getpid()}.safetensors")
    try:
        save_file(tensors, tmp, metadata=metadata)
        honour_umask(tmp)
        fsync_path(tmp)
        tensors.clear()
        result.verification = verify_export(tmp, config, reference, opts.dtype)
        if not result.verification.passed:
            raise VerificationError(f"export of {opts.src} failed verification "
                                    f"({result.verification.describe()}); {opts.dst} was not written")
        result.file_sha256 = file_sha256(tmp)
        result.size = os.path.getsize(tmp)
        os.replace(tmp, result.dst)
        fsync_path(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    atomic_write_text(result.dst + ".sha256", f"{result.file_sha256}  {os.path.basename(result.dst)}\n")


def export_checkpoint(opts: ExportOptions) -> ExportResult:
    """Run the whole export; DST appears only once the written file passed verification."""
    _check_options(opts)
    sd, source_metadata = read_state_dict(opts.src)
    train_cfg, config_source = resolve_source_config(opts, source_metadata)
    step = source_metadata.get("step") or source_metadata.get("vwm_step") or None
    result = ExportResult(src=os.path.abspath(opts.src), dst=os.path.abspath(opts.dst),
                          config_source=config_source, step=step, dtype=opts.dtype)
    weights = _prepare_weights(sd, opts, train_cfg, result)
    del sd
    train_model = to_container(train_cfg.model)
    reference = denoiser_output(train_model, weights, opts.src)
    tensors = _final_tensors(weights, opts, train_model, result)
    del weights
    config = inference_config(train_model, result.lora)
    metadata = {
        "format": "pt",
        "vwm_config": json.dumps(config),
        "vwm_source": result.src,
        "vwm_step": step or "unknown",
        "vwm_ema": "yes" if result.ema_folded else "no",
        "vwm_lora": result.lora,
        "vwm_dtype": opts.dtype,
        "vwm_version": vwm.__version__,
        "vwm_tensors_sha256": result.tensors_sha256,
    }
    _publish_verified(tensors, metadata, config, reference, opts, result)
    log.info("exported %s -> %s", opts.src, opts.dst)
    return result
