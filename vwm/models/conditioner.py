"""Conditioner of SVD / Vista: per-key embedders and their assembly into `vector`, `crossattn` and `concat`.

Embedder order defines the state-dict paths `conditioner.embedders.<i>.*` (0 OpenCLIP image, 1 fps, 2 motion
bucket, 3 VAE encoder of the condition frame, 4 cond_aug, 5-9 actions), so it must follow the reference YAML.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from einops import rearrange, repeat
from safetensors.torch import load_file
from torch import nn

from vwm.actions import ACTION_FEATURES, ACTION_KEYS
from vwm.checkpoint.keys import key_diff
from vwm.dtypes import module_dtype, outside_autocast
from vwm.models.embeddings import timestep_embedding

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Embedder(nn.Module):
    """Base of conditioner embedders: the batch key it reads, its classifier-free dropout rate, trainability.

    A non-trainable embedder is frozen by `GeneralConditioner` (no gradients) and stays in eval mode when a
    parent module calls `.train()`.
    """

    def __init__(self, *, input_key: str | None = None, ucg_rate: float = 0.0, is_trainable: bool = False):
        super().__init__()
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"ucg_rate={ucg_rate} must lie in [0, 1]")
        self.input_key = input_key
        self.ucg_rate = float(ucg_rate)
        self.is_trainable = bool(is_trainable)

    def freeze(self) -> None:
        """Disable gradients for every parameter and switch to eval mode."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Embedder:
        """Set training mode; a non-trainable embedder always stays in eval mode."""
        return super().train(mode and self.is_trainable)


def _plain(obj: Any) -> Any:
    """Nested mappings / sequences (e.g. OmegaConf containers) -> dicts / lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        return [_plain(v) for v in obj]
    return obj


class FrozenOpenCLIPImageEmbedder(Embedder):
    """OpenCLIP image embedding: (B, 3, H, W) in [-1, 1] -> (B, embed_dim), the unnormalised visual output.

    The model is built from the open_clip config of `arch` (or `model_cfg`, an open_clip config dict with
    embed_dim / vision_cfg / text_cfg) without downloading anything. Its text transformer is deleted as in
    the reference (token embedding, ln_final, text_projection and logit_scale stay in the state dict).
    Weights come from the checkpoint that loads the whole model, or from the local file `weights`
    (safetensors or an open_clip checkpoint). The reference's `version`
    (pretrained tag) is dropped by vwm.aliases.PARAM_ALIASES.
    """

    def __init__(
        self,
        arch: str = "ViT-H-14",
        freeze: bool = True,
        antialias: bool = True,
        weights: str | None = None,
        model_cfg: dict | None = None,
        *,
        input_key: str | None = None,
        ucg_rate: float = 0.0,
        is_trainable: bool = False,
    ):
        super().__init__(input_key=input_key, ucg_rate=ucg_rate, is_trainable=is_trainable)
        import open_clip  # after vwm's torchvision shim (vwm/__init__.py)

        cfg = _plain(model_cfg) if model_cfg is not None else open_clip.get_model_config(arch)
        if cfg is None:
            known = ", ".join(open_clip.list_models())
            raise ValueError(f"arch={arch!r} is not an open_clip model config; known: {known}")
        cfg = copy.deepcopy(cfg)
        if cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {}):
            raise ValueError(f"arch={arch!r}: custom / Hugging Face text towers are not supported")
        model = open_clip.CLIP(**cfg)
        # Only the image tower is used. The text transformer goes as in the reference; so does its causal
        # mask (a non-persistent buffer no checkpoint fills, which would stay behind on a meta build).
        del model.transformer
        del model.attn_mask
        self.model = model
        self.arch = arch
        self.antialias = antialias
        if weights is not None:
            self.load_weights(weights)
        if freeze:
            self.freeze()

    def load_weights(self, path: str) -> None:
        """Load CLIP weights from a local safetensors / open_clip checkpoint (text transformer dropped)."""
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and "state_dict" in state:
                state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("transformer.")}
        diff = key_diff(self.model.state_dict(), state)
        if not diff.ok:
            raise ValueError(
                f"weights={path!r} does not fit the {self.arch} CLIP model: missing {diff.missing[:8]}, "
                f"unexpected {diff.unexpected[:8]}, wrong shape {diff.wrong_shape[:8]}"
            )
        self.model.load_state_dict(state)
        log.info("Loaded OpenCLIP %s weights from %s", self.arch, path)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> CLIP input: kornia bicubic resize (antialiased), to [0, 1], CLIP mean/std."""
        import kornia

        size = tuple(self.model.visual.image_size)
        x = kornia.geometry.resize(
            image.float(), size, interpolation="bicubic", align_corners=True, antialias=self.antialias
        )
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return ((x + 1.0) / 2.0 - mean) / std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, embed_dim), run in the weights' dtype, returned in the input's."""
        x = self.preprocess(image).to(module_dtype(self.model.visual, torch.float32))
        return self.model.visual(x).to(image.dtype)


class FrozenOpenCLIPImagePredictionEmbedder(Embedder):
    """CLIP embedding of condition frames: ((B·n), 3, H, W) -> ((B·n_copies), n, D) with n = n_cond_frames."""

    def __init__(
        self,
        open_clip: FrozenOpenCLIPImageEmbedder,
        n_cond_frames: int,
        n_copies: int,
        *,
        input_key: str | None = None,
        ucg_rate: float = 0.0,
        is_trainable: bool = False,
    ):
        super().__init__(input_key=input_key, ucg_rate=ucg_rate, is_trainable=is_trainable)
        self.n_cond_frames = n_cond_frames
        self.n_copies = n_copies
        self.open_clip = open_clip

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B·n, 3, H, W) or (B, n, 3, H, W) -> (B·n_copies, n, D)."""
        if frames.ndim == 5:
            frames = rearrange(frames, "b t c h w -> (b t) c h w")
        emb = rearrange(self.open_clip(frames), "(b t) d -> b t d", t=self.n_cond_frames)
        return repeat(emb, "b t d -> (b s) t d", s=self.n_copies)


class ConcatTimestepEmbedderND(Embedder):
    """Sinusoidal embedding of each scalar feature, concatenated feature-major: (B,) | (B, F) -> (B, F·D).

    D = outdim. With `add_sequence_dim` the output is (B, 1, F·D) and lands in `crossattn` (the actions).
    `input_scale` multiplies the features before the embedding (1 in SVD / Vista). The embedding's frequencies
    span 1 to 1e-4 per unit, made for timesteps; actions such as a lateral offset of ±0.5 m or a normalised
    steering angle of ±0.15 then differ in only a few channels, which a large model learns over 100k steps. A
    scale of ~100 spreads them over most channels, which is what a small model trained for minutes needs.
    """

    def __init__(
        self,
        outdim: int,
        num_features: int | None = None,
        add_sequence_dim: bool = False,
        input_scale: float = 1.0,
        *,
        input_key: str | None = None,
        ucg_rate: float = 0.0,
        is_trainable: bool = False,
    ):
        super().__init__(input_key=input_key, ucg_rate=ucg_rate, is_trainable=is_trainable)
        self.outdim = outdim
        self.num_features = num_features
        self.add_sequence_dim = add_sequence_dim
        self.input_scale = float(input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) or (B, F) -> (B, F·outdim) = [emb(x[:, 0]) | emb(x[:, 1]) | ...], or (B, 1, F·outdim)."""
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2 or (self.num_features is not None and x.shape[1] != self.num_features):
            raise ValueError(
                f"{self.input_key or 'input'} has shape {tuple(x.shape)}; expected (B,) or "
                f"(B, {self.num_features if self.num_features is not None else 'F'})"
            )
        emb = timestep_embedding(rearrange(x, "b f -> (b f)") * self.input_scale, self.outdim)
        emb = rearrange(emb, "(b f) d -> b (f d)", b=x.shape[0])
        return emb[:, None] if self.add_sequence_dim else emb


class VideoPredictionEmbedderWithEncoder(Embedder):
    """VAE latent of condition frames: ((B·n_cond_frames), 3, H, W) -> ((B·n_copies), n_cond_frames·z, h, w).

    With `is_ae` the encoder's `encode` is used (the posterior mode for AutoencoderKLModeOnly), else its
    forward; the result is multiplied by `scale_factor` (1.0 in SVD: the latent stays unscaled). Frames are
    encoded `en_and_decode_n_samples_a_time` at a time. `disable_encoder_autocast` runs the encoder with
    autocast off. Inside `GeneralConditioner.latent_condition_frames()` the input is a latent that passes straight through
    (long rollouts).
    The reference's noise augmentation (`sigma_sampler_config`, `sigma_cond_config`) is not supported.
    """

    def __init__(
        self,
        n_cond_frames: int,
        n_copies: int,
        encoder: nn.Module,
        sigma_sampler_config: Any = None,
        sigma_cond_config: Any = None,
        is_ae: bool = False,
        scale_factor: float = 1.0,
        disable_encoder_autocast: bool = False,
        en_and_decode_n_samples_a_time: int | None = None,
        *,
        input_key: str | None = None,
        ucg_rate: float = 0.0,
        is_trainable: bool = False,
    ):
        super().__init__(input_key=input_key, ucg_rate=ucg_rate, is_trainable=is_trainable)
        noise_configs = {"sigma_sampler_config": sigma_sampler_config, "sigma_cond_config": sigma_cond_config}
        for name, value in noise_configs.items():
            if value is not None:
                raise ValueError(
                    f"{name} is not supported (noise augmentation of the condition latent); allowed: null"
                )
        chunk = en_and_decode_n_samples_a_time
        if chunk is not None and chunk < 1:
            raise ValueError(f"en_and_decode_n_samples_a_time={chunk} must be >= 1 or null")
        self.n_cond_frames = n_cond_frames
        self.n_copies = n_copies
        self.encoder = encoder
        self.is_ae = is_ae
        self.scale_factor = scale_factor
        self.disable_encoder_autocast = disable_encoder_autocast
        self.en_and_decode_n_samples_a_time = en_and_decode_n_samples_a_time
        self.skip_encode = False

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B·n, 3, H, W) or (B, n, 3, H, W) -> (B·n_copies, n·z, h, w); identity when `skip_encode`."""
        if self.skip_encode:
            return frames
        if frames.ndim == 5:
            frames = rearrange(frames, "b t c h w -> (b t) c h w")
        chunk = self.en_and_decode_n_samples_a_time or frames.shape[0]
        encode = self.encoder.encode if self.is_ae else self.encoder
        dtype = module_dtype(self.encoder, frames.dtype)
        with outside_autocast(frames.device, self.disable_encoder_autocast):
            latents = torch.cat([encode(part.to(dtype)) for part in frames.split(chunk)])
        latents = latents.to(frames.dtype) * self.scale_factor
        latents = rearrange(latents, "(b t) c h w -> b (t c) h w", t=self.n_cond_frames)
        return repeat(latents, "b c h w -> (b s) c h w", s=self.n_copies)


class GeneralConditioner(nn.Module):
    """Runs every embedder on its batch key and concatenates the outputs by rank into the conditioning dict.

    Rank 2 -> `vector` (concatenated on dim 1), rank 3 -> `crossattn` (dim 2), rank 4/5 -> `concat` (dim 1),
    in embedder order. Action embedders (keys in `vwm.actions.ACTION_KEYS`) give a zero embedding for samples
    whose `action_mask` bit is 0 and for a key absent from the batch; any other absent key is an error.
    """

    OUTPUT_KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    CAT_DIMS = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, emb_models: list[Embedder]):
        super().__init__()
        for i, embedder in enumerate(emb_models):
            if not isinstance(embedder, Embedder):
                raise ValueError(f"emb_models[{i}] is a {type(embedder).__name__}; expected a vwm Embedder")
            if not embedder.input_key:
                raise ValueError(f"emb_models[{i}] ({type(embedder).__name__}) has no input_key")
            if not embedder.is_trainable:
                embedder.freeze()
            n_params = sum(p.numel() for p in embedder.parameters())
            log.info(
                "Embedder %d: %s on %r, %d params, trainable=%s",
                i, type(embedder).__name__, embedder.input_key, n_params, embedder.is_trainable,
            )
        self.embedders = nn.ModuleList(emb_models)

    def forward(
        self,
        batch: Mapping[str, Any],
        force_zero_embeddings: Collection[str] = (),
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Conditioning dict, with classifier-free dropout per sample and embedder drawn from `generator`."""
        return self._assemble(self._embed(batch), force_zero_embeddings, generator, dropout=True)

    def get_unconditional_conditioning(
        self,
        batch: Mapping[str, Any],
        force_uc_zero_embeddings: Collection[str] = (),
        force_cond_zero_embeddings: Collection[str] = (),
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(c, uc) without dropout; uc has the embeddings of `force_uc_zero_embeddings` keys zeroed."""
        outputs = self._embed(batch)
        c = self._assemble(outputs, force_cond_zero_embeddings, None, dropout=False)
        uc = self._assemble(outputs, force_uc_zero_embeddings, None, dropout=False)
        return c, uc

    @contextlib.contextmanager
    def latent_condition_frames(self, enabled: bool = True) -> Iterator[None]:
        """Within the block, the VAE-encoder embedders take their input as an already encoded (unscaled) latent and
        pass it through (long rollouts reuse the previous round's latents); restored on exit."""
        encoders = [e for e in self.embedders if isinstance(e, VideoPredictionEmbedderWithEncoder)]
        for e in encoders:
            e.skip_encode = enabled
        try:
            yield
        finally:
            for e in encoders:
                e.skip_encode = False

    def _embed(self, batch: Mapping[str, Any]) -> list[torch.Tensor]:
        outputs = []
        for i, embedder in enumerate(self.embedders):
            key = embedder.input_key
            with nullcontext() if embedder.is_trainable else torch.no_grad():
                if key in ACTION_KEYS:
                    out = self._embed_action(embedder, batch)
                elif key in batch:
                    out = embedder(batch[key])
                else:
                    raise ValueError(
                        f"batch has no key {key!r} needed by conditioner embedder {i} "
                        f"({type(embedder).__name__}); batch keys: {sorted(batch)}"
                    )
            if out.ndim not in self.OUTPUT_KEYS:
                raise ValueError(f"embedder {i} ({key!r}) returned rank {out.ndim}; expected 2, 3, 4 or 5")
            outputs.append(out)
        return outputs

    def _embed_action(self, embedder: Embedder, batch: Mapping[str, Any]) -> torch.Tensor:
        key = embedder.input_key
        if key in batch:
            values = batch[key]
            keep = None
            if "action_mask" in batch:
                mask = batch["action_mask"]
                if mask.ndim != 2 or mask.shape[1] != len(ACTION_KEYS):
                    raise ValueError(
                        f"action_mask has shape {tuple(mask.shape)}; expected (B, {len(ACTION_KEYS)}) "
                        f"with columns {ACTION_KEYS}"
                    )
                keep = mask[:, ACTION_KEYS.index(key)].bool()
        else:
            n, device = self._batch_size(batch)
            features = getattr(embedder, "num_features", None) or ACTION_FEATURES[key]
            values = torch.zeros(n, features, device=device)
            keep = torch.zeros(n, dtype=torch.bool, device=device)
        out = embedder(values)
        return out if keep is None else _zero_where_dropped(out, keep)

    def _batch_size(self, batch: Mapping[str, Any]) -> tuple[int, torch.device]:
        keys = [e.input_key for e in self.embedders] + list(batch)
        for key in keys:
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.ndim >= 1:
                return value.shape[0], value.device
        raise ValueError(f"cannot infer the batch size: no tensor among batch keys {sorted(batch)}")

    def _assemble(
        self,
        outputs: list[torch.Tensor],
        zero_keys: Collection[str],
        generator: torch.Generator | None,
        dropout: bool,
    ) -> dict[str, torch.Tensor]:
        known = {e.input_key for e in self.embedders}
        unknown = sorted(set(zero_keys) - known)
        if unknown:
            raise ValueError(f"force-zero keys {unknown} match no embedder; allowed: {sorted(known)}")
        parts: dict[str, list[torch.Tensor]] = {}
        for embedder, out in zip(self.embedders, outputs):
            if dropout and embedder.ucg_rate > 0.0:
                out = _zero_where_dropped(out, _keep_mask(embedder, out.shape[0], generator, out.device))
            if embedder.input_key in zero_keys:
                out = torch.zeros_like(out)
            parts.setdefault(self.OUTPUT_KEYS[out.ndim], []).append(out)
        return {slot: torch.cat(chunks, dim=self.CAT_DIMS[slot]) for slot, chunks in parts.items()}


def _keep_mask(
    embedder: Embedder, n: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Per-sample Bernoulli(1 - ucg_rate) keep decisions drawn from `generator`."""
    if generator is None:
        raise ValueError(
            f"embedder {embedder.input_key!r} has ucg_rate={embedder.ucg_rate}: classifier-free dropout "
            "needs generator=torch.Generator (get_unconditional_conditioning conditions without dropout)"
        )
    draws = torch.rand(n, generator=generator, device=generator.device)
    return (draws < 1.0 - embedder.ucg_rate).to(device)


def _zero_where_dropped(out: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep = keep.to(device=out.device, dtype=torch.bool).view(-1, *([1] * (out.ndim - 1)))
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))
