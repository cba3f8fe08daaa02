"""The dry run's memory estimate against measured peaks (issue #14 item 8): the formula is pinned on round numbers,
and the estimate of seven configurations measured on an H100 (scripts/measure_memory.py: bf16, DeepSpeed ZeRO-2,
one GPU, eager layers, random weights) stays within 5 %. The advice names what would actually help."""

from __future__ import annotations

import os

import pytest
from helpers import REPO

from vwm.config import load_config
from vwm.training.flops import GIB, MEMORY_COEFFICIENTS, estimate_for_config, estimate_memory

MEASURED = [  # config, height, width, batch, checkpointing, latents, measured peak GiB (H100 80GB, torch 2.11)
    ("vista_phase1", 576, 1024, 1, True, False, 42.53),
    ("vista_phase1", 320, 576, 1, True, False, 34.66),
    ("vista_phase1", 320, 576, 1, False, True, 63.93),
    ("vista_phase2_stage1", 320, 576, 1, True, False, 10.67),
    ("vista_phase2_stage1", 320, 576, 4, True, False, 23.04),
    ("vista_phase2_stage1", 320, 576, 1, False, True, 34.02),
    ("vista_phase2_stage2", 576, 1024, 1, True, False, 19.73),
    # use_checkpoint: auto, planned for the estimate's default budget (85 % of 80 GiB; bench/train_step.py
    # --checkpointing auto, H100 80GB, commit e57af25: bench/results/2026-12-06b-h100/checkpointing_auto.jsonl)
    ("vista_phase1", 576, 1024, 1, "auto", False, 69.83),
    ("vista_phase2_stage1", 320, 576, 1, "auto", False, 34.06),
]
"""Peaks measured on an H100 at commit 820ad9a + this branch (the same model code); docs/training.md lists them."""


def _config(name, height, width, batch, checkpointing, latents):
    overrides = [f"data.params.target_height={height}", f"data.params.target_width={width}",
                 f"data.params.batch_size={batch}", "model.params.compile_model=false",
                 f"model.params.network_config.params.use_checkpoint={checkpointing}"]
    if latents:  # a latent cache: no online VAE encode
        overrides.append("data.params.subsets=[{target: vwm.data.latents.LatentCacheSubset, "
                         "params: {cache_dir: cache}}]")
    return load_config(os.path.join(REPO, "configs", "training", f"{name}.yaml"), overrides)


def test_formula_on_round_numbers():
    """1e9 trainable, 1e9 frozen, EMA of the trainable ones, bf16 mixed, ZeRO-2 over 4 ranks."""
    est = estimate_memory(trainable=10**9, frozen=10**9, ema_params=10**9, world_size=4, activations=10 * GIB,
                          vae_encode=3 * GIB, bucket_elements=10**8)
    overhead = int(MEMORY_COEFFICIENTS["overhead_gib"] * GIB)
    assert est.weights == 2 * 2 * 10**9                     # bf16 weights, replicated
    assert est.master_and_optimizer == 12 * 10**9 // 4      # fp32 master + Adam m, v: sharded
    assert est.ema == 4 * 10**9                             # fp32 EMA, replicated
    assert est.gradients == 2 * 10**9 // 4 + 2 * 10**8      # bf16 gradient partition + one bucket
    assert est.step_transient == 4 * 10**9 // 4             # the step's fp32 gradients of the partition
    assert est.steady == est.weights + est.master_and_optimizer + est.ema + overhead
    assert est.total == est.steady + 10 * GIB + est.gradients  # activations dominate here
    # More GPUs shrink only the sharded parts.
    one = estimate_memory(trainable=10**9, frozen=10**9, ema_params=10**9, world_size=1, activations=10 * GIB)
    assert one.weights == est.weights and one.ema == est.ema and one.activations == est.activations
    assert one.master_and_optimizer == 4 * est.master_and_optimizer


@pytest.mark.slow  # builds each full-size model on the meta device: about 5 s per configuration
@pytest.mark.parametrize("case", MEASURED, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-b{c[3]}-"
                         f"{'auto' if c[4] == 'auto' else 'ckpt' if c[4] else 'nockpt'}{'-latents' if c[5] else ''}")
def test_estimate_is_within_5_percent_of_measured_peaks(case):
    *spec, measured = case
    estimate = estimate_for_config(_config(*spec), world_size=1, precision="bf16-mixed").total / GIB
    assert abs(estimate / measured - 1) < 0.05, f"estimate {estimate:.2f} GiB, measured {measured} GiB"


def test_advice_names_what_helps_not_just_more_gpus():
    big = estimate_for_config(_config("vista_phase1", 576, 1024, 2, False, True), world_size=8,
                              precision="bf16-mixed")
    assert big.total > 80 * GIB
    advice = "\n".join(big.advice(80.0))
    assert "use_checkpoint=true" in advice and "batch_size" in advice
    assert "more GPUs" not in advice  # 8 ranks already: the sharded part is small, activations dominate
    sharded = estimate_memory(trainable=5 * 10**9, frozen=0, ema_params=0, world_size=1, activations=GIB)
    assert "more GPUs: ZeRO-2 divides" in "\n".join(sharded.advice(80.0))


# ------------------------------------------------------------------------ use_checkpoint: auto (issue #13)


def test_choose_stored_layers_fills_the_room_by_flops_per_byte():
    """The plan stores the layers with the most recomputation saved per byte first, skips one that does not fit
    and takes a smaller one after it, and its peak moves linearly between the two measured ends."""
    from vwm.training.flops import choose_stored_layers

    saved = {"a": 100, "b": 100, "c": 400, "d": 50}
    flops = {"a": 1000.0, "b": 100.0, "c": 8000.0, "d": 50.0}  # per byte: c 20, a 10, b 1, d 1
    # checkpointed end 10, full end 10 + 650 (1 byte of peak per saved byte)
    assert choose_stored_layers(saved, flops, 10, 660, room=10) == (frozenset(), 10)
    assert choose_stored_layers(saved, flops, 10, 660, room=660) == (frozenset(saved), 660)
    assert choose_stored_layers(saved, flops, 10, 660, room=515) == (frozenset({"c", "a"}), 510)
    # "b" (100) no longer fits after c and a at room 565, "d" (50) does
    assert choose_stored_layers(saved, flops, 10, 660, room=565) == (frozenset({"c", "a", "d"}), 560)
    # twice the bytes of peak per saved byte
    assert choose_stored_layers(saved, flops, 10, 1310, room=1010) == (frozenset({"c", "a"}), 1010)


def _tiny_auto(budget_gib=None):
    overrides = ["model.params.network_config.params.use_checkpoint=auto"]
    if budget_gib is not None:
        overrides.append(f"model.params.network_config.params.checkpoint_budget_gib={budget_gib}")
    return load_config(os.path.join(REPO, "configs", "tiny", "train.yaml"), overrides)


@pytest.mark.parametrize("budget, stored", [(0.001, "none"), (0.336, "some"), (10.0, "all")])
def test_auto_plan_follows_the_budget(budget, stored):
    """The tiny model holds ~0.327 GiB between steps (0.25 of it workspace allowance) and ~20 MB of activations
    without checkpointing: a budget below the checkpointed peak stores nothing, one in between some layers, a large
    one every layer; the forward/backward phase of the estimate (the only one the plan changes) stays within the
    budget whenever anything is stored."""
    est = estimate_for_config(_tiny_auto(budget), world_size=1)
    plan = est.plan
    assert plan is not None and plan.layers > 0
    n = len(plan.stored)
    assert {"none": n == 0, "some": 0 < n < plan.layers, "all": n == plan.layers}[stored], plan.describe()
    if n:
        assert est.steady + est.gradients + est.activations <= budget * GIB
    assert 0 <= plan.recompute_flops <= plan.forward_flops
    assert (plan.recompute_flops == 0) == (n == plan.layers)


def test_apply_plan_sets_layers_and_keeps_the_gradients():
    """apply_activation_plan checkpoints exactly the layers the plan does not store (none without a GPU or a
    budget), and a partly checkpointed model computes the same loss and gradients as a fully checkpointed one."""
    import torch

    from vwm.config import build_model
    from vwm.models.video_unet import VideoLayer
    from vwm.training.activation_plan import apply_activation_plan

    def layers(engine):
        return {n: m.use_checkpoint for n, m in engine.model.diffusion_model.named_modules()
                if isinstance(m, VideoLayer)}

    cfg = _tiny_auto()
    torch.manual_seed(0)
    engine = build_model(cfg)
    with torch.no_grad():  # zero-initialised output layers would leave most gradients zero
        for p in engine.model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    assert apply_activation_plan(engine, cfg, world_size=1, precision="bf16-mixed", device=None) is None
    assert all(layers(engine).values()), "auto without a budget or a GPU must checkpoint every layer"

    cfg = _tiny_auto(0.336)
    partial = build_model(cfg)
    partial.load_state_dict(engine.state_dict())
    plan = apply_activation_plan(partial, cfg, world_size=1, precision="bf16-mixed", device=None)
    flags = layers(partial)
    assert plan is not None and {n for n, on in flags.items() if not on} == set(plan.stored)
    assert 0 < len(plan.stored) < len(flags)

    from helpers import make_batch  # noqa: PLC0415 - the tiny model's batch

    batch = make_batch()
    results = []
    for model in (engine, partial):
        model.train()
        loss = model.compute_loss(batch, torch.Generator().manual_seed(5)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.model.named_parameters()
                                        if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
