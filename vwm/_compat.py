"""Import-time environment fixes that must run before torchvision, open_clip or Lightning are imported.

The only torchvision wheel published for some torch releases is a CUDA build. Next to a CPU build of
torch its native library cannot load, and its import then dies while registering fake kernels for the
`torchvision::nms` / `torchvision::qnms` operators that the native library would have defined. vwm uses
no torchvision operator (open_clip imports torchvision only for its transforms, and Lightning reaches it
through torchmetrics), so when, and only when, that native library fails to load we declare the two
operator schemas ourselves. Calling any torchvision operator afterwards still fails loudly.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)

_TORCHVISION_FALLBACK_LIB: torch.library.Library | None = None
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _torchvision_native_library() -> str | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    for name in sorted(os.listdir(folder)):
        if name.startswith("_C") and name.endswith((".so", ".pyd", ".dylib")):
            return os.path.join(folder, name)
    return None


def ensure_torchvision_importable() -> None:
    """Declare torchvision's operator schemas when its native library cannot load (see module doc)."""
    global _TORCHVISION_FALLBACK_LIB
    if _TORCHVISION_FALLBACK_LIB is not None:
        return
    path = _torchvision_native_library()
    if path is None:
        return
    try:
        torch.ops.load_library(path)
        return
    except OSError as err:
        log.debug("torchvision native ops unavailable (%s); declaring their schemas", err)
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        lib.define(schema)
    _TORCHVISION_FALLBACK_LIB = lib


ensure_torchvision_importable()
