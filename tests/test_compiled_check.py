"""Compiled UNet layers verify their gradients against eager layers at the first informative training step
(vwm/training/compiled_check.py): a compiler that returns the right loss with wrong gradients (as torch 2.11 did on
an H100, docs/performance.md) is caught and the run continues eagerly; a faithful one keeps its compiled layers."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from helpers import build_tiny, make_batch

from vwm.training.compiled_check import compare_compiled_gradients, compiled_layers
from vwm.models.video_unet import VideoLayer


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient times `factor` backward: a compiled layer whose loss is right and whose
    gradients are not."""

    @staticmethod
    def forward(ctx, x, factor):  # noqa: ANN001, ANN205
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * ctx.factor, None


def _stand_in(layer, factor: float | None = None):  # noqa: ANN001, ANN202
    """A compiled_run that computes the layer eagerly (faithful) or with scaled gradients (broken)."""
    def run(x, emb, context, num_frames):  # noqa: ANN001, ANN202
        out = layer._run(x, emb, context, num_frames)
        return out if factor is None else _ScaleGradient.apply(out, factor)
    return run


def _install(model, factor: float | None = None) -> list:
    layers = [m for m in model.unet.modules() if isinstance(m, VideoLayer)]
    for m in layers:
        m.compiled_run = _stand_in(m, factor)
    return layers


def _loss_of(model, batch):  # noqa: ANN001, ANN202
    return lambda: model.compute_loss(batch, torch.Generator().manual_seed(3)).loss


def test_faithful_compiled_layers_pass_and_broken_ones_fail_the_gradient_check():
    batch = make_batch()
    model = build_tiny()
    _install(model)
    ok = compare_compiled_gradients(model.unet, _loss_of(model, batch))
    assert ok.status == "passed" and ok.grad_rel_distance < 1e-5, ok
    assert ok.loss_compiled == ok.loss_eager
    _install(model, factor=50.0)  # only the backward of every layer is wrong
    bad = compare_compiled_gradients(model.unet, _loss_of(model, batch))
    assert bad.status == "failed" and bad.grad_rel_distance > 1.0, bad
    assert bad.loss_compiled == pytest.approx(bad.loss_eager)  # the loss alone cannot tell
    _install(model, factor=float("nan"))  # non-finite gradients fail too
    nan = compare_compiled_gradients(model.unet, _loss_of(model, batch))
    assert nan.status == "failed" and nan.grad_rel_distance == float("inf"), nan
    # the check leaves the layers as it found them: compiled, with their checkpoint flags
    assert len(compiled_layers(model.unet)) == len(_install(model, factor=50.0))
    assert not any(m.use_checkpoint for m in model.unet.modules() if isinstance(m, VideoLayer))
    # a gradient error of a few percent (0.2 % per layer, compounded through the layers) passes a loose
    # tolerance and fails a tight one
    _install(model, factor=1.002)
    assert compare_compiled_gradients(model.unet, _loss_of(model, batch), tolerance=0.1).status == "passed"
    assert compare_compiled_gradients(model.unet, _loss_of(model, batch), tolerance=1e-3).status == "failed"


def test_a_model_without_upstream_gradients_defers_the_check():
    """A model trained from scratch starts with a zero output layer: no weight upstream of it gets a gradient, so
    compiled and eager agree trivially and the check waits for a later step."""
    model = build_tiny(nonzero=False)
    _install(model, factor=50.0)
    result = compare_compiled_gradients(model.unet, _loss_of(model, make_batch()))
    assert result.status == "deferred" and result.informative_share < 0.5, result


def test_the_engine_drops_compiled_layers_whose_gradients_are_wrong_and_keeps_faithful_ones(caplog):
    batch = make_batch()
    model = build_tiny()
    model._compiled_check_pending = True
    _install(model, factor=50.0)
    with caplog.at_level(logging.WARNING, logger="vwm.models.engine"):
        model.training_step(dict(batch), 0)
    assert not compiled_layers(model.unet) and not model._compiled_check_pending
    assert "FAILED the gradient check" in caplog.text and "compile_model=False" in caplog.text
    # after the fallback the step's gradients are the eager ones
    loss = model.training_step(dict(batch), 0)
    loss.backward()
    eager = build_tiny()
    eager.training_step(dict(batch), 0).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)

    faithful = build_tiny()
    faithful._compiled_check_pending = True
    layers = _install(faithful)
    faithful.training_step(dict(batch), 0)
    assert len(compiled_layers(faithful.unet)) == len(layers) and not faithful._compiled_check_pending


def test_running_out_of_memory_for_the_check_keeps_the_compiled_layers_and_trains_on(monkeypatch, caplog):
    """The check holds two copies of the trainable gradients; where they do not fit, the run warns and goes on."""
    from vwm.training import compiled_check

    def no_memory(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory")

    model = build_tiny()
    model._compiled_check_pending = True
    layers = _install(model)
    monkeypatch.setattr(compiled_check, "compare_compiled_gradients", no_memory)
    with caplog.at_level(logging.WARNING, logger="vwm.models.engine"):
        loss = model.training_step(make_batch(), 0)
    assert torch.isfinite(loss) and len(compiled_layers(model.unet)) == len(layers)
    assert "not verified: out of memory" in caplog.text and model.compiled_check["status"] == "skipped"


def test_compile_model_arms_the_check_and_the_switch_disarms_it():
    assert build_tiny("model.params.compile_model=True")._compiled_check_pending
    assert not build_tiny("model.params.compile_model=True",
                          "model.params.verify_compiled_gradients=False")._compiled_check_pending
    assert not build_tiny()._compiled_check_pending


def test_compile_model_compiles_both_vae_encoders():
    """The clip's VAE encoder and the conditioner's (the condition frame's, every step) are both compiled; without
    compile_model neither is."""
    def encoders(model):
        conditioner = [e.encoder for e in model.conditioner.embedders if hasattr(e, "encoder")]
        assert conditioner, "the tiny config has a conditioner VAE"
        return [model.first_stage_model, *conditioner]

    assert all(m._encode_frames is not None for m in encoders(build_tiny("model.params.compile_model=True")))
    assert all(m._encode_frames is None for m in encoders(build_tiny()))


def test_compiled_layers_build_forward_and_backward_with_vwms_inductor_options():
    """vwm's Inductor options (video_unet.INDUCTOR_OPTIONS: padding and mix-order reduction off, what gave right
    gradients on an H100) reach the forward and, compiled later and out of that scope, the backward graphs;
    `compile_options` in the config (nested as YAML writes it) overrides one of them."""
    from vwm.models import video_unet

    seen = []

    def record(graph):  # noqa: ANN001, ANN202  (a post-grad pass: sees the config each graph compiles under)
        config = torch._inductor.config
        seen.append((config.triton.mix_order_reduction, config.comprehensive_padding, config.shape_padding))

    # config.patch restores the module's entry (monkeypatch's undo would delete it: later compiles then fail)
    with torch._inductor.config.patch(post_grad_custom_post_pass=record):
        for overrides, expected in (((), (False, False, False)),
                                    (("model.params.compile_options={triton: {mix_order_reduction: true}}",),
                                     (True, False, False))):
            torch._dynamo.reset()
            seen.clear()
            model = build_tiny("model.params.compile_model=True", *overrides)
            for layer in compiled_layers(model)[1:]:
                layer.compiled_run = None  # one compiled layer is enough (and quick)
            # the VAE encoders' forward-only graphs (torch's defaults: no gradient is taken) are not compared
            for encoder in (model.first_stage_model,
                            *(e.encoder for e in model.conditioner.embedders if hasattr(e, "encoder"))):
                encoder._encode_frames = None
            model.compute_loss(make_batch(), torch.Generator().manual_seed(3)).loss.backward()
            assert len(seen) >= 2 and set(seen) == {expected}, (overrides, seen)  # forward and backward graphs
            assert torch._inductor.config.triton.mix_order_reduction is True  # the global default is untouched
    torch._dynamo.reset()
    assert torch._inductor.config.post_grad_custom_post_pass is None
    # padding off: what gave the eager gradients on the H100 (docs/performance.md, 2026-12-07)
    assert video_unet.INDUCTOR_OPTIONS == {"comprehensive_padding": False, "shape_padding": False,
                                           "triton.mix_order_reduction": False}


@pytest.mark.slow
def test_torch_compile_passes_the_gradient_check_on_cpu():
    """The real compiler (Inductor's C++ backend) on the tiny model passes, with the checkpoint traced into the
    compiled graphs (the default placement)."""
    model = build_tiny()
    model.unet.set_gradient_checkpointing(True)
    model.unet.compile_layers()
    result = compare_compiled_gradients(model.unet, _loss_of(model, make_batch()),
                                        [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    assert result.status == "passed" and result.grad_rel_distance < 1e-4, result


@pytest.mark.slow
def test_train_py_with_compiled_layers_under_deepspeed_verifies_them_and_trains_compiled(tmp_path):
    """train.py with compile_model=True under DeepSpeed ZeRO-2 (CPU, gloo): the tiny model trains from scratch, so
    its first steps defer the check (a zero output layer, then zero convolutions closing each residual branch, leave
    most weights without a gradient) until one can tell; Inductor's CPU code passes, the
    layers stay compiled, and the check's extra backward leaves DeepSpeed's gradients alone (finite, same loss
    curve as an eager run)."""
    from test_train_cli import ZERO2, _losses, _train

    compiled = _train(tmp_path, "compiled", "--max_steps", "3", ZERO2, "model.params.compile_model=True",
                      timeout=900)
    out = compiled.stdout + compiled.stderr
    assert re.search(r"passed the gradient check at step [12]: relative distance", out), out[-4000:]
    assert re.search(r"compiled layers gradient check at step [12] passed: trained compiled", out)  # the summary
    assert "FAILED" not in out
    _train(tmp_path, "eager", "--max_steps", "3", ZERO2)
    got, want = _losses(tmp_path / "compiled"), _losses(tmp_path / "eager")
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
