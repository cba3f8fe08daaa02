"""Inflated 3D ConvNet (I3D, Carreira & Zisserman 2017), Kinetics-400, as the FVD feature network
(Unterthiner et al. 2018).

This is the PyTorch port of the RGB I3D used by VideoGPT, TATS and LVDM (the FVD code Vista's authors say they
modified), whose weights file is `i3d_pretrained_400.pt`. Parameter names follow that port
(`Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b1b.bn.running_var`, `logits.conv3d.bias`, ...), so the file loads
strictly. Every convolution and pool pads like TensorFlow's `SAME` (the padding depends on the input size and
is split front/back), which changes the output; it is reproduced exactly.

Why this network and not the TorchScript export of the TF-Hub I3D (`i3d_torchscript.pt`, StyleGAN-V): Vista's
FVD follows LVDM, which uses this port; and an architecture in code can be built with random weights and
tested, which a TorchScript file cannot.

FVD input (`preprocess`, LVDM's): uint8 RGB clips, every frame resized to 224x224 with PyTorch bilinear
interpolation (align_corners=False, no antialiasing; the aspect ratio is not kept), scaled to [-1, 1] by
2x/255 - 1. The feature is the 400-d logit vector averaged over the output time steps. At least 9 frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vwm.eval.resize import resize_images

INPUT_SIZE = 224
FEATURE_DIM = 400
MIN_FRAMES = 9
"""Fewer frames leave no time step for the final 2x7x7 average pool."""


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF SAME padding of one axis, split with the smaller half in front."""
    pad = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return pad // 2, pad - pad // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = x.shape[-3:]
    pt, ph, pw = (same_padding(s, k, st) for s, k, st in zip((t, h, w), kernel, stride))
    if not any(pt + ph + pw):
        return x
    return F.pad(x, (*pw, *ph, *pt))


class Unit3D(nn.Module):
    """Conv3d with SAME padding, then batch norm (eps 1e-5) and ReLU; the logit layer has a bias and neither."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), batch_norm: bool = True, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride=stride, bias=not batch_norm)
        self.bn = nn.BatchNorm3d(cout, eps=1e-5, momentum=0.001) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max pool with SAME zero padding (inputs are ReLU outputs, so zeros never win over valid values)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four branches: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool -> 1x1 (out: sum of the branch widths)."""

    def __init__(self, cin: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(cin, widths[0])
        self.b1a = Unit3D(cin, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a = Unit3D(cin, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(cin, widths[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
"""Input width and branch widths of each Inception module (Inception-v1 / GoogLeNet, inflated)."""


class InceptionI3d(nn.Module):
    """RGB I3D: clips (B, 3, T, 224, 224) in [-1, 1], T >= 9 -> Kinetics-400 logits (B, 400), averaged over time."""

    def __init__(self, num_classes: int = FEATURE_DIM):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(*_MIXED["Mixed_3b"])
        self.Mixed_3c = InceptionModule(*_MIXED["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            setattr(self, name, InceptionModule(*_MIXED[name]))
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(*_MIXED["Mixed_5b"])
        self.Mixed_5c = InceptionModule(*_MIXED["Mixed_5c"])
        self.logits = Unit3D(1024, num_classes, batch_norm=False, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3 or x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D input must be (B, 3, T >= {MIN_FRAMES}, H, W), got {tuple(x.shape)}")
        for name in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
                     "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
                     "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c"):
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)  # (B, 1024, T', 1, 1) for 224x224 input
        return self.logits(x).mean(dim=(3, 4)).mean(dim=2)


def output_steps(frames: int) -> int:
    """Time steps of the logits before averaging: ceil three times by the strides 2, minus the pool's 1."""
    for _ in range(3):
        frames = math.ceil(frames / 2)
    return frames - 1


def preprocess(clips: torch.Tensor) -> torch.Tensor:
    """uint8 RGB clips (B, T, 3, H, W) -> I3D input (B, 3, T, 224, 224) in [-1, 1] (LVDM's preprocessing)."""
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[2] != 3:
        raise ValueError(f"I3D input must be uint8 RGB clips (B, T, 3, H, W), got {clips.dtype} "
                         f"{tuple(clips.shape)}")
    b, t = clips.shape[:2]
    frames = resize_images(clips.flatten(0, 1).float(), (INPUT_SIZE, INPUT_SIZE), "bilinear")
    return (2.0 * frames / 255.0 - 1.0).unflatten(0, (b, t)).transpose(1, 2).contiguous()
