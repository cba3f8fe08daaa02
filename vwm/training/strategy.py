"""Distributed strategies from the YAML `lightning` section: DeepSpeed ZeRO (GPU and, for tests, CPU) and DDP.

Lightning's DeepSpeedStrategy refuses CPU accelerators. The DeepSpeed engine itself runs ZeRO-2 on CPU over gloo
(with torch's AdamW), so our subclass relaxes exactly the device checks and passes the local rank where Lightning
passes a CUDA device index. On GPUs it behaves as Lightning's strategy.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch
from lightning_fabric.utilities.seed import reset_seed
from pytorch_lightning.accelerators import CUDAAccelerator
from pytorch_lightning.plugins.precision import DeepSpeedPrecision, Precision
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from pytorch_lightning.trainer.states import TrainerFn

from vwm.training.deepspeed_io import write_through_python_files
from vwm.training.settings import zero_stage
from vwm.training.zero_reshard import load_repartitioned, saved_world_size
from vwm.training.zero_step import speed_up_zero_optimizer

log = logging.getLogger(__name__)

DEEPSPEED_DEFAULTS: dict[str, Any] = {
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": 200_000_000,
    "allgather_bucket_size": 200_000_000,
    # Start every parameter of the flat bf16 buffer on a 16-byte boundary. Without it a 1-element parameter (each
    # time_mixer.mix_factor) shifts all later weights off alignment and cuBLAS/cuDNN fall back to slow unaligned
    # kernels: 0.43 s of a 2.25 s phase-1 step at 576x1024 on an H200 (bench/train_step.py --profile).
    "parameter_alignment": True,
}
"""ZeRO settings used unless the config's `lightning.deepspeed` section overrides them."""


class _BatchAsIsPrecision(DeepSpeedPrecision):
    """DeepSpeed precision that leaves the batch alone: the engine casts pixels for the VAE and latents for the UNet
    itself, so action values (metres, degrees, pixels) reach their fp32 sinusoidal embeddings unrounded."""

    def convert_input(self, data: Any) -> Any:
        return data


class VWMDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy that also runs on CPU (gloo) and never passes a missing device index."""

    strategy_name = "vwm_deepspeed"

    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: DeepSpeedPrecision | None) -> None:
        if type(plugin) is DeepSpeedPrecision:
            plugin = _BatchAsIsPrecision(plugin.precision)
        self._precision_plugin = plugin

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu():
            # Skip DeepSpeedStrategy's CUDA-only check; DDPStrategy's environment setup does the rest.
            DDPStrategy.setup_environment(self)
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            super().setup_distributed()
            return

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _format_config(self) -> None:
        super()._format_config()
        bf16 = self.config.get("bf16")
        if isinstance(bf16, dict) and bf16.get("enabled"):
            # DeepSpeed's bf16 overflow check walks every gradient tensor with a host synchronisation (286 ms of a
            # 1.68 s step at 576x1024 on an H100). vwm's guard checks the same before each update, on every rank
            # (vwm.training.guards.check_update), so it is off unless a DeepSpeed config given to this strategy
            # sets it.
            bf16.setdefault("check_grad_overflow", False)

    def _get_process_group_backend(self) -> str:
        return "gloo" if self._on_cpu() else super()._get_process_group_backend()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        index = self.root_device.index if self.root_device.index is not None else self.local_rank
        with _scalar_params_as_vectors(model):
            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=index),
                config=self.config,
                model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                dist_init_required=False,
            )

        write_through_python_files(engine)
        speed_up_zero_optimizer(engine.optimizer)  # the gradient norm with multi-tensor kernels (zero_step.py)
        return engine, ds_optimizer

    def load_checkpoint(self, checkpoint_path: str, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's DeepSpeed restore; a ZeRO checkpoint written by another number of ranks is re-partitioned
        for this run (`vwm.training.zero_reshard`) when its optimizer state is loaded for training."""
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if not fitting or saved_world_size(checkpoint_path) == self.deepspeed_engine.dp_world_size:
            return super().load_checkpoint(checkpoint_path, weights_only)
        return load_repartitioned(self.deepspeed_engine, checkpoint_path, self.lightning_module.strict_loading)


@contextlib.contextmanager
def _scalar_params_as_vectors(model: torch.nn.Module) -> Iterator[None]:
    """DeepSpeed's initial parameter broadcast views every parameter as bytes, which fails for 0-dim ones (CLIP's
    `logit_scale`). Present them as 1-element vectors during initialisation and restore their shape after."""
    scalars = [p for p in model.parameters() if p.dim() == 0]
    for p in scalars:
        p.data = p.data.reshape(1)
    try:
        yield
    finally:
        for p in scalars:
            p.data = p.data.reshape(())


MIN_DEEPSPEED = "0.19.7"
"""The first DeepSpeed with ZeRO's `parameter_alignment` (DEEPSPEED_DEFAULTS); older ones reject the setting."""


def _require_deepspeed(minimum: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("deepspeed")
    except PackageNotFoundError:
        raise RuntimeError(f"the DeepSpeed strategies need deepspeed >= {minimum}, which is not installed: "
                           f"pip install -c constraints.txt 'deepspeed>={minimum}' (or strategy ddp)") from None
    if Version(installed) < Version(minimum):
        raise RuntimeError(f"deepspeed {installed} is installed; vwm's ZeRO settings need deepspeed >= {minimum} "
                           f"(parameter_alignment): pip install -c constraints.txt 'deepspeed>={minimum}'")


def build_strategy(name: str | None, lightning_cfg: Mapping[str, Any], timeout_s: float = 1800.0) -> Strategy | str:
    """The Lightning strategy named in the config (`deepspeed_stage_{1,2}`, `ddp`, `auto`), configured from YAML."""
    name = name or "auto"
    timeout = timedelta(seconds=timeout_s)
    if name.startswith("deepspeed"):
        stage = zero_stage(name)
        if stage not in (1, 2):
            raise ValueError(f"strategy={name!r}: vwm supports ZeRO stages 1 and 2 (optimizer/gradient sharding)")
        _require_deepspeed(MIN_DEEPSPEED)
        zero = {**DEEPSPEED_DEFAULTS, **dict(lightning_cfg.get("deepspeed") or {})}
        config = {
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage, **zero},
            "train_micro_batch_size_per_gpu": 1,
        }
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        return VWMDeepSpeedStrategy(config=config, timeout=timeout)
    if name == "ddp":
        # Every trainable parameter receives a gradient (inert ones are frozen), so no unused-parameter search.
        return DDPStrategy(find_unused_parameters=False, timeout=timeout)
    if name in ("auto", "single_device"):
        return "auto"
    raise ValueError(f"lightning.trainer.strategy={name!r}: expected deepspeed_stage_1, deepspeed_stage_2, ddp or auto")
