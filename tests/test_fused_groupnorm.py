"""The fused GroupNorm (+ SiLU) kernels (vwm.models.fused_groupnorm): the same function as the plain norm, run by
Triton's CPU interpreter in fp32 and on the GPU in bf16; the switch that folds each SiLU into its norm without
changing a model's output or its state dict; and the dispatch that keeps CPU and gradient calls on the plain path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from vwm.models import fused_groupnorm
from vwm.models.layers import FoldedSiLU, GroupNorm, GroupNorm32, use_fused_groupnorm
from vwm.models.vae_networks import Encoder, ResnetBlock
from vwm.models.video_unet import ResBlock

gpu = pytest.mark.skipif(not fused_groupnorm.available(), reason="needs a CUDA GPU with Triton")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_split_for_spreads_long_groups_and_leaves_many_short_ones_whole():
    assert fused_groupnorm.split_for(1600, 92160) == 1  # the UNet's first level: enough groups already
    assert fused_groupnorm.split_for(64, 2_304_000) == 32  # a temporal res block in a CFG batch
    assert fused_groupnorm.split_for(448, 2_359_296) == 4  # the VAE's first level, 14 frames
    assert fused_groupnorm.split_for(1, 10**9) == fused_groupnorm.MAX_SPLIT
    assert fused_groupnorm.split_for(4, 1000) == 1  # never slices shorter than MIN_SLICE
    for groups, size in [(3, 50_000), (7, 3_000_000), (100, 200_000)]:
        split = fused_groupnorm.split_for(groups, size)
        assert split & (split - 1) == 0 and 1 <= split <= fused_groupnorm.MAX_SPLIT


def test_on_the_cpu_a_fused_norm_takes_the_plain_path_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 5, 6)
    for cls in (GroupNorm, GroupNorm32):
        norm = cls(32, 64, eps=1e-6)
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
        plain = norm(x)
        torch.testing.assert_close(plain, nn.functional.group_norm(x, 32, norm.weight, norm.bias, 1e-6))
        norm.fused = True
        assert torch.equal(norm(x), plain)
        norm.silu = True
        assert torch.equal(norm(x), nn.functional.silu(plain))
    assert not fused_groupnorm.supported(x, 32)
    with pytest.raises(ValueError, match="plain path"):
        fused_groupnorm.group_norm(x, 32, None, None, 1e-5)


def _randomise(module: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return module


@pytest.mark.parametrize("build,args", [
    (lambda: ResBlock(64, 32, 96), lambda: (torch.randn(3, 64, 6, 5), torch.randn(3, 32))),
    (lambda: ResBlock(64, 32, dims=3, kernel_size=(3, 1, 1), frames_in_emb=True),
     lambda: (torch.randn(2, 64, 4, 3, 5), torch.randn(2, 4, 32))),
    (lambda: ResnetBlock(64, 96), lambda: (torch.randn(2, 64, 6, 6),)),
    (lambda: Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), in_channels=3, resolution=16,
                     z_channels=4, double_z=True), lambda: (torch.randn(2, 3, 16, 16),)),
])
def test_folding_the_silu_into_the_norm_changes_neither_output_nor_state_dict(build, args):
    model = _randomise(build()).eval()
    inputs = args()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(*inputs)
        count = use_fused_groupnorm(model)
        folded = model(*inputs)
    assert count == sum(isinstance(m, GroupNorm) for m in model.modules()) and count >= 1
    assert all(m.silu for m in model.modules() if isinstance(m, GroupNorm) and not _is_plain_norm(model, m))
    assert torch.equal(folded, plain)  # on the CPU both paths are the plain one, with the SiLU moved
    assert model.state_dict().keys() == keys.keys()
    folded_modules = [m for m in model.modules() if isinstance(m, FoldedSiLU)]
    use_fused_groupnorm(model)  # a second switch to the same state replaces nothing
    assert [m for m in model.modules() if isinstance(m, FoldedSiLU)] == folded_modules
    use_fused_groupnorm(model, enabled=False)
    assert not any(isinstance(m, FoldedSiLU) for m in model.modules())
    assert not any(m.silu or m.fused for m in model.modules() if isinstance(m, GroupNorm))
    with torch.no_grad():
        assert torch.equal(model(*inputs), plain)


def _is_plain_norm(model: nn.Module, norm: nn.Module) -> bool:
    """A norm whose output is not followed by SiLU (the VAE attention's)."""
    return any(getattr(m, "norm", None) is norm for m in model.modules())


INTERPRETED = textwrap.dedent("""
    import json, torch
    from vwm.models import fused_groupnorm as fg
    torch.manual_seed(0)
    errors = []
    # (shape, groups, silu, affine, offset): a 5-D temporal shape, tails of the apply tile, several slices per
    # group (group size 80 000: split 4, the last slice short), a mean far from zero against its spread
    cases = [((2, 8, 5, 7), 4, True, True, 0.0), ((1, 6, 3, 4, 9), 3, False, True, 0.0),
             ((2, 4, 40000), 2, True, True, 0.0), ((3, 2, 33333), 1, False, False, 0.0),
             ((2, 4, 50000), 2, True, True, 300.0)]
    for shape, groups, silu, affine, offset in cases:
        x = torch.randn(shape) * 0.5 + offset
        w = torch.randn(shape[1]) if affine else torch.empty(0)
        b = torch.randn(shape[1]) if affine else torch.empty(0)
        out = fg.run(x, groups, w, b, 1e-6, silu, out=torch.full(shape, float("nan")))
        exact = torch.nn.functional.group_norm(x.double(), groups, w.double() if affine else None,
                                               b.double() if affine else None, 1e-6)
        exact = torch.nn.functional.silu(exact) if silu else exact
        plain = fg.group_norm_reference(x, groups, w if affine else None, b if affine else None, 1e-6, silu)
        errors.append([(out.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item()])
    print(json.dumps(errors))
""")


def test_the_kernels_compute_groupnorm_under_tritons_interpreter():
    """Statistics and apply kernels under Triton's CPU interpreter in fp32 (no GPU needed): every output element
    (NaN before) equals GroupNorm computed in float64, including groups cut into several slices and a mean 600
    times the spread (the shifted sums keep the variance from cancelling: as close as torch's fp32 norm). The
    interpreter rounds to bf16 by truncation, unlike the GPU, so bf16 is checked on the GPU below."""
    pytest.importorskip("triton", reason="Triton is in requirements-dev.txt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    if run.returncode != 0 and "only 0-dimensional arrays can be converted" in run.stderr:
        pytest.skip("this Triton interpreter does not run under the installed NumPy")
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    # within 2e-5 of float64, or (the large mean, where fp32 itself cannot hold x - mean that closely) no further
    # from it than torch's own fp32 GroupNorm
    assert len(errors) == 5 and all(kernel < max(2e-5, plain) for kernel, plain in errors), errors


@gpu
@pytest.mark.parametrize("shape,groups,silu", [((50, 320, 72, 128), 32, True), ((2, 320, 25, 72, 128), 32, True),
                                               ((3, 640, 9, 16), 32, False), ((2, 128, 96, 160), 32, True)])
def test_the_kernels_match_the_plain_norm_within_bf16_rounding(shape, groups, silu):
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * 2 + 0.5).bfloat16()
    weight = torch.randn(shape[1], device="cuda").bfloat16()
    bias = torch.randn(shape[1], device="cuda").bfloat16()
    normed = fused_groupnorm.group_norm(x, groups, weight, bias, 1e-5, False)
    plain = fused_groupnorm.group_norm_reference(x, groups, weight, bias, 1e-5, False)
    assert normed.dtype == torch.bfloat16 and normed.shape == x.shape
    # both round an fp32 norm to bf16: they differ by at most one bf16 step, in few elements
    diff = (normed.float() - plain.float()).abs()
    worst = (diff - plain.float().abs() * 2 ** -7).max().item()
    assert worst <= 1e-6, f"off by more than one bf16 step: {worst}"
    assert (diff > 0).float().mean() < 0.02
    if silu:
        # the SiLU acts on the rounded norm, as nn.SiLU after GroupNorm32 does: one bf16 step from torch's SiLU of
        # the kernel's own norm (comparing with torch's norm instead would turn a one-step difference in the
        # norm into several steps of the SiLU's small output where it is flat: about 3 at -5, 10 at -8)
        fused = fused_groupnorm.group_norm(x, groups, weight, bias, 1e-5, True)
        expect = torch.nn.functional.silu(normed)
        diff = (fused.float() - expect.float()).abs()
        worst = (diff - expect.float().abs() * 2 ** -7).max().item()
        assert worst <= 1e-6, f"SiLU off by more than one bf16 step: {worst}"
        assert (diff > 0).float().mean() < 0.02


@gpu
def test_a_compiled_res_block_with_the_fused_norms_matches_the_plain_one():
    """The fused norms inside a compiled ResBlock add no more error to the eager block's output than compiling the
    plain block does (bf16, random weights: compiling alone moves some outputs by a few bf16 steps)."""
    torch.manual_seed(0)
    block = _randomise(ResBlock(320, 64, 320)).cuda().to(torch.bfloat16).eval()
    x = torch.randn(4, 320, 36, 64, device="cuda", dtype=torch.bfloat16)
    emb = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        plain = block(x, emb).float()
        compiled_plain = torch.compile(block, dynamic=False)(x, emb).float()
        torch._dynamo.reset()
        use_fused_groupnorm(block)
        assert any(getattr(m, "fused", False) for m in block.modules())
        fused = torch.compile(block, dynamic=False)(x, emb).float()
    scale = plain.abs().max().item()
    compiler_err = (compiled_plain - plain).abs().max().item() / scale
    fused_err = (fused - plain).abs().max().item() / scale
    assert fused_err <= max(2 * compiler_err, 2 ** -7), (fused_err, compiler_err)
    x.requires_grad_(True)  # a gradient falls back to the plain path
    block(x, emb).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_engine_switch_reaches_both_frozen_vae_encoders_and_not_the_unet():
    from helpers import build_tiny

    model = build_tiny("model.params.fused_groupnorm=True")
    encoders = [model.first_stage_model, *(e.encoder for e in model.conditioner.embedders if hasattr(e, "encoder"))]
    assert len(encoders) == 2
    for encoder in encoders:
        norms = [m for m in encoder.modules() if isinstance(m, GroupNorm)]
        assert norms and all(m.fused for m in norms)
    assert not any(getattr(m, "fused", False) for m in model.unet.modules() if isinstance(m, GroupNorm))
    assert not any(m.fused for m in build_tiny().modules() if isinstance(m, GroupNorm))
