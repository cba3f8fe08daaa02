"""State-dict key transforms: wrapper prefixes, phase-added families, EMA shadows (fold, fill, check), LoRA merge,
reduced-precision restore. Pure functions over `{key: tensor}` mappings."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from vwm.checkpoint.errors import CheckpointError, format_keys
from vwm.models.ema import ema_buffer_name

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


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DeepSpeed/Lightning/DDP wrapper prefixes (`_forward_module.`, `module.`) from every key."""
    out = {}
    for key, value in sd.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out



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
        raise CheckpointError(f"{name}: EMA shadows without a matching weight: {format_keys(orphans)}")


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
                              f"given: {format_keys(changed)}; pass the file the phase was started from "
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



@dataclass(frozen=True)
class KeyDiff:
    """How a state dict differs from the one a module expects: keys missing, keys unexpected, shapes wrong
    (each sorted)."""

    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[str]

    @property
    def ok(self) -> bool:
        """True when the state dict fits exactly."""
        return not (self.missing or self.unexpected or self.wrong_shape)


def key_diff(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
             may_miss: Callable[[str], bool] = lambda key: False) -> KeyDiff:
    """Compare `state` with the state dict a module expects; keys for which `may_miss` is true may be absent."""
    return KeyDiff(
        missing=sorted(k for k in expected if k not in state and not may_miss(k)),
        unexpected=sorted(k for k in state if k not in expected),
        wrong_shape=sorted(k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)),
    )
