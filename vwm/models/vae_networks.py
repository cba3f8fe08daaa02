"""The KL autoencoder's networks: 2-D encoder, 2-D decoder and SVD's temporal video decoder.

Attribute paths follow the reference (`encoder.down.0.block.1.conv2`, `decoder.up.3.block.0.time_stack`,
`decoder.conv_out.time_mix_conv`, ...), so the VAE tensors of SVD-XT / Vista checkpoints load unchanged.
Frames are flattened to (N, C, H, W); the temporal decoder takes the frames per clip as `timesteps`.
The first-stage models that wrap these networks live in `vwm.models.autoencoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vwm.models.layers import GroupNorm, GroupNorm32, norm_silu, temporal_conv

AttnType = Literal["vanilla", "vanilla-xformers", "none"]
"""Mid-block attention: "vanilla" and "vanilla-xformers" both mean single-head SDPA here; "none" skips it."""
DecoderMergeStrategy = Literal["learned", "fixed"]
TimeMode = Literal["conv-only"]

_ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")


def _group_norm(channels: int) -> GroupNorm:
    return GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 `nin_shortcut` when the width changes."""

    silu_norms = ("norm1", "norm2")  # norms always followed by SiLU (`use_fused_groupnorm` folds it in)

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1-conv projections, residual (SDPA, scale C^-1/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        height = x.shape[2]
        q, k, v = (
            rearrange(proj(h), "n c h w -> n 1 (h w) c").contiguous() for proj in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(out, "n 1 (h w) c -> n c h w", h=height))


def _check_attn_type(attn_type: str) -> None:
    if attn_type not in _ATTN_TYPES:
        raise ValueError(f"attn_type={attn_type!r} is not supported; allowed: {', '.join(_ATTN_TYPES)}")


def _make_attn(channels: int, attn_type: AttnType) -> nn.Module:
    return nn.Identity() if attn_type == "none" else AttnBlock(channels)


class EncoderDownsample(nn.Module):
    """Halve the resolution: zero-pad right/bottom by one, then a stride-2 3x3 conv (or 2x2 avg pooling)."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2)


class DecoderUpsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Encoder(nn.Module):
    """KL-VAE encoder: image (N, in_channels, H, W) -> posterior moments (N, 2·z_channels, H/2^k, W/2^k)."""

    silu_norms = ("norm_out",)  # followed by SiLU in forward (`use_fused_groupnorm` folds it in)

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        attn_type: AttnType = "vanilla",
    ):
        super().__init__()
        _check_attn_type(attn_type)
        mults = (1, *ch_mult)
        res = resolution
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * mults[level]
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(_make_attn(block_in, attn_type))
            if level != len(ch_mult) - 1:
                stage.downsample = EncoderDownsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = _make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, 2·z_channels | z_channels, h, w)."""
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    """KL-VAE decoder: latent (N, z_channels, h, w) -> image (N, out_ch, h·2^k, w·2^k).

    `forward` takes `timesteps` for one interface with `VideoDecoder`; the 2-D decoder ignores it.
    """

    silu_norms = ("norm_out",)  # followed by SiLU in forward (`use_fused_groupnorm` folds it in)

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        resolution: int,
        z_channels: int,
        attn_type: AttnType = "vanilla",
    ):
        super().__init__()
        _check_attn_type(attn_type)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = self._make_resblock(block_in, block_in, dropout)
        self.mid.attn_1 = _make_attn(block_in, attn_type)
        self.mid.block_2 = self._make_resblock(block_in, block_in, dropout)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(self._make_resblock(block_in, ch * ch_mult[level], dropout))
                block_in = ch * ch_mult[level]
                if res in attn_resolutions:
                    stage.attn.append(_make_attn(block_in, attn_type))
            if level != 0:
                stage.upsample = DecoderUpsample(block_in, resamp_with_conv)
                res *= 2
            stages.append(stage)
        self.up = nn.ModuleList(reversed(stages))  # up[i] is resolution level i, as in the reference
        self.norm_out = _group_norm(block_in)
        self.conv_out = self._make_conv_out(block_in, out_ch)

    def _make_resblock(self, in_channels: int, out_channels: int, dropout: float) -> nn.Module:
        return ResnetBlock(in_channels, out_channels, dropout)

    def _make_conv_out(self, in_channels: int, out_channels: int) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def _layer(self, module: nn.Module, h: torch.Tensor, timesteps: int | None) -> torch.Tensor:
        return module(h)

    def forward(self, z: torch.Tensor, timesteps: int | None = None) -> torch.Tensor:
        """(N, z_channels, h, w) -> (N, out_ch, H, W); `timesteps` (frames per clip) is for VideoDecoder."""
        h = self.conv_in(z)
        h = self._layer(self.mid.block_1, h, timesteps)
        h = self._layer(self.mid.block_2, self.mid.attn_1(h), timesteps)
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = self._layer(block, h, timesteps)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self._layer(self.conv_out, norm_silu(self.norm_out, h), timesteps)


def _temporal_padding(kernel_size: int | Sequence[int]) -> int | list[int]:
    return [k // 2 for k in kernel_size] if isinstance(kernel_size, Sequence) else kernel_size // 2


class TimeStackBlock(nn.Module):
    """Temporal residual block on (B, C, T, H, W): x + conv3d(SiLU(GN(conv3d(SiLU(GN(x)))))), last conv 0.

    Layout and names of SVD's `ResBlock(dims=3, skip_t_emb=True)`: `in_layers.{0,2}`, `out_layers.{0,3}`.
    """

    def __init__(self, channels: int, kernel_size: int | Sequence[int], dropout: float = 0.0):
        super().__init__()
        padding = _temporal_padding(kernel_size)
        in_conv = temporal_conv(channels, channels, kernel_size, padding=padding)
        out_conv = temporal_conv(channels, channels, kernel_size, padding=padding)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.in_layers = nn.Sequential(GroupNorm32(32, channels, eps=1e-6), nn.SiLU(), in_conv)
        self.out_layers = nn.Sequential(
            GroupNorm32(32, channels, eps=1e-6), nn.SiLU(), nn.Dropout(dropout), out_conv
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out_layers(self.in_layers(x))


class DecoderVideoResBlock(ResnetBlock):
    """Spatial ResnetBlock per frame, then a temporal block blended in: a·temporal + (1-a)·spatial.

    a = sigmoid(mix_factor) ("learned") or mix_factor ("fixed"). Note the VAE weights the *temporal* branch by
    a, the opposite of the UNet's AlphaBlender (which weights the spatial branch).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dropout: float,
        video_kernel_size: int | Sequence[int],
        alpha: float,
        merge_strategy: DecoderMergeStrategy,
    ):
        super().__init__(in_channels, out_channels, dropout)
        self.time_stack = TimeStackBlock(out_channels, video_kernel_size, dropout)
        self.merge_strategy = merge_strategy
        if merge_strategy == "learned":
            self.mix_factor = nn.Parameter(torch.full((1,), float(alpha)))
        else:
            self.register_buffer("mix_factor", torch.full((1,), float(alpha)))

    def forward(self, x: torch.Tensor, timesteps: int) -> torch.Tensor:
        """((B·T), C, H, W) -> ((B·T), C', H, W) with `timesteps` = T frames per clip."""
        spatial = rearrange(super().forward(x), "(b t) c h w -> b c t h w", t=timesteps)
        alpha = torch.sigmoid(self.mix_factor) if self.merge_strategy == "learned" else self.mix_factor
        alpha = alpha.to(spatial.dtype)
        out = alpha * self.time_stack(spatial) + (1.0 - alpha) * spatial
        return rearrange(out, "b c t h w -> (b t) c h w")


class AE3DConv(nn.Conv2d):
    """3x3 conv per frame followed by a temporal conv `time_mix_conv` over each clip's frames."""

    def __init__(self, in_channels: int, out_channels: int, video_kernel_size: int | Sequence[int]):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.time_mix_conv = temporal_conv(
            out_channels, out_channels, video_kernel_size, padding=_temporal_padding(video_kernel_size)
        )

    def forward(self, x: torch.Tensor, timesteps: int) -> torch.Tensor:
        """((B·T), C, H, W) -> ((B·T), C', H, W) with `timesteps` = T frames per clip."""
        h = rearrange(super().forward(x), "(b t) c h w -> b c t h w", t=timesteps)
        return rearrange(self.time_mix_conv(h), "b c t h w -> (b t) c h w")


class VideoDecoder(Decoder):
    """SVD's temporal decoder: KL decoder with DecoderVideoResBlocks and a temporal output conv ("conv-only").

    Latents are ((B·T), z_channels, h, w) with T = `timesteps` frames per clip. Reference modes "all" and
    "attn-only" (temporal attention in the mid block) are not implemented and raise ValueError.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        resolution: int,
        z_channels: int,
        attn_type: AttnType = "vanilla",
        video_kernel_size: int | Sequence[int] = 3,
        alpha: float = 0.0,
        merge_strategy: DecoderMergeStrategy = "learned",
        time_mode: TimeMode = "conv-only",
    ):
        if time_mode != "conv-only":
            raise ValueError(
                f"time_mode={time_mode!r} is not supported; allowed: 'conv-only' (the mode SVD and Vista "
                "use; 'all' and 'attn-only' add temporal attention blocks that vwm does not implement)"
            )
        if merge_strategy not in ("learned", "fixed"):
            raise ValueError(
                f"merge_strategy={merge_strategy!r} is not supported; allowed: 'learned', 'fixed'"
            )
        # Read by the block factories that Decoder.__init__ calls (plain attributes may precede
        # Module.__init__).
        kernel = list(video_kernel_size) if isinstance(video_kernel_size, Sequence) else video_kernel_size
        self._video_args = (kernel, alpha, merge_strategy)
        super().__init__(
            ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, dropout=dropout, resamp_with_conv=resamp_with_conv,
            resolution=resolution, z_channels=z_channels, attn_type=attn_type,
        )
        self.time_mode = time_mode

    def _make_resblock(self, in_channels: int, out_channels: int, dropout: float) -> nn.Module:
        return DecoderVideoResBlock(in_channels, out_channels, dropout, *self._video_args)

    def _make_conv_out(self, in_channels: int, out_channels: int) -> nn.Module:
        return AE3DConv(in_channels, out_channels, self._video_args[0])

    def _layer(self, module: nn.Module, h: torch.Tensor, timesteps: int | None) -> torch.Tensor:
        if isinstance(module, (DecoderVideoResBlock, AE3DConv)):
            return module(h, timesteps)
        return module(h)

    def forward(self, z: torch.Tensor, timesteps: int | None = None) -> torch.Tensor:
        """((B·T), z_channels, h, w) -> ((B·T), out_ch, H, W); `timesteps` = T is required."""
        if timesteps is None or timesteps < 1 or z.shape[0] % timesteps:
            raise ValueError(
                f"timesteps={timesteps!r} must be a positive divisor of the latent frame count {z.shape[0]}"
            )
        return super().forward(z, timesteps)
