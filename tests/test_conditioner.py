"""Conditioner: state-dict contract, output layout, dropout, action masks, freezing, OpenCLIP weights."""

from __future__ import annotations

import copy
import json
import math
import os
import socket

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from vwm.actions import ACTION_KEYS
from vwm.config import instantiate, resolve_aliases, validate
from vwm.models.autoencoder import AutoencoderKLModeOnly
from vwm.models.conditioner import (
    CLIP_MEAN,
    CLIP_STD,
    ConcatTimestepEmbedderND,
    Embedder,
    FrozenOpenCLIPImageEmbedder,
    FrozenOpenCLIPImagePredictionEmbedder,
    GeneralConditioner,
    VideoPredictionEmbedderWithEncoder,
)

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CONFIGS = {
    "vista_inference": "inference__vista.yaml",
    "vista_phase1": "training__vista_phase1.yaml",
    "vista_phase2_stage1": "training__vista_phase2_stage1.yaml",
}
TINY_CLIP = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 28, "layers": 1, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 32, "heads": 2, "layers": 1},
}
TINY_VAE = dict(
    ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0, in_channels=3,
    resolution=32, z_channels=4, double_z=True, attn_type="vanilla-xformers",
)


def build_reference_node(node, path="conditioner_config"):
    """A reference `{target, params}` node built through the config layer: alias tables, validation, PARAM_ALIASES."""
    cfg = OmegaConf.create(node)
    resolve_aliases(cfg)
    validate(cfg, path)
    return instantiate(cfg, path)


def conditioner_node(config: str) -> dict:
    cfg = OmegaConf.load(os.path.join(DATA_DIR, "reference_configs", CONFIGS[config]))
    return OmegaConf.to_container(cfg)["model"]["params"]["conditioner_config"]


def tiny_conditioner(config: str = "vista_inference") -> GeneralConditioner:
    """The reference conditioner config with a tiny CLIP (embed_dim 1024) and a tiny VAE."""
    node = conditioner_node(config)
    emb = node["params"]["emb_models"]
    emb[0]["params"]["open_clip_embedding_config"]["params"]["model_cfg"] = copy.deepcopy(TINY_CLIP)
    emb[3]["params"]["encoder_config"]["params"]["ddconfig"] = dict(TINY_VAE)
    return build_reference_node(node)


def full_batch(b: int = 2, size: int = 32) -> dict[str, torch.Tensor]:
    frame = torch.rand(b, 3, size, size) * 2 - 1
    return {
        "cond_frames_without_noise": frame, "cond_frames": frame, "cond_aug": torch.zeros(b),
        "fps_id": torch.full((b,), 9.0), "motion_bucket_id": torch.full((b,), 127.0),
        "command": torch.randint(0, 4, (b, 1)).float(), "trajectory": torch.randn(b, 8),
        "speed": torch.rand(b, 4), "angle": torch.randn(b, 4) * 0.1, "goal": torch.rand(b, 2),
    }


def scalar_conditioner(rates: dict[str, float]) -> GeneralConditioner:
    return GeneralConditioner([
        ConcatTimestepEmbedderND(outdim=8, input_key=key, ucg_rate=rate) for key, rate in rates.items()
    ])


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_state_dict_contract(config):
    with torch.device("meta"):
        conditioner = build_reference_node(conditioner_node(config))
    with open(os.path.join(DATA_DIR, "vista_state_dict.json")) as f:
        reference = json.load(f)[config]
    expected = {k: v for k, v in reference.items() if k.startswith("conditioner.")}
    ours = {"conditioner." + k: list(v.shape) for k, v in conditioner.state_dict().items()}
    assert ours == expected
    assert sum(k.startswith("conditioner.embedders.0.open_clip.model.") for k in ours) == 398
    assert sum(k.startswith("conditioner.embedders.3.encoder.") for k in ours) == 248


def test_output_layout_and_widths():
    conditioner = tiny_conditioner()
    batch = full_batch()
    c = conditioner(batch)
    assert c["vector"].shape == (2, 768)
    assert c["crossattn"].shape == (2, 1, 1024 + 2432)
    assert c["concat"].shape == (2, 4, 16, 16)
    clip = conditioner.embedders[0](batch["cond_frames_without_noise"])
    torch.testing.assert_close(c["crossattn"][:, :, :1024], clip)
    torch.testing.assert_close(c["crossattn"][:, 0, 1024 + 128:1024 + 128 + 1024],
                               conditioner.embedders[6](batch["trajectory"])[:, 0])
    torch.testing.assert_close(c["vector"][:, 256:512], conditioner.embedders[2](batch["motion_bucket_id"]))


def test_ucg_dropout_statistics_and_determinism():
    conditioner = scalar_conditioner({"fps_id": 0.3, "motion_bucket_id": 0.5, "cond_aug": 0.0})
    n = 4000
    batch = {"fps_id": torch.full((n,), 9.0), "motion_bucket_id": torch.full((n,), 127.0),
             "cond_aug": torch.ones(n)}
    out = conditioner(batch, generator=torch.Generator().manual_seed(0))["vector"]
    dropped = [(out[:, i * 8:(i + 1) * 8] == 0).all(dim=1) for i in range(3)]
    assert abs(dropped[0].float().mean().item() - 0.3) < 0.03
    assert abs(dropped[1].float().mean().item() - 0.5) < 0.03
    assert not dropped[2].any()
    both = (dropped[0] & dropped[1]).float().mean().item()
    assert abs(both - 0.15) < 0.03  # independent draws per embedder
    torch.manual_seed(99)  # the global RNG plays no part
    again = conditioner(batch, generator=torch.Generator().manual_seed(0))["vector"]
    other = conditioner(batch, generator=torch.Generator().manual_seed(1))["vector"]
    assert torch.equal(out, again) and not torch.equal(out, other)
    with pytest.raises(ValueError, match="generator"):
        conditioner(batch)


def test_action_mask_zeroes_exactly_the_masked_samples():
    conditioner = tiny_conditioner()
    batch = full_batch(b=4)
    full = conditioner(batch)["crossattn"]
    mask = torch.ones(4, len(ACTION_KEYS), dtype=torch.bool)
    mask[1, ACTION_KEYS.index("trajectory")] = False
    mask[2] = False
    masked = conditioner({**batch, "action_mask": mask})["crossattn"]
    widths = [128, 1024, 512, 512, 256]
    start = 1024
    for col, width in enumerate(widths):
        part, ref = masked[:, 0, start:start + width], full[:, 0, start:start + width]
        for sample in range(4):
            if mask[sample, col]:
                torch.testing.assert_close(part[sample], ref[sample])
            else:
                assert torch.count_nonzero(part[sample]) == 0
        start += width
    torch.testing.assert_close(masked[:, :, :1024], full[:, :, :1024])


def test_missing_action_keys_give_zero_embeddings():
    conditioner = GeneralConditioner([
        ConcatTimestepEmbedderND(outdim=16, input_key="fps_id"),
        ConcatTimestepEmbedderND(outdim=128, num_features=1, add_sequence_dim=True, input_key="command"),
        ConcatTimestepEmbedderND(outdim=128, num_features=8, add_sequence_dim=True, input_key="trajectory"),
    ])
    c = conditioner({"fps_id": torch.full((3,), 9.0), "trajectory": torch.randn(3, 8)})
    assert c["crossattn"].shape == (3, 1, 128 + 1024)
    assert torch.count_nonzero(c["crossattn"][..., :128]) == 0
    assert torch.count_nonzero(c["crossattn"][..., 128:]) > 0
    actions_only = GeneralConditioner([conditioner.embedders[1]])
    out = actions_only({"img_seq": torch.zeros(5, 2, 3, 4, 4)})["crossattn"]  # batch size from any tensor
    assert out.shape == (5, 1, 128) and torch.count_nonzero(out) == 0
    with pytest.raises(ValueError, match="batch size"):
        actions_only({"note": "no tensors"})


def test_missing_non_action_key_is_an_error():
    conditioner = tiny_conditioner()
    batch = full_batch()
    del batch["motion_bucket_id"]
    with pytest.raises(ValueError, match="'motion_bucket_id'.*embedder 2"):
        conditioner(batch)


def test_force_zero_embeddings_and_unconditional_conditioning():
    conditioner = tiny_conditioner("vista_phase2_stage1")  # ucg_rate 0.15 on CLIP, VAE and actions
    batch = full_batch()
    zero = ["cond_frames", "cond_frames_without_noise", "trajectory"]
    c, uc = conditioner.get_unconditional_conditioning(batch, force_uc_zero_embeddings=zero)
    assert torch.count_nonzero(uc["concat"]) == 0
    assert torch.count_nonzero(uc["crossattn"][..., :1024]) == 0
    assert torch.count_nonzero(uc["crossattn"][..., 1024 + 128:1024 + 1152]) == 0
    torch.testing.assert_close(uc["vector"], c["vector"])
    torch.testing.assert_close(uc["crossattn"][..., 1024:1024 + 128], c["crossattn"][..., 1024:1024 + 128])
    clip = conditioner.embedders[0](batch["cond_frames_without_noise"])
    torch.testing.assert_close(c["crossattn"][..., :1024], clip)
    torch.testing.assert_close(c["concat"], conditioner.embedders[3](batch["cond_frames"]))  # no dropout in c
    forced = conditioner(batch, force_zero_embeddings=["fps_id"], generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(forced["vector"][:, :256]) == 0
    with pytest.raises(ValueError, match="'fsp_id'"):
        conditioner(batch, force_zero_embeddings=["fsp_id"], generator=torch.Generator())


def test_concat_timestep_embedder_numerics():
    x = torch.tensor([[0.0, 1.5, -2.0], [7.0, 0.25, 100.0]])
    emb = ConcatTimestepEmbedderND(outdim=6, num_features=3)
    out = emb(x)
    assert out.shape == (2, 18)
    for b in range(2):
        for f in range(3):
            t = x[b, f].item()
            freqs = [math.exp(-math.log(10000.0) * k / 3) for k in range(3)]
            expected = [math.cos(t * w) for w in freqs] + [math.sin(t * w) for w in freqs]
            torch.testing.assert_close(out[b, 6 * f:6 * (f + 1)], torch.tensor(expected), atol=1e-5, rtol=0)
    scalar = ConcatTimestepEmbedderND(outdim=256)(torch.tensor([9.0, 127.0]))
    assert scalar.shape == (2, 256)
    seq = ConcatTimestepEmbedderND(outdim=6, num_features=3, add_sequence_dim=True)(x)
    torch.testing.assert_close(seq[:, 0], out)
    with pytest.raises(ValueError, match="expected \\(B,\\) or \\(B, 3\\)"):
        emb(torch.zeros(2, 4))


def test_frozen_embedders_stay_in_eval_without_gradients():
    conditioner = tiny_conditioner()
    trainable = VideoPredictionEmbedderWithEncoder(
        1, 1, AutoencoderKLModeOnly(embed_dim=4, ddconfig=TINY_VAE), is_ae=True, input_key="cond_frames",
        is_trainable=True,
    )
    conditioner.embedders.append(trainable)
    conditioner.train()
    for embedder in list(conditioner.embedders)[:-1]:
        assert all(not m.training for m in embedder.modules())
        assert all(not p.requires_grad for p in embedder.parameters())
    assert all(m.training for m in trainable.modules())
    assert all(p.requires_grad for p in trainable.parameters())
    c = conditioner(full_batch())
    assert c["concat"].shape == (2, 8, 16, 16) and c["concat"].requires_grad
    assert not c["crossattn"].requires_grad


def test_vae_embedder_mode_chunking_and_skip_encode():
    vae = AutoencoderKLModeOnly(embed_dim=4, ddconfig=TINY_VAE)
    frames = torch.rand(3, 3, 16, 16) * 2 - 1
    whole = VideoPredictionEmbedderWithEncoder(1, 1, vae, is_ae=True, disable_encoder_autocast=True)
    chunked = VideoPredictionEmbedderWithEncoder(1, 1, vae, is_ae=True, en_and_decode_n_samples_a_time=1)
    with torch.no_grad():
        expected = vae.encode(frames)
        torch.testing.assert_close(whole(frames), expected)
        torch.testing.assert_close(chunked(frames), expected, atol=1e-5, rtol=1e-5)
        stacked = VideoPredictionEmbedderWithEncoder(3, 2, vae, is_ae=True)(frames)
        assert stacked.shape == (2, 12, 8, 8)
        whole.skip_encode = True
        latent = torch.randn(3, 4, 8, 8)
        assert whole(latent) is latent
    with pytest.raises(ValueError, match="sigma_sampler_config"):
        VideoPredictionEmbedderWithEncoder(1, 1, vae, sigma_sampler_config=object())


def test_embedders_compute_in_their_weight_dtype():
    vae = AutoencoderKLModeOnly(embed_dim=4, ddconfig=TINY_VAE).to(torch.bfloat16)
    out = VideoPredictionEmbedderWithEncoder(1, 1, vae, is_ae=True)(torch.rand(2, 3, 16, 16))
    assert out.dtype == torch.float32
    clip = FrozenOpenCLIPImageEmbedder(model_cfg=TINY_CLIP).to(torch.bfloat16)
    assert clip(torch.rand(2, 3, 20, 20)).dtype == torch.float32


def test_open_clip_preprocess_of_a_constant_image():
    clip = FrozenOpenCLIPImageEmbedder(model_cfg=TINY_CLIP)
    image = torch.full((1, 3, 40, 60), 0.2)
    x = clip.preprocess(image)
    assert x.shape == (1, 3, 28, 28)
    expected = (0.6 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[0].mean(dim=(1, 2)), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_open_clip_loads_local_weights(tmp_path, no_network, suffix):
    import open_clip

    torch.manual_seed(1)
    source = open_clip.CLIP(**copy.deepcopy(TINY_CLIP))  # a full open_clip model, text transformer included
    path = str(tmp_path / f"clip{suffix}")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    torch.manual_seed(2)
    random_init = FrozenOpenCLIPImageEmbedder(model_cfg=TINY_CLIP)
    torch.manual_seed(2)
    loaded = FrozenOpenCLIPImageEmbedder(model_cfg=TINY_CLIP, weights=path)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = source.visual(loaded.preprocess(image))
        torch.testing.assert_close(loaded(image), expected)
        assert not torch.allclose(random_init(image), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    wrapped = FrozenOpenCLIPImagePredictionEmbedder(loaded, n_cond_frames=1, n_copies=1)
    assert wrapped(image).shape == (2, 1, 1024)


def test_open_clip_errors(tmp_path):
    other = {**TINY_CLIP, "embed_dim": 512}
    import open_clip

    path = str(tmp_path / "other.safetensors")
    state = open_clip.CLIP(**copy.deepcopy(other)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(ValueError, match="does not fit"):
        FrozenOpenCLIPImageEmbedder(model_cfg=TINY_CLIP, weights=path)
    with pytest.raises(ValueError, match="arch='ViT-Z-99'"):
        FrozenOpenCLIPImageEmbedder(arch="ViT-Z-99")


def test_prediction_embedder_frames_and_copies():
    clip = FrozenOpenCLIPImageEmbedder(model_cfg=TINY_CLIP)
    wrapped = FrozenOpenCLIPImagePredictionEmbedder(clip, n_cond_frames=2, n_copies=3)
    frames = torch.rand(2, 2, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        out = wrapped(frames)
        assert out.shape == (6, 2, 1024)
        torch.testing.assert_close(out[3, 1], clip(frames[1, 1:2])[0])


def test_conditioner_rejects_bad_embedders():
    with pytest.raises(ValueError, match="emb_models\\[0\\] is a Linear"):
        GeneralConditioner([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="no input_key"):
        GeneralConditioner([ConcatTimestepEmbedderND(outdim=4)])
    with pytest.raises(ValueError, match="ucg_rate=1.5"):
        Embedder(ucg_rate=1.5)
