"""DeepSpeed's ZeRO step without its per-tensor host work (vwm/training/zero_step.py), on a real ZeRO-2 engine in bf16
(gloo on the CPU): the multi-tensor gradient norm is DeepSpeed's own, its NaN masking included, and the bf16
overflow check that vwm's guard replaces is off."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from conftest import clean_subprocess_env
from helpers import REPO

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import vwm  # noqa: F401
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from vwm.training.strategy import build_strategy

    class Toy(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            # many tensors of odd sizes (and a 1-element one), as the UNet's ~1,340 are
            self.layers = torch.nn.ModuleList(torch.nn.Linear(16 + i, 17 + i) for i in range(6))
            self.gain = torch.nn.Parameter(torch.ones(1))
            self.rows = []

        def training_step(self, batch, i):
            (x,) = batch
            x = x.to(self.gain.dtype)
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return (x * self.gain).square().mean() * 1e3

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

        def on_before_optimizer_step(self, optimizer):
            opt = self.trainer.model.optimizer
            grads, params = opt.averaged_gradients[0], opt.params_in_partition[0]
            fast = float(opt.get_grad_norm_direct(grads, params))
            deepspeeds = float(opt._vwm_foreach_grad_norm(grads, params))
            saved = grads[2].clone()
            grads[2].view(-1)[0] = float("nan")
            masked = (float(opt.get_grad_norm_direct(grads, params)),
                      float(opt._vwm_foreach_grad_norm(grads, params)))
            grads[2].copy_(saved)
            self.rows.append({"fast": fast, "deepspeed": deepspeeds, "masked": masked,
                              "dtype": str(grads[0].dtype), "n": len(params)})

    strategy = build_strategy("deepspeed_stage_2", {})
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, precision="bf16-mixed", max_steps=3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=0.5)
    model = Toy()
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(48, 16)), batch_size=8))
    print(json.dumps({"bf16": strategy.config["bf16"], "rows": model.rows}))
""")


def test_zero2_bf16_step_uses_deepspeeds_own_norm_through_multi_tensor_kernels(tmp_path):
    script = tmp_path / "zero_step.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), REPO], env=clean_subprocess_env(), capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # vwm.training.guards.check_update refuses non-finite gradients before every update instead
    assert result["bf16"] == {"enabled": True, "check_grad_overflow": False}
    rows = result["rows"]
    assert len(rows) == 3 and all(r["dtype"] == "torch.bfloat16" and r["n"] == 13 for r in rows), rows
    for r in rows:
        assert r["fast"] > 1.0  # the loss is scaled so that clipping at 0.5 acts
        assert abs(r["fast"] - r["deepspeed"]) <= 1e-6 * r["deepspeed"], r
        assert r["masked"] == [-1.0, -1.0]  # a NaN anywhere: DeepSpeed's -1 sentinel, from both
    assert len({round(r["fast"], 3) for r in rows}) == 3  # the weights moved between steps


def test_the_norm_is_only_installed_on_deepspeeds_zero_optimizer():
    import torch
    from vwm.training.zero_step import speed_up_zero_optimizer

    plain = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert speed_up_zero_optimizer(plain) is False and not hasattr(plain, "get_grad_norm_direct")


def test_an_older_deepspeed_is_named_with_the_version_vwm_needs(monkeypatch):
    """DeepSpeed before 0.19.7 rejects ZeRO's parameter_alignment with a pydantic 'Extra inputs are not permitted';
    vwm names the installed and the needed version instead, and the requirement files state the same floor."""
    import importlib.metadata
    import re

    import pytest
    from vwm.training.strategy import MIN_DEEPSPEED, build_strategy

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.18.0" if name == "deepspeed" else real(name))
    with pytest.raises(RuntimeError, match=r"deepspeed 0\.18\.0 is installed; .* need deepspeed >= 0\.19\.7"):
        build_strategy("deepspeed_stage_2", {})
    assert build_strategy("ddp", {}) is not None  # other strategies do not need it
    for name in ("requirements.txt", "pyproject.toml"):
        with open(f"{REPO}/{name}") as f:
            assert re.findall(r"deepspeed>=([\d.]+)", f.read()) == [MIN_DEEPSPEED], name
