"""GroupNorm (+ SiLU) and the VAE's 512-wide attention at the full-size model's shapes, one JSON line per case.

GroupNorm: each shape of the SVD UNet's sampling forward (batch-2 CFG at 576x1024, 25 frames) and of the VAE
encoder (14-frame chunks at 576x1024), as the models compute it (statistics on an fp32 copy, rounded to bf16,
then SiLU), timed eager, compiled by Inductor and with `vwm.models.fused_groupnorm`'s Triton kernels, with the
effective bandwidth (one read and one write of the tensor counted, the floor of any implementation) and the
largest difference from the eager output.

Attention: the VAE mid-block's single 512-wide head over 72x128 = 9216 tokens (14 frames): SDPA as the model calls
it (no flash kernel takes a 512-wide head) against two batched matmuls with fp32 scores, in frame chunks, with the
error of each against an fp32 computation.

    python bench/groupnorm.py                    # GPU only
    python bench/groupnorm.py --cases unet --reps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from geglu import timed as geglu_timed  # noqa: E402
from vwm.models import fused_groupnorm  # noqa: E402

# (name, shape, groups, silu, eps)
UNET = [
    ("unet_l1", (50, 320, 72, 128), 32, True, 1e-5),
    ("unet_l1_cat", (50, 640, 72, 128), 32, True, 1e-5),
    ("unet_l1_temporal", (2, 320, 25, 72, 128), 32, True, 1e-5),
    ("unet_l1_transformer", (50, 320, 72, 128), 32, False, 1e-6),
    ("unet_l2", (50, 640, 36, 64), 32, True, 1e-5),
    ("unet_l2_temporal", (2, 640, 25, 36, 64), 32, True, 1e-5),
    ("unet_l3", (50, 1280, 18, 32), 32, True, 1e-5),
    ("unet_l4", (50, 1280, 9, 16), 32, True, 1e-5),
]
VAE = [
    ("vae_l1", (14, 128, 576, 1024), 32, True, 1e-6),
    ("vae_l2", (14, 256, 288, 512), 32, True, 1e-6),
    ("vae_l3", (14, 512, 144, 256), 32, True, 1e-6),
    ("vae_l4", (14, 512, 72, 128), 32, True, 1e-6),
]


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn over reps runs (bench/geglu.py's CUDA-event timer), after two warm-up runs."""
    for _ in range(2):
        fn()
    return geglu_timed(fn, reps)


def plain(x, groups, weight, bias, eps, silu):
    return fused_groupnorm.group_norm_reference(x, groups, weight, bias, eps, silu)


def groupnorm_case(name, shape, groups, silu, eps, reps, device) -> dict:
    torch.manual_seed(0)
    x = (torch.randn(shape, device=device) * 2 + 0.5).bfloat16()
    weight = torch.randn(shape[1], device=device).bfloat16()
    bias = torch.randn(shape[1], device=device).bfloat16()
    torch._dynamo.reset()  # each case compiles afresh (past the recompile limit Dynamo would run it eagerly)
    compiled = torch.compile(plain, dynamic=False)
    with torch.no_grad():
        ref = plain(x, groups, weight, bias, eps, silu)
        out = {}
        runs = {"eager": lambda: plain(x, groups, weight, bias, eps, silu),
                "compiled": lambda: compiled(x, groups, weight, bias, eps, silu),
                "fused": lambda: fused_groupnorm.group_norm(x, groups, weight, bias, eps, silu)}
        for label, fn in runs.items():
            ms = timed(fn, reps)
            diff = (fn().float() - ref.float()).abs().max().item()
            out[label] = {"ms": round(ms, 3), "gb_s": round(2 * x.numel() * x.element_size() / ms / 1e6, 0),
                          "max_abs_diff": diff}
    return {"case": name, "shape": list(shape), "groups": groups, "silu": silu,
            "split": fused_groupnorm.split_for(shape[0] * groups, x.numel() // shape[0] // groups), **out}


def attention_by_chunks(q, k, v, chunk: int) -> torch.Tensor:
    """Single-head attention (n, tokens, c) with fp32 scores: matmul into fp32, softmax in fp32, probabilities
    rounded to the input dtype for the second matmul (what the fused kernels do), `chunk` frames at a time."""
    outs = []
    for qs, ks, vs in zip(q.split(chunk), k.split(chunk), v.split(chunk)):
        scores = torch.bmm(qs, ks.transpose(1, 2), out_dtype=torch.float32)
        probs = scores.mul_(qs.shape[-1] ** -0.5).softmax(dim=-1).to(vs.dtype)
        outs.append(torch.bmm(probs, vs))
    return torch.cat(outs)


def attention_case(reps, device) -> list[dict]:
    torch.manual_seed(0)
    n, tokens, c = 14, 72 * 128, 512
    q, k, v = (torch.randn(n, tokens, c, device=device).bfloat16() for _ in range(3))
    with torch.no_grad():
        exact = torch.cat([F.scaled_dot_product_attention(a.float()[None], b.float()[None], w.float()[None])[0]
                           for a, b, w in zip(q.split(1), k.split(1), v.split(1))])
        rows = []
        cases = {"sdpa": lambda: F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]}
        for chunk in (1, 2, 7):
            cases[f"bmm_fp32_scores_chunk{chunk}"] = lambda chunk=chunk: attention_by_chunks(q, k, v, chunk)
        for label, fn in cases.items():
            try:
                ms = timed(fn, reps)
                err = ((fn().float() - exact).abs().max() / exact.abs().max()).item()
                rows.append({"case": "vae_attention", "variant": label, "ms": round(ms, 3),
                             "max_rel_err_vs_fp32": err, "tflop_s": round(4 * n * tokens ** 2 * c / ms / 1e9, 1)})
            except Exception as err:  # noqa: BLE001  (a variant that fails is a result; the others still run)
                rows.append({"case": "vae_attention", "variant": label, "error": repr(err)[:300]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["unet", "vae", "attention"], choices=["unet", "vae", "attention"])
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    if not fused_groupnorm.available():
        raise SystemExit("bench/groupnorm.py needs a CUDA GPU with Triton")
    device = torch.device("cuda")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for group in args.cases:
        if group == "attention":
            for row in attention_case(args.reps, device):
                print(json.dumps({**row, **meta}), flush=True)
            continue
        for case in UNET if group == "unet" else VAE:
            try:
                row = groupnorm_case(*case, reps=args.reps, device=device)
            except Exception as err:  # noqa: BLE001  (a shape that fails is a result; the others still run)
                row = {"case": case[0], "error": repr(err)[:300]}
            print(json.dumps({**row, **meta}), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
