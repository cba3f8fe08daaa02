"""First-stage KL autoencoder of SVD: 2-D encoder, temporal video decoder, diagonal-Gaussian posterior.

Attribute paths follow the reference (`encoder.down.0.block.1.conv2`, `decoder.up.3.block.0.time_stack`,
`decoder.conv_out.time_mix_conv`, ...), so the VAE tensors of SVD-XT / Vista checkpoints load unchanged.
Frames are flattened to (N, C, H, W) inside; the video helpers of `AutoencodingEngine` take (B, T, C, H, W).
Scaling latents by the diffusion scale factor (0.18215) is the diffusion engine's job, not this module's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vwm.aliases import constructor_arguments, param_aliases
from vwm.models.layers import GroupNorm32, temporal_conv

AttnType = Literal["vanilla", "vanilla-xformers", "none"]
"""Mid-block attention: "vanilla" and "vanilla-xformers" both mean single-head SDPA here; "none" skips it."""
DecoderMergeStrategy = Literal["learned", "fixed"]
TimeMode = Literal["conv-only"]

_ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 `nin_shortcut` when the width changes."""

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
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
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
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """KL-VAE decoder: latent (N, z_channels, h, w) -> image (N, out_ch, h·2^k, w·2^k).

    `forward` takes `timesteps` for one interface with `VideoDecoder`; the 2-D decoder ignores it.
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
        return self._layer(self.conv_out, F.silu(self.norm_out(h)), timesteps)


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


class DiagonalGaussianRegularizer(nn.Module):
    """Posterior N(mean, exp(logvar)) of moments [mean | logvar] (logvar in [-30, 20]): sample or mode."""

    def __init__(self, sample: bool = True):
        super().__init__()
        self.sample = sample

    def forward(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 2C, h, w) -> (N, C, h, w): mean + std·eps with eps drawn from `generator`, or the mean."""
        mean, logvar = moments.chunk(2, dim=1)
        if not self.sample:
            return mean
        if generator is None:
            raise ValueError(
                "generator=None: sampling the posterior needs an explicit torch.Generator "
                "(or build DiagonalGaussianRegularizer(sample=False) for the mode)"
            )
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return mean + std * eps.to(device=mean.device, dtype=mean.dtype)


def _config_keys(cls: type) -> set[str]:
    """The keys a config may give `cls`: its constructor's parameters and the reference keys it drops."""
    return set(inspect.signature(cls).parameters) | set(param_aliases(cls).drops)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")


class AutoencodingEngine(nn.Module):
    """SVD's first-stage model: encoder + posterior regulariser + (temporal) decoder; latents are unscaled.

    Configs keep the reference's keys (`encoder_config`, ...); vwm.aliases.PARAM_ALIASES maps them here.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, regularizer: DiagonalGaussianRegularizer):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.regularization = regularizer

    _encode_frames = None  # the torch.compile'd encoder forward, set by compile_encoder
    _decode_frames = None  # the torch.compile'd decoder forward, set by compile_decoder

    def compile_encoder(self) -> None:
        """torch.compile the encoder's forward for the fixed frame shapes of a run (the norms, activations and
        residual adds around the convolutions fuse): 0.36 -> 0.23 s for 25 bf16 frames at 576x1024 on an H100
        (bench/regions.py). The state dict is unchanged; each distinct chunk shape compiles once."""
        self._encode_frames = torch.compile(self.encoder.forward, dynamic=False)

    def _moments(self, frames: torch.Tensor) -> torch.Tensor:
        return self.encoder(frames) if self._encode_frames is None else self._encode_frames(frames)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Frames (N, 3, H, W) in [-1, 1] -> latents (N, z, H/8, W/8), a posterior sample (or mode)."""
        return self.regularization(self._moments(x), generator=generator)

    def compile_decoder(self) -> None:
        """torch.compile the decoder's forward (sampling: sample.py compiles it with the UNet); each distinct
        window shape compiles once. The state dict is unchanged."""
        self._decode_frames = torch.compile(self.decoder.forward, dynamic=False)

    def decode(self, z: torch.Tensor, timesteps: int) -> torch.Tensor:
        """Latents ((B·T), z, h, w) of clips of `timesteps` frames -> frames ((B·T), 3, H, W)."""
        decoder = self.decoder if self._decode_frames is None else self._decode_frames
        return decoder(z, timesteps=timesteps)

    def encode_video(
        self, x: torch.Tensor, chunk_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, T, z, h, w), encoding `chunk_size` frames at a time.

        Frames are encoded independently and the posterior noise is drawn once for the whole video, so the
        result does not depend on chunk_size.
        """
        if x.ndim != 5:
            raise ValueError(f"encode_video expects (B, T, C, H, W), got shape {tuple(x.shape)}")
        _check_chunk_size(chunk_size)
        frames = rearrange(x, "b t c h w -> (b t) c h w")
        moments = torch.cat([self._moments(chunk) for chunk in frames.split(chunk_size)])
        z = self.regularization(moments, generator=generator)
        return rearrange(z, "(b t) c h w -> b t c h w", b=x.shape[0])

    def decode_video(self, z: torch.Tensor, chunk_size: int, overlap: int = 3) -> torch.Tensor:
        """(B, T, z, h, w) -> (B, T, 3, H, W), decoding each clip in temporal windows of `chunk_size` frames.

        As the reference's `decode_first_stage`: when overlap < chunk_size, window k starts at k·(chunk_size -
        overlap) and the first `overlap` frames of each later window are averaged with the previous output;
        otherwise (e.g. chunk_size 1) the clip is cut into disjoint windows. Each window is decoded with
        timesteps = its length. Unlike the reference, windows never straddle two clips of the batch.
        """
        if z.ndim != 5:
            raise ValueError(f"decode_video expects (B, T, C, h, w), got shape {tuple(z.shape)}")
        _check_chunk_size(chunk_size)
        if overlap < 0:
            raise ValueError(f"overlap={overlap} must be >= 0")
        b, t = z.shape[:2]
        if overlap < chunk_size:
            starts, shared = range(0, max(t - overlap, 1), chunk_size - overlap), overlap
        else:
            starts, shared = range(0, t, chunk_size), 0
        out = None
        for i, start in enumerate(starts):
            window = z[:, start:start + chunk_size]
            n = window.shape[1]
            frames = self.decode(rearrange(window, "b t c h w -> (b t) c h w"), timesteps=n)
            frames = rearrange(frames, "(b t) c h w -> b t c h w", b=b)
            if out is None:
                out = frames.new_empty((b, t, *frames.shape[2:]))
            k = shared if i else 0
            out[:, start:start + k] = (out[:, start:start + k] + frames[:, :k]) / 2
            out[:, start + k:start + n] = frames[:, k:]
        return out


class AutoencoderKLModeOnly(nn.Module):
    """The conditioner's KL-VAE: Encoder + Decoder from `ddconfig`, 1x1 quant convs; `encode` gives the mode.

    `ddconfig` is the reference's parameter set shared by encoder and decoder; each takes its own keys of it
    (vwm.aliases.PARAM_ALIASES drops the others). The decoder and `post_quant_conv` are unused by the
    conditioner but kept so the reference state dict loads unchanged.
    """

    def __init__(self, embed_dim: int, ddconfig: dict):
        super().__init__()
        ddconfig = dict(ddconfig) if isinstance(ddconfig, Mapping) else ddconfig
        if not isinstance(ddconfig, dict):
            raise ValueError(f"ddconfig must be a mapping of Encoder/Decoder params, got {type(ddconfig)}")
        allowed = _config_keys(Encoder) & _config_keys(Decoder)
        unknown = sorted(set(ddconfig) - allowed)
        if unknown:
            raise ValueError(f"ddconfig has unknown keys {unknown}; allowed: {sorted(allowed)}")
        self.encoder = Encoder(**constructor_arguments(Encoder, ddconfig, "ddconfig"))
        self.decoder = Decoder(**constructor_arguments(Decoder, ddconfig, "ddconfig"))
        self.regularization = DiagonalGaussianRegularizer(sample=False)
        moments = 2 if ddconfig.get("double_z", True) else 1
        self.quant_conv = nn.Conv2d(moments * ddconfig["z_channels"], moments * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (N, 3, H, W) in [-1, 1] -> posterior mode (N, embed_dim, H/8, W/8), unscaled."""
        return self.regularization(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, embed_dim, h, w) -> frames (N, out_ch, H, W)."""
        return self.decoder(self.post_quant_conv(z))


class PixelShuffleAutoencoder(nn.Module):
    """Parameter-free, exactly invertible first stage: `patch` x `patch` pixel blocks become channels
    (pixel_unshuffle), so latents are (3·patch², H/patch, W/patch) and decoding is lossless.

    For small demos and tests on CPU, where a pretrained VAE is not available: the diffusion model then works on
    real image content and its samples decode to real pictures. Same interface as `AutoencodingEngine`.
    """

    def __init__(self, patch: int = 4, in_channels: int = 3):
        super().__init__()
        if patch < 1:
            raise ValueError(f"patch={patch} must be >= 1")
        self.patch = patch
        self.in_channels = in_channels

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, C, H, W) -> (N, C·patch², H/patch, W/patch)."""
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of patch={self.patch}")
        return F.pixel_unshuffle(x, self.patch)

    def decode(self, z: torch.Tensor, timesteps: int | None = None) -> torch.Tensor:
        """Inverse of `encode`."""
        return F.pixel_shuffle(z, self.patch)

    def encode_video(self, x: torch.Tensor, chunk_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, T, C·patch², H/patch, W/patch)."""
        b = x.shape[0]
        return rearrange(self.encode(rearrange(x, "b t c h w -> (b t) c h w")), "(b t) c h w -> b t c h w", b=b)

    def decode_video(self, z: torch.Tensor, chunk_size: int, overlap: int = 3) -> torch.Tensor:
        """Inverse of `encode_video` (exact, so chunking and overlap do not apply)."""
        b = z.shape[0]
        return rearrange(self.decode(rearrange(z, "b t c h w -> (b t) c h w")), "(b t) c h w -> b t c h w", b=b)
