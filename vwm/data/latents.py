"""Latent cache: `python -m vwm.data.latents build ...` encodes every clip of a config's data subsets once
with the first-stage VAE into sharded safetensors files plus `index.json`, and `LatentCacheSubset` reads them
back so the DataModule trains from cached VAE posterior moments instead of decoding and encoding pixels.
Format, exactness and the VAE identity check: docs/data.md, "Latent cache"."""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from vwm.actions import ACTION_KEYS
from vwm.checkpoint.formats import read_state_dict
from vwm.checkpoint.keys import key_diff
from vwm.cli.common import run_cli
from vwm.config import instantiate, load_config
from vwm.data.base import BrokenSampleError, Clip
from vwm.data.datamodule import VideoDataModule
from vwm.data.sources import build_subset
from vwm.data.video import to_unit_range
from vwm.dtypes import DTYPES, DtypeName
from vwm.fsio import honour_umask
from vwm.models.autoencoder import DiagonalGaussianRegularizer

log = logging.getLogger(__name__)

FORMAT = "vwm-latent-cache"
FORMAT_VERSION = 2
"""2: clips that a subset repeats (nuScenes re-balancing) are stored once (`clips.stored`); 1 is still read."""
READABLE_VERSIONS = (1, 2)
INDEX_FILE = "index.json"
FIRST_STAGE_PREFIX = "first_stage_model."


def first_stage_identity(first_stage: nn.Module) -> str:
    """'sha256:<hex>' over the VAE's module classes and its state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, module in first_stage.named_modules():
        digest.update(f"module {name} {type(module).__module__}.{type(module).__qualname__}\n".encode())
    for name, tensor in first_stage.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"tensor {name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def shard_file(number: int) -> str:
    """File name of shard `number` inside a cache directory."""
    return f"shard-{number:05d}.safetensors"


# ------------------------------------------------------------------------------------------------ building


def load_first_stage(cfg: DictConfig, ckpt: str | None) -> nn.Module:
    """The config's `model.params.first_stage_config` VAE in eval mode, with the `first_stage_model.*` tensors
    of `ckpt` loaded strictly (random weights when `ckpt` is None)."""
    node = OmegaConf.select(cfg, "model.params.first_stage_config")
    if node is None:
        raise ValueError("the config has no model.params.first_stage_config: pass the training config "
                         "(model + data sections) the cache is for")
    first_stage = instantiate(node)
    posterior = getattr(first_stage, "regularization", None)
    if not isinstance(posterior, DiagonalGaussianRegularizer) or not isinstance(
            getattr(first_stage, "encoder", None), nn.Module):
        raise ValueError(f"model.params.first_stage_config builds {type(first_stage).__name__}; the latent "
                         "cache needs a VAE with an encoder and a DiagonalGaussianRegularizer posterior "
                         "(vwm.models.autoencoder.AutoencodingEngine)")
    if ckpt is None:
        log.warning("no --ckpt: the first stage has random weights; only a model with these exact weights "
                    "(identity %s) can train from this cache", first_stage_identity(first_stage))
    else:
        state = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in read_state_dict(ckpt)[0].items()
                 if k.startswith(FIRST_STAGE_PREFIX)}
        diff = key_diff(first_stage.state_dict(), state)
        if not state or not diff.ok:
            raise ValueError(f"--ckpt {ckpt!r}: its {FIRST_STAGE_PREFIX}* tensors do not fit "
                             f"model.params.first_stage_config ({len(state)} found; missing {diff.missing[:5]}, "
                             f"unexpected {diff.unexpected[:5]}, wrong shape {diff.wrong_shape[:5]})")
        first_stage.load_state_dict(state)
    return first_stage.eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(first_stage: nn.Module, frames: torch.Tensor, frames_per_call: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 frames (T,3,H,W) -> posterior moments [mean | logvar] (T, 2C, h, w), unscaled, as the engine's
    `encode_first_stage` computes them before drawing its sample."""
    param = next(first_stage.parameters())
    x = to_unit_range(frames).to(device=device, dtype=param.dtype)
    return torch.cat([first_stage.encoder(part) for part in x.split(frames_per_call)])


def _save_shard(tensors: dict[str, torch.Tensor], path: str) -> None:
    save_file(tensors, path, metadata={"format": FORMAT})
    honour_umask(path)


def _write_atomic(path: str, write: Any) -> int:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return os.path.getsize(path)


def _data_sources(cfg: DictConfig) -> tuple[Any, list[Any], list[Any]]:
    if "data" not in cfg:
        raise ValueError("the config has no data section (data.target / data.params): the cache encodes "
                         "its subsets")
    datamodule = instantiate(cfg.data, "data.params")
    if not isinstance(datamodule, VideoDataModule):
        raise ValueError(f"data.target builds {type(datamodule).__name__}; expected vwm.data.datamodule."
                         "VideoDataModule")
    specs = list(datamodule.subset_specs)
    subsets = [build_subset(spec, num_frames=datamodule.num_frames, target_height=datamodule.target_height,
                            target_width=datamodule.target_width) for spec in specs]
    cached = [type(s).__name__ for s in subsets if getattr(s, "yields_moments", False)]
    if cached:
        raise ValueError(f"data.params.subsets already hold latent caches ({cached}); give the pixel subsets "
                         "to encode")
    return datamodule, specs, subsets


def build_cache(cfg: DictConfig, out_dir: str, *, ckpt: str | None = None, shard_size: int = 64,
                device: str = "cpu", dtype: DtypeName = "fp32", frames_per_call: int | None = None
                ) -> dict[str, Any]:
    """Encode every clip of the config's data subsets into `out_dir` (shards, then index.json); return the
    index."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"--shard_size={shard_size!r} must be an integer >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} must be one of {list(DTYPES)}")
    if frames_per_call is not None and frames_per_call < 1:
        raise ValueError(f"--frames_per_call={frames_per_call!r} must be >= 1")
    if any(os.path.exists(os.path.join(out_dir, name)) for name in (INDEX_FILE, shard_file(0))):
        raise FileExistsError(f"--out {out_dir!r} already holds a latent cache; choose another directory or "
                              "delete it")
    datamodule, specs, subsets = _data_sources(cfg)
    num_frames, height, width = datamodule.num_frames, datamodule.target_height, datamodule.target_width
    first_stage = load_first_stage(cfg, ckpt)
    identity = first_stage_identity(first_stage)
    first_stage.to(device)
    chunk = (frames_per_call or OmegaConf.select(cfg, "model.params.en_and_decode_n_samples_a_time")
             or num_frames)
    os.makedirs(out_dir, exist_ok=True)

    shards: list[dict[str, Any]] = []
    clips: dict[str, list[Any]] = {"subset": [], "index": [], "source": [], "stored": []}
    stored_at: dict[tuple[int, Any], int] = {}  # (subset, clip_key) -> number of the clip holding its tensors
    encoded = 0
    skipped: list[dict[str, Any]] = []
    pending: dict[str, torch.Tensor] = {}
    latent_shape: list[int] | None = None
    start = time.monotonic()

    def flush() -> None:
        first = shards[-1]["first"] + shards[-1]["count"] if shards else 0
        path = os.path.join(out_dir, shard_file(len(shards)))
        size = _write_atomic(path, lambda tmp: _save_shard(pending, tmp))
        shards.append({"file": os.path.basename(path), "first": first, "count": len(clips["source"]) - first,
                       "bytes": size})
        pending.clear()

    # A shard holds the tensors of the clips numbered [first, first + count); copies point to earlier numbers.

    for s, subset in enumerate(subsets):
        key_of = getattr(subset, "clip_key", None)
        for index in range(len(subset)):
            key = (s, key_of(index) if callable(key_of) else index)
            if key in stored_at:  # a re-balanced copy: same tensors, encoded once
                clips["subset"].append(s)
                clips["index"].append(index)
                clips["source"].append(clips["source"][stored_at[key]])
                clips["stored"].append(stored_at[key])
                continue
            try:
                clip = subset.load_clip(index)
            except BrokenSampleError as exc:
                log.warning("skipping broken sample %s (subset %d, index %d): %s", exc.path, s, index,
                            exc.reason)
                skipped.append({"subset": s, "index": index, "path": exc.path, "reason": exc.reason})
                continue
            if tuple(clip.frames.shape) != (num_frames, 3, height, width) or clip.frames.dtype != torch.uint8:
                raise ValueError(f"subset {s} returned frames {tuple(clip.frames.shape)} {clip.frames.dtype} "
                                 f"for index {index}; expected uint8 {(num_frames, 3, height, width)}")
            moments = encode_moments(first_stage, clip.frames, chunk, device).to("cpu", DTYPES[dtype])
            latent_shape = latent_shape or list(moments.shape)
            number = len(clips["source"])
            stored_at[key] = number
            encoded += 1
            pending[f"{number}.moments"] = moments.contiguous()
            pending[f"{number}.frame0"] = clip.frames[0].clone()
            for key, value in clip.actions.items():
                pending[f"{number}.{key}"] = value.to(torch.float32).clone()
            clips["subset"].append(s)
            clips["index"].append(index)
            clips["source"].append(clip.source)
            clips["stored"].append(number)
            if encoded % shard_size == 0:
                flush()
            if encoded % 100 == 0:
                log.info("encoded %d clips (%.2f clips/s)", encoded, encoded / (time.monotonic() - start))
    if pending:
        flush()
    if not clips["source"]:
        raise ValueError(f"no clip could be encoded: {len(skipped)} broken samples in data.params.subsets")
    index = {
        "format": FORMAT, "version": FORMAT_VERSION, "num_clips": len(clips["source"]),
        "num_encoded": encoded, "num_frames": num_frames, "height": height, "width": width,
        "latent_shape": latent_shape,
        "moments_dtype": dtype,
        "first_stage": {"identity": identity, "weights": os.path.abspath(ckpt) if ckpt else None,
                        "config": OmegaConf.to_container(cfg.model.params.first_stage_config, resolve=True),
                        "frames_per_call": chunk, "device": str(device), "torch": torch.__version__},
        "data": {"subsets": specs}, "shards": shards, "clips": clips, "skipped": skipped,
    }

    def write_index(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f)

    _write_atomic(os.path.join(out_dir, INDEX_FILE), write_index)
    log.info("latent cache %s: %d clips (%d encoded, the rest re-balanced copies) in %d shards, %d skipped, "
             "%.1f s", out_dir, index["num_clips"], encoded, len(shards), len(skipped), time.monotonic() - start)
    return index


# ------------------------------------------------------------------------------------------------- reading


def read_index(cache_dir: str) -> dict[str, Any]:
    """The index of a latent cache, after checking its format and that every shard has its recorded size."""
    path = os.path.join(cache_dir, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cache_dir={cache_dir!r} has no {INDEX_FILE} (a cache is complete only once "
                                "`python -m vwm.data.latents build` has written it, last)")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rebuild the cache") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") not in READABLE_VERSIONS:
        found = ((index.get("format"), index.get("version")) if isinstance(index, dict)
                 else type(index).__name__)
        raise ValueError(f"{path}: format {found!r} is not ({FORMAT!r}, one of {READABLE_VERSIONS}); rebuild the "
                         "cache")
    for shard in index["shards"]:
        if os.path.basename(shard["file"]) != shard["file"]:
            raise ValueError(f"{path}: shard name {shard['file']!r} must be a file name inside {cache_dir}")
        file = os.path.join(cache_dir, shard["file"])
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: shard listed in {path} is missing")
        size = os.path.getsize(file)
        if size != shard["bytes"]:
            raise ValueError(f"{file}: {size} bytes but {path} records {shard['bytes']}: the shard is "
                             "truncated or was modified; rebuild the cache")
    return index


class LatentCacheSubset:
    """A DataModule subset over a latent cache: clips carry the VAE posterior moments, the condition frame and
    the actions, so training skips JPEG decoding and the VAE encode."""

    yields_moments = True

    def __init__(self, num_frames: int, target_height: int, target_width: int, *, cache_dir: str,
                 expected_first_stage: str | None = None, subset: int | None = None):
        index = read_index(cache_dir)
        for name, wanted, built in (("num_frames", num_frames, index["num_frames"]),
                                    ("target_height", target_height, index["height"]),
                                    ("target_width", target_width, index["width"])):
            if wanted != built:
                raise ValueError(f"latent cache {cache_dir!r} was built with {name}={built}, the DataModule "
                                 f"has {name}={wanted}; rebuild the cache at this size or change the "
                                 "DataModule")
        self.first_stage = index["first_stage"]["identity"]
        if expected_first_stage is not None and expected_first_stage != self.first_stage:
            raise ValueError(f"latent cache {cache_dir!r} was built with first stage {self.first_stage}, "
                             f"expected_first_stage={expected_first_stage}")
        sources = len(index["data"]["subsets"])
        if subset is not None and not 0 <= subset < sources:
            raise ValueError(f"subset={subset!r} must be null or a source number in [0, {sources}) of "
                             f"{cache_dir!r} (its data.subsets: {index['data']['subsets']})")
        self.cache_dir = cache_dir
        self.num_frames, self.target_height, self.target_width = num_frames, target_height, target_width
        self.weights = index["first_stage"]["weights"]
        self.latent_shape = tuple(index["latent_shape"])
        self.moments_dtype = DTYPES[index["moments_dtype"]]
        self._sources = index["clips"]["source"]
        self._stored = index["clips"].get("stored") or list(range(len(self._sources)))
        self._clips = [i for i, s in enumerate(index["clips"]["subset"]) if subset is None or s == subset]
        self._shard_first = [shard["first"] for shard in index["shards"]]
        self._shard_files = [os.path.join(cache_dir, shard["file"]) for shard in index["shards"]]

    def __len__(self) -> int:
        return len(self._clips)

    def load_clip(self, index: int) -> Clip:
        """Clip `index`: moments (T, 2C, h, w) in the stored dtype, frame 0 as uint8 (1, 3, H, W), actions."""
        if not 0 <= index < len(self._clips):
            raise IndexError(f"LatentCacheSubset: index={index} out of range [0, {len(self._clips)})")
        number = self._clips[index]
        clip = self._stored[number]  # the clip holding the tensors (itself, or the first copy of it)
        file = self._shard_files[bisect.bisect_right(self._shard_first, clip) - 1]
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                keys = set(f.keys())
                moments = f.get_tensor(f"{clip}.moments")
                frame = f.get_tensor(f"{clip}.frame0")
                actions = {k: f.get_tensor(f"{clip}.{k}") for k in ACTION_KEYS if f"{clip}.{k}" in keys}
        except (SafetensorError, OSError) as err:
            raise BrokenSampleError(file, f"cannot read clip {clip} of the latent cache ({err})") from err
        if tuple(moments.shape) != self.latent_shape or moments.dtype != self.moments_dtype:
            raise BrokenSampleError(file, f"clip {clip} has moments {tuple(moments.shape)} {moments.dtype}; "
                                          f"the index records {self.latent_shape} {self.moments_dtype}")
        return Clip(frames=frame.unsqueeze(0), actions=actions, source=self._sources[number], moments=moments)

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError unless `model.first_stage_model` is the VAE this cache was encoded with (the
        DataModule calls this at setup with the model being trained)."""
        identity = first_stage_identity(model.first_stage_model)
        if identity != self.first_stage:
            raise ValueError(
                f"latent cache {self.cache_dir!r} was encoded with first stage {self.first_stage} (weights "
                f"{self.weights}), but the model being trained has first stage {identity}; rebuild the cache "
                "from the weights you train with (python -m vwm.data.latents build --ckpt ...)")


# ------------------------------------------------------------------------------------------------------ CLI


def parser(prog: str = "python -m vwm.data.latents") -> argparse.ArgumentParser:
    """The latent-cache builder's argument parser (`vwm data latents build ...`)."""
    p = argparse.ArgumentParser(prog=prog)
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="encode the clips of a config's data subsets into a latent cache")
    build.add_argument("--config", action="append", required=True,
                       help="training config (model + data sections); repeat to merge several, left to right")
    build.add_argument("--ckpt", default=None, help="weights holding first_stage_model.* (any format "
                       "train.py --finetune reads); without it the VAE is randomly initialised")
    build.add_argument("--out", required=True, help="cache directory to create")
    build.add_argument("--shard_size", type=int, default=64, help="clips per shard file")
    build.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    build.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                       help="storage dtype of the moments")
    build.add_argument("--frames_per_call", type=int, default=None,
                       help="frames per encoder call (default: model.params.en_and_decode_n_samples_a_time)")
    build.add_argument("--debug", action="store_true", help="full tracebacks for errors (also VWM_DEBUG=1)")
    build.add_argument("overrides", nargs="*", help="config overrides a.b=c")
    return p


def _build(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    cfg = load_config(args.config, args.overrides)
    index = build_cache(cfg, args.out, ckpt=args.ckpt, shard_size=args.shard_size, device=args.device,
                        dtype=args.dtype, frames_per_call=args.frames_per_call)
    keys = ("num_clips", "num_encoded", "num_frames", "height", "width", "latent_shape", "moments_dtype")
    summary = {"out": args.out, **{k: index[k] for k in keys}, "shards": len(index["shards"]),
               "skipped": len(index["skipped"]), "bytes": sum(s["bytes"] for s in index["shards"]),
               "first_stage": index["first_stage"]["identity"]}
    print(json.dumps(summary, sort_keys=True))


def main(argv: Sequence[str] | None = None, prog: str = "python -m vwm.data.latents") -> int:
    """CLI: `python -m vwm.data.latents build --config CFG [--ckpt W] --out DIR [options] [a.b=c ...]`; exit code
    2 with a one-line message for a user error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_cli(prog, lambda a: _build(parser(prog).parse_args(a)), argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
