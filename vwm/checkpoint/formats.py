"""Reading weights in every format the reference and vwm produce, safely.

Formats: safetensors; `pytorch_model.bin` from `zero_to_fp32` (ours or the reference's, `_forward_module.`
prefixes, dot-less EMA names) or its output directory; Lightning `.ckpt` files; vwm step directories (their
manifest checked first); DeepSpeed checkpoint directories (merged by `vwm.checkpoint.zero`). Pickled files are only
ever opened through `vwm.checkpoint.unpickle`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vwm.checkpoint.errors import CheckpointError, format_keys
from vwm.checkpoint.keys import strip_prefixes
from vwm.checkpoint.manifest import check_manifest
from vwm.checkpoint.unpickle import torch_load_safely
from vwm.checkpoint.zero import merge_zero_checkpoint

ZERO_TO_FP32_FILES = ("model.safetensors", "pytorch_model.bin")
"""Single-file outputs of DeepSpeed's `zero_to_fp32.py` inside its output directory."""


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


def _read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    check_manifest(path)
    return _read_file_unchecked(path)


def _read_file_unchecked(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        obj = torch_load_safely(path, mmap=True)  # a private mapping: read on use, never written back
        metadata = {}
        if isinstance(obj, Mapping) and "global_step" in obj:
            metadata["step"] = str(obj["global_step"])
        return _tensor_dict(obj, path), metadata
    raise CheckpointError(
        f"{path}: unknown weight format; expected .safetensors, .bin/.pt/.pth, .ckpt or a checkpoint dir"
    )


def _read_shards(path: str, index: str) -> dict[str, torch.Tensor]:
    with open(index) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard:
            raise CheckpointError(f"{index}: shard name {shard!r} must be a file name inside {path}")
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: shard listed in {index} is missing")
        sd.update(_read_file_unchecked(file)[0])
    lost = sorted(set(weight_map) - set(sd))
    if lost:
        raise CheckpointError(f"{index}: tensors listed but not found in the shards: {format_keys(lost)}")
    return sd


def _read_directory(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    check_manifest(path)
    if any(os.path.isfile(os.path.join(path, name)) for name in ("latest", "mp_rank_00_model_states.pt")):
        return merge_zero_checkpoint(path)
    if os.path.isfile(os.path.join(path, "lightning.ckpt")):  # a vwm DDP checkpoint directory
        return _read_file_unchecked(os.path.join(path, "lightning.ckpt"))
    for name in ZERO_TO_FP32_FILES:  # DeepSpeed's zero_to_fp32.py output directory
        index = os.path.join(path, name + ".index.json")
        if os.path.isfile(index):
            return _read_shards(path, index), {}
        if os.path.isfile(os.path.join(path, name)):
            return _read_file_unchecked(os.path.join(path, name))
    raise CheckpointError(
        f"{path}: not a checkpoint directory: expected a DeepSpeed checkpoint ('latest' or "
        f"mp_rank_00_model_states.pt), lightning.ckpt, or zero_to_fp32 output "
        f"({', '.join(ZERO_TO_FP32_FILES)} or their .index.json)"
    )


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with wrapper prefixes stripped, metadata) from any supported weight file or directory."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    sd, metadata = _read_directory(path) if os.path.isdir(path) else _read_file(path)
    return strip_prefixes(sd), metadata



def read_config_metadata(metadata: Mapping[str, str]) -> dict | None:
    """The resolved model config embedded in a vwm safetensors export, if any."""
    raw = metadata.get("vwm_config")
    return None if raw is None else json.loads(raw)

