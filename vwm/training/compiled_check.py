"""Compiled UNet layers verify their gradients against the eager layers before training relies on them.

Regional compilation (`compile_model: True`) is only worth its speed if it computes the same function. On CPU the
tests show it does; on an H100 with torch 2.11 (2026-12-07, docs/performance.md) the compiled 576x1024 loss had the
eager value but gradients 1.9e4 times their norm away from the eager ones, and on 2026-12-06 non-finite ones. The
cause was Inductor's stride padding in the bf16 backward, which vwm now turns off (video_unet.INDUCTOR_OPTIONS;
the same step then passed this check at 4.0e-4). Such a fault is specific to a GPU, a driver, a torch build and a
shape, so no test here can rule out the next one for a user's run. The run checks it instead, once, at its first
step that can tell:

- the loss and the gradients of every trainable weight, through the compiled layers and then through the eager
  layers (every layer checkpointed, so the second pass adds little memory), from the same batch and the same
  random draws; `torch.autograd.grad`, so neither pass touches `.grad` or the strategy's gradient hooks;
- the relative distance ||g_compiled - g_eager|| / ||g_eager|| over all weights together: 5e-9 in fp32 on a CPU,
  4.0e-4 in bf16 for the right compiled 576x1024 step on the H100 (eager rounds every intermediate to bf16,
  compiled kernels keep fp32 inside), 1.9e4 for the padding fault; the default tolerance of 0.1 sits between.
  Above it every rank drops the compiled layers and trains eagerly (same numerics, slower), with a warning that
  gives the distance; the log gives it in either case;
- a model whose output layer is still zero (training from scratch) has no gradient upstream of it, so its first
  step cannot tell: the check waits for a step where most weights receive a gradient (the tiny model trained from
  scratch gets there at its third step, once the zero convolutions closing its residual branches have moved).

All ranks take the same decision (one all-gather), so no rank runs different code from the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_TOLERANCE = 0.1
MAX_DEFERRALS = 20
"""Steps the check waits for informative gradients before giving up (and keeping the compiled layers, with a
warning that they were not verified)."""


@dataclass
class CompiledGradientCheck:
    """The result of one comparison. `status`: `passed`, `failed`, `deferred` (too few weights had a gradient to
    tell) or `skipped` (nothing compiled, or random dropout masks that compiled and eager code draw differently)."""

    status: str
    grad_rel_distance: float | None = None
    loss_compiled: float | None = None
    loss_eager: float | None = None
    worst_tensor: str | None = None
    informative_share: float | None = None
    reason: str = ""


def compiled_layers(module: nn.Module) -> list[nn.Module]:
    """The UNet layers of `module` that run a compiled stand-in (`VideoUNet.compile_layers`)."""
    return [m for m in module.modules() if getattr(m, "compiled_run", None) is not None]


def drop_compiled_layers(module: nn.Module) -> int:
    """Run every compiled layer of `module` eagerly from now on; the number of layers changed."""
    layers = compiled_layers(module)
    for m in layers:
        m.compiled_run = None
    return len(layers)


def _random_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in module.modules())


def compare_compiled_gradients(
    module: nn.Module,
    loss_of: Callable[[], torch.Tensor],
    named_params: Sequence[tuple[str, nn.Parameter]] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    min_informative: float = 0.5,
) -> CompiledGradientCheck:
    """Loss and gradients of `loss_of()` (which must draw the same random numbers each call) with the compiled
    layers of `module` and with eager ones, for `named_params` (default: the trainable weights of `module`):
    `passed` within `tolerance` (relative distance of all gradients together), else `failed`; `deferred` when
    fewer than `min_informative` of the weight tensors get a gradient. The eager pass checkpoints every layer;
    the module is left as it was."""
    layers = compiled_layers(module)
    if not layers:
        return CompiledGradientCheck("skipped", reason="no compiled layer")
    if _random_dropout(module):
        return CompiledGradientCheck("skipped", reason="dropout > 0: compiled and eager code draw different masks")
    if named_params is None:
        named_params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named_params], [p for _, p in named_params]

    def gradients() -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        loss = loss_of()
        return loss.detach(), list(torch.autograd.grad(loss, list(params), allow_unused=True))

    loss_c, grads_c = gradients()
    runs = [m.compiled_run for m in layers]
    flags = [(m, m.use_checkpoint) for m in module.modules() if hasattr(m, "use_checkpoint")]
    try:
        for m in layers:
            m.compiled_run = None
        for m, _ in flags:
            m.use_checkpoint = True
        loss_e, grads_e = gradients()
    finally:
        for m, run in zip(layers, runs):
            m.compiled_run = run
        for m, flag in flags:
            m.use_checkpoint = flag
    pairs = [(n, gc if gc is not None else torch.zeros_like(ge), ge if ge is not None else torch.zeros_like(gc))
             for n, gc, ge in zip(names, grads_c, grads_e) if gc is not None or ge is not None]
    norms = torch.stack([torch.stack([torch.linalg.vector_norm((gc - ge).float()), torch.linalg.vector_norm(ge.float())])
                         for _, gc, ge in pairs]).tolist() if pairs else []  # one host sync
    diff_sq = sum(d * d for d, _ in norms)
    ref_sq = sum(r * r for _, r in norms)
    informative = sum(r > 0 for _, r in norms)
    ratios = [(d / r, n) for (n, _, _), (d, r) in zip(pairs, norms) if r > 0]
    result = CompiledGradientCheck("deferred", loss_compiled=float(loss_c.float()), loss_eager=float(loss_e.float()),
                                   worst_tensor=max(ratios)[1] if ratios else None,
                                   informative_share=round(informative / max(len(params), 1), 4))
    finite = math.isfinite(diff_sq) and math.isfinite(result.loss_compiled)
    if finite and result.informative_share < min_informative:
        result.reason = (f"only {informative} of {len(params)} weight tensors receive a gradient (an output layer "
                         f"still at zero?)")
        return result
    result.grad_rel_distance = math.sqrt(diff_sq / ref_sq) if finite and ref_sq > 0 else float("inf")
    if result.grad_rel_distance <= tolerance:
        result.status = "passed"
    else:
        result.status = "failed"
        result.reason = (f"the compiled layers' gradients are {result.grad_rel_distance:.3g} (relative) from the "
                         f"eager layers', above the tolerance {tolerance:g}")
    return result
