"""Fault injection for end-to-end tests: `python tests/faults.py <train.py args>` runs train.py with the faults
named in the environment variable VWM_FAULTS (comma-separated). The faults act at the boundaries real failures
come from (a gradient, the optimizer's learning rate, a buffer, the process, the disk); the code under test runs
unchanged.

  nan_loss:S:R         the loss of the step that makes global step S is NaN on rank R
  nan_grad:S:R         the update that makes global step S gets a NaN gradient on rank R (its loss stays finite)
  inf_lr:S             the update that makes global step S uses an infinite learning rate (a broken schedule)
  nan_ema:S            after step S one EMA shadow holds a NaN (the weights and losses stay finite)
  kill_after_commit:S  SIGKILL right after checkpoint step-S is committed (renamed into place)
  enospc:S             every checkpoint file of step S is written to /dev/full (the kernel answers ENOSPC)
"""

from __future__ import annotations

import os
import signal
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from tests/
    sys.path.insert(0, REPO)


def _faults() -> dict[str, list[int]]:
    out = {}
    for item in filter(None, os.environ.get("VWM_FAULTS", "").split(",")):
        name, *args = item.split(":")
        out[name] = [int(a) for a in args]
    return out


def install(faults: dict[str, list[int]]) -> None:
    """Patch the faults into the engine, the checkpoint code's file operations and torch.save."""
    from vwm.models.engine import DiffusionEngine

    if "nan_loss" in faults:
        step, rank = faults["nan_loss"]
        compute_loss = DiffusionEngine.compute_loss

        def nan_loss(self, batch, generator):
            out = compute_loss(self, batch, generator)
            if self.global_step == step - 1 and self.global_rank == rank:
                out.loss = out.loss * float("nan")
            return out

        DiffusionEngine.compute_loss = nan_loss
    if "nan_grad" in faults:
        step, rank = faults["nan_grad"]

        def on_train_start(self):
            def poison(grad):
                return grad * float("nan") if self.global_step == step - 1 and self.global_rank == rank else grad

            next(p for p in self.model.parameters() if p.requires_grad).register_hook(poison)

        DiffusionEngine.on_train_start = on_train_start
    if "inf_lr" in faults:
        (step,) = faults["inf_lr"]

        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == step - 1:
                for group in self.trainer.optimizers[0].param_groups:
                    group["lr"] = float("inf")

        DiffusionEngine.on_train_batch_start = on_train_batch_start
    if "nan_ema" in faults:
        (step,) = faults["nan_ema"]

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.global_step == step:
                shadow = next(b for n, b in self.model_ema.named_buffers() if n not in ("decay", "num_updates"))
                shadow.view(-1)[0] = float("nan")

        DiffusionEngine.on_train_batch_end = on_train_batch_end
    if "kill_after_commit" in faults:
        import vwm.training.checkpointing as checkpointing

        (step,) = faults["kill_after_commit"]
        replace = os.replace

        def replace_then_die(src, dst):
            replace(src, dst)
            if os.path.basename(dst) == f"step-{step:09d}":
                os.kill(os.getpid(), signal.SIGKILL)

        checkpointing.os.replace = replace_then_die
    if "enospc" in faults:
        (step,) = faults["enospc"]
        save = torch.save
        marker = f".step-{step:09d}.partial"

        def save_to_full_disk(obj, f, *args, **kwargs):
            name = str(f) if isinstance(f, (str, os.PathLike)) else str(getattr(f, "name", ""))
            if marker in name and isinstance(f, (str, os.PathLike)):
                f = "/dev/full"
            elif marker in name:  # the caller's open file now writes to a full device
                full = os.open("/dev/full", os.O_WRONLY)
                os.dup2(full, f.fileno())
                os.close(full)
            return save(obj, f, *args, **kwargs)

        torch.save = save_to_full_disk


if __name__ == "__main__":
    install(_faults())
    from vwm.cli.train import main

    sys.exit(main())
