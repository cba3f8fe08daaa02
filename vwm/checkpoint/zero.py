"""DeepSpeed ZeRO-1/2 checkpoint directories: find the tag, verify every shard with the restricted unpickler, merge
the fp32 weights as DeepSpeed's `zero_to_fp32.py` does."""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import re
from collections.abc import Mapping

import torch

from vwm.checkpoint.errors import CheckpointError
from vwm.checkpoint.unpickle import load_zero_file

log = logging.getLogger(__name__)


def zero_tag_dir(path: str) -> tuple[str, str]:
    """(checkpoint dir, tag) of a DeepSpeed checkpoint, given the dir holding `latest` or the tag dir."""
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if not tag or not os.path.isdir(os.path.join(path, tag)):
            raise CheckpointError(f"{latest}: names tag {tag!r}, which is not a directory there")
        return path, tag
    if os.path.isfile(os.path.join(path, "mp_rank_00_model_states.pt")):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    raise CheckpointError(f"{path}: not a DeepSpeed checkpoint (no 'latest' file and no "
                          f"mp_rank_00_model_states.pt)")



def verify_zero_files(tag_dir: str) -> dict:
    """Open every shard with the restricted unpickler (so DeepSpeed's own loader never meets a malicious
    pickle), check the optimizer shards cover the saved world size, and return the model-states dict."""
    files = sorted(glob.glob(os.path.join(tag_dir, "*.pt")))
    model_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if model_file not in files:
        raise CheckpointError(f"{model_file}: missing")
    states = None
    for file in files:
        obj = load_zero_file(file)
        if file == model_file:
            states = obj
    assert isinstance(states, Mapping)
    world = states.get("dp_world_size")
    optim = [f for f in files if f.endswith("_optim_states.pt")]
    if world is not None and len(optim) != int(world):
        ranks = (re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)) for f in optim)
        have = {int(m.group(1)) for m in ranks if m}
        lost = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(int(world)) if r not in have]
        raise CheckpointError(f"{tag_dir}: expected {world} optimizer shards, found {len(optim)}; missing: "
                              f"{', '.join(lost)}")
    return states


def merge_zero_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Consolidated state dict of a DeepSpeed ZeRO-1/2 checkpoint, as its `zero_to_fp32.py` writes it
    (trainable weights fp32 from the optimizer partitions; frozen weights and buffers in the training dtype),
    plus any module weight that merge leaves out (ZeRO-1 saves no frozen-parameter list), from the model
    states."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir, tag = zero_tag_dir(path)
    states = verify_zero_files(os.path.join(ckpt_dir, tag))
    chatter = io.StringIO()  # DeepSpeed's merge prints its progress; keep it out of the CLIs' output
    try:
        with contextlib.redirect_stdout(chatter):
            sd = dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag))
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise CheckpointError(f"{path}: DeepSpeed could not merge the checkpoint ({err})") from err
    log.debug("DeepSpeed merge of %s: %s", path, chatter.getvalue())
    for key, value in states["module"].items():
        if key not in sd and torch.is_tensor(value):
            sd[key] = value
    metadata = {"source": os.path.abspath(path)}
    if "global_step" in states:
        metadata["step"] = str(states["global_step"])
    return sd, metadata
