"""Strict loading of weights into a DiffusionEngine-like module.

The only keys a checkpoint may lack are the ones a training phase adds on purpose, each initialised as the
reference does: `cond_time_stack_embed` (copied from `time_embed`), the action-control projections (zeros), LoRA
adapters (fresh: down ~ N(0, 1/r), up = 0) and the EMA (rebuilt from the weights).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vwm.checkpoint.errors import CheckpointError, format_keys
from vwm.checkpoint.formats import read_state_dict
from vwm.checkpoint.keys import (
    PHASE_ADDITIONS,
    WHOLE_FAMILIES,
    PhaseAddition,
    check_ema_shadows,
    family_of,
    fold_ema,
    has_ema,
    merge_lora,
    strip_prefixes,
)

log = logging.getLogger(__name__)


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
        raise CheckpointError(f"{name}: unexpected keys not in the model: {format_keys(unexpected)}")

    by_family: dict[str, list[str]] = {}
    for key in set(expected) - set(sd):
        by_family.setdefault(family_of(key) or "other", []).append(key)
    bad = [k for f, keys in by_family.items() if f == "other" or f not in allow_missing for k in keys]
    if bad:
        raise CheckpointError(f"{name}: missing keys the model needs: {format_keys(bad)}")
    for family, keys in by_family.items():
        members = sum(family_of(k) == family for k in expected)
        if family in WHOLE_FAMILIES and len(keys) < members:  # the phase adds a family whole, never in parts
            raise CheckpointError(
                f"{name}: has {members - len(keys)} of the {members} {family} tensors; a phase may lack a family "
                f"only as a whole (then it is initialised), so these are missing: {format_keys(keys)}")

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
