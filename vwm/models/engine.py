"""DiffusionEngine: the latent video diffusion world model as a LightningModule.

It owns the network (`model.diffusion_model`), the preconditioning (`denoiser`), the conditioner, the frozen
first stage (`first_stage_model`), the training loss, an optional sampler for logging and an EMA (`model_ema`).
Attribute names reproduce the reference so checkpoints load without key surgery. Randomness on the training
path comes from a generator seeded by (seed, rank, global step, data position), so a resumed run draws exactly
the numbers the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from vwm.config import instantiate
from vwm.defaults import NUM_FRAMES
from vwm.diffusion.loss import DiffusionLossOutput
from vwm.dtypes import module_dtype, outside_autocast
from vwm.models.ema import LitEma
from vwm.models.layers import use_fused_groupnorm
from vwm.models.video_unet import UNetWrapper
from vwm.training import compiled_check, step
from vwm.training.guards import check_update

log = logging.getLogger(__name__)

ADAPTER_TAG = "adapter"
"""Parameters whose name contains this are the phase-2 adapters (LoRA and action control)."""


FUSABLE_OPTIMIZERS = ("torch.optim.AdamW", "torch.optim.Adam")
"""Optimizer targets whose `fused=True` form (one CUDA kernel for the whole update) vwm chooses on GPUs."""


def optimizer_params(node: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The optimizer's keyword arguments from its config node. On CUDA, torch's Adam/AdamW run fused unless the
    config chooses an implementation (`fused` or `foreach`): the same update in one kernel per tensor list instead
    of about ten passes over the fp32 master weights and moments (94 ms of a 576x1024 phase-1 step on an H100 with
    the foreach form, 2026-12-07; the fused AdamW over the same 1.48 B weights: 24 ms)."""
    params = dict(node.get("params") or {})
    if (node.get("target") in FUSABLE_OPTIMIZERS and device.type == "cuda"
            and "fused" not in params and "foreach" not in params):
        params["fused"] = True
    return params


def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixing the run seed with integer keys (rank, step, ...) through numpy's SeedSequence."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, *[k & 0xFFFFFFFF for k in keys]]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class DiffusionEngine(pl.LightningModule):
    """Latent video diffusion model (SVD-XT / Vista) with its training step, sampling and EMA."""

    config_unbuilt = ("optimizer_config",)

    def __init__(
        self,
        network: nn.Module,
        denoiser: nn.Module,
        first_stage: nn.Module,
        conditioner: nn.Module,
        sampler: Any = None,
        optimizer_config: dict | None = None,
        scheduler: Any = None,
        loss_fn: Any = None,
        use_ema: bool = False,
        ema_decay_rate: float = 0.9999,
        scale_factor: float = 1.0,
        disable_first_stage_autocast: bool = False,
        input_key: str = "img_seq",
        compile_model: bool = False,
        en_and_decode_n_samples_a_time: int | None = 14,
        num_frames: int = NUM_FRAMES,
        slow_spatial_layers: bool = False,
        train_peft_adapters: bool = False,
        replace_cond_frames: bool = False,
        fixed_cond_frames: list[list[int]] | None = None,
        slow_spatial_lr_scale: float = 0.1,
        verify_compiled_gradients: bool = True,
        compiled_gradient_tolerance: float = compiled_check.DEFAULT_TOLERANCE,
        compile_options: dict | None = None,
        fused_groupnorm: bool = False,
    ):
        super().__init__()
        if slow_spatial_layers and train_peft_adapters:
            raise ValueError("slow_spatial_layers and train_peft_adapters are exclusive optimizer modes; set one")
        if en_and_decode_n_samples_a_time is not None and en_and_decode_n_samples_a_time < 1:
            raise ValueError(f"en_and_decode_n_samples_a_time={en_and_decode_n_samples_a_time} must be >= 1 or null")
        self.model = UNetWrapper(network, compile_model=compile_model, compile_options=compile_options)
        self.denoiser = denoiser
        self.conditioner = conditioner
        self.first_stage_model = first_stage
        self.sampler = sampler
        self.loss_fn = loss_fn
        self.optimizer_config = optimizer_config or {"target": "torch.optim.AdamW"}
        self.scheduler_config = scheduler
        self.scale_factor = scale_factor
        self.disable_first_stage_autocast = disable_first_stage_autocast
        self.input_key = input_key
        self.en_and_decode_n_samples_a_time = en_and_decode_n_samples_a_time
        self.num_frames = num_frames
        self.slow_spatial_layers = slow_spatial_layers
        self.slow_spatial_lr_scale = slow_spatial_lr_scale
        self.train_peft_adapters = train_peft_adapters
        self.replace_cond_frames = replace_cond_frames
        self.fixed_cond_frames = fixed_cond_frames
        self.learning_rate = 1e-4
        self.seed = 0
        self._nonfinite: torch.Tensor | None = None
        self._skipped: torch.Tensor | None = None
        # compiled layers compare their gradients with eager ones at the first informative step
        # (vwm/training/compiled_check.py); the count of steps that could not tell
        self._compiled_check_pending = bool(compile_model and verify_compiled_gradients)
        self._compiled_check_deferrals = 0
        self.compiled_check: dict[str, Any] | None = None  # the agreed outcome, once there is one
        self.compiled_gradient_tolerance = compiled_gradient_tolerance

        self.first_stage_model.eval().requires_grad_(False)
        # the clip's VAE and the conditioner's own (the condition frame's latent), each frozen
        embedders = getattr(self.conditioner, "embedders", ())
        for module in (self.first_stage_model, *(getattr(e, "encoder", None) for e in embedders)):
            if fused_groupnorm and isinstance(module, nn.Module):
                # their GroupNorms (+ SiLU) as Triton kernels on CUDA (vwm.models.fused_groupnorm): no gradient
                # is taken through a frozen encoder, so the forward-only kernels apply; elsewhere the plain norm
                use_fused_groupnorm(module)
            if compile_model and hasattr(module, "compile_encoder"):
                module.compile_encoder()
        self.freeze_untrained()
        self.use_ema = use_ema
        self.ema_decay_rate = ema_decay_rate
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay_rate)

    # ----------------------------------------------------------------------------------------- parameters

    @property
    def unet(self) -> nn.Module:
        """The bare VideoUNet."""
        return self.model.diffusion_model

    def inert_parameter_names(self) -> list[str]:
        """UNet parameters that cannot influence the output: the query/key paths (and the query LayerNorm `norm2`)
        of cross-attention layers whose context is a single token (softmax over one key is 1). They stay in the
        state dict, frozen."""
        if self.crossattn_tokens() != 1:
            return []
        names = []
        inert = (".attn2.to_q.", ".attn2.to_k.", ".attn2.q_adapter_", ".attn2.k_adapter_", ".norm2.")
        for name, _ in self.model.named_parameters():
            if any(part in name for part in inert):
                names.append(name)
        return names

    def crossattn_tokens(self) -> int:
        """Number of context tokens the conditioner produces for cross-attention."""
        tokens = 1
        for embedder in getattr(self.conditioner, "embedders", []):
            if hasattr(embedder, "open_clip"):
                tokens = max(tokens, int(getattr(embedder, "n_cond_frames", 1)))
        return tokens

    def freeze_untrained(self) -> None:
        """requires_grad only for what the configured mode trains: all UNet weights, or only its adapters
        (`train_peft_adapters`); never the inert cross-attention query/key paths; embedders per `is_trainable`."""
        inert = set(self.inert_parameter_names())
        for name, p in self.model.named_parameters():
            trainable = name not in inert and (not self.train_peft_adapters or ADAPTER_TAG in name)
            p.requires_grad_(trainable)

    def trainable_parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (reference modes: plain, slow spatial layers at 0.1x lr, adapters only)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.slow_spatial_layers:
            groups = [
                {"params": [p for n, p in named if "time_stack" in n], "lr": self.learning_rate},
                {"params": [p for n, p in named if "time_stack" not in n],
                 "lr": self.learning_rate * self.slow_spatial_lr_scale},
            ]
        else:
            groups = [{"params": [p for _, p in named], "lr": self.learning_rate}]
        for embedder in getattr(self.conditioner, "embedders", []):
            params = [p for p in embedder.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": self.learning_rate})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        groups = self.trainable_parameter_groups()
        if not groups:
            raise ValueError("no trainable parameters: check train_peft_adapters / add_lora / action_control")
        node = dict(self.optimizer_config)
        node["params"] = optimizer_params(node, self.device)
        opt = instantiate(node, "model.params.optimizer_config", params=groups, lr=self.learning_rate)
        if self.scheduler_config is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=self.scheduler_config)
        return [opt], [{"scheduler": sched, "interval": "step", "frequency": 1}]

    # -------------------------------------------------------------------------------------------- latents

    def _first_stage_chunk(self, frames: int) -> int:
        return self.en_and_decode_n_samples_a_time or frames

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels (B,T,3,H,W) in [-1,1] -> scaled latents (B,T,C,h,w) (posterior sample, chunked per frames).
        With `disable_first_stage_autocast` (the reference's switch, set in every SVD/Vista config) the VAE runs
        outside autocast, in its weights' dtype: fp32 under Lightning's bf16-mixed without DeepSpeed; under
        DeepSpeed bf16 the weights are bf16 and there is no autocast to leave, as in the reference."""
        x = x.to(module_dtype(self.first_stage_model, x.dtype))
        with outside_autocast(x.device, self.disable_first_stage_autocast):
            z = self.first_stage_model.encode_video(x, self._first_stage_chunk(x.shape[1]), generator=generator)
        return z * self.scale_factor

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, overlap: int = 3, chunk_size: int | None = None) -> torch.Tensor:
        """Scaled latents (B,T,C,h,w) -> pixels (B,T,3,H,W), in windows of `chunk_size` frames (default: the
        config's en_and_decode_n_samples_a_time) whose `overlap` shared frames are averaged."""
        z = (z / self.scale_factor).to(module_dtype(self.first_stage_model, z.dtype))
        chunk = chunk_size or self._first_stage_chunk(z.shape[1])
        with outside_autocast(z.device, self.disable_first_stage_autocast):
            return self.first_stage_model.decode_video(z, chunk, overlap=overlap)

    # ------------------------------------------------------------------------------------------- training

    def make_generator(self, *keys: int) -> torch.Generator:
        """Generator on this module's device seeded from (seed, rank, *keys)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(step_seed(self.seed, self.global_rank, *keys))
        return gen

    @torch.no_grad()
    def sample_posterior(self, moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cached VAE moments (B,T,2C,h,w) -> scaled latents (B,T,C,h,w): the first stage's own posterior
        draw, so the same generator state gives the latents `encode_first_stage` draws from the pixels."""
        if moments.ndim != 5 or moments.shape[1] != self.num_frames:
            raise ValueError(f"batch['latent_moments'] has shape {tuple(moments.shape)}; expected (B, "
                             f"num_frames={self.num_frames}, 2C, h, w)")
        moments = moments.to(module_dtype(self.first_stage_model, torch.float32))
        z = self.first_stage_model.regularization(moments.flatten(0, 1), generator=generator)
        return z.unflatten(0, moments.shape[:2]) * self.scale_factor

    def latents_of(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Training latents: the precomputed `latents` of a cached batch, a posterior sample of its cached
        `latent_moments` (vwm.data.latents), else the VAE encoding of `input_key`."""
        if "latents" in batch:
            return batch["latents"]
        if "latent_moments" in batch:
            return self.sample_posterior(batch["latent_moments"], generator)
        x = batch[self.input_key]
        if x.ndim != 5:
            raise ValueError(f"batch[{self.input_key!r}] must be (B,T,3,H,W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_frames:
            raise ValueError(
                f"batch[{self.input_key!r}] has {x.shape[1]} frames but the model is configured for "
                f"num_frames={self.num_frames}"
            )
        return self.encode_first_stage(x, generator=generator)

    def compute_loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> DiffusionLossOutput:
        """Diffusion loss terms for one batch, every random draw from `generator` (vwm/training/step.py)."""
        return step.diffusion_loss(self, batch, generator)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The whole step, hook by hook: vwm/training/step.py.
        keys = step.step_keys(self.global_step, batch, batch_idx)
        if self._compiled_check_pending and torch.is_grad_enabled():
            self.verify_compiled_layers(batch, keys)
        out = self.compute_loss(batch, self.make_generator(*keys))
        bad = ~torch.isfinite(out.loss.detach())
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        if "n_skipped" in batch:
            skipped = batch["n_skipped"].sum()
            self._skipped = skipped if self._skipped is None else self._skipped + skipped
        bsz = next(batch[k] for k in (self.input_key, "latents", "latent_moments") if k in batch).shape[0]
        self.log("loss", out.loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=bsz)
        if out.hf is not None:
            self.log("loss_hf", out.hf.mean(), on_step=True, on_epoch=False, batch_size=bsz)
        return out.loss

    def verify_compiled_layers(self, batch: Mapping[str, torch.Tensor], keys: Sequence[int]) -> None:
        """Compare the compiled UNet layers' loss gradients on this batch with the eager layers' (own random draws,
        `vwm.training.compiled_check`); all ranks agree, and if any rank's gradients differ beyond
        `compiled_gradient_tolerance`, every rank trains with eager layers from now on."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        try:
            result = compiled_check.compare_compiled_gradients(
                self.unet, lambda: self.compute_loss(batch, self.make_generator(*keys, 1)).loss, named,
                tolerance=self.compiled_gradient_tolerance)
        except torch.OutOfMemoryError:  # it holds two copies of the trainable gradients; the step itself fits
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            result = compiled_check.CompiledGradientCheck(
                "skipped", reason="out of memory for two copies of the gradients (verify_compiled_gradients=False "
                                  "skips the check)")
        codes = ("passed", "skipped", "deferred", "failed")
        distance = result.grad_rel_distance if result.grad_rel_distance is not None else 0.0
        local = torch.tensor([codes.index(result.status), min(distance, 1e30)], device=self.device)
        rows = self.all_gather(local).reshape(-1, 2).tolist() if self._trainer is not None else [local.tolist()]
        worst = max(codes.index(result.status), *(int(row[0]) for row in rows))
        distance = max(row[1] for row in rows)
        status = codes[worst]
        self.compiled_check = {"status": status, "step": self.global_step, "grad_rel_distance": distance,
                               "deferrals": self._compiled_check_deferrals}
        where = (f"loss {result.loss_compiled:.6g} compiled / {result.loss_eager:.6g} eager"
                 if result.loss_eager is not None else result.reason)
        if status == "failed":
            self._compiled_check_pending = False
            compiled_check.drop_compiled_layers(self.unet)
            machine = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
            log.warning("compiled UNet layers FAILED the gradient check at step %d: their gradients are %.3g "
                        "(relative) from the eager layers' (tolerance %g; %s; worst tensor on this rank %s), with "
                        "torch %s on %s. Training continues with eager layers (the same function, slower). "
                        "model.params.compile_model=False skips compiling; docs/performance.md has the known "
                        "cases.", self.global_step, distance, self.compiled_gradient_tolerance, where,
                        result.worst_tensor, torch.__version__, machine)
        elif status == "deferred":
            self._compiled_check_deferrals += 1
            if self._compiled_check_deferrals >= compiled_check.MAX_DEFERRALS:
                self._compiled_check_pending = False
                log.warning("compiled UNet layers could not be verified in %d steps (%s); they stay compiled",
                            self._compiled_check_deferrals, result.reason)
        elif status == "skipped":
            self._compiled_check_pending = False
            log.warning("compiled UNet layers were not verified: %s", result.reason or "skipped on another rank")
        else:
            self._compiled_check_pending = False
            log.info("compiled UNet layers %s the gradient check at step %d: relative distance %.3g from the "
                     "eager layers (tolerance %g; %s)", status, self.global_step, distance,
                     self.compiled_gradient_tolerance, where)
        if status in ("passed", "failed") and self._trainer is not None:
            self.log("compile_check/grad_rel_distance", distance, on_step=True, on_epoch=False, batch_size=1)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        engine = self.trainer.model
        if hasattr(engine, "is_gradient_accumulation_boundary") and not engine.is_gradient_accumulation_boundary():
            return  # DeepSpeed calls this every micro-batch; its gradients are complete only at the boundary
        # All ranks agree before any update is applied: a non-finite loss, gradient norm or learning rate anywhere
        # stops every rank at this step.
        check = check_update(self, optimizer, self._nonfinite, self._skipped)
        self._nonfinite = self._skipped = None
        self.log("grad_norm", check.grad_norm, on_step=True, on_epoch=False, batch_size=1)
        self.log("data/skipped", check.skipped, on_step=True, on_epoch=False, batch_size=1)

    @torch.no_grad()
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch, self.make_generator(self.global_step, batch_idx, 1))
        self.log("test/loss", out.loss, on_step=True, batch_size=next(iter(batch.values())).shape[0])
        return out.loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # EMA once per applied update, before any callback sees the step (so checkpoints include it). DeepSpeed
        # is called every micro-batch and may skip a step (accumulation window, overflow): ask the engine.
        engine = self.trainer.model if self._trainer is not None else None
        applied = engine.was_step_applied() if hasattr(engine, "was_step_applied") else True
        if self.use_ema and applied:
            self.model_ema(self.model)

    # ------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def get_conditioning(
        self, batch: Mapping[str, torch.Tensor], uc_keys: Sequence[str] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Conditioning without dropout and its unconditional counterpart (listed input keys zeroed; default: every
        embedder trained with classifier-free dropout, as the reference's logger does)."""
        if uc_keys is None:
            uc_keys = [e.input_key for e in self.conditioner.embedders if e.ucg_rate > 0.0]
        return self.conditioner.get_unconditional_conditioning(batch, force_uc_zero_embeddings=list(uc_keys))

    def cond_mask_for(self, batch_size: int, frames: int, indices: Sequence[int]) -> torch.Tensor:
        """(B,T) mask with ones at the given condition-frame indices."""
        mask = torch.zeros(batch_size, frames, device=self.device)
        if indices:
            mask[:, list(indices)] = 1.0
        return mask

    @torch.no_grad()
    def sample(
        self,
        cond: dict[str, torch.Tensor],
        uc: dict[str, torch.Tensor] | None,
        shape: Sequence[int],
        cond_frame: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        sampler: Any = None,
        **sampler_kwargs: Any,
    ) -> torch.Tensor:
        """Draw latents of `shape` (B,T,C,h,w) with the configured (or given) sampler; masked frames are `cond_frame`."""
        sampler = sampler or self.sampler
        if sampler is None:
            raise ValueError("no sampler: pass one or set sampler_config in the model config")
        noise = torch.randn(*shape, device=self.device, generator=generator)
        return sampler(self.denoiser, self.model, noise, cond, uc, cond_frame=cond_frame, cond_mask=cond_mask,
                       generator=generator, **sampler_kwargs)

    @torch.no_grad()
    def log_videos(self, batch: Mapping[str, torch.Tensor], n: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        """Samples (EMA weights when kept), inputs and VAE reconstructions of the first n clips, in [-1, 1]."""
        batch = {k: (v[:n] if torch.is_tensor(v) else v) for k, v in batch.items()}
        gen = torch.Generator(device=self.device).manual_seed(seed)
        batch = step.add_condition_frames(batch, gen)
        z = self.latents_of(batch, gen)
        c, uc = self.get_conditioning(batch)
        indices = (self.fixed_cond_frames or [[0]])[0] if self.replace_cond_frames else []
        mask = self.cond_mask_for(z.shape[0], z.shape[1], indices)
        scope = self.model_ema.scope(self.model) if self.use_ema else contextlib.nullcontext()
        with scope:
            samples = self.sample(c, uc, z.shape, cond_frame=z, cond_mask=mask, generator=gen)
        out = {"samples": self.decode_first_stage(samples), "reconstructions": self.decode_first_stage(z)}
        if self.input_key in batch:
            out["inputs"] = batch[self.input_key]
        return out
