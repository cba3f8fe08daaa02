"""What a user watches and reads at the end of a run: a progress bar that counts optimizer steps toward the run's
end (continuing across a resume) with loss, clips/s and ETA; and the closing summary (steps, time, final loss,
checkpoints, the loss curve written to the run directory, the next command)."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.callbacks.progress.progress_bar import ProgressBar
from tqdm import tqdm

log = logging.getLogger(__name__)

LOSS_PNG = "loss.png"
"""The loss curve written into the run directory at the end of a run."""


def _total_steps(trainer: pl.Trainer) -> int | None:
    """Optimizer steps at which the run ends (max_steps, else max_epochs x steps per epoch); None if unbounded."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        total = trainer.estimated_stepping_batches
    except (RuntimeError, ValueError, TypeError, AttributeError):  # no sized loader yet
        return None
    return int(total) if math.isfinite(total) and total > 0 else None


class StepProgressBar(ProgressBar):
    """A tqdm bar over optimizer steps 0..end, starting at the resumed step, showing the loss, clips/s and the ETA
    (rank 0 only; Lightning's own bar counts batches of an epoch)."""

    def __init__(self, clips_per_step: int, refresh_s: float = 0.5):
        super().__init__()
        self.clips_per_step = clips_per_step
        self.refresh_s = refresh_s
        self._enabled = True
        self._bar: Any = None
        self._t_start = 0.0
        self._step_start = 0
        self._last_draw = 0.0

    def disable(self) -> None:
        """No bar (every rank but 0)."""
        self._enabled = False

    def enable(self) -> None:
        """Show the bar."""
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return

        self._step_start = trainer.global_step
        self._t_start = time.perf_counter()
        self._bar = tqdm(total=_total_steps(trainer), initial=trainer.global_step, desc="train", unit="step",
                         dynamic_ncols=True, file=sys.stderr, smoothing=0.05,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._bar is None:
            return
        step = trainer.global_step
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        now = time.perf_counter()
        if now - self._last_draw < self.refresh_s and step != self._bar.total:
            return
        self._last_draw = now
        done = step - self._step_start
        rate = done * self.clips_per_step / max(now - self._t_start, 1e-9)
        loss = trainer.callback_metrics.get("loss")
        postfix = {"clips/s": f"{rate:.2f}"}
        if loss is not None:
            postfix = {"loss": f"{float(loss):.4f}", **postfix}
        self._bar.set_postfix(postfix, refresh=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print above the bar."""
        if self._bar is not None:
            self._bar.write(" ".join(map(str, args)), file=sys.stderr)
        else:
            print(*args, file=sys.stderr, **kwargs)


# ----------------------------------------------------------------------------------------------------- summary


@dataclass
class RunSummary:
    """The closing report of a run (rank 0)."""

    run_dir: str
    first_step: int
    last_step: int
    seconds: float
    clips_per_step: int
    final_loss: float | None = None
    mean_loss_last: float | None = None
    checkpoint: str | None = None
    loss_png: str | None = None
    next_commands: list[str] = field(default_factory=list)
    stopped_by_signal: int | None = None
    tensorboard: bool = False
    compiled_check: dict | None = None
    """The compiled UNet layers' gradient check (DiffusionEngine.compiled_check), when the run compiled them."""

    def lines(self) -> list[str]:
        """The summary as printed."""
        steps = self.last_step - self.first_step
        rate = steps * self.clips_per_step / self.seconds if self.seconds > 0 else float("nan")
        head = "stopped by signal %d" % self.stopped_by_signal if self.stopped_by_signal else "finished"
        out = [f"== training {head}: step {self.last_step} ({steps} steps this run, from step {self.first_step}) in "
               f"{_duration(self.seconds)}, {rate:.2f} clips/s"]
        if self.final_loss is not None:
            out.append(f"   final loss {self.final_loss:.5f}" + (
                f" (mean of the last 10 % of steps: {self.mean_loss_last:.5f})"
                if self.mean_loss_last is not None else ""))
        check = self.compiled_check
        if check is not None and check["status"] in ("passed", "failed"):
            verdict = "passed: trained compiled" if check["status"] == "passed" else "FAILED: trained eagerly"
            out.append(f"   compiled layers gradient check at step {check['step']} {verdict} (relative distance "
                       f"{check['grad_rel_distance']:.3g} from eager)")
        elif check is not None:
            out.append(f"   compiled layers not verified ({check['status']})")
        out.append(f"   run directory  {self.run_dir}")
        out.append(f"   checkpoint     {self.checkpoint or '(none written)'}")
        if self.loss_png:
            out.append(f"   loss curve     {self.loss_png}")
        if self.tensorboard:
            out.append(f"   TensorBoard    tensorboard --logdir {os.path.join(self.run_dir, 'tensorboard')}")
        for i, command in enumerate(self.next_commands):
            out.append(f"   {'next' if i == 0 else '    '}           {command}")
        return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def read_losses(metrics_path: str) -> list[tuple[int, float]]:
    """(step, loss) rows of a run's metrics.jsonl (empty when missing)."""
    if not os.path.isfile(metrics_path):
        return []
    rows = []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if "loss" in row and "step" in row and math.isfinite(float(row["loss"])):
                rows.append((int(row["step"]), float(row["loss"])))
    return rows


def plot_losses(rows: list[tuple[int, float]], path: str, title: str) -> str | None:
    """Write the loss curve (per step and a moving average, log scale) as a PNG; None without matplotlib or
    without rows."""
    if not rows:
        return None
    try:
        import matplotlib
    except ImportError:
        log.info("matplotlib is not installed: no %s", path)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([s for s, _ in rows])
    loss = np.array([v for _, v in rows])
    k = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, alpha=0.35, lw=0.8, label="loss per step")
    ax.plot(steps[k - 1:], smooth, lw=2, label=f"moving average ({k} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion loss")
    if (loss > 0).all():
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def next_commands(run_dir: str, checkpoint: str | None, cfg: Any) -> list[str]:
    """What to run after this phase: the export of the newest checkpoint (with --keep-lora when LoRA adapters
    train, so the next stage continues them), then sampling from it."""
    if checkpoint is None:
        return []
    name = os.path.basename(run_dir.rstrip(os.sep))
    dst = os.path.join("ckpts", f"{name}.safetensors")
    lora = bool(_select(cfg, "model.params.network_config.params.add_lora"))
    export = ["python", "bin_to_st.py", os.path.relpath(checkpoint), dst] + (["--keep-lora"] if lora else [])
    out = [shlex.join(export) + ("   # --keep-lora: the next stage continues the adapters; drop it for the final "
                                 "export" if lora else "")]
    out.append(f"python train.py --base <next phase config> --finetune {shlex.quote(dst)}   # or sample.py "
               f"--ckpt {shlex.quote(dst)}")
    return out


def _select(cfg: Any, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key)
    except Exception:  # noqa: BLE001 - a config without that key (any OmegaConf error) simply has no value
        return None


def summarize(run_dir: str, *, first_step: int, last_step: int, seconds: float, clips_per_step: int,
              checkpoint: str | None, cfg: Any, stopped_by_signal: int | None = None,
              metrics_file: str = "metrics.jsonl", compiled_check: dict | None = None) -> RunSummary:
    """Build the closing summary and write the loss curve into the run directory."""
    rows = read_losses(os.path.join(run_dir, metrics_file))
    final = rows[-1][1] if rows else None
    tail = rows[-max(1, len(rows) // 10):] if rows else []
    png = plot_losses(rows, os.path.join(run_dir, LOSS_PNG), f"vwm: {os.path.basename(run_dir)}")
    return RunSummary(run_dir=run_dir, first_step=first_step, last_step=last_step, seconds=seconds,
                      clips_per_step=clips_per_step, final_loss=final,
                      mean_loss_last=sum(v for _, v in tail) / len(tail) if tail else None,
                      checkpoint=checkpoint, loss_png=png, next_commands=next_commands(run_dir, checkpoint, cfg),
                      stopped_by_signal=stopped_by_signal, compiled_check=compiled_check,
                      tensorboard=os.path.isdir(os.path.join(run_dir, "tensorboard")))
