"""The SVD-XT spatio-temporal UNet with Vista's additions (condition-frame timestep embedding, action control, LoRA).

Attribute paths reproduce the reference exactly (`input_blocks.N.K`, `time_stack`, `time_mixer.mix_factor`, ...),
so SVD-XT and Vista checkpoints load without key surgery. Public tensors are (B, T, C, H, W); inside, frames are
flattened to (B·T) for the 2-D layers and regrouped per location for the temporal ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from vwm.models.attention import BasicTransformerBlock, VideoTransformerBlock
from vwm.models.embeddings import timestep_embedding
from vwm.models.layers import AlphaBlender, MergeStrategy, normalization, temporal_conv, zero_module


# Inductor options of the compiled UNet layers in training. With Inductor's default padding of tensor strides
# (comprehensive and shape padding), the compiled backward of the SVD res block gave NaN weight gradients in bf16 on
# an H100 (torch 2.11), while its forward was right: the whole 576x1024 loss matched eager and its gradients were
# 1.9e4 times their norm off. Of the eleven option sets `bench/compiled_grads.py --sweep` tried on that block, only
# padding off gave the eager gradients (relative distance 0.0067 in bf16), and with it the compiled 576x1024 training
# step passed its gradient check (distance 4.0e-4, docs/performance.md, 2026-12-07). Mix-order reduction (fused
# inner and outer sums of a norm's backward, on by default since torch 2.10, with silent-correctness bugs reported
# upstream) was not the cause but stays off: the verified step ran without it. Sampling, which has no backward,
# compiles with torch's defaults (`compile_layers(inference=True)`): padding off made its 50-step 576x1024 rollout
# 0.8 s slower (docs/performance.md). `compile_layers(inductor_options=...)` and the config's `compile_options`
# override a key.
INDUCTOR_OPTIONS: dict[str, object] = {
    "comprehensive_padding": False,
    "shape_padding": False,
    "triton.mix_order_reduction": False,
}


def flat_options(options, prefix: str = "") -> dict:  # noqa: ANN001
    """Inductor options as torch.compile takes them: nested mappings (`{triton: {mix_order_reduction: false}}`, as
    YAML writes them) become dotted keys (`triton.mix_order_reduction`); dotted keys stay."""
    flat = {}
    for key, value in dict(options).items():
        if hasattr(value, "items"):
            flat.update(flat_options(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class VideoLayer:
    """Mixin for UNet layers that need the timestep embedding, the clip context and the frame count; they can
    recompute their activations in the backward pass (gradient checkpointing)."""

    use_checkpoint: bool = False
    compiled_run = None  # the compiled stand-in for `_run`, set by VideoUNet.compile_layers

    def run(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Apply the layer's `video_forward(x ((b t),c,h,w), emb ((b t),e), context (b,m,d), num_frames)`, under
        activation checkpointing when enabled and gradients are needed; compiled when the UNet was."""
        if self.compiled_run is not None:
            return self.compiled_run(x, emb, context, num_frames)
        return self._run(x, emb, context, num_frames)

    def _run(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int,
             forward=None) -> torch.Tensor:  # noqa: ANN001
        forward = forward or self.video_forward
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(forward, x, emb, context, num_frames, use_reentrant=False)
        return forward(x, emb, context, num_frames)


class ResBlock(nn.Module):
    """Residual block GN-SiLU-conv, + Linear(emb), GN-SiLU-dropout-zero conv, with a 1x1 (or 3x3) skip when the
    width changes (Ho et al. 2020, as in SVD); `dims=3` with kernel (3,1,1) makes it temporal."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        dims: Literal[2, 3] = 2,
        kernel_size: int | Sequence[int] = 3,
        use_conv_skip: bool = False,
        frames_in_emb: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        conv = nn.Conv2d if dims == 2 else temporal_conv
        padding = [k // 2 for k in kernel_size] if isinstance(kernel_size, Sequence) else kernel_size // 2
        self.frames_in_emb = frames_in_emb
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv(channels, out_channels, kernel_size, padding=padding)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(conv(out_channels, out_channels, kernel_size, padding=padding)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv_skip:
            self.skip_connection = conv(channels, out_channels, kernel_size, padding=padding)
        else:
            self.skip_connection = conv(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) with emb (N, E); or, temporal, x: (B, C, T, H, W) with emb (B, T, E)."""
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)
        e = rearrange(e, "b t c -> b c t 1 1") if self.frames_in_emb else e[..., None, None]
        return self.skip_connection(x) + self.out_layers(h + e)


class VideoResBlock(ResBlock, VideoLayer):
    """Spatial ResBlock per frame followed by a temporal (3,1,1) ResBlock, blended by a learned `time_mixer`."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        video_kernel_size: int | Sequence[int] = 3,
        merge_strategy: MergeStrategy = "learned_with_images",
        merge_factor: float = 0.5,
        use_checkpoint: bool = False,
    ):
        super().__init__(channels, emb_channels, out_channels, dropout)
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.time_stack = ResBlock(
            out_channels, emb_channels, out_channels, dropout, dims=3, kernel_size=video_kernel_size, frames_in_emb=True
        )
        self.time_mixer = AlphaBlender(merge_factor, merge_strategy)

    def video_forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = ResBlock.forward(self, x, emb)
        # Explicit copies at layout changes keep every kernel on dense NCHW / row-major inputs.
        x = rearrange(x, "(b t) c h w -> b c t h w", t=num_frames).contiguous()
        x_t = self.time_stack(x, rearrange(emb, "(b t) c -> b t c", t=num_frames))
        return rearrange(self.time_mixer(x, x_t), "b c t h w -> (b t) c h w").contiguous()


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (or 2x2 average pool when `use_conv` is False)."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution (when `use_conv`)."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class SpatialVideoTransformer(nn.Module, VideoLayer):
    """GN + projection, then per depth level a spatial transformer block and a temporal one (on the spatial output
    plus a frame-index embedding) blended by `time_mixer`, projection back and residual (SVD)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        depth: int = 1,
        dropout: float = 0.0,
        use_linear: bool = True,
        ff_in: bool = True,
        merge_strategy: MergeStrategy = "learned_with_images",
        merge_factor: float = 0.5,
        max_time_embed_period: int = 10000,
        add_lora: bool = False,
        lora_rank: int = 16,
        lora_scale: float = 1.0,
        action_control: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        adapters = dict(add_lora=add_lora, lora_rank=lora_rank, lora_scale=lora_scale, action_control=action_control)
        self.use_checkpoint = use_checkpoint
        self.use_linear = use_linear
        self.channels = channels
        self.max_time_embed_period = max_time_embed_period
        self.norm = normalization(channels)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, **adapters) for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1))
        self.time_stack = nn.ModuleList(
            VideoTransformerBlock(inner, heads, dim_head, context_dim, dropout, ff_in=ff_in, **adapters)
            for _ in range(depth)
        )
        self.time_pos_embed = nn.Sequential(nn.Linear(channels, channels * 4), nn.SiLU(), nn.Linear(channels * 4, channels))
        self.time_mixer = AlphaBlender(merge_factor, merge_strategy)

    def video_forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        _, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "n c h w -> n (h w) c").contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        frames = torch.arange(num_frames, device=x.device)
        frame_emb = self.time_pos_embed(
            timestep_embedding(frames, self.channels, self.max_time_embed_period).to(x.dtype)
        )  # (t, c)
        for block, time_block in zip(self.transformer_blocks, self.time_stack):
            x = block(x, context)
            x_mix = rearrange(x, "(b t) s c -> b t s c", t=num_frames) + frame_emb[None, :, None]
            x_mix = rearrange(x_mix, "b t s c -> (b s) t c")
            x_mix = time_block(x_mix, context)
            x_mix = rearrange(x_mix, "(b s) t c -> (b t) s c", s=h * w)
            x = self.time_mixer(x, x_mix)
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "n (h w) c -> n c h w", h=h, w=w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class UNetBlock(nn.Sequential):
    """One `input_blocks.N` / `output_blocks.N` entry: layers applied in order, video layers get the extra inputs."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        for layer in self:
            x = layer.run(x, emb, context, num_frames) if isinstance(layer, VideoLayer) else layer(x)
        return x


class VideoUNet(nn.Module):
    """SVD-XT video UNet eps/v-network F(x, c_noise, context, y) over (B, T, C, H, W) latents (Blattmann et al. 2023),
    with Vista's clean-condition-frame timestep MLP, action-control K/V adapters and LoRA (Gao et al. 2024)."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        context_dim: int,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_head_channels: int = -1,
        num_heads: int = -1,
        transformer_depth: int | Sequence[int] = 1,
        transformer_depth_middle: int | None = None,
        dropout: float = 0.0,
        conv_resample: bool = True,
        num_classes: Literal["sequential"] | None = None,
        adm_in_channels: int | None = None,
        use_checkpoint: bool | Literal["auto"] = False,
        checkpoint_budget_gib: float | None = None,
        use_linear_in_transformer: bool = False,
        extra_ff_mix_layer: bool = False,
        use_spatial_context: bool = True,
        merge_strategy: MergeStrategy = "learned_with_images",
        merge_factor: float = 0.5,
        video_kernel_size: int | Sequence[int] = 3,
        max_ddpm_temb_period: int = 10000,
        add_lora: bool = False,
        lora_rank: int = 16,
        lora_scale: float = 1.0,
        action_control: bool = False,
        separate_cond_time_embed: bool = True,
    ):
        super().__init__()
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError(
                f"set exactly one of num_heads ({num_heads}) and num_head_channels ({num_head_channels})"
            )
        if not use_spatial_context:
            raise ValueError("use_spatial_context=False is not supported: the temporal cross-attention uses the "
                             "clip's spatial context (SVD / Vista)")
        if num_classes == "sequential" and adm_in_channels is None:
            raise ValueError("num_classes='sequential' needs adm_in_channels")
        depths = [transformer_depth] * len(channel_mult) if isinstance(transformer_depth, int) else list(transformer_depth)
        if len(depths) != len(channel_mult):
            raise ValueError(f"transformer_depth {depths} needs one entry per channel_mult level {list(channel_mult)}")
        depth_mid = depths[-1] if transformer_depth_middle is None else transformer_depth_middle
        if use_checkpoint not in (True, False, "auto"):
            raise ValueError(f"use_checkpoint must be true, false or 'auto', got {use_checkpoint!r}")
        if checkpoint_budget_gib is not None and not checkpoint_budget_gib > 0:
            raise ValueError(f"checkpoint_budget_gib must be > 0 GiB, got {checkpoint_budget_gib}")
        # "auto": every layer checkpointed until the trainer applies a plan for its GPU's memory
        # (vwm.training.activation_plan), which stores the activations of the layers that fit within
        # `checkpoint_budget_gib` (default: 85 % of the GPU) and recomputes only the rest
        self.checkpoint_policy = use_checkpoint
        self.checkpoint_budget_gib = checkpoint_budget_gib
        use_checkpoint = bool(use_checkpoint)

        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if separate_cond_time_embed:  # Vista; SVD-XT has no such MLP and embeds clean frames like noisy ones
            self.cond_time_stack_embed = nn.Sequential(
                nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )
        if num_classes == "sequential":
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        def resblock(ch_in: int, ch_out: int | None = None) -> VideoResBlock:
            return VideoResBlock(ch_in, emb_dim, ch_out, dropout, video_kernel_size, merge_strategy, merge_factor,
                                 use_checkpoint)

        def transformer(ch: int, depth: int) -> SpatialVideoTransformer:
            heads, dim_head = (ch // num_head_channels, num_head_channels) if num_head_channels != -1 else (
                num_heads, ch // num_heads)
            return SpatialVideoTransformer(
                ch, heads, dim_head, context_dim, depth, dropout, use_linear_in_transformer, extra_ff_mix_layer,
                merge_strategy, merge_factor, max_ddpm_temb_period, add_lora, lora_rank, lora_scale, action_control,
                use_checkpoint,
            )

        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch, conv_resample)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = UNetBlock(resblock(ch), transformer(ch, depth_mid), resblock(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(UNetBlock(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)))

    def compile_layers(self, checkpoint_in_graph: bool = True, inductor_options: dict | None = None,
                       inference: bool = False) -> None:
        """torch.compile each res block and transformer (regional compilation): the norms, activations, residual
        adds and layout changes between the matmuls and convolutions fuse into few kernels. Layers of equal shapes
        share one compiled graph, so a 25-frame SVD UNet compiles about 20 graphs once per resolution. The state
        dict is unchanged.

        `checkpoint_in_graph` (the default): activation checkpointing is traced into the compiled graph, whose
        partitioner chooses what to keep and what to recompute, without per-tensor Python hooks: 1.573 -> 1.358 s
        and 40.5 -> 30.9 GiB per 576x1024 phase-1 step against False (H200, 2026-11-22, every layer
        checkpointed). It compiles one graph per layer shape and checkpoint flag. False compiles only the layer's
        math and checkpoints around it in eager code: one graph per layer shape whatever the activation plan, and
        no checkpoint operator inside the compiler (`bench/regions.py --checkpoint-in eager`). Inductor runs with
        `INDUCTOR_OPTIONS` (stride padding off: with it, both placements gave wrong bf16 gradients on an H100)
        updated by `inductor_options`; with `inference` (sampling: no gradients are ever taken) with torch's
        defaults updated by `inductor_options`, since the padding fault is in the backward and padding makes the
        forward faster."""
        import functools

        import torch._dynamo

        layers = [m for m in self.modules() if isinstance(m, VideoLayer)]
        # One code object per layer class serves every instance; each distinct shape is one cache entry.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(layers))
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 8 * len(layers))
        options = {**({} if inference else INDUCTOR_OPTIONS), **flat_options(inductor_options or {})}
        for layer in layers:
            if checkpoint_in_graph:
                layer.compiled_run = torch.compile(layer._run, dynamic=False, options=options)
            else:
                forward = torch.compile(layer.video_forward, dynamic=False, options=options)
                layer.compiled_run = functools.partial(layer._run, forward=forward)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each res block and transformer in the backward pass instead of storing activations."""
        for module in self.modules():
            if isinstance(module, VideoLayer):
                module.use_checkpoint = enabled

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B,T,C,H,W), c_noise (B,T), context (B,M,D), y (B,adm), cond_mask (B,T) -> (B,T,C_out,H,W)."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass the vector conditioning y if and only if the network has num_classes set")
        b, t = x.shape[:2]
        x = x.to(self.input_blocks[0][0].weight.dtype)  # inputs follow the weights (bf16 under DeepSpeed bf16)
        t_emb = timestep_embedding(rearrange(c_noise, "b t -> (b t)"), self.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb)
        if cond_mask is not None and hasattr(self, "cond_time_stack_embed"):
            # Clean condition frames get their own timestep MLP (Vista); torch.where keeps the graph sync-free.
            is_cond = rearrange(cond_mask, "b t -> (b t) 1").bool()
            emb = torch.where(is_cond, self.cond_time_stack_embed(t_emb), emb)
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype)).repeat_interleave(t, dim=0)
        context = context.to(x.dtype)
        h = rearrange(x, "b t c h w -> (b t) c h w")
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, t)
            skips.append(h)
        h = self.middle_block(h, emb, context, t)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, t)
        return rearrange(self.out(h), "(b t) c h w -> b t c h w", b=b)


class UNetWrapper(nn.Module):
    """Feeds the conditioner output to the UNet: concatenates `cond["concat"]` to every frame's channels and passes
    `crossattn` as context and `vector` as y (the reference's OpenAIWrapper; state-dict prefix `model.diffusion_model`)."""

    def __init__(self, diffusion_model: VideoUNet, compile_model: bool = False, compile_options: dict | None = None):
        super().__init__()
        self.diffusion_model = diffusion_model
        if compile_model:
            diffusion_model.compile_layers(inductor_options=compile_options)

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, cond: dict[str, torch.Tensor], cond_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B,T,C,H,W), c_noise (B,T) -> network output (B,T,C_out,H,W)."""
        if "concat" in cond:
            concat = cond["concat"].to(x.dtype)
            x = torch.cat([x, concat[:, None].expand(-1, x.shape[1], -1, -1, -1)], dim=2)
        return self.diffusion_model(x, c_noise, cond["crossattn"], cond.get("vector"), cond_mask)
