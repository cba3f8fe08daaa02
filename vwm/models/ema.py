"""Exponential moving average of the network weights, stored under the reference's buffer names.

Shadows are fp32 buffers named like the reference's `LitEma` (`model_ema.diffusion_modelinput_blocks11...`: the
parameter name with its dots removed), so EMA weights in reference checkpoints and in ours are interchangeable.
The update is a few multi-tensor (`foreach`) kernels per optimizer step, half-precision weights cast a chunk at a
time; DeepSpeed's module-wide dtype casts leave the shadows in fp32 (see `_apply`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_CHUNK_ELEMENTS = 1 << 26  # params cast to fp32 per fused update when the weights are half precision


def ema_buffer_name(param_name: str) -> str:
    """Reference EMA buffer name of a parameter: its dotted name with the dots removed."""
    return param_name.replace(".", "")


class LitEma(nn.Module):
    """EMA with warm-up: shadow <- shadow + (1 - d)(p - shadow), d = min(decay, (1+n)/(10+n)) after n updates."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay={decay} must be in [0, 1]")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int32))
        self.use_num_updates = use_num_updates
        self._updates = 0 if use_num_updates else -1
        self._decay = float(decay)
        self.param_names: list[str] = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                buffer = ema_buffer_name(name)
                if buffer in self._buffers:
                    raise ValueError(f"EMA buffer name {buffer!r} of {name!r} collides with another parameter's")
                self.param_names.append(name)
                self.register_buffer(buffer, p.detach().float().clone())
        self._register_load_state_dict_pre_hook(self._sync_host_counters)

    def _sync_host_counters(self, state_dict, prefix, *args) -> None:
        if prefix + "num_updates" in state_dict:
            self._updates = int(state_dict[prefix + "num_updates"])
        if prefix + "decay" in state_dict:
            self._decay = float(state_dict[prefix + "decay"])

    def _apply(self, fn, recurse=True):
        # Keep shadows fp32 through module-wide casts (DeepSpeed's `module.bfloat16()`); only move devices.
        # This module owns buffers only, so applying `fn` buffer by buffer is all nn.Module._apply would do.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if buf.is_floating_point() and moved.dtype != buf.dtype:
                moved = buf.to(device=moved.device)
            self._buffers[name] = moved
        return self

    def shadows(self) -> list[torch.Tensor]:
        """Shadow tensors in `param_names` order."""
        return [self._buffers[ema_buffer_name(n)] for n in self.param_names]

    def current_decay(self) -> float:
        """Decay used by the next update."""
        if self._updates < 0:
            return self._decay
        n = self._updates + 1
        return min(self._decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update from the current weights of `model` (the module the EMA was built from)."""
        decay = self.current_decay()
        if self._updates >= 0:
            self._updates += 1
            self.num_updates.fill_(self._updates)
        params = dict(model.named_parameters())
        same: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        cast: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for shadow, name in zip(self.shadows(), self.param_names):
            weight = params[name]
            pick = same if weight.dtype == shadow.dtype else cast
            pick[0].append(shadow)
            pick[1].append(weight)
        if same[0]:
            torch._foreach_lerp_(same[0], same[1], 1.0 - decay)
        # Half-precision weights (DeepSpeed's bf16 modules): cast a chunk at a time into one fp32 scratch buffer with
        # a multi-tensor copy, then lerp. Per-tensor `.float()` calls cost 54 ms of host time per update at 1.48 B
        # weights on an H100 (2026-12-07), where the GPU work is ~10 ms. The arithmetic is the same: an exact cast.
        for shadows, weights in _chunks(*cast):
            sizes = [w.numel() for w in weights]
            scratch = torch.empty(sum(sizes), dtype=torch.float32, device=weights[0].device)
            views = [v.view(w.shape) for v, w in zip(scratch.split(sizes), weights)]
            torch._foreach_copy_(views, weights)
            torch._foreach_lerp_(shadows, views, 1.0 - decay)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Set every shadow to the model's current weights (a fresh EMA)."""
        params = dict(model.named_parameters())
        for name, shadow in zip(self.param_names, self.shadows()):
            shadow.copy_(params[name].detach())

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadows into the model's parameters."""
        params = dict(model.named_parameters())
        for name, shadow in zip(self.param_names, self.shadows()):
            params[name].copy_(shadow)

    @contextlib.contextmanager
    def scope(self, model: nn.Module) -> Iterator[None]:
        """Temporarily run `model` with EMA weights; the live weights wait on the CPU meanwhile."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().to("cpu", copy=True) for n in self.param_names}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)


def _chunks(shadows: list[torch.Tensor], weights: list[torch.Tensor]
            ) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """(shadows, weights) in runs of at least `_CHUNK_ELEMENTS` weight elements (the last run may be shorter)."""
    start, size = 0, 0
    for i, weight in enumerate(weights):
        size += weight.numel()
        if size >= _CHUNK_ELEMENTS:
            yield shadows[start:i + 1], weights[start:i + 1]
            start, size = i + 1, 0
    if start < len(weights):
        yield shadows[start:], weights[start:]
