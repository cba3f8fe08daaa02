"""The feature networks of an evaluation, built from local weight files: per-frame Inception pool features
(FID) and per-clip I3D logits (FVD), computed in float32 on the evaluation's device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vwm.eval import i3d as i3d_net
from vwm.eval import inception as inception_net
from vwm.eval.weights import I3D, INCEPTION, load_into, verify_file

log = logging.getLogger(__name__)


@dataclass
class FeatureNetworks:
    """Inception (FID) and I3D (FVD), either None when its metric is off; `weights` records the SHA-256 of each
    file used ("random" for random weights, which only tests and benchmarks use)."""

    device: torch.device
    inception: inception_net.FIDInceptionV3 | None = None
    i3d: i3d_net.InceptionI3d | None = None
    fid_normalize: str = "torchmetrics"
    frame_batch: int = 32
    weights: dict[str, str] = field(default_factory=dict)

    @torch.no_grad()
    def frame_features(self, frames: torch.Tensor) -> np.ndarray:
        """uint8 frames (N, 3, H, W) -> Inception pool features (N, 2048) float32."""
        assert self.inception is not None, "the FID network is off"
        out = []
        for i in range(0, len(frames), self.frame_batch):
            x = inception_net.preprocess(frames[i:i + self.frame_batch].to(self.device), self.fid_normalize)
            out.append(self.inception(x).float().cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def clip_features(self, clip: torch.Tensor, lengths: Sequence[int]) -> dict[int, np.ndarray]:
        """uint8 clip (T, 3, H, W) -> {n: I3D logits (400,) of its first n frames} for each n in lengths."""
        assert self.i3d is not None, "the FVD network is off"
        out = {}
        for n in lengths:
            x = i3d_net.preprocess(clip[None, :n].to(self.device))
            out[n] = self.i3d(x)[0].float().cpu().numpy()
        return out


def random_init_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights that keep activations O(1) through the depth (He-normal convolutions and linear
    layers, zero biases, identity batch norms), so random-weight features still separate inputs. PyTorch's
    default initialisation shrinks them by about sqrt(3) per layer, to ~1e-8 at the Inception pool."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
    return module


def build_feature_networks(device: torch.device, metrics: Sequence[str], inception_path: str | None = None,
                           i3d_path: str | None = None, *, inception_sha256: str | None = None,
                           i3d_sha256: str | None = None, verify: bool = True, random_weights: bool = False,
                           fid_normalize: str = "torchmetrics") -> FeatureNetworks:
    """The networks the metrics need, loaded from local files (checksums verified), in eval mode on `device`.

    random_weights=True builds them with seeded random weights (`random_init_`) instead (tests and speed
    benchmarks; the numbers mean nothing and the summary says so).
    """
    nets = FeatureNetworks(device=device, fid_normalize=fid_normalize)
    specs = [("fid", "inception", inception_net.FIDInceptionV3, inception_path, INCEPTION, inception_sha256),
             ("fvd", "i3d", i3d_net.InceptionI3d, i3d_path, I3D, i3d_sha256)]
    for metric, attr, cls, path, spec, expected in specs:
        if metric not in metrics:
            continue
        if random_weights:
            net = random_init_(cls())
            nets.weights[attr] = "random"
        else:
            digest = verify_file(path, spec, expected, verify=verify)
            net = cls()
            load_into(net, path, spec)
            nets.weights[attr] = digest
            log.info("%s weights %s (sha256 %s)", attr, path, digest)
        setattr(nets, attr, net.eval().requires_grad_(False).to(device))
    return nets
