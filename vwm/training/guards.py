"""Numerical guards of training: before an optimizer step every rank agrees that the loss, the global gradient norm
and the learning rate are finite (else all ranks stop, no update applied), and checkpoints are only committed with
finite weights. One all-gather of a few numbers per optimizer step, where the ranks already synchronise."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch


def non_finite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the floating parameters and buffers (weights, EMA shadows) of `module` holding NaN or Inf."""
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()  # one host sync
    return [n for (n, _), ok in zip(named, finite) if not ok]


def _grad_tensors(partitions: Any) -> Iterable[torch.Tensor]:
    for part in partitions.values():
        if torch.is_tensor(part):
            yield part
        elif part is not None:
            yield from (g for g in part if g is not None)


def local_grad_square_norm(optimizer: Any, module: torch.nn.Module) -> tuple[torch.Tensor, bool]:
    """(sum of squares of the gradient entries this rank holds, whether every rank holds the same ones).

    DeepSpeed ZeRO-1/2 keeps each rank's reduced partition in `averaged_gradients` after the last backward of an
    accumulation window (the partitions are disjoint); DDP and single-device training keep the full reduced
    gradients in `.grad` (replicated)."""
    partitions = getattr(optimizer, "averaged_gradients", None)
    grads = list(_grad_tensors(partitions)) if isinstance(partitions, dict) else []
    replicated = not grads
    if replicated:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(module.parameters()).device), replicated
    # fp32 norms straight from the multi-tensor kernel: no per-tensor cast on the host (1,340 tensors in the UNet)
    # and no bf16 rounding of each tensor's norm before the sum
    norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
    return norms.square().sum(), replicated


@dataclass
class UpdateCheck:
    """What the ranks agreed on before an optimizer step."""

    grad_norm: float
    """Global L2 norm of the gradient about to be applied."""
    skipped: float
    """Broken samples skipped while drawing this step's batches, summed over ranks and micro-batches."""


def update_hint(module: Any, gradients: bool = False) -> str:
    """What a user can do about a refused update. Non-finite gradients under compiled UNet layers point at the
    compiler too: on an H100 (torch 2.11, 2026-12-06) the compiled 576x1024 phase-1 step produced non-finite
    gradients at its first step while the eager step was finite (docs/performance.md)."""
    hint = "Resume from the last checkpoint with a lower learning rate or check the data of this step."
    unet = getattr(module, "unet", None)
    compiled = unet is not None and any(getattr(m, "compiled_run", None) is not None for m in unet.modules())
    if gradients and compiled:
        hint += (" This run compiles the UNet layers (model.params.compile_model=True); if the first steps already "
                 "fail, train eagerly with model.params.compile_model=False, whose numerics are the same.")
    return hint


def check_update(module: pl.LightningModule, optimizer: Any, loss_non_finite: torch.Tensor | None,
                 skipped: torch.Tensor | None) -> UpdateCheck:
    """Agree on all ranks (one all-gather) that the loss of every micro-batch, the global gradient norm and the
    learning rates are finite; otherwise raise FloatingPointError on every rank before the update is applied."""
    grad_sq, replicated = local_grad_square_norm(optimizer, module)
    device = grad_sq.device
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    bad_lr = next((lr for lr in lrs if not math.isfinite(lr)), None)
    zero = torch.zeros((), device=device)
    local = torch.stack([
        zero if loss_non_finite is None else loss_non_finite.reshape(()).float().to(device),
        (~torch.isfinite(grad_sq)).float(),
        grad_sq.float(),
        zero + float(bad_lr is not None),
        zero if skipped is None else skipped.reshape(()).float().to(device),
    ])
    rows = module.all_gather(local).reshape(-1, local.numel()).tolist()
    step = module.global_step + 1  # the step this update would complete (the metrics and checkpoint number)
    loss_ranks = [r for r, row in enumerate(rows) if row[0]]
    grad_ranks = [r for r, row in enumerate(rows) if row[1]]
    hint = update_hint(module, gradients=bool(grad_ranks))
    if loss_ranks:
        raise FloatingPointError(f"non-finite loss at step {step} on rank(s) {loss_ranks}; no update was "
                                 f"applied. {hint}")
    if grad_ranks:
        raise FloatingPointError(f"non-finite gradient norm at step {step} (in the gradients of rank(s) "
                                 f"{grad_ranks}; the loss was finite on every rank); no update was applied. {hint}")
    if any(row[3] for row in rows):
        raise FloatingPointError(f"non-finite learning rate {bad_lr} at step {step} (param group learning rates "
                                 f"{lrs}); no update was applied. Check base_learning_rate and scheduler_config")
    square = rows[0][2] if replicated else sum(row[2] for row in rows)
    return UpdateCheck(grad_norm=math.sqrt(square), skipped=sum(row[4] for row in rows))
