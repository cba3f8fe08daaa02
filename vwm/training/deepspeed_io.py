"""How DeepSpeed writes checkpoint files: through Python file objects, so a failed write raises the real OSError
(ENOSPC names the full disk) instead of torch's path writer's "unexpected pos" / "basic_ios::clear" stream error."""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine


def _first_os_error(err: BaseException) -> OSError | None:
    """The earliest OSError in an exception's chain (torch's zip writer turns a failed write into a RuntimeError
    raised while the OSError is handled)."""
    found, seen = None, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            found = err
        err = err.__cause__ or err.__context__
    return found


class PythonFileCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine writing each file through `open()` (same bytes, same format)."""

    def save(self, state_dict: Any, path: str) -> None:
        try:
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
        except (OSError, RuntimeError) as err:
            first = _first_os_error(err)
            if first is None or first is err:
                raise
            raise first from None


def write_through_python_files(engine: Any) -> None:
    """Switch a DeepSpeed engine's stock torch checkpoint engine to `PythonFileCheckpointEngine` (other engines,
    such as the decoupled or fast writers, are left alone)."""
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.__class__ = PythonFileCheckpointEngine
