"""First-stage models of SVD: the KL autoencoder (encoder, diagonal-Gaussian posterior, temporal decoder), the
conditioner's mode-only VAE, and a parameter-free pixel-shuffle stand-in for CPU demos.

The networks live in `vwm.models.vae_networks`; `Encoder`, `Decoder` and `VideoDecoder` are importable from here
too because config `target:` paths (ours and those embedded in exports) name them here. The video helpers of
`AutoencodingEngine` take (B, T, C, H, W). Scaling latents by the diffusion scale factor (0.18215) is the
diffusion engine's job, not this module's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vwm.aliases import constructor_arguments, param_aliases
from vwm.dtypes import module_dtype
from vwm.models.vae_networks import Decoder, Encoder, VideoDecoder  # noqa: F401  (VideoDecoder: config targets)


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
        """Latents ((B·T), z, h, w) of clips of `timesteps` frames -> frames ((B·T), 3, H, W), in the decoder's
        dtype (sampling may run the decoder in bf16 while the encoder stays fp32: `Placement(decode_dtype=)`)."""
        decoder = self.decoder if self._decode_frames is None else self._decode_frames
        return decoder(z.to(module_dtype(self.decoder, z.dtype)), timesteps=timesteps)

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

    _encode_frames = None  # the torch.compile'd encoder forward, set by compile_encoder

    def compile_encoder(self) -> None:
        """torch.compile the encoder's forward (the condition frame's encode in every training step; eager, its
        GroupNorms over one frame run on few thread blocks). The state dict is unchanged."""
        self._encode_frames = torch.compile(self.encoder.forward, dynamic=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (N, 3, H, W) in [-1, 1] -> posterior mode (N, embed_dim, H/8, W/8), unscaled."""
        encoder = self.encoder if self._encode_frames is None else self._encode_frames
        return self.regularization(self.quant_conv(encoder(x)))

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


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (n, n): row k is the k-th cosine basis vector, so M @ M.T = I."""
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(torch.pi * (2 * k[None] + 1) * k[:, None] / (2 * n)) * (2.0 / n) ** 0.5
    m[0] /= 2.0**0.5
    return m.float()


class BlockDCTAutoencoder(PixelShuffleAutoencoder):
    """Parameter-free, exactly invertible first stage that, unlike `PixelShuffleAutoencoder`, gives every spatial
    frequency the same scale: each `patch` x `patch` block of each colour becomes its orthonormal 2-D DCT
    coefficients (channel c·patch² + u·patch + v holds frequency (u, v) of colour c), and each channel is divided
    by `channel_std`, the spread of that coefficient over the training frames (`block_dct_std`). In raw pixels
    the fine detail (edges, lane markings) has a small fraction of the variance of the block means, so at the
    noise levels a small model trains at it is buried first and weighs little in the loss; normalised, every
    frequency has unit scale.
    """

    def __init__(self, patch: int = 4, in_channels: int = 3, channel_std: list[float] | None = None):
        super().__init__(patch, in_channels)
        n = in_channels * patch * patch
        values = [1.0] * n if channel_std is None else [float(v) for v in channel_std]
        if len(values) != n or min(values) <= 0:  # checked on the host: the model may be built on the meta device
            raise ValueError(f"channel_std needs {n} positive values (in_channels * patch**2), got {len(values)} "
                             f"values, min {min(values) if values else None}")
        # non-persistent: the first stage stays parameter- and state-free, as the state-dict contract expects
        self.register_buffer("basis", dct_matrix(patch), persistent=False)
        self.register_buffer("channel_std", torch.tensor(values).view(1, n, 1, 1), persistent=False)

    def _coefficients(self, blocks: torch.Tensor, inverse: bool) -> torch.Tensor:
        n, _, h, w = blocks.shape
        b = blocks.reshape(n, self.in_channels, self.patch, self.patch, h, w)
        m = self.basis.to(blocks.dtype)
        pattern = "ui,vj,ncuvhw->ncijhw" if inverse else "ui,vj,ncijhw->ncuvhw"
        return torch.einsum(pattern, m, m, b).reshape(n, -1, h, w)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, C, H, W) -> (N, C·patch², H/patch, W/patch): normalised block-DCT coefficients."""
        coef = self._coefficients(super().encode(x), inverse=False)
        return coef / self.channel_std.to(coef.dtype)

    def decode(self, z: torch.Tensor, timesteps: int | None = None) -> torch.Tensor:
        """Inverse of `encode`."""
        return super().decode(self._coefficients(z * self.channel_std.to(z.dtype), inverse=True))


def block_dct_std(frames: torch.Tensor, patch: int = 4, floor: float = 0.02) -> list[float]:
    """Per-channel standard deviation of the block-DCT coefficients of frames (N, C, H, W) in [-1, 1], at least
    `floor` (a channel with almost no variance would otherwise be amplified without bound): the `channel_std`
    of a `BlockDCTAutoencoder` for data like these frames."""
    coef = BlockDCTAutoencoder(patch, frames.shape[1]).encode(frames.float())
    std = coef.transpose(0, 1).reshape(coef.shape[1], -1).std(dim=1)
    return [round(max(float(v), floor), 4) for v in std]
