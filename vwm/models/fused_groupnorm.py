"""GroupNorm (optionally followed by SiLU) as two Triton kernels, for the no-gradient paths: sampling's UNet and the
VAE's encoder and decoder.

Every GroupNorm of the SVD UNet and its VAE reduces over a contiguous span of memory: in an (N, C, *spatial)
contiguous tensor, group g of sample n is the `C/G * prod(spatial)` elements starting at `(n*C + g*C/G) * S`. The
statistics are therefore a plain sum over long contiguous rows, and the only question is how to spread them over the
GPU. Some rows are very long and few (the VAE's first level: 4 channels x 576x1024 pixels per group; the UNet's
temporal res blocks: 10 channels x 25 frames x 72x128 pixels per group, 64 groups in a CFG batch), and a kernel that
gives each group one program leaves most of the GPU idle. Here:

1. `_stats_kernel` splits each group into `SPLIT` slices (chosen so the grid has about two thousand programs) and
   writes each slice's shifted sum and sum of squares in fp32 (the shift, the group's first element, keeps the
   one-pass variance from cancelling when the mean is large against the spread);
2. `_apply_kernel` combines a group's slices into mean and 1/std, then normalises a tile, applies the per-channel
   affine, rounds to the output dtype (as `GroupNorm32` does) and applies SiLU to the rounded value when asked
   (as an `nn.SiLU` after it would), in one read and one write.

Forward only (no autograd formula): `group_norm` raises when a gradient would be needed; `supported` says when it
may be used. Registered as the custom op `vwm::group_norm` through `torch.library.triton_op`, so a regionally
compiled layer keeps it inside its graph.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; a CPU build has none, and then nothing here is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installed torch
    triton = None

TARGET_PROGRAMS = 2048
"""The statistics grid aims at about this many programs (over ten per SM on an H100's 132, so that enough loads
are in flight to keep the memory busy) ..."""
MIN_SLICE = 16384
"""... without cutting a group into slices shorter than this many elements."""
MAX_SPLIT = 64
STATS_BLOCK = 4096
APPLY_BLOCK = 2048


def available() -> bool:
    """Whether the kernels can run here (Triton importable and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


def group_norm_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float, silu: bool = False) -> torch.Tensor:
    """The plain computation the kernels replace: GroupNorm on an fp32 copy, rounded to x's dtype, then SiLU."""
    y = torch.nn.functional.group_norm(
        x.float(), num_groups, None if weight is None else weight.float(), None if bias is None else bias.float(),
        eps).to(x.dtype)
    return torch.nn.functional.silu(y) if silu else y


def split_for(groups: int, group_size: int) -> int:
    """How many slices the statistics kernel cuts each group into (a power of two, 1 to MAX_SPLIT)."""
    want = max(1, min(TARGET_PROGRAMS // max(groups, 1), group_size // MIN_SLICE, MAX_SPLIT))
    return 1 << (want.bit_length() - 1)


if triton is not None:

    @triton.jit
    def _stats_kernel(x_ptr, part_ptr, group_size, slice_size, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        group = tl.program_id(0)
        part = tl.program_id(1)
        base = x_ptr + group.to(tl.int64) * group_size
        shift = tl.load(base).to(tl.float32)
        start = part * slice_size
        end = tl.minimum(start + slice_size, group_size)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_sq = tl.zeros((BLOCK,), dtype=tl.float32)
        for offset in range(start, end, BLOCK):
            idx = offset + tl.arange(0, BLOCK)
            ok = idx < end
            v = tl.load(base + idx, mask=ok, other=0.0).to(tl.float32) - shift
            v = tl.where(ok, v, 0.0)
            acc += v
            acc_sq += v * v
        out = part_ptr + (group * SPLIT + part) * 2
        tl.store(out, tl.sum(acc, axis=0))
        tl.store(out + 1, tl.sum(acc_sq, axis=0))

    @triton.jit
    def _apply_kernel(x_ptr, part_ptr, w_ptr, b_ptr, out_ptr, group_size, spatial, channels_per_group,
                      num_groups, eps, SPLIT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SILU: tl.constexpr, BLOCK: tl.constexpr):
        group = tl.program_id(0)
        tile = tl.program_id(1)
        parts = part_ptr + group * SPLIT * 2 + tl.arange(0, SPLIT) * 2
        total = tl.sum(tl.load(parts), axis=0)
        total_sq = tl.sum(tl.load(parts + 1), axis=0)
        base = group.to(tl.int64) * group_size
        shift = tl.load(x_ptr + base).to(tl.float32)
        mean_shifted = total / group_size
        var = tl.maximum(total_sq / group_size - mean_shifted * mean_shifted, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        mean = shift + mean_shifted
        idx = tile * BLOCK + tl.arange(0, BLOCK)
        ok = idx < group_size
        v = tl.load(x_ptr + base + idx, mask=ok, other=0.0).to(tl.float32)
        y = (v - mean) * rstd
        channel = (group % num_groups) * channels_per_group + idx // spatial
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + channel, mask=ok, other=1.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + channel, mask=ok, other=0.0).to(tl.float32)
        y = y.to(out_ptr.dtype.element_ty)
        if SILU:
            f = y.to(tl.float32)
            y = (f / (1.0 + tl.exp(-f))).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + base + idx, y, mask=ok)

    def _launch(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu: bool,
                out: torch.Tensor, wrap=lambda kernel: kernel) -> None:
        n, c = x.shape[:2]
        spatial = x.numel() // max(n * c, 1)
        groups = n * num_groups
        group_size = (c // num_groups) * spatial
        split = split_for(groups, group_size)
        block = STATS_BLOCK
        slice_size = triton.cdiv(triton.cdiv(group_size, split), block) * block
        partials = torch.empty((groups, split, 2), device=x.device, dtype=torch.float32)
        wrap(_stats_kernel)[(groups, split)](x, partials, group_size, slice_size, SPLIT=split, BLOCK=block,
                                            num_warps=8)
        wrap(_apply_kernel)[(groups, triton.cdiv(group_size, APPLY_BLOCK))](
            x, partials, weight, bias, out, group_size, spatial, c // num_groups, num_groups, eps, SPLIT=split,
            HAS_WEIGHT=weight.numel() > 0, HAS_BIAS=bias.numel() > 0, SILU=silu, BLOCK=APPLY_BLOCK, num_warps=8)

    def run(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu: bool,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """The kernels called directly, without the custom op (x contiguous; empty weight/bias for none), into `out`
        when given (the CPU interpreter test passes a NaN-filled one)."""
        out = torch.empty_like(x) if out is None else out
        _launch(x, num_groups, weight, bias, eps, silu, out)
        return out

    @torch.library.triton_op("vwm::group_norm", mutates_args=())
    def _group_norm_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       silu: bool) -> torch.Tensor:
        out = torch.empty_like(x)
        _launch(x, num_groups, weight, bias, eps, silu, out, wrap=torch.library.wrap_triton)
        return out


def supported(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None) -> bool:
    """Whether `group_norm` can take this call: a CUDA tensor of at least 3 dimensions whose channels split evenly
    into the groups, and no gradient to take."""
    grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    return (triton is not None and x.is_cuda and x.dim() >= 3 and x.shape[1] % num_groups == 0 and x.numel() > 0
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and not grad)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, silu: bool = False) -> torch.Tensor:
    """GroupNorm of x (N, C, *spatial) with statistics in fp32, output in x's dtype, then SiLU when `silu`."""
    if not supported(x, num_groups, weight):
        raise ValueError("the fused GroupNorm kernels need a CUDA tensor (N, C, ...) with C divisible by the groups "
                         "and no gradient; GroupNorm takes the plain path otherwise")
    empty = x.new_empty(0)
    weight = empty if weight is None else weight.contiguous()
    bias = empty if bias is None else bias.contiguous()
    return _group_norm_op(x.contiguous(), num_groups, weight, bias, float(eps), bool(silu))


__all__ = ["available", "group_norm", "group_norm_reference", "split_for", "supported"]
