"""Small building blocks shared by the video UNet: normalisation, feed-forward, learned blending."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the activation/weight dtype, cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


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

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP `net = [GEGLU(dim -> mult·dim), Dropout, Linear(mult·dim -> dim_out)]`."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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
