"""Training building blocks without processes: LR schedule, EMA, step seeds, video logging, memory estimate."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build_tiny, make_batch

from vwm.models.ema import LitEma
from vwm.models.engine import optimizer_params, step_seed
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


def test_ema_of_bf16_weights_matches_the_reference_update_across_chunk_edges(monkeypatch):
    """DeepSpeed's bf16 modules: the shadows (fp32) follow shadow - (1 - d)(shadow - w.float()), the reference's
    update (to fp32 rounding), whichever chunk of the multi-tensor cast a weight falls in (a 1-element weight
    included)."""
    import vwm.models.ema as ema_module

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3), torch.nn.Linear(3, 1))
    net[2].bias.requires_grad_(False)  # not tracked
    ema = LitEma(net, decay=0.999)
    monkeypatch.setattr(ema_module, "_CHUNK_ELEMENTS", 20)  # chunks close inside and exactly at tensor edges
    net.to(torch.bfloat16)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert ema.param_names == names and all(s.dtype == torch.float32 for s in ema.shadows())
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        decay = ema.current_decay()
        expected = [s - (1 - decay) * (s - dict(net.named_parameters())[n].float())
                    for s, n in zip([s.clone() for s in ema.shadows()], names)]
        ema(net)
        for got, want in zip(ema.shadows(), expected):
            torch.testing.assert_close(got, want, rtol=3e-7, atol=1e-7)
    mixed = torch.nn.Linear(4, 4)
    ema32 = LitEma(mixed, decay=0.5)
    mixed.weight.data = mixed.weight.data.to(torch.bfloat16)  # one weight half precision, the bias fp32
    with torch.no_grad():
        mixed.bias.add_(1.0)
    before = [s.clone() for s in ema32.shadows()]
    ema32(mixed)
    torch.testing.assert_close(ema32.shadows()[1], before[1] + (1 - 2 / 11) * 1.0)  # decay min(0.5, 2/11)
    torch.testing.assert_close(ema32.shadows()[0], before[0] + (1 - 2 / 11) * (mixed.weight.float() - before[0]))


def test_the_guards_gradient_norm_is_exact_in_fp32_for_bf16_gradients():
    """check_update's global norm sums fp32 per-tensor norms of bf16 gradients (DeepSpeed's partitions or .grad),
    not norms rounded to bf16 first (0.4 % off at most, which a logged grad_norm would carry)."""
    from vwm.training.guards import local_grad_square_norm

    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(33, 33) for _ in range(8))).to(torch.bfloat16)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 3
    exact = sum(float(p.grad.double().square().sum()) for p in net.parameters())
    square, replicated = local_grad_square_norm(torch.optim.SGD(net.parameters(), lr=0.1), net)
    assert replicated and square.dtype == torch.float32
    assert abs(float(square) - exact) <= 1e-5 * exact

    class Zero:  # DeepSpeed ZeRO-1/2: this rank's reduced partitions, by group
        averaged_gradients = {0: [p.grad for p in list(net.parameters())[:5]], 1: None}

    part = sum(float(p.grad.double().square().sum()) for p in list(net.parameters())[:5])
    square, replicated = local_grad_square_norm(Zero(), net)
    assert not replicated and abs(float(square) - part) <= 1e-5 * part


def test_adam_runs_fused_on_cuda_unless_the_config_picks_an_implementation():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    adamw = {"target": "torch.optim.AdamW", "params": {"betas": [0.9, 0.99]}}
    assert optimizer_params(adamw, cuda) == {"betas": [0.9, 0.99], "fused": True}
    assert optimizer_params(adamw, cpu) == {"betas": [0.9, 0.99]}  # CPU runs keep torch's default
    assert optimizer_params({"target": "torch.optim.Adam"}, cuda) == {"fused": True}
    for chosen in ({"foreach": True}, {"fused": False}):
        assert optimizer_params({"target": "torch.optim.AdamW", "params": chosen}, cuda) == chosen
    assert optimizer_params({"target": "torch.optim.SGD", "params": {"lr": 0.1}}, cuda) == {"lr": 0.1}
    assert adamw["params"] == {"betas": [0.9, 0.99]}  # the config node is left as it was


def test_fused_adamw_takes_the_same_steps_as_the_default_form():
    """What `fused=True` changes is the kernel, not the update: three steps of torch's fused AdamW (CPU here) against
    its default multi-tensor form from the same weights and gradients, with weight decay, as vwm configures it."""
    from vwm.config import instantiate

    torch.manual_seed(0)
    shapes = [(33, 17), (17,), (1,), (5, 5, 3)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    results = []
    for params_cfg in (optimizer_params({"target": "torch.optim.AdamW"}, torch.device("cuda")), {}):
        weights = [torch.nn.Parameter(w.clone()) for w in start]
        node = {"target": "torch.optim.AdamW", "params": {**params_cfg, "weight_decay": 0.01}}
        opt = instantiate(node, "model.params.optimizer_config", params=weights, lr=1e-3)
        assert opt.defaults["fused"] is (True if params_cfg else None)
        for step in grads:
            for w, g in zip(weights, step):
                w.grad = g.clone()
            opt.step()
        results.append([w.detach() for w in weights])
    assert all(not torch.equal(w, w0) for w, w0 in zip(results[0], start))  # the steps moved every weight
    for fused, default in zip(*results):
        torch.testing.assert_close(fused, default, rtol=1e-6, atol=1e-7)


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
