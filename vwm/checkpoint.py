"""Reading weights in every format the reference and vwm produce, safely, and loading them strictly.

Formats: safetensors; `pytorch_model.bin` from `zero_to_fp32` (ours or the reference's, `_forward_module.`
prefixes, dot-less EMA names) or its output directory; Lightning `.ckpt` files; vwm step directories;
DeepSpeed checkpoint directories (merged here). Pickled files are only ever opened with
`torch.load(weights_only=True)`; a file that needs arbitrary unpickling is refused.

Loading is strict. The only keys a checkpoint may lack are the ones a training phase adds on purpose, each
initialised as the reference does: `cond_time_stack_embed` (copied from `time_embed`), the action-control
projections (zeros), LoRA adapters (fresh: down ~ N(0, 1/r), up = 0) and the EMA (rebuilt from the weights).
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import io
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
WHOLE_FAMILIES = ("cond_time_stack_embed", "action_control", "lora")
"""Families a checkpoint has completely or not at all. The EMA is exempt: when any shadow the model keeps is
missing, the whole EMA is rebuilt from the loaded weights (the counters too)."""

_FAMILY_PATTERNS: dict[str, re.Pattern] = {
    "cond_time_stack_embed": re.compile(r"^model\.diffusion_model\.cond_time_stack_embed\."),
    "action_control": re.compile(r"\.[kv]_adapter_action_control\.weight$"),
    "lora": re.compile(r"\.(q|k|v|out)_adapter_(down|up)\.weight$"),
    "ema": re.compile(r"^model_ema\."),
}


class CheckpointError(RuntimeError):
    """A weight file that cannot be used; the message names the file and the reason."""


# -------------------------------------------------------------------------------------------------- reading

CONVERT_HINT = (
    "If you trust the file, convert it to safetensors in an isolated environment, e.g. "
    "`python -c \"import torch, safetensors.torch as s; sd = torch.load('IN', weights_only=False); "
    "s.save_file({k: v.contiguous() for k, v in sd.get('state_dict', sd).items() if torch.is_tensor(v)}, "
    "'OUT.safetensors')\"`"
)
"""How to turn a pickle that needs arbitrary code into a file vwm reads."""

ZERO_TO_FP32_FILES = ("model.safetensors", "pytorch_model.bin")
"""Single-file outputs of DeepSpeed's `zero_to_fp32.py` inside its output directory."""


def _torch_load_safely(path: str, mmap: bool = False) -> object:
    mmap = mmap and zipfile.is_zipfile(path)  # only torch's zip format maps; legacy pickles are read whole
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to unpickle: it needs arbitrary code execution, which vwm never allows "
            f"(torch.load(weights_only=True) says: {str(err).splitlines()[0]}). {CONVERT_HINT}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
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


def _read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _check_manifest(path)
    return _read_file_unchecked(path)


def _read_file_unchecked(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        obj = _torch_load_safely(path, mmap=True)  # a private mapping: read on use, never written back
        metadata = {}
        if isinstance(obj, Mapping) and "global_step" in obj:
            metadata["step"] = str(obj["global_step"])
        return _tensor_dict(obj, path), metadata
    raise CheckpointError(
        f"{path}: unknown weight format; expected .safetensors, .bin/.pt/.pth, .ckpt or a checkpoint dir"
    )


def _check_manifest(path: str) -> None:
    """Refuse a vwm checkpoint directory (or a file or DeepSpeed tag directory inside one) whose MANIFEST.json does
    not match the files on disk: missing files, sizes, checksums (every byte is read)."""
    from vwm.training.checkpointing import MANIFEST, read_manifest

    root = os.path.abspath(path)
    for level in range(3):  # the directory itself, or the step-N/ above a file or DeepSpeed tag directory in it
        named_step = re.match(r"^step-\d+$", os.path.basename(root)) is not None
        if (level == 0 or named_step) and os.path.isfile(os.path.join(root, MANIFEST)):
            try:
                read_manifest(root, checksums=True)
            except ValueError as err:
                raise CheckpointError(str(err)) from err
            return
        root = os.path.dirname(root)


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
        raise CheckpointError(f"{index}: tensors listed but not found in the shards: {_format_keys(lost)}")
    return sd


def _read_directory(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _check_manifest(path)
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


EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
"""EMA bookkeeping buffers, which are not weight shadows."""


def ema_shadows(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the EMA weight shadows in a state dict."""
    return [k for k in sd if k.startswith("model_ema.") and k not in EMA_COUNTERS]


def has_ema(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when the state dict carries EMA shadows."""
    return bool(ema_shadows(sd))


def check_ema_shadows(sd: Mapping[str, torch.Tensor], model_keys: Iterable[str], name: str) -> None:
    """Refuse EMA shadows that belong to no weight, neither of the checkpoint nor of the model: a broken name
    mapping, never something to skip (the same rule for `--finetune` and `bin_to_st.py`)."""
    weights = {ema_key(k) for k in (*sd, *model_keys) if k.startswith("model.")}
    orphans = [k for k in ema_shadows(sd) if k not in weights]
    if orphans:
        raise CheckpointError(f"{name}: EMA shadows without a matching weight: {_format_keys(orphans)}")


def fold_ema(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Replace each network weight by its EMA shadow and drop all `model_ema.*` keys; returns (dict,
    #replaced)."""
    out = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    replaced = 0
    for key in list(out):
        if key.startswith("model."):
            shadow = sd.get(ema_key(key))
            if shadow is not None:
                if shadow.shape != out[key].shape:
                    raise CheckpointError(f"EMA shadow of {key} has shape {tuple(shadow.shape)}, weight "
                                          f"{tuple(out[key].shape)}")
                out[key] = shadow.to(out[key].dtype)
                replaced += 1
    return out, replaced


def fill_from_ema(
    sd: Mapping[str, torch.Tensor], expected: Iterable[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Add each expected network weight the state dict lacks but whose EMA shadow it has (the reference's PEFT
    `.bin` files drop the base weights, its issue #16); returns (dict, filled keys)."""
    out = dict(sd)
    filled = []
    for key in expected:
        if key.startswith("model.") and key not in out and ema_key(key) in sd:
            out[key] = sd[ema_key(key)]
            filled.append(key)
    return out, filled


def restore_reduced_precision(
    sd: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], name: str = "<state dict>"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Replace weights stored in reduced precision (DeepSpeed saves frozen weights in the training dtype) by
    the fp32 values of the phase's starting weights `base`, after checking they round to exactly the stored
    values; returns (dict, restored keys). A weight that does not round to its stored value is an error:
    `base` is not where the phase started."""
    out = dict(sd)
    restored, changed = [], []
    for key, value in sd.items():
        if not value.is_floating_point() or value.dtype == torch.float32 or key not in base:
            continue
        start = base[key]
        if start.shape != value.shape or not torch.equal(start.to(value.dtype), value):
            changed.append(key)
            continue
        out[key] = start.float()
        restored.append(key)
    if changed:
        raise CheckpointError(f"{name}: weights stored in reduced precision differ from the starting weights "
                              f"given: {_format_keys(changed)}; pass the file the phase was started from "
                              f"(its --finetune)")
    return out, restored


_LORA_BASE = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}


def merge_lora(sd: Mapping[str, torch.Tensor], scale: float = 1.0) -> tuple[dict[str, torch.Tensor], int]:
    """Fold LoRA adapters into their base projections, W += scale · up @ down, and drop them; returns (dict,
    #merged)."""
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
            more = " ..." if len(self.dropped) > 4 else ""
            lines.append(f"  ignored {len(self.dropped)} tensors: {', '.join(self.dropped[:4])}{more}")
        return "\n".join(lines)


def _format_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    sd: Mapping[str, torch.Tensor],
    name: str,
    allow_missing: Collection[PhaseAddition] = (),
) -> tuple[dict[str, list[str]], list[str]]:
    """Check a checkpoint against a model's state dict (which may live on the meta device): every key known,
    none missing beyond the allowed phase families, shapes equal, values finite. Returns (missing keys per
    family, EMA shadows to drop); raises CheckpointError naming the offending keys."""
    unexpected = set(sd) - set(expected)
    # EMA shadows the model does not keep: all of them when it has no EMA (they were folded first if asked),
    # else those of weights it does not train (our EMA tracks trainable weights only; frozen ones never move).
    dropped = sorted(k for k in unexpected if k.startswith("model_ema."))
    unexpected -= set(dropped)
    if unexpected:
        raise CheckpointError(f"{name}: unexpected keys not in the model: {_format_keys(unexpected)}")

    by_family: dict[str, list[str]] = {}
    for key in set(expected) - set(sd):
        by_family.setdefault(family_of(key) or "other", []).append(key)
    bad = [k for f, keys in by_family.items() if f == "other" or f not in allow_missing for k in keys]
    if bad:
        raise CheckpointError(f"{name}: missing keys the model needs: {_format_keys(bad)}")
    for family, keys in by_family.items():
        members = sum(family_of(k) == family for k in expected)
        if family in WHOLE_FAMILIES and len(keys) < members:  # the phase adds a family whole, never in parts
            raise CheckpointError(
                f"{name}: has {members - len(keys)} of the {members} {family} tensors; a phase may lack a family "
                f"only as a whole (then it is initialised), so these are missing: {_format_keys(keys)}")

    mismatched = [k for k in sd if k in expected and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if mismatched:
        details = ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched[:6])
        raise CheckpointError(f"{name}: shape mismatch (checkpoint vs model): {details}")

    for key, value in sd.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{name}: tensor {key} contains NaN or Inf")
    return {f: sorted(keys) for f, keys in by_family.items()}, dropped


def load_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    allow_missing: Collection[PhaseAddition] = PHASE_ADDITIONS,
    use_ema_weights: bool = False,
    lora_scale: float = 1.0,
    name: str | None = None,
) -> LoadReport:
    """Load weights strictly into a DiffusionEngine-like module.

    allow_missing: phase-added families the checkpoint may lack (initialised as the reference does).
    use_ema_weights: replace network weights by the checkpoint's EMA shadows (what inference wants).
    lora_scale: used to merge LoRA adapters the checkpoint has but the model does not.
    name: how errors refer to a state-dict source (default: the path, or "<state dict>").
    Any other missing or unexpected key raises CheckpointError listing the keys.
    """
    if isinstance(source, Mapping):
        sd, name = strip_prefixes(source), name or "<state dict>"
    else:
        sd, _ = read_state_dict(source)
        name = name or str(source)
    report = LoadReport(source=name)
    expected = model.state_dict()
    check_ema_shadows(sd, expected, name)
    if use_ema_weights and has_ema(sd):
        sd, report.ema_folded = fold_ema(sd)

    model_has_lora = any(family_of(k) == "lora" for k in expected)
    if not model_has_lora and any(family_of(k) == "lora" for k in sd):
        sd, report.lora_merged = merge_lora(sd, lora_scale)
    by_family, report.dropped = check_state_dict(expected, sd, name, allow_missing)

    fill = {k: v for k, v in sd.items() if k not in set(report.dropped)}
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
    # Every key was checked above; only the EMA (rebuilt below) may remain missing, asserted right after.
    incompatible = model.load_state_dict(fill, strict=False)
    leftover = set(incompatible.missing_keys) - set(by_family.get("ema", []))
    assert not leftover and not incompatible.unexpected_keys, (leftover, incompatible.unexpected_keys)
    if "ema" in by_family and getattr(model, "model_ema", None) is not None:
        model.model_ema.reset(model.model)  # a fresh EMA of the loaded weights
    report.initialised = by_family
    log.info(report.summary())
    return report


def read_config_metadata(metadata: Mapping[str, str]) -> dict | None:
    """The resolved model config embedded in a vwm safetensors export, if any."""
    raw = metadata.get("vwm_config")
    return None if raw is None else json.loads(raw)


HANDOFF_NETWORK_PARAMS = frozenset({
    "add_lora", "lora_rank", "lora_scale", "action_control", "separate_cond_time_embed", "use_checkpoint",
    "spatial_transformer_attn_type",
})
"""Network parameters a training phase may set differently from the config of its starting weights: the
families it adds (initialised by `load_weights`) and memory/kernel settings."""

_EMBEDDER_TRAINING_KEYS = ("ucg_rate", "is_trainable")


def _normalized(value: object) -> object:
    """A plain-container config value with every node's constructor defaults filled in, so an explicit default
    and an omitted one compare equal."""
    from vwm.config import is_node, locate, node_arguments

    if is_node(value):
        cls = locate(value["target"])
        simple = (bool, int, float, str, type(None))
        args = {name: p.default for name, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty and isinstance(p.default, simple)}
        args.update(node_arguments(value))
        return {"target": value["target"], **{k: _normalized(v) for k, v in args.items()}}
    if isinstance(value, Mapping):
        return {k: _normalized(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    return value


def _flatten(value: object, prefix: str) -> dict[str, object]:
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out or {prefix: {}}
    if isinstance(value, list):
        out = {prefix + ".len": len(value)}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _architecture(model_node: Mapping) -> dict[str, object]:
    """The parts of a model config that decide what its weights mean (flattened, defaults filled)."""
    node = _normalized(model_node)
    network = dict(node.get("network_config") or {})
    for key in HANDOFF_NETWORK_PARAMS:
        network.pop(key, None)
    embedders = ((node.get("conditioner_config") or {}).get("emb_models") or [])
    embedders = [{k: v for k, v in e.items() if k not in _EMBEDDER_TRAINING_KEYS} for e in embedders]
    arch = {
        "target": node.get("target"),
        "scale_factor": node.get("scale_factor"),
        "network_config": network,
        "denoiser_config": node.get("denoiser_config"),
        "first_stage_config": node.get("first_stage_config"),
        "conditioner_config.emb_models": embedders,
    }
    return _flatten(arch, "model.params")


def check_handoff(source_model: Mapping, target_model: Mapping, name: str) -> None:
    """Refuse to start a phase from weights whose embedded model config differs from the training config in
    anything but what a phase may add (LoRA, action control, the condition-frame timestep MLP, appended action
    embedders): differences such as the preconditioning, head count or latent scale change no tensor shape, so
    a strict load alone cannot see them."""
    from vwm.actions import ACTION_KEYS
    from vwm.config import to_container

    source, target = _architecture(to_container(source_model)), _architecture(to_container(target_model))
    emb = "model.params.conditioner_config.emb_models"
    n_src, n_tgt = source.pop(emb + ".len", 0), target.pop(emb + ".len", 0)
    appended = [target.get(f"{emb}[{i}].input_key") for i in range(n_src, n_tgt)]
    problems = []
    if n_tgt < n_src or any(key not in ACTION_KEYS for key in appended):
        problems.append(f"{emb}: checkpoint has {n_src} embedders, config {n_tgt} (a phase may only append "
                        f"action embedders {', '.join(ACTION_KEYS)}; it appends {appended})")
    added = tuple(f"{emb}[{i}]" for i in range(n_src, n_tgt))
    target = {k: v for k, v in target.items() if not k.startswith(added)}
    for key in sorted(set(source) | set(target)):
        old, new = source.get(key, "<absent>"), target.get(key, "<absent>")
        if old != new:
            problems.append(f"{key}: checkpoint {old!r}, config {new!r}")
    if problems:
        raise CheckpointError(
            f"{name}: its embedded model config (vwm_config) does not match the training config beyond what "
            f"a phase may add ({', '.join(sorted(HANDOFF_NETWORK_PARAMS))}, action embedders): "
            + "; ".join(problems[:8])
            + (f"; ... (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        )


def load_finetune(model: nn.Module, path: str | Path, model_config: Mapping) -> LoadReport:
    """Load a phase's starting weights (`train.py --finetune`): the config check of `check_handoff` when the
    file embeds its config (a bin_to_st.py export), then the strict `load_weights` with the phase families."""
    sd, metadata = read_state_dict(path)
    embedded = read_config_metadata(metadata)
    lora_scale = 1.0
    if embedded is not None:
        check_handoff(embedded["model"], model_config, str(path))
        network = (embedded["model"].get("params") or {}).get("network_config") or {}
        lora_scale = float((network.get("params") or {}).get("lora_scale", 1.0))
    return load_weights(model, sd, lora_scale=lora_scale, name=str(path))


# ------------------------------------------------------------------------------------------ DeepSpeed ZeRO


def _deepspeed_safe_globals() -> list:
    """Classes DeepSpeed pickles into ZeRO checkpoints that the restricted unpickler may rebuild."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, loss_scaler.LossScaler, loss_scaler.DynamicLossScaler, fragment_address]


def zero_tag_dir(path: str) -> tuple[str, str]:
    """(checkpoint dir, tag) of a DeepSpeed checkpoint, given the dir holding `latest` or the tag dir."""
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if not tag or not os.path.isdir(os.path.join(path, tag)):
            raise CheckpointError(f"{latest}: names tag {tag!r}, which is not a directory there")
        return path, tag
    if os.path.isfile(os.path.join(path, "mp_rank_00_model_states.pt")):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    raise CheckpointError(f"{path}: not a DeepSpeed checkpoint (no 'latest' file and no "
                          f"mp_rank_00_model_states.pt)")


def load_zero_file(path: str) -> Any:
    """A DeepSpeed checkpoint file, memory-mapped, through the restricted unpickler with DeepSpeed's allow-listed
    classes (a file that needs more is refused)."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return _torch_load_safely(path, mmap=True)


def verify_pickles(root: str, skip: Collection[str] = ()) -> None:
    """Open every file under `root` with the restricted unpickler and DeepSpeed's allow-listed classes, except
    Python scripts (DeepSpeed's zero_to_*.py), the manifest and the files named in `skip` (read as text by their
    users); a file that needs more is refused before anything else unpickles it."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for folder, _, files in os.walk(root):
            for name in sorted(files):
                if name not in skip and not name.endswith(".py") and not name.startswith("MANIFEST.json"):
                    _torch_load_safely(os.path.join(folder, name), mmap=True)


def verify_zero_files(tag_dir: str) -> dict:
    """Open every shard with the restricted unpickler (so DeepSpeed's own loader never meets a malicious
    pickle), check the optimizer shards cover the saved world size, and return the model-states dict."""
    files = sorted(glob.glob(os.path.join(tag_dir, "*.pt")))
    model_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if model_file not in files:
        raise CheckpointError(f"{model_file}: missing")
    states = None
    for file in files:
        obj = load_zero_file(file)
        if file == model_file:
            states = obj
    assert isinstance(states, Mapping)
    world = states.get("dp_world_size")
    optim = [f for f in files if f.endswith("_optim_states.pt")]
    if world is not None and len(optim) != int(world):
        ranks = (re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)) for f in optim)
        have = {int(m.group(1)) for m in ranks if m}
        lost = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(int(world)) if r not in have]
        raise CheckpointError(f"{tag_dir}: expected {world} optimizer shards, found {len(optim)}; missing: "
                              f"{', '.join(lost)}")
    return states


def merge_zero_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Consolidated state dict of a DeepSpeed ZeRO-1/2 checkpoint, as its `zero_to_fp32.py` writes it
    (trainable weights fp32 from the optimizer partitions; frozen weights and buffers in the training dtype),
    plus any module weight that merge leaves out (ZeRO-1 saves no frozen-parameter list), from the model
    states."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir, tag = zero_tag_dir(path)
    states = verify_zero_files(os.path.join(ckpt_dir, tag))
    chatter = io.StringIO()  # DeepSpeed's merge prints its progress; keep it out of the CLIs' output
    try:
        with contextlib.redirect_stdout(chatter):
            sd = dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag))
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise CheckpointError(f"{path}: DeepSpeed could not merge the checkpoint ({err})") from err
    log.debug("DeepSpeed merge of %s: %s", path, chatter.getvalue())
    for key, value in states["module"].items():
        if key not in sd and torch.is_tensor(value):
            sd[key] = value
    metadata = {"source": os.path.abspath(path)}
    if "global_step" in states:
        metadata["step"] = str(states["global_step"])
    return sd, metadata
