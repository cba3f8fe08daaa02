"""Small building blocks shared by the video UNet: normalisation, feed-forward, learned blending."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that can take `vwm.models.fused_groupnorm`'s Triton kernels and fold in the SiLU after it.

    `fused` (set by `use_fused_groupnorm`): take the kernels whenever they support the call (CUDA, no gradient);
    the plain path otherwise. `silu` (set by `use_fused_groupnorm` where the next module is an `nn.SiLU`, which it
    replaces by an identity): apply SiLU to the output, on either path. With both off this is `nn.GroupNorm`.
    """

    fused = False
    silu = False

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from vwm.models import fused_groupnorm

            if fused_groupnorm.supported(x, self.num_groups, self.weight):
                return fused_groupnorm.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)
        y = self.plain(x)
        return F.silu(y) if self.silu else y


class GroupNorm32(GroupNorm):
    """GroupNorm computed on an fp32 copy of the activation, output in the input dtype (SVD's GroupNorm32).

    Measured on an H100 (phase 2 at 320x576, bench/train_step.py): faster than passing bf16 activations to
    PyTorch's native kernel directly (0.94 s vs 1.08 s per training step).
    """

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class FoldedSiLU(nn.Identity):
    """Stands where an `nn.SiLU` was after a `GroupNorm` that now applies the SiLU itself (`use_fused_groupnorm`)."""


def use_fused_groupnorm(model: nn.Module, enabled: bool = True) -> int:
    """Switch every `GroupNorm` of `model` to the fused kernels (or back) and fold each `nn.SiLU` that directly
    follows one in an `nn.Sequential` into it (or restore it); returns how many norms there are. Norms whose
    module applies SiLU in code declare it through a `silu_norms` attribute (the VAE's blocks). Parameter names
    and the state dict are unchanged: the SiLU has none."""
    norms = [m for m in model.modules() if isinstance(m, GroupNorm)]
    for norm in norms:
        norm.fused = enabled
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], GroupNorm) and isinstance(module[i + 1], (nn.SiLU, FoldedSiLU)):
                    module[i].silu = enabled
                    if isinstance(module[i + 1], FoldedSiLU) != enabled:  # unchanged modules keep compiled guards
                        module[i + 1] = FoldedSiLU() if enabled else nn.SiLU()
        for name in getattr(module, "silu_norms", ()):
            getattr(module, name).silu = enabled
    return len(norms)


def norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SiLU(norm(x)), where the norm may already apply the SiLU (`GroupNorm.silu`)."""
    y = norm(x)
    return y if getattr(norm, "silu", False) else F.silu(y)


class TemporalConv(nn.Conv3d):
    """Convolution over time only, kernel (k, 1, 1) on (B, C, T, H, W), run as a 2-D convolution on (B, C, T, H·W).

    Same parameters (and state-dict shapes) as the Conv3d it replaces; 2-D kernels are much faster than 3-D ones.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        if self.kernel_size[1:] != (1, 1) or self.stride != (1, 1, 1) or self.dilation != (1, 1, 1):
            raise ValueError(f"TemporalConv needs a (k, 1, 1) kernel with unit stride, got {self.kernel_size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = F.conv2d(x.reshape(b, c, t, h * w), self.weight.squeeze(-1), self.bias, padding=(self.padding[0], 0))
        return y.reshape(b, y.shape[1], y.shape[2], h, w)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's GroupNorm: 32 groups, eps 1e-5 (SVD's `normalization`)."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it (output projections start as no-ops)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GEGLU(nn.Module):
    """Gated GELU projection: (x W + b) split in two halves a, g -> a * gelu(g) (Shazeer 2020)."""

    fused = False
    """Set by `use_fused_geglu`: take `vwm.models.fused_geglu` (one kernel, no double-width intermediate) whenever
    it supports the call (CUDA bf16/fp16, no gradient); the plain path otherwise."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and type(self.proj) is nn.Linear:
            from vwm.models import fused_geglu

            if fused_geglu.supported(x, self.proj.weight):
                return fused_geglu.geglu(x, self.proj.weight, self.proj.bias)
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


def use_fused_geglu(model: nn.Module, enabled: bool = True) -> int:
    """Switch every `GEGLU` of `model` to the fused kernel (or back); returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, GEGLU)]
    for layer in layers:
        layer.fused = enabled
    return len(layers)


class FeedForward(nn.Module):
    """Transformer MLP `net = [GEGLU(dim -> mult·dim), Dropout, Linear(mult·dim -> dim_out)]`."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def temporal_conv(in_channels: int, out_channels: int, kernel_size, padding=0) -> nn.Conv3d:
    """A Conv3d over (B, C, T, H, W); a `TemporalConv` (2-D kernel) when the kernel is (k, 1, 1) as in SVD."""
    k = tuple(kernel_size) if not isinstance(kernel_size, int) else (kernel_size,) * 3
    if len(k) == 3 and k[1:] == (1, 1):
        return TemporalConv(in_channels, out_channels, k, padding=padding)
    return nn.Conv3d(in_channels, out_channels, k, padding=padding)


MergeStrategy = Literal["fixed", "learned", "learned_with_images"]


class AlphaBlender(nn.Module):
    """Blend of a spatial and a temporal path: alpha·x_spatial + (1-alpha)·x_temporal, alpha = sigmoid(mix_factor)
    when learned (SVD's `time_mixer`), or the fixed `mix_factor` itself."""

    def __init__(self, alpha: float, merge_strategy: MergeStrategy):
        super().__init__()
        if merge_strategy not in ("fixed", "learned", "learned_with_images"):
            raise ValueError(
                f"merge_strategy={merge_strategy!r} is not one of 'fixed', 'learned', 'learned_with_images'"
            )
        self.merge_strategy = merge_strategy
        if merge_strategy == "fixed":
            self.register_buffer("mix_factor", torch.tensor([float(alpha)]))
        else:
            self.mix_factor = nn.Parameter(torch.tensor([float(alpha)]))

    def alpha(self) -> torch.Tensor:
        """Weight of the spatial path, shape (1,)."""
        return self.mix_factor if self.merge_strategy == "fixed" else torch.sigmoid(self.mix_factor)

    def forward(self, x_spatial: torch.Tensor, x_temporal: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha().to(x_spatial.dtype)
        return torch.lerp(x_temporal, x_spatial, alpha)
