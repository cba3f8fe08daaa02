"""Training building blocks without processes: LR schedule, EMA, step seeds, video logging, memory estimate."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build_tiny, make_batch

from vwm.models.ema import LitEma
from vwm.models.engine import step_seed
from vwm.training.lr import LambdaLinearScheduler


def test_lambda_linear_schedule_matches_the_reference_formula():
    sched = LambdaLinearScheduler(warm_up_steps=[10], f_min=[0.5], f_max=[1.0], f_start=[1e-6], cycle_lengths=[100])
    assert sched(0) == pytest.approx(1e-6)
    assert sched(5) == pytest.approx(1e-6 + (1.0 - 1e-6) / 10 * 5)
    # after warm-up: f_min + (f_max - f_min) * (L - n) / L
    assert sched(10) == pytest.approx(0.5 + 0.5 * 90 / 100)
    assert sched(60) == pytest.approx(0.5 + 0.5 * 40 / 100)
    const = LambdaLinearScheduler([1000], [1.0], [1.0], [1e-6], [1e13])  # the reference configs' schedule
    assert const(1000) == pytest.approx(1.0) and const(10**6) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaLinearScheduler([1, 2], [1.0], [1.0], [0.0], [10])


def test_ema_warmup_decay_and_fp32_shadows_survive_half_casts():
    net = torch.nn.Linear(4, 4)
    ema = LitEma(net, decay=0.9)
    assert ema.current_decay() == pytest.approx(2 / 11)  # min(decay, (1+n)/(10+n)) with n = 1 on the first update
    before = ema.shadows()[0].clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema(net)
    torch.testing.assert_close(ema.shadows()[0], before + (1 - 2 / 11) * 1.0)
    ema.to(torch.bfloat16)  # what DeepSpeed's module.bfloat16() does to every buffer
    assert all(s.dtype == torch.float32 for s in ema.shadows())
    assert int(ema.num_updates) == 1
    state = ema.state_dict()
    fresh = LitEma(net, decay=0.9)
    fresh.load_state_dict(state)
    assert fresh.current_decay() == pytest.approx(min(0.9, 3 / 12))


def test_step_seeds_differ_by_rank_and_step_and_are_stable():
    seeds = {step_seed(23, rank, step, idx) for rank in range(4) for step in range(50) for idx in range(2)}
    assert len(seeds) == 4 * 50 * 2
    assert step_seed(23, 1, 7, 0) == step_seed(23, 1, 7, 0)
    assert all(0 <= s < 2**63 for s in seeds)


def test_log_videos_returns_samples_inputs_and_reconstructions_with_ema_restored():
    model = build_tiny("model.params.use_ema=true")
    weights = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    with torch.no_grad():
        for shadow in model.model_ema.shadows():
            shadow.add_(0.01)
    out = model.log_videos(make_batch(b=2), n=1, seed=3)
    assert set(out) == {"samples", "inputs", "reconstructions"}
    assert all(v.shape == (1, 5, 3, 64, 64) and torch.isfinite(v).all() for v in out.values())
    for name, p in model.model.named_parameters():  # the live weights are back after sampling with EMA ones
        assert torch.equal(p, weights[name])


def test_memory_estimate_shards_optimizer_state_over_ranks():
    from vwm.training.flops import estimate_memory

    one = estimate_memory(trainable=10**9, frozen=0, ema_params=10**9, world_size=1, activations=0)
    eight = estimate_memory(trainable=10**9, frozen=0, ema_params=10**9, world_size=8, activations=0)
    assert one.master_and_optimizer == 12 * 10**9 and eight.master_and_optimizer == math.ceil(12 * 10**9 / 8)
    assert one.weights == eight.weights == 2 * 10**9 and one.ema == 4 * 10**9


@pytest.mark.parametrize("saved, now", [(2, 1), (1, 2), (4, 3), (3, 5)])
def test_zero_partitions_resplit_for_another_world_size(saved, now):
    from vwm.training.zero_reshard import copy_flat_range

    flat = torch.randn(23)  # params + alignment padding; ZeRO pads the end to a multiple of the world size

    def split(world):
        size = -(-flat.numel() // (2 * world)) * 2  # equal partitions of the end-padded buffer
        return size, [flat[r * size:(r + 1) * size] for r in range(world)]  # lean: without the end padding

    size, parts = split(saved)
    pieces = [(r * size, part) for r, part in enumerate(parts)]
    new_size, expected = split(now)
    for rank in range(now):
        out = torch.full((new_size,), float("nan"))
        copy_flat_range(pieces, rank * new_size, out)
        assert torch.equal(out[:expected[rank].numel()], expected[rank])
        assert not out[expected[rank].numel():].any()  # end padding is zero
