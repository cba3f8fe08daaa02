"""The GEGLU feed-forward projection as one GPU kernel, for sampling.

`GEGLU` computes `(x W + b)` with twice the hidden width, splits it into a value half `a` and a gate half `g` and
returns `a * gelu(g)`. Done as a matrix product and a separate elementwise kernel, the product writes the full
double-width result to memory and the gate kernel reads it back: at 576x1024 that round trip is the largest
memory-bound item of a compiled sampling forward (30.5 ms of 433 ms for the batch-2 CFG step on an H100,
docs/performance.md). Here one Triton kernel computes both halves of each output tile in two accumulators that share
the loaded `x` tile, applies the bias and the exact (erf) GELU in fp32 and writes only the gated result: the
double-width tensor never exists.

Measured on an H100 (2026-12-07, `bench/geglu.py`): 74 ms per batch-2 UNet forward against 60 ms for the compiled
plain path. The kernel ties at the first level (the widest rows, where the saved traffic is largest) and loses at
the others, because its product runs at about 340 TFLOP/s where cuBLAS's runs at 540 or more. So it is an option
(`vwm.rollout.Placement(fused_geglu=True)`), off by default, until its tiling is tuned for Hopper.

Forward only (no autograd formula): `GEGLU` uses it when `fused` is set, the input is a CUDA bf16/fp16 tensor and no
gradient is being taken; anything else takes the plain path. Registered as the custom op `vwm::geglu` through
`torch.library.triton_op`, so a regionally compiled layer keeps it inside its graph.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; a CPU build has none, and then nothing here is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installed torch
    triton = None


def available() -> bool:
    """Whether the fused kernel can run here (Triton importable and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The plain computation the kernel replaces (what `GEGLU.forward` does without it)."""
    a, gate = torch.nn.functional.linear(x, weight, bias).chunk(2, dim=-1)
    return a * torch.nn.functional.gelu(gate)


if triton is not None:

    def _configs():
        # Two fp32 accumulators per tile: BLOCK_M * BLOCK_N * 2 / (32 * num_warps) registers per thread for them.
        shapes = [(128, 64, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3),
                  (256, 64, 64, 8, 3), (64, 64, 64, 4, 4)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for m, n, k, w, s in shapes]

    @triton.autotune(configs=_configs(), key=["M", "N", "K"])
    @triton.jit
    def _geglu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K,
                      stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # Tiles in groups of GROUP_M rows, so neighbouring programs reuse the same rows of x from the L2 cache.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        # W is (2N, K) row-major (nn.Linear's layout): rows [0, N) make the value half, rows [N, 2N) the gate half.
        a_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        g_ptrs = a_ptrs + N * stride_wn
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wa = tl.load(a_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_a = tl.dot(x, wa, acc_a)
            acc_g = tl.dot(x, wg, acc_g)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_wk
            g_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            acc_a += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(b_ptr + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        gelu = 0.5 * acc_g * (1.0 + tl.erf(acc_g * 0.7071067811865476))
        out = acc_a * gelu
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    def run_config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, config,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel with one given `triton.Config` instead of the autotuned choice (x (M, K) contiguous; for
        `bench/geglu.py --sweep`, which times every config of the autotuning list at each shape), into `out`
        (M, N) when given."""
        m, k = x.shape
        n = weight.shape[0] // 2
        out = torch.empty((m, n), device=x.device, dtype=x.dtype) if out is None else out
        meta = config.kwargs
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _geglu_kernel.fn[grid](x, weight, bias, out, m, n, k, x.stride(0), x.stride(1), weight.stride(0),
                               weight.stride(1), out.stride(0), out.stride(1), HAS_BIAS=bias.numel() > 0,
                               num_warps=config.num_warps, num_stages=config.num_stages, **meta)
        return out

    @torch.library.triton_op("vwm::geglu", mutates_args=())
    def _geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        n = weight.shape[0] // 2
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        torch.library.wrap_triton(_geglu_kernel)[grid](
            x, weight, bias, out, m, n, k, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            out.stride(0), out.stride(1), HAS_BIAS=bias.numel() > 0)
        return out


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `geglu` can take this call: a CUDA half-precision input and weight of one dtype, and no gradient."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and not grad)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`a * gelu(g)` of `(a, g) = x W^T + b` in one kernel; x (..., K), weight (2N, K), bias (2N,) -> (..., N)."""
    if not supported(x, weight):
        raise ValueError("the fused GEGLU kernel needs a CUDA bf16/fp16 input and weight of one dtype and no "
                         "gradient; GEGLU takes the plain path otherwise")
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    bias = torch.empty(0, device=x.device, dtype=x.dtype) if bias is None else bias.to(x.dtype)
    out = _geglu_op(rows, weight.contiguous(), bias)
    return out.reshape(*lead, weight.shape[0] // 2)
