"""FP8 sampling (`sample.py --fp8`, vwm.models.fp8): the e4m3 products stay close to bf16 ones, only the large
linear layers of the transformers convert, and a rollout with them stays close to the bf16 rollout. Runs on the CPU
(torch._scaled_mm has a CPU kernel); the speed is measured on a GPU by bench/sample.py --modes compiled fp8."""

from __future__ import annotations

import torch
from helpers import build_tiny, make_batch
from torch import nn

from vwm import rollout as ro
from vwm.data.batch import action_batch
from vwm.models import fp8
from vwm.models.video_unet import SpatialVideoTransformer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_float8_linear_is_close_to_the_bf16_product():
    torch.manual_seed(0)
    linear = nn.Linear(256, 512).to(torch.bfloat16)
    x = torch.randn(2, 7, 256, dtype=torch.bfloat16) * 3.0
    x[0, 0] *= 50  # an outlier token: per-row scales keep it from crushing the other rows
    want = linear(x)
    got = fp8.Float8Linear(linear)(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert _rel(got, want) < 0.05  # e4m3: 3 mantissa bits per element, averaged over 256 products
    assert _rel(got[1], want[1]) < 0.05
    # a wrong scale (e.g. the transpose of the weight scale) would be off by far more
    assert _rel(got, want) > 1e-4, "the FP8 path must actually quantise"


def test_only_large_transformer_linears_convert():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.time_embed = nn.Linear(256, 1024)
            self.attn = nn.Module()
            self.attn.to_q = nn.Linear(512, 512, bias=False)
            self.attn.q_adapter_down = nn.Linear(512, 256, bias=False)
            self.attn.small = nn.Linear(64, 512)
            self.attn.odd = nn.Linear(520, 512)
            self.ff = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))

    net = Net()
    assert fp8.convert_to_fp8(net) == 3
    assert isinstance(net.attn.to_q, fp8.Float8Linear)
    assert isinstance(net.ff[0], fp8.Float8Linear) and isinstance(net.ff[2], fp8.Float8Linear)
    for kept in (net.time_embed, net.attn.q_adapter_down, net.attn.small, net.attn.odd):
        assert type(kept) is nn.Linear


def test_fp8_rollout_stays_close_to_the_bf16_rollout(monkeypatch):
    """The tiny model's transformers are narrower than MIN_FEATURES: lower it so that they convert."""
    monkeypatch.setattr(fp8, "MIN_FEATURES", 16)
    frames = make_batch(b=1, t=5, seed=0)["img_seq"][:, :3]
    actions = [action_batch([{"command": torch.tensor([1.0])}])]
    settings = ro.RolloutSettings(n_rounds=1, n_steps=3)
    videos = []
    for use_fp8 in (False, True):
        model = build_tiny()
        placement = ro.Placement(model, "cpu", unet_dtype=torch.bfloat16, fp8=use_fp8)
        converted = [m for m in model.unet.modules() if isinstance(m, fp8.Float8Linear)]
        assert bool(converted) == use_fp8
        if use_fp8:  # inside the transformers only
            inside = {id(m) for t in model.unet.modules() if isinstance(t, SpatialVideoTransformer)
                      for m in t.modules()}
            assert all(id(m) in inside for m in converted)
        videos.append(ro.rollout(model, frames, actions, [ro.sample_generator(23, 0)], settings, placement).video)
    assert torch.isfinite(videos[1]).all()
    # 16-wide products average little of the e4m3 rounding away; the 320-1280-wide SVD layers average more
    assert 0 < _rel(videos[1], videos[0]) < 0.15


def test_fp8_needs_the_bf16_unet():
    import pytest

    with pytest.raises(ValueError, match="bf16"):
        ro.Placement(build_tiny(), "cpu", fp8=True)  # fp32 UNet on the CPU by default
