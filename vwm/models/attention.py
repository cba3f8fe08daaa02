"""Attention for the video UNet: SDPA multi-head attention with Vista's LoRA and action-control adapters, and
the spatial / temporal transformer blocks that use it.

Every attention runs through `torch.nn.functional.scaled_dot_product_attention`; adapters work on every path
(the reference drops them silently without xformers). Cross-attention to a single context token (the CLIP
image embedding, widened by the action embedding) is computed exactly without a softmax: with one key the
attention weights are 1, so the output is `to_out(v(context))` for every query, one vector per clip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vwm.actions import ACTION_CONTEXT_DIM
from vwm.models.layers import FeedForward


class Attention(nn.Module):
    """Multi-head (cross-)attention, softmax(QK^T/sqrt(d))V, with optional rank-r LoRA on q/k/v/out and zero-initialised
    action-control projections added to K and V (Vista §3.2)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        add_lora: bool = False,
        lora_rank: int = 16,
        lora_scale: float = 1.0,
        action_control: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.context_dim = context_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.add_lora = add_lora
        self.lora_scale = lora_scale
        if add_lora:
            for name, d_in, d_out in (
                ("q", query_dim, inner), ("k", context_dim, inner), ("v", context_dim, inner), ("out", inner, query_dim)
            ):
                down = nn.Linear(d_in, lora_rank, bias=False)
                up = nn.Linear(lora_rank, d_out, bias=False)
                nn.init.normal_(down.weight, std=1.0 / lora_rank)
                nn.init.zeros_(up.weight)
                setattr(self, f"{name}_adapter_down", down)
                setattr(self, f"{name}_adapter_up", up)
        self.action_control = action_control
        if action_control:
            self.k_adapter_action_control = nn.Linear(ACTION_CONTEXT_DIM, inner, bias=False)
            self.v_adapter_action_control = nn.Linear(ACTION_CONTEXT_DIM, inner, bias=False)
            nn.init.zeros_(self.k_adapter_action_control.weight)
            nn.init.zeros_(self.v_adapter_action_control.weight)

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        up = getattr(self, f"{name}_adapter_up")
        return up(getattr(self, f"{name}_adapter_down")(x)) * self.lora_scale

    def _split_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.action_control:
            if context.shape[-1] != self.context_dim:
                raise ValueError(
                    f"context width {context.shape[-1]} != context_dim {self.context_dim}; a context widened by "
                    f"action embeddings needs action_control=True"
                )
            return context, None
        if context.shape[-1] != self.context_dim + ACTION_CONTEXT_DIM:
            raise ValueError(
                f"action_control=True expects context width {self.context_dim}+{ACTION_CONTEXT_DIM}, got {context.shape[-1]}"
            )
        return context[..., : self.context_dim], context[..., self.context_dim :]

    def _keys_values(self, context: torch.Tensor, need_k: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        ctx, actions = self._split_context(context)
        k = None
        if need_k:
            k = self.to_k(ctx)
            if self.add_lora:
                k = k + self._lora("k", ctx)
            if actions is not None:
                k = k + self.k_adapter_action_control(actions)
        v = self.to_v(ctx)
        if self.add_lora:
            v = v + self._lora("v", ctx)
        if actions is not None:
            v = v + self.v_adapter_action_control(actions)
        return k, v

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        out = self.to_out[0](o)
        if self.add_lora:
            out = out + self._lora("out", o)
        return out

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of x (N, L, C) over context (N, M, D) (self-attention when context is None)."""
        context = x if context is None else context
        q = self.to_q(x)
        if self.add_lora:
            q = q + self._lora("q", x)
        k, v = self._keys_values(context)
        q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=self.heads) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[1](self._output(rearrange(o, "n h l d -> n l (h d)")))

    def cross_attend(self, x: torch.Tensor, context: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Cross-attention of norm(x) over a context (B, M, D) shared by groups of rows of x (B·R, L, C), b-major.

        With one context token the queries cannot matter, so norm(x) and Q are never computed.
        """
        batch, rows = context.shape[0], x.shape[0] // context.shape[0]
        if batch * rows != x.shape[0]:
            raise ValueError(f"{x.shape[0]} query rows cannot be grouped over a context batch of {batch}")
        if context.shape[1] != 1:
            return self.forward(norm(x), context.repeat_interleave(rows, dim=0))
        # One key: softmax weights are exactly 1, so every query receives V.
        _, v = self._keys_values(context, need_k=False)
        out = self._output(v).to(x.dtype)  # (B, 1, C)
        out = out.unsqueeze(1).expand(batch, rows, *x.shape[1:]).reshape(x.shape)
        return self.to_out[1](out)


class BasicTransformerBlock(nn.Module):
    """Spatial transformer block on per-frame tokens: self-attention, cross-attention to the clip context, GEGLU MLP."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        dropout: float = 0.0,
        add_lora: bool = False,
        lora_rank: int = 16,
        lora_scale: float = 1.0,
        action_control: bool = False,
    ):
        super().__init__()
        lora = dict(add_lora=add_lora, lora_rank=lora_rank, lora_scale=lora_scale)
        self.attn1 = Attention(dim, None, heads, dim_head, dropout, **lora)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, dropout, action_control=action_control, **lora)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: ((b t), s, c) tokens of each frame; context: (b, m, d) per clip."""
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2.cross_attend(x, context, self.norm2) + x
        return self.ff(self.norm3(x)) + x


class VideoTransformerBlock(nn.Module):
    """Temporal transformer block on per-location frame sequences: MLP-in, temporal self-attention,
    cross-attention to the clip context, GEGLU MLP (SVD's `time_stack`)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        dropout: float = 0.0,
        ff_in: bool = True,
        add_lora: bool = False,
        lora_rank: int = 16,
        lora_scale: float = 1.0,
        action_control: bool = False,
    ):
        super().__init__()
        lora = dict(add_lora=add_lora, lora_rank=lora_rank, lora_scale=lora_scale)
        self.has_ff_in = ff_in
        if ff_in:
            self.norm_in = nn.LayerNorm(dim)
            self.ff_in = FeedForward(dim, dim_out=dim, dropout=dropout)
        self.attn1 = Attention(dim, None, heads, dim_head, dropout, **lora)
        self.ff = FeedForward(dim, dim_out=dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, dropout, action_control=action_control, **lora)
        self.norm1 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: ((b s), t, c) frame sequence at each location; context: (b, m, d) per clip."""
        if self.has_ff_in:
            x = self.ff_in(self.norm_in(x)) + x
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2.cross_attend(x, context, self.norm2) + x
        return self.ff(self.norm3(x)) + x
