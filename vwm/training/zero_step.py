"""DeepSpeed ZeRO-1/2's optimizer step without its per-tensor host work.

Measured on an H100 (2026-12-07, `bench/train_step.py`, phase 1 at 576x1024, compiled): DeepSpeed's `step()` took
389 ms of a 1.68 s step, of which about 95 ms were GPU kernels. The rest was the host walking the ~1,340 gradient
tensors one by one, while the GPU waited:

- the bf16 overflow check (`bf16.check_grad_overflow`, on by default): six small kernels per tensor and a host
  synchronisation, 286 ms per step. vwm checks the same thing already, once per update, before DeepSpeed's step:
  `vwm.training.guards.check_update` refuses a non-finite global gradient norm on every rank before any update is
  applied (and names the step). So vwm's strategy turns DeepSpeed's check off (`VWMDeepSpeedStrategy`);
- the gradient norm for clipping: per tensor an fp64 copy of the gradient, then its norm. `foreach_grad_norm`
  computes the same norm (fp64 per-tensor norms, summed in the same order, the same all-reduces) with torch's
  multi-tensor kernels, without the copies.

Both keep the update DeepSpeed computes; tests/test_zero_step.py checks them on a real ZeRO-2 engine.
"""

from __future__ import annotations

import types
from typing import Any

import torch

_PATCHED = "_vwm_foreach_grad_norm"


def foreach_grad_norm(self: Any, gradients: list[torch.Tensor], params: list[torch.Tensor],
                      norm_type: float = 2) -> torch.Tensor:
    """DeepSpeedZeroOptimizer.get_grad_norm_direct for the L2 norm, with multi-tensor kernels: the norm of
    `gradients` (this rank's partition) over every data-parallel (and model-parallel) rank, NaN/Inf masked to -1
    as DeepSpeed does. Other norms, pipeline-replicated or model-parallel parameters take DeepSpeed's own path."""
    from deepspeed import comm as dist
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace

    try:  # DeepSpeed >= 0.19: fp64 where the device has it; before, always fp64 (`g.double()`)
        from deepspeed.runtime.zero.utils import get_norm_dtype
    except ImportError:
        def get_norm_dtype() -> torch.dtype:
            return torch.float64

    original = getattr(self, _PATCHED)
    if float(norm_type) != 2.0 or self.model_parallel_rank != 0:
        return original(gradients, params, norm_type)
    grads = []
    for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params):
        if hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated:
            continue
        if is_model_parallel_parameter(p):  # not in vwm's models; keep DeepSpeed's bookkeeping for them
            return original(gradients, params, norm_type)
        grads.append(g.detach())
    if grads:
        total = torch.stack(torch._foreach_norm(grads, 2, dtype=get_norm_dtype())).pow(2).sum().float()
    else:
        total = torch.tensor(0.0, dtype=torch.float32).to(self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def speed_up_zero_optimizer(optimizer: Any) -> bool:
    """Give a DeepSpeed ZeRO-1/2 optimizer `foreach_grad_norm` (once). False, and nothing changed, for any other
    optimizer or a DeepSpeed whose ZeRO optimizer lacks the method this replaces."""
    method = getattr(type(optimizer), "get_grad_norm_direct", None)
    if method is None or not hasattr(optimizer, "dp_process_group") or hasattr(optimizer, _PATCHED):
        return False
    setattr(optimizer, _PATCHED, types.MethodType(method, optimizer))
    optimizer.get_grad_norm_direct = types.MethodType(foreach_grad_norm, optimizer)
    return True
