"""Reading weights in every format the reference and vwm produce, safely, and loading them strictly.

Formats: safetensors; `pytorch_model.bin` from `zero_to_fp32` (ours or the reference's, `_forward_module.`
prefixes, dot-less EMA names); Lightning `.ckpt` files; DeepSpeed checkpoint directories (merged here). Pickled
files are only ever opened with `torch.load(weights_only=True)`; a file that needs arbitrary unpickling is refused.

Loading is strict. The only keys a checkpoint may lack are the ones a training phase adds on purpose, each
initialised as the reference does: `cond_time_stack_embed` (copied from `time_embed`), the action-control
projections (zeros), LoRA adapters (fresh: down ~ N(0, 1/r), up = 0) and the EMA (rebuilt from the weights).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from vwm.models.ema import ema_buffer_name

log = logging.getLogger(__name__)

PREFIXES = ("_forward_module.", "module.")
"""Wrapper prefixes that training checkpoints put in front of model keys."""

PhaseAddition = Literal["cond_time_stack_embed", "action_control", "lora", "ema"]
PHASE_ADDITIONS: tuple[PhaseAddition, ...] = ("cond_time_stack_embed", "action_control", "lora", "ema")
"""Parameter families a checkpoint may lack when a later training phase introduces them."""

_FAMILY_PATTERNS: dict[str, re.Pattern] = {
    "cond_time_stack_embed": re.compile(r"^model\.diffusion_model\.cond_time_stack_embed\."),
    "action_control": re.compile(r"\.[kv]_adapter_action_control\.weight$"),
    "lora": re.compile(r"\.(q|k|v|out)_adapter_(down|up)\.weight$"),
    "ema": re.compile(r"^model_ema\."),
}


class CheckpointError(RuntimeError):
    """A weight file that cannot be used; the message names the file and the reason."""


# -------------------------------------------------------------------------------------------------- reading


def _torch_load_safely(path: str, mmap: bool = False) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to unpickle (it needs arbitrary code execution, which vwm never allows: {err}). "
            f"Convert trusted files to safetensors first, e.g. "
            f"`python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('IN', weights_only=False), 'OUT')\"`"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from err


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file (header and sizes validated by safetensors)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from err
    return tensors, metadata


def _tensor_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and "module" in obj and isinstance(obj["module"], Mapping):
        obj = obj["module"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return tensors


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with wrapper prefixes stripped, metadata) from any supported weight file or directory."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    metadata: dict[str, str] = {}
    if os.path.isdir(path):
        sd, metadata = merge_zero_checkpoint(path)
    elif path.endswith(".safetensors"):
        sd, metadata = read_safetensors(path)
    elif path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        obj = _torch_load_safely(path)
        sd = _tensor_dict(obj, path)
        if isinstance(obj, Mapping) and "global_step" in obj:
            metadata["step"] = str(obj["global_step"])
    else:
        raise CheckpointError(
            f"{path}: unknown weight format; expected .safetensors, .bin/.pt/.pth, .ckpt or a DeepSpeed checkpoint dir"
        )
    return strip_prefixes(sd), metadata


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DeepSpeed/Lightning/DDP wrapper prefixes (`_forward_module.`, `module.`) from every key."""
    out = {}
    for key, value in sd.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------ transformations


def ema_key(param_key: str) -> str:
    """EMA shadow key of a model parameter key (`model.X.Y` -> `model_ema.XY`)."""
    if not param_key.startswith("model."):
        raise ValueError(f"{param_key!r}: EMA covers only network weights (keys under 'model.')")
    return "model_ema." + ema_buffer_name(param_key[len("model."):])


def has_ema(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when the state dict carries EMA shadows."""
    return any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates") for k in sd)


def fold_ema(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Replace each network weight by its EMA shadow and drop all `model_ema.*` keys; returns (dict, #replaced)."""
    out = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    replaced = 0
    for key in list(out):
        if key.startswith("model."):
            shadow = sd.get(ema_key(key))
            if shadow is not None:
                if shadow.shape != out[key].shape:
                    raise CheckpointError(f"EMA shadow of {key} has shape {tuple(shadow.shape)}, weight {tuple(out[key].shape)}")
                out[key] = shadow.to(out[key].dtype)
                replaced += 1
    return out, replaced


_LORA_BASE = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}


def merge_lora(sd: Mapping[str, torch.Tensor], scale: float = 1.0) -> tuple[dict[str, torch.Tensor], int]:
    """Fold LoRA adapters into their base projections, W += scale · up @ down, and drop them; returns (dict, #merged)."""
    out = dict(sd)
    merged = 0
    for key in list(sd):
        m = re.match(r"^(model\..*)\.(q|k|v|out)_adapter_down\.weight$", key)
        if not m:
            continue
        prefix, which = m.groups()
        up_key = f"{prefix}.{which}_adapter_up.weight"
        base_key = f"{prefix}.{_LORA_BASE[which]}.weight"
        if up_key not in sd or base_key not in sd:
            raise CheckpointError(f"LoRA adapter {key} has no matching {up_key} / {base_key}")
        base = sd[base_key]
        delta = sd[up_key].float() @ sd[key].float()
        out[base_key] = (base.float() + scale * delta).to(base.dtype)
        del out[key], out[up_key]
        merged += 1
    return out, merged


def family_of(key: str) -> str | None:
    """Which phase-added family a key belongs to, if any."""
    for family, pattern in _FAMILY_PATTERNS.items():
        if pattern.search(key):
            return family
    return None


# ----------------------------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What a strict load did beyond copying matching tensors."""

    source: str
    initialised: dict[str, list[str]] = field(default_factory=dict)
    """Phase-added families missing from the checkpoint, and the keys initialised for each."""
    dropped: list[str] = field(default_factory=list)
    """Checkpoint keys deliberately not loaded (with the reason logged)."""
    lora_merged: int = 0
    ema_folded: int = 0

    def summary(self) -> str:
        """One line per action."""
        lines = [f"loaded {self.source}"]
        for family, keys in self.initialised.items():
            lines.append(f"  initialised {len(keys)} {family} tensors (not in the checkpoint)")
        if self.lora_merged:
            lines.append(f"  merged {self.lora_merged} LoRA adapters into their base weights")
        if self.ema_folded:
            lines.append(f"  used EMA weights for {self.ema_folded} tensors")
        if self.dropped:
            lines.append(f"  ignored {len(self.dropped)} tensors: {', '.join(self.dropped[:4])}{' ...' if len(self.dropped) > 4 else ''}")
        return "\n".join(lines)


def _format_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    allow_missing: Collection[PhaseAddition] = PHASE_ADDITIONS,
    use_ema_weights: bool = False,
    lora_scale: float = 1.0,
) -> LoadReport:
    """Load weights strictly into a DiffusionEngine-like module.

    allow_missing: phase-added families the checkpoint may lack (initialised as the reference does).
    use_ema_weights: replace network weights by the checkpoint's EMA shadows (what inference wants).
    lora_scale: used to merge LoRA adapters the checkpoint has but the model does not.
    Any other missing or unexpected key raises CheckpointError listing the keys.
    """
    if isinstance(source, Mapping):
        sd, name = strip_prefixes(source), "<state dict>"
    else:
        sd, _ = read_state_dict(source)
        name = str(source)
    report = LoadReport(source=name)
    if use_ema_weights and has_ema(sd):
        sd, report.ema_folded = fold_ema(sd)

    expected = model.state_dict()
    model_has_lora = any(family_of(k) == "lora" for k in expected)
    if not model_has_lora and any(family_of(k) == "lora" for k in sd):
        sd, report.lora_merged = merge_lora(sd, lora_scale)

    unexpected = set(sd) - set(expected)
    # EMA shadows the model does not keep: all of them when it has no EMA (they were folded above if asked), else
    # those of weights it does not train (our EMA tracks trainable weights only; frozen ones never move).
    report.dropped += sorted(k for k in unexpected if k.startswith("model_ema."))
    unexpected -= set(report.dropped)
    if unexpected:
        raise CheckpointError(f"{name}: unexpected keys not in the model: {_format_keys(unexpected)}")

    missing = set(expected) - set(sd)
    by_family: dict[str, list[str]] = {}
    for key in missing:
        by_family.setdefault(family_of(key) or "other", []).append(key)
    bad = {f: keys for f, keys in by_family.items() if f == "other" or f not in allow_missing}
    if bad:
        keys = [k for ks in bad.values() for k in ks]
        raise CheckpointError(f"{name}: missing keys the model needs: {_format_keys(keys)}")

    mismatched = [k for k in sd if k in expected and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if mismatched:
        details = ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched[:6])
        raise CheckpointError(f"{name}: shape mismatch (checkpoint vs model): {details}")

    for key, value in sd.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{name}: tensor {key} contains NaN or Inf")

    fill = dict(sd)
    for key in by_family.get("cond_time_stack_embed", []):
        src = key.replace("cond_time_stack_embed", "time_embed")
        if src not in sd:
            raise CheckpointError(f"{name}: cannot initialise {key}: {src} is missing too")
        fill[key] = sd[src].clone()
    for key in by_family.get("action_control", []):
        fill[key] = torch.zeros_like(expected[key], device="cpu")  # zero-initialised: starts as a no-op
    for key in by_family.get("lora", []):
        shape = expected[key].shape
        if "_adapter_up." in key:
            fill[key] = torch.zeros(shape, dtype=expected[key].dtype)
        else:  # down projection ~ N(0, 1/rank), as the reference initialises it
            fill[key] = (torch.randn(shape) / shape[0]).to(expected[key].dtype)
    incompatible = model.load_state_dict(fill, strict=False)
    leftover = set(incompatible.missing_keys) - set(by_family.get("ema", []))
    assert not leftover and not incompatible.unexpected_keys, (leftover, incompatible.unexpected_keys)
    if "ema" in by_family and getattr(model, "model_ema", None) is not None:
        model.model_ema.reset(model.model)  # a fresh EMA of the loaded weights
    report.initialised = {f: sorted(k) for f, k in by_family.items()}
    log.info(report.summary())
    return report


def read_config_metadata(metadata: Mapping[str, str]) -> dict | None:
    """The resolved model config embedded in a vwm safetensors export, if any."""
    raw = metadata.get("vwm_config")
    return None if raw is None else json.loads(raw)


# ------------------------------------------------------------------------------------------ DeepSpeed ZeRO


def _deepspeed_safe_globals() -> list:
    """Classes DeepSpeed pickles into ZeRO checkpoints that the restricted unpickler may rebuild."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, loss_scaler.LossScaler, loss_scaler.DynamicLossScaler, fragment_address]


def zero_tag_dir(path: str) -> tuple[str, str]:
    """(checkpoint dir, tag) of a DeepSpeed checkpoint given the dir holding `latest` or the tag dir itself."""
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if not tag or not os.path.isdir(os.path.join(path, tag)):
            raise CheckpointError(f"{latest}: names tag {tag!r}, which is not a directory there")
        return path, tag
    if os.path.isfile(os.path.join(path, "mp_rank_00_model_states.pt")):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    raise CheckpointError(f"{path}: not a DeepSpeed checkpoint (no 'latest' file and no mp_rank_00_model_states.pt)")


def verify_zero_files(tag_dir: str) -> dict:
    """Open every shard with the restricted unpickler (so DeepSpeed's own loader never meets a malicious pickle),
    check the optimizer shards cover the saved world size, and return the model-states dict."""
    files = sorted(glob.glob(os.path.join(tag_dir, "*.pt")))
    model_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if model_file not in files:
        raise CheckpointError(f"{model_file}: missing")
    states = None
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for file in files:
            obj = _torch_load_safely(file, mmap=True)
            if file == model_file:
                states = obj
    assert isinstance(states, Mapping)
    world = states.get("dp_world_size")
    optim = [f for f in files if f.endswith("_optim_states.pt")]
    if world is not None and len(optim) != int(world):
        have = {int(m.group(1)) for f in optim if (m := re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)))}
        lost = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(int(world)) if r not in have]
        raise CheckpointError(f"{tag_dir}: expected {world} optimizer shards, found {len(optim)}; missing: {', '.join(lost)}")
    return states


def merge_zero_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Consolidated fp32 state dict of a DeepSpeed ZeRO-1/2 checkpoint (as its `zero_to_fp32.py` would write), with
    trainable weights from the fp32 optimizer partitions and frozen weights and buffers from the model states."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir, tag = zero_tag_dir(path)
    states = verify_zero_files(os.path.join(ckpt_dir, tag))
    try:
        sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise CheckpointError(f"{path}: DeepSpeed could not merge the checkpoint ({err})") from err
    metadata = {"source": os.path.abspath(path)}
    if "global_step" in states:
        metadata["step"] = str(states["global_step"])
    return dict(sd), metadata
