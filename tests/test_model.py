"""Model core: state-dict contract, tiny-model behaviour, adapters, loading rules (DESIGN.md §5 layers 1-3, 5)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import DATA, REFERENCE_CONFIGS, REPO, build_tiny, make_batch, tiny_config
from safetensors.torch import save_file

from vwm.checkpoint import CheckpointError, load_weights, merge_lora
from vwm.config import build_model, load_config

CONTRACT = json.load(open(os.path.join(DATA, "vista_state_dict.json")))


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("model_ema.")}


def _model_only(cfg_path: str):
    """Load a config and build its model on the meta device (the data/lightning sections are not needed)."""
    cfg = load_config(cfg_path)
    return build_model(cfg, device="meta")


@pytest.mark.parametrize(
    "config, layout",
    [
        (os.path.join(REFERENCE_CONFIGS, "inference__vista.yaml"), "vista_inference"),
        (os.path.join(REFERENCE_CONFIGS, "training__vista_phase1.yaml"), "vista_phase1"),
        (os.path.join(REFERENCE_CONFIGS, "training__vista_phase2_stage1.yaml"), "vista_phase2_stage1"),
        (os.path.join(REPO, "configs", "inference", "vista.yaml"), "vista_inference"),
        (os.path.join(REPO, "configs", "inference", "svd_xt.yaml"), "svd_xt_derived"),
        (os.path.join(REPO, "configs", "training", "vista_phase1.yaml"), "vista_phase1"),
        (os.path.join(REPO, "configs", "training", "vista_phase2_stage1.yaml"), "vista_phase2_stage1"),
    ],
)
def test_full_size_state_dict_contract(config, layout):
    ours = _shapes(_model_only(config))
    expected = CONTRACT[layout]
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}


def test_ema_keeps_reference_buffer_names_for_trained_weights():
    model = _model_only(os.path.join(REPO, "configs", "training", "vista_phase1.yaml"))
    ema = {k for k in model.state_dict() if k.startswith("model_ema.")}
    assert {"model_ema.decay", "model_ema.num_updates"} <= ema
    assert "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn1to_qweight" in ema
    trained = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert len(ema) == len(trained) + 2


def test_peft_mode_freezes_everything_but_adapters():
    model = _model_only(os.path.join(REPO, "configs", "training", "vista_phase2_stage1.yaml"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("adapter" in n for n in trainable)
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    assert not any(p.requires_grad for p in model.conditioner.parameters())


def test_tiny_forward_backward_shapes_and_gradient_flow():
    model = build_tiny()
    batch = make_batch()
    out = model.compute_loss(batch, torch.Generator().manual_seed(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n: p for n, p in model.model.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_inert_single_token_query_key_params_are_frozen():
    model = build_tiny()
    inert = set(model.inert_parameter_names())
    assert any(".attn2.to_k." in n for n in inert) and any("k_adapter_action_control" in n for n in inert)
    assert not any(".attn1." in n for n in inert)
    params = dict(model.model.named_parameters())
    assert all(not params[n].requires_grad for n in inert)


def test_gradient_checkpointing_gives_identical_loss_and_gradients():
    batch = make_batch()
    results = []
    for ckpt in (False, True):
        model = build_tiny()
        model.unet.set_gradient_checkpointing(ckpt)
        loss = model.compute_loss(batch, torch.Generator().manual_seed(3)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.model.named_parameters() if p.grad is not None}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=0, atol=1e-6)


def test_training_loss_is_deterministic_in_the_generator():
    model = build_tiny()
    batch = make_batch()
    a = model.compute_loss(batch, torch.Generator().manual_seed(5)).loss
    b = model.compute_loss(batch, torch.Generator().manual_seed(5)).loss
    c = model.compute_loss(batch, torch.Generator().manual_seed(6)).loss
    assert torch.equal(a, b) and not torch.equal(a, c)


def _network_output(model, batch, actions: dict | None = None):
    cond, _ = model.get_conditioning({**batch, **(actions or {})})
    z = torch.randn(2, 5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 2.0)
    return model.denoiser(model.model, z, sigma, cond)


@torch.no_grad()
def test_action_control_starts_as_a_no_op_and_then_conditions():
    model = build_tiny(nonzero=False)
    batch = make_batch()
    with torch.no_grad():
        for _, p in model.unet.named_parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)  # wake up zero-init output layers, but keep the action projections at zero
        for name, p in model.unet.named_parameters():
            if "action_control" in name:
                p.zero_()
    base = _network_output(model, batch)
    other = _network_output(model, batch, {"trajectory": batch["trajectory"] + 5.0})
    assert torch.equal(base, other)  # zero-initialised adapters: actions cannot matter yet
    for name, p in model.unet.named_parameters():
        if "action_control" in name:
            p.normal_(0, 0.02)
    base = _network_output(model, batch)
    other = _network_output(model, batch, {"trajectory": batch["trajectory"] + 5.0})
    assert not torch.allclose(base, other)
    masked = dict(batch, action_mask=torch.zeros(2, 5, dtype=torch.bool))
    no_actions = {k: v for k, v in batch.items() if k not in ("command", "trajectory", "speed", "angle", "goal", "action_mask")}
    torch.testing.assert_close(_network_output(model, masked), _network_output(model, no_actions))


@torch.no_grad()
def test_lora_merge_equals_unmerged_output():
    model = build_tiny("model.params.network_config.params.add_lora=true")
    for name, p in model.unet.named_parameters():
        if "adapter_up" in name:
            p.normal_(0, 0.05)
    batch = make_batch()
    expected = _network_output(model, batch)
    merged_sd, count = merge_lora(model.state_dict(), scale=model.unet.input_blocks[1][1].transformer_blocks[0].attn1.lora_scale)
    assert count > 0
    plain = build_tiny()
    load_weights(plain, merged_sd)
    torch.testing.assert_close(_network_output(plain, batch), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_safetensors_roundtrip_loads_strictly_and_is_deterministic(tmp_path):
    source = build_tiny(seed=1)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("model_ema.")}, str(path))
    target = build_tiny(seed=2)
    report = load_weights(target, path)
    assert report.initialised == {}
    batch = make_batch()
    a, b = _network_output(target, batch), _network_output(target, batch)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, _network_output(source, batch))


def test_svd_layout_into_vista_phase2_reports_exactly_the_allowed_missing_keys(tmp_path):
    svd = build_tiny("model.params.network_config.params.action_control=false",
                     "model.params.network_config.params.separate_cond_time_embed=false", seed=1)
    svd_sd = {k: v for k, v in svd.state_dict().items() if not k.startswith(("model_ema.", "conditioner.embedders.5",
              "conditioner.embedders.6", "conditioner.embedders.7", "conditioner.embedders.8", "conditioner.embedders.9"))}
    vista = build_tiny("model.params.network_config.params.add_lora=true", seed=2)
    report = load_weights(vista, svd_sd)
    assert set(report.initialised) == {"cond_time_stack_embed", "action_control", "lora"}
    sd = vista.state_dict()
    for key in report.initialised["cond_time_stack_embed"]:
        assert torch.equal(sd[key], svd_sd[key.replace("cond_time_stack_embed", "time_embed")])
    assert all(not sd[k].any() for k in report.initialised["action_control"])
    assert all(not sd[k].any() for k in report.initialised["lora"] if "adapter_up" in k)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_weights(build_tiny(), svd_sd, allow_missing=("lora",))


def test_unexpected_and_mismatched_keys_are_errors():
    model = build_tiny()
    sd = dict(model.state_dict())
    with pytest.raises(CheckpointError, match="unexpected keys.*model.diffusion_model.bogus"):
        load_weights(model, {**sd, "model.diffusion_model.bogus": torch.zeros(1)})
    bad = dict(sd)
    bad["model.diffusion_model.out.2.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match="shape mismatch.*out.2.bias"):
        load_weights(model, bad)
    nan = dict(sd)
    nan["model.diffusion_model.out.2.bias"] = torch.full_like(sd["model.diffusion_model.out.2.bias"], float("nan"))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_weights(model, nan)


def test_tiny_sampling_runs_and_replaces_condition_frames():
    model = build_tiny()
    batch = make_batch(b=1)
    cond, uc = model.get_conditioning(batch)
    z = model.encode_first_stage(batch["img_seq"], generator=torch.Generator().manual_seed(0))
    mask = model.cond_mask_for(1, 5, [0, 1])
    out = model.sample(cond, uc, z.shape, cond_frame=z, cond_mask=mask, generator=torch.Generator().manual_seed(0))
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert torch.equal(out[:, :2], z[:, :2])


def test_config_errors_name_the_dotted_key(tmp_path):
    with pytest.raises(ValueError, match=r"network_config\.params\.channel_mul: unknown parameter.*allowed: .*channel_mult"):
        load_config(os.path.join(REPO, "configs", "tiny", "model.yaml"),
                    ["model.params.network_config.params.channel_mul=[1,2]"])
    with pytest.raises(ValueError, match=r"network_config\.params\.model_channels: expected int, got 'wide'"):
        load_config(os.path.join(REPO, "configs", "tiny", "model.yaml"),
                    ["model.params.network_config.params.model_channels=wide"])
    with pytest.raises(ValueError, match=r"targets must live in vwm"):
        cfg = tmp_path / "evil.yaml"
        cfg.write_text("model:\n  target: os.system\n  params: {}\n")
        load_config(str(cfg))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_overrides_index_lists_and_parse_values():
    demo = os.path.join(REPO, "configs", "demo", "toyworld.yaml")
    emb = "model.params.conditioner_config.params.emb_models"
    cfg = load_config(demo, [f"{emb}.5.ucg_rate=0.25", "data.params.batch_size=3",
                             "model.params.network_config.params.attention_resolutions=[1, 2]",
                             "lightning.trainer.max_steps=null"])
    assert cfg.model.params.conditioner_config.params.emb_models[5].ucg_rate == 0.25
    assert cfg.model.params.conditioner_config.params.emb_models[6].ucg_rate == 0.1  # others untouched
    assert cfg.data.params.batch_size == 3 and cfg.lightning.trainer.max_steps is None
    assert list(cfg.model.params.network_config.params.attention_resolutions) == [1, 2]
    for bad in ("data.params.batch_size", "=3", "a..b=1", f"{emb}.99.ucg_rate=0.1"):
        with pytest.raises(ValueError, match="override"):
            load_config(demo, [bad])


def test_reference_only_params_are_accepted_and_derived_ones_dropped():
    cfg = load_config(os.path.join(REFERENCE_CONFIGS, "inference__vista.yaml"))
    assert cfg.model.target == "vwm.models.engine.DiffusionEngine"
    assert "num_frames" not in cfg.model.params.denoiser_config.params
    assert tiny_config().model.params.num_frames == 5


def test_disable_first_stage_autocast_keeps_the_vae_out_of_autocast():
    """The reference's `disable_first_stage_autocast` (True in every SVD/Vista config): under autocast (Lightning's
    bf16-mixed without DeepSpeed) the VAE encodes and decodes in its weights' fp32, exactly as without autocast;
    with the switch off it runs in bf16. The same for the condition-frame embedder's `disable_encoder_autocast`."""
    model = build_tiny()
    assert model.disable_first_stage_autocast  # the tiny config keeps the reference's setting
    x = make_batch(b=1)["img_seq"]
    plain = model.encode_first_stage(x, generator=torch.Generator().manual_seed(0))
    frames = model.decode_first_stage(plain)
    for disabled in (True, False):
        model.disable_first_stage_autocast = disabled
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = model.encode_first_stage(x, generator=torch.Generator().manual_seed(0))
            out = model.decode_first_stage(plain)
        if disabled:
            torch.testing.assert_close(z, plain, rtol=0, atol=0)
            torch.testing.assert_close(out, frames, rtol=0, atol=0)
        else:
            assert not torch.equal(z, plain) and not torch.equal(out.float(), frames)
    # the condition-frame embedder's own switch (disable_encoder_autocast) goes through the same helper
    from vwm.models.conditioner import VideoPredictionEmbedderWithEncoder

    embedder = next(e for e in model.conditioner.embedders if isinstance(e, VideoPredictionEmbedderWithEncoder))
    cond = x[:, 0]
    with torch.no_grad():
        reference = embedder(cond)
        for disabled in (True, False):
            embedder.disable_encoder_autocast = disabled
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = embedder(cond)
            assert torch.equal(got, reference) == disabled


@pytest.mark.slow
def test_compiled_layers_checkpointed_in_eager_code_compile_one_graph_per_layer_shape_under_a_mixed_plan():
    """use_checkpoint: auto checkpoints some layers and stores others. With the checkpoint in eager code around the
    compiled math (checkpoint_in_graph=False) the plan changes no compiled graph: a mixed plan compiles exactly the
    graphs of a plan without checkpointing, where the checkpoint traced into the graph (the default) compiles
    more, one set per flag (tiny config: 9 against 11)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    batch = make_batch()

    def graphs(in_graph: bool, mixed: bool) -> int:
        torch._dynamo.reset()
        counters.clear()
        model = build_tiny()
        layers = [m for m in model.unet.modules() if hasattr(m, "video_forward")]
        for i, layer in enumerate(layers):
            layer.use_checkpoint = mixed and i % 2 == 0
        model.unet.compile_layers(checkpoint_in_graph=in_graph)
        model.compute_loss(batch, torch.Generator().manual_seed(3)).loss.backward()
        return int(counters["stats"]["unique_graphs"])

    plain = graphs(in_graph=False, mixed=False)
    assert plain > 0
    assert graphs(in_graph=False, mixed=True) == plain
    assert graphs(in_graph=True, mixed=True) > plain
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_layers_match_eager_with_and_without_checkpointing():
    """compile_model (regional torch.compile of every res block and transformer, and of the VAE encoder) computes
    the same loss and gradients as eager code, also when checkpointing recomputes through the compiled layers, with
    the checkpoint traced into the compiled graph or applied in eager code around it; the state dict is unchanged."""
    batch = make_batch()
    eager = build_tiny()
    keys = set(eager.state_dict())
    loss = eager.compute_loss(batch, torch.Generator().manual_seed(3)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in eager.model.named_parameters() if p.grad is not None}
    for ckpt, in_graph in ((False, True), (True, True), (True, False)):
        model = build_tiny()
        model.load_state_dict(eager.state_dict())
        model.unet.set_gradient_checkpointing(ckpt)
        model.unet.compile_layers(checkpoint_in_graph=in_graph)
        model.first_stage_model.compile_encoder()  # what compile_model also does to the VAE encoders
        for embedder in model.conditioner.embedders:
            if hasattr(getattr(embedder, "encoder", None), "compile_encoder"):
                embedder.encoder.compile_encoder()
        assert set(model.state_dict()) == keys
        layers = [m for m in model.unet.modules() if getattr(m, "compiled_run", None) is not None]
        assert layers, "no layer was compiled"
        out = model.compute_loss(batch, torch.Generator().manual_seed(3)).loss
        out.backward()
        torch.testing.assert_close(out, loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            got = dict(model.model.named_parameters())[name].grad
            torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
