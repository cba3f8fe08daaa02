"""First-stage autoencoder: state-dict contract, posterior sampling, temporal decoder, chunked video I/O."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from einops import rearrange
from omegaconf import OmegaConf
from torch import nn

from vwm.config import instantiate, resolve_aliases, validate
from vwm.models.autoencoder import AutoencoderKLModeOnly, AutoencodingEngine, DiagonalGaussianRegularizer
from vwm.models.vae_networks import AttnBlock, DecoderVideoResBlock, Encoder, ResnetBlock, VideoDecoder

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CONFIGS = {
    "vista_inference": "inference__vista.yaml",
    "vista_phase1": "training__vista_phase1.yaml",
    "vista_phase2_stage1": "training__vista_phase2_stage1.yaml",
}
_SHARED = dict(
    ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0, resolution=32, z_channels=4,
    attn_type="vanilla",
)
TINY_ENCODER = dict(_SHARED, in_channels=3, double_z=True)
TINY_DECODER = dict(_SHARED, out_ch=3)
TINY_DDCONFIG = dict(_SHARED, in_channels=3, out_ch=3, double_z=True)
"""The reference's shared encoder/decoder parameter set (`ddconfig`), as its YAMLs give it."""


def build_reference_node(node, path="first_stage_config"):
    """A reference `{target, params}` node built through the config layer: alias tables, validation, PARAM_ALIASES."""
    cfg = OmegaConf.create(node)
    resolve_aliases(cfg)
    validate(cfg, path)
    return instantiate(cfg, path)


def shapes(module: nn.Module, prefix: str) -> dict[str, list[int]]:
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


def tiny_engine(**video_params) -> AutoencodingEngine:
    """Tiny VAE whose zero-initialised temporal convs and mix factors are randomised (time mixing visible)."""
    video_params.setdefault("video_kernel_size", [3, 1, 1])
    decoder = VideoDecoder(**TINY_DECODER, **video_params)
    engine = AutoencodingEngine(Encoder(**TINY_ENCODER), decoder, DiagonalGaussianRegularizer())
    with torch.no_grad():
        for name, p in engine.named_parameters():
            if "time_stack.out_layers.3" in name:
                p.normal_(0.0, 0.05)
            elif name.endswith("mix_factor"):
                p.uniform_(-1.0, 1.0)
    return engine.eval()


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_state_dict_contract(config):
    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(DATA_DIR, "reference_configs", CONFIGS[config])))
    with torch.device("meta"):
        model = build_reference_node(cfg["model"]["params"]["first_stage_config"])
    with open(os.path.join(DATA_DIR, "vista_state_dict.json")) as f:
        reference = json.load(f)[config]
    expected = {k: v for k, v in reference.items() if k.startswith("first_stage_model.")}
    assert shapes(model, "first_stage_model.") == expected
    assert len(expected) == 106 + 266


def test_encode_decode_shapes():
    engine = tiny_engine()
    x = torch.rand(6, 3, 16, 24) * 2 - 1
    z = engine.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (6, 4, 8, 12)
    assert engine.decode(z, timesteps=3).shape == (6, 3, 16, 24)
    video = x.view(2, 3, 3, 16, 24)
    zv = engine.encode_video(video, chunk_size=4, generator=torch.Generator().manual_seed(0))
    assert zv.shape == (2, 3, 4, 8, 12)
    assert engine.decode_video(zv, chunk_size=2, overlap=1).shape == (2, 3, 3, 16, 24)


def test_posterior_sampling_uses_only_the_generator():
    reg = DiagonalGaussianRegularizer()
    moments = torch.randn(3, 8, 5, 5)
    a = reg(moments, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # the global RNG must not matter
    b = reg(moments, generator=torch.Generator().manual_seed(1))
    c = reg(moments, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="generator"):
        reg(moments)


def test_posterior_mode_and_sample_statistics():
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.full_like(mean, -100.0)  # clamped to -30: std = exp(-15)
    moments = torch.cat([mean, logvar], dim=1)
    assert torch.equal(DiagonalGaussianRegularizer(sample=False)(moments), mean)
    sample = DiagonalGaussianRegularizer()(moments, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, mean, atol=1e-5, rtol=0)
    log_var = 2 * math.log(2.0)  # std 2
    moments = torch.cat([torch.full((1, 4, 64, 64), 3.0), torch.full((1, 4, 64, 64), log_var)], dim=1)
    draws = DiagonalGaussianRegularizer()(moments, generator=torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 3.0) < 0.1 and abs(draws.std().item() - 2.0) < 0.1


def test_encode_video_is_per_frame_and_chunk_invariant():
    engine = tiny_engine()
    video = torch.rand(2, 5, 3, 16, 16) * 2 - 1
    a = engine.encode_video(video, chunk_size=2, generator=torch.Generator().manual_seed(3))
    b = engine.encode_video(video, chunk_size=7, generator=torch.Generator().manual_seed(3))
    frames = rearrange(video, "b t c h w -> (b t) c h w")
    flat = engine.encode(frames, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, rearrange(flat, "(b t) c h w -> b t c h w", b=2))


def reference_decode(engine: AutoencodingEngine, z: torch.Tensor, n: int, overlap: int = 3) -> torch.Tensor:
    """The reference's decode_first_stage loop on flat frames (valid for n - overlap >= overlap)."""
    outs = []
    if overlap < n:
        previous = z[:overlap]
        for current in z[overlap:].split(n - overlap):
            context = torch.cat([previous, current])
            previous = current[-overlap:]
            out = engine.decode(context, timesteps=context.shape[0])
            if outs:
                outs[-1][-overlap:] = (outs[-1][-overlap:] + out[:overlap]) / 2
                outs.append(out[overlap:])
            else:
                outs.append(out)
    else:
        outs = [engine.decode(chunk, timesteps=chunk.shape[0]) for chunk in z.split(n)]
    return torch.cat(outs)


@pytest.mark.parametrize("frames,chunk", [(25, 14), (25, 1), (25, 6), (10, 14), (9, 3)])
def test_decode_video_matches_reference_loop(frames, chunk):
    engine = tiny_engine()
    z = torch.randn(1, frames, 4, 4, 4)
    with torch.no_grad():
        ours = engine.decode_video(z, chunk_size=chunk, overlap=3)
        expected = reference_decode(engine, z[0], chunk)
    torch.testing.assert_close(ours[0], expected)


def test_decode_video_overlap_by_hand_and_per_clip():
    engine = tiny_engine()
    z = torch.randn(2, 25, 4, 4, 4)
    with torch.no_grad():
        out = engine.decode_video(z, chunk_size=14, overlap=3)
        for clip in range(2):
            first = engine.decode(z[clip, :14], timesteps=14)
            second = engine.decode(z[clip, 11:], timesteps=14)
            expected = torch.cat([first[:11], (first[11:] + second[:3]) / 2, second[3:]])
            torch.testing.assert_close(out[clip], expected)


def test_decode_video_short_windows_and_short_clips():
    engine = tiny_engine()
    z = torch.randn(1, 7, 4, 4, 4)
    with torch.no_grad():
        out = engine.decode_video(z, chunk_size=4, overlap=2)  # windows start at 0, 2, 4
        d = [engine.decode(z[0, s:s + 4], timesteps=min(4, 7 - s)) for s in (0, 2, 4)]
        expected = torch.cat([d[0][:2], (d[0][2:] + d[1][:2]) / 2, d[1][2:], d[2][2:]])
        expected[4:6] = (d[1][2:] + d[2][:2]) / 2
        torch.testing.assert_close(out[0], expected)
        short = engine.decode_video(z[:, :2], chunk_size=14, overlap=3)  # fewer frames than the overlap
        torch.testing.assert_close(short[0], engine.decode(z[0, :2], timesteps=2))
    with pytest.raises(ValueError, match="chunk_size"):
        engine.decode_video(z, chunk_size=0)
    with pytest.raises(ValueError, match="B, T"):
        engine.decode_video(z[0], chunk_size=2)


def test_video_decoder_mixes_neighbouring_frames_only_within_a_clip():
    engine = tiny_engine()
    z = torch.randn(2 * 4, 4, 4, 4)
    bumped = z.clone()
    bumped[0] += 1.0  # clip 0, frame 0
    with torch.no_grad():
        base, moved = engine.decode(z, timesteps=4), engine.decode(bumped, timesteps=4)
        assert not torch.allclose(base[1], moved[1])  # frame 1 of the same clip sees frame 0
        torch.testing.assert_close(base[4:], moved[4:])  # the other clip does not
        single, single_moved = engine.decode(z, timesteps=1), engine.decode(bumped, timesteps=1)
        torch.testing.assert_close(single[1:], single_moved[1:])  # one frame per clip: no mixing
        engine.decoder.mid.block_1.mix_factor.fill_(4.0)
        assert not torch.allclose(engine.decode(z, timesteps=4), base)


def test_video_res_block_weights_the_temporal_branch_by_alpha():
    block = DecoderVideoResBlock(32, 32, 0.0, [3, 1, 1], alpha=0.7, merge_strategy="learned")
    with torch.no_grad():
        block.time_stack.out_layers[3].weight.normal_(0.0, 0.1)
        x = torch.randn(2 * 3, 32, 4, 4)
        spatial = rearrange(ResnetBlock.forward(block, x), "(b t) c h w -> b c t h w", t=3)
        temporal = block.time_stack(spatial)
        alpha = torch.sigmoid(torch.tensor(0.7))
        expected = rearrange(alpha * temporal + (1 - alpha) * spatial, "b c t h w -> (b t) c h w")
        torch.testing.assert_close(block(x, timesteps=3), expected)
    fixed = DecoderVideoResBlock(32, 32, 0.0, 3, alpha=0.25, merge_strategy="fixed")
    assert "mix_factor" in dict(fixed.named_buffers())
    assert fixed.time_stack.in_layers[2].kernel_size == (3, 3, 3)


def test_attention_is_single_head_softmax():
    block = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (rearrange(m(h), "n c h w -> n (h w) c") for m in (block.q, block.k, block.v))
        weights = torch.softmax(q @ k.transpose(1, 2) / 32**0.5, dim=-1)
        expected = x + block.proj_out(rearrange(weights @ v, "n (h w) c -> n c h w", h=3))
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_invalid_options_are_reported():
    with pytest.raises(ValueError, match="time_mode='all'"):
        VideoDecoder(**TINY_DECODER, time_mode="all")
    with pytest.raises(ValueError, match="merge_strategy"):
        VideoDecoder(**TINY_DECODER, merge_strategy="learned_with_images")
    with pytest.raises(ValueError, match="attn_type='linear'"):
        Encoder(**{**TINY_ENCODER, "attn_type": "linear"})
    with pytest.raises(ValueError, match="timesteps=3"):
        VideoDecoder(**TINY_DECODER)(torch.randn(4, 4, 4, 4), timesteps=3)
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        AutoencoderKLModeOnly(embed_dim=4, ddconfig={**TINY_DDCONFIG, "bogus": 1})


def test_mode_only_autoencoder_returns_the_posterior_mode():
    ddconfig = {**TINY_DDCONFIG, "attn_type": "vanilla-xformers"}
    params = {"embed_dim": 4, "ddconfig": ddconfig, "monitor": "val/rec_loss",
              "loss_config": {"target": "torch.nn.Identity"}}  # the reference's dead keys, dropped by the config
    vae = build_reference_node({"target": "vwm.models.autoencoder.AutoencoderKLModeOnly", "params": params})
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        torch.testing.assert_close(z, vae.quant_conv(vae.encoder(x))[:, :4])
        assert torch.equal(z, vae.encode(x))
        assert vae.decode(z).shape == (3, 3, 16, 16)


def test_block_dct_first_stage_is_exactly_invertible_and_normalises_each_frequency():
    """BlockDCTAutoencoder: orthonormal per-block DCT (energy kept, DC = patch x block mean), each channel divided
    by its channel_std, decode the exact inverse; no state-dict entries; block_dct_std gives unit-std channels on
    the frames it was measured on."""
    from vwm.models.autoencoder import BlockDCTAutoencoder, block_dct_std, dct_matrix

    m = dct_matrix(4)
    torch.testing.assert_close(m @ m.T, torch.eye(4), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(6, 3, 4, 5, generator=g), size=(16, 20), mode="bilinear")
    x = (smooth + 0.05 * torch.randn(6, 3, 16, 20, generator=g)).clamp(0, 1) * 2 - 1  # mostly low frequencies
    plain = BlockDCTAutoencoder(4, 3)
    z = plain.encode(x)
    assert z.shape == (6, 48, 4, 5) and plain.state_dict() == {}
    torch.testing.assert_close(z.pow(2).sum(), x.pow(2).sum(), rtol=1e-5, atol=0)  # orthonormal
    torch.testing.assert_close(z[:, 0], 4 * torch.nn.functional.avg_pool2d(x, 4)[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(plain.decode(z), x, rtol=0, atol=1e-5)

    std = block_dct_std(x, floor=1e-4)
    assert std[0] > 5 * std[15]  # the DC coefficient spreads far more than the finest frequency
    scaled = BlockDCTAutoencoder(4, 3, std)
    zs = scaled.encode(x)
    unit = zs.transpose(0, 1).reshape(48, -1).std(dim=1)
    torch.testing.assert_close(unit, torch.ones(48), rtol=2e-3, atol=0)
    torch.testing.assert_close(scaled.decode(zs), x, rtol=0, atol=1e-5)
    video = x[None].expand(2, 6, 3, 16, 20)
    torch.testing.assert_close(scaled.decode_video(scaled.encode_video(video, 3), 3), video, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="channel_std needs 48 positive values"):
        BlockDCTAutoencoder(4, 3, [1.0] * 47)
    with pytest.raises(ValueError, match="channel_std needs 48 positive values"):
        BlockDCTAutoencoder(4, 3, [0.0] * 48)


def test_block_dct_variant_config_channel_std_is_what_block_dct_std_measures():
    """configs/demo/toyworld_dct.yaml (a measured demo variant, docs/toyworld.md) lists the channel_std that its
    header says how to measure; both of its first stages use it."""
    from vwm.config import load_config
    from vwm.data.toyworld import ToyWorldSubset
    from vwm.models.autoencoder import BlockDCTAutoencoder, block_dct_std

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "demo", "toyworld_dct.yaml"))
    stage = cfg.model.params.first_stage_config
    cond = next(e for e in cfg.model.params.conditioner_config.params.emb_models if e.input_key == "cond_frames")
    assert stage.target.endswith("BlockDCTAutoencoder") and cond.params.encoder_config == stage
    data = ToyWorldSubset(8, 64, 64, length=1000, seed=3, policy="explore")
    frames = torch.cat([data.load_clip(i).frames for i in range(48)]).float() / 127.5 - 1
    torch.testing.assert_close(torch.tensor(list(stage.params.channel_std)), torch.tensor(block_dct_std(frames)),
                               rtol=0, atol=1e-4)
    assert isinstance(instantiate(stage), BlockDCTAutoencoder)
    from vwm.config import build_model
    from vwm.training.flops import estimate_for_config

    assert build_model(cfg, device="meta").first_stage_model.channel_std.is_meta  # what --dry-run builds
    estimate = estimate_for_config(cfg, world_size=1)
    assert estimate.total > 0 and estimate.vae_encode == 0  # a block first stage keeps no encoder activations
