"""FP8 (e4m3) matrix products for sampling: the UNet's large linear layers on Hopper's FP8 tensor cores.

Inference only. Each converted `nn.Linear` keeps its weight in float8 e4m3 with one fp32 scale per output channel
(its absolute maximum maps to e4m3's largest value, 448); activations are scaled per row (per token) on the fly and
the product runs in `torch._scaled_mm` with bf16 output and the bias fused. e4m3 keeps 3 mantissa bits, so each
product carries a relative error of a few per cent per element that averages out over the reduction; the fidelity
cost on whole rollouts is measured by `bench/sample.py --modes compiled fp8` (docs/sampling.md). The convolutions,
the normalisations, the timestep and action embeddings and the LoRA adapters stay in bf16.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
MIN_FEATURES = 256
"""Smaller products (embeddings, adapters) gain nothing from FP8 and are left alone."""


class Float8Linear(nn.Module):
    """`nn.Linear` with an e4m3 weight (per-output-channel scales) and per-row activation scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        self.register_buffer("weight_fp8", (weight / scale).to(torch.float8_e4m3fn))  # (out, in), row-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        quantised = (rows / scale).to(torch.float8_e4m3fn)
        # the second operand must be column-major: the transpose of the row-major weight is
        out = torch._scaled_mm(quantised, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=torch.bfloat16)
        return out.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 weight, rowwise scales"


def eligible(name: str, module: nn.Module) -> bool:
    """Large linear layers of the transformers (attention projections, feed-forward), not adapters or embeddings."""
    return (type(module) is nn.Linear and "adapter" not in name and "emb" not in name
            and min(module.in_features, module.out_features) >= MIN_FEATURES
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_fp8(unet: nn.Module) -> int:
    """Replace the eligible linear layers of `unet` in place; returns how many were converted. One-way: the
    converted model is for sampling only (its state dict no longer matches a checkpoint's)."""
    targets = [name for name, module in unet.named_modules() if eligible(name, module)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, Float8Linear(getattr(parent, child)))
    return len(targets)
