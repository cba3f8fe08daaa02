"""The only way vwm opens a pickle: `torch.load(weights_only=True)`, with DeepSpeed's allow-listed classes for ZeRO
files. A file that needs arbitrary code execution is refused with a CheckpointError saying how to convert it."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Collection

import torch

from vwm.checkpoint.errors import CheckpointError

CONVERT_HINT = (
    "If you trust the file, convert it to safetensors in an isolated environment, e.g. "
    "`python -c \"import torch, safetensors.torch as s; sd = torch.load('IN', weights_only=False); "
    "s.save_file({k: v.contiguous() for k, v in sd.get('state_dict', sd).items() if torch.is_tensor(v)}, "
    "'OUT.safetensors')\"`"
)
"""How to turn a pickle that needs arbitrary code into a file vwm reads."""


def torch_load_safely(path: str, mmap: bool = False) -> object:
    """`torch.load` through the restricted unpickler, memory-mapped when asked and the file is a zip."""
    mmap = mmap and zipfile.is_zipfile(path)  # only torch's zip format maps; legacy pickles are read whole
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to unpickle: it needs arbitrary code execution, which vwm never allows "
            f"(torch.load(weights_only=True) says: {str(err).splitlines()[0]}). {CONVERT_HINT}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from err


def _deepspeed_safe_globals() -> list:
    """Classes DeepSpeed pickles into ZeRO checkpoints that the restricted unpickler may rebuild."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, loss_scaler.LossScaler, loss_scaler.DynamicLossScaler, fragment_address]


def load_zero_file(path: str) -> object:
    """A DeepSpeed checkpoint file, memory-mapped, through the restricted unpickler with DeepSpeed's allow-listed
    classes (a file that needs more is refused)."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch_load_safely(path, mmap=True)


def verify_pickles(root: str, skip: Collection[str] = ()) -> None:
    """Open every file under `root` with the restricted unpickler and DeepSpeed's allow-listed classes, except
    Python scripts (DeepSpeed's zero_to_*.py), the manifest and the files named in `skip` (read as text by their
    users); a file that needs more is refused before anything else unpickles it."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for folder, _, files in os.walk(root):
            for name in sorted(files):
                if name not in skip and not name.endswith(".py") and not name.startswith("MANIFEST.json"):
                    torch_load_safely(os.path.join(folder, name), mmap=True)

