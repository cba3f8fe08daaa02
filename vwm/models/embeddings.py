"""Sinusoidal embeddings shared by the UNet (noise level, frame index) and the conditioner (scalars, actions)."""

from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a 1-D tensor: (N,) -> (N, dim) as [cos(t·f_k) | sin(t·f_k)], f_k = P^(-k/half).

    The cos-then-sin order and frequencies match the SVD / sgm convention, so pretrained weights that
    consume these features keep their meaning. Computed in fp32 whatever the input dtype.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
