"""Resuming a DeepSpeed ZeRO-1/2 checkpoint on another number of ranks, with its full optimizer state.

ZeRO-1/2 keeps, per parameter group, one flat buffer: the trainable parameters in order, each followed by its
`parameter_alignment` padding, then padded at the end to a multiple of the world size. Rank r owns the r-th equal
slice of it: fp32 master weights and the optimizer's moments (Adam's exp_avg, exp_avg_sq). Everything before the
end padding is laid out the same for any world size, so the saved slices, concatenated, are re-split for the
current ranks: each rank copies the part of the saved slices that falls into its new slice (reading only those
bytes, the shards are memory-mapped) and loads it as DeepSpeed itself loads a same-size checkpoint. vwm opens the
files with the restricted (weights-only) unpickler; DeepSpeed's own read of the module states comes after
`resume_target` opened every file of the checkpoint that way. DeepSpeed alone refuses a new world size ("Automatic
adjustment of ZeRO's optimizer state partitioning ... is not currently supported").
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vwm.checkpoint import CheckpointError, load_zero_file, zero_tag_dir

log = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"
_OPTIM_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def saved_world_size(checkpoint_dir: str) -> int:
    """The number of data-parallel ranks that wrote a DeepSpeed checkpoint (its model states' `dp_world_size`)."""
    ckpt_dir, tag = zero_tag_dir(checkpoint_dir)
    return int(load_zero_file(os.path.join(ckpt_dir, tag, MODEL_STATES))["dp_world_size"])


def copy_flat_range(pieces: Sequence[tuple[int, torch.Tensor]], start: int, out: torch.Tensor) -> None:
    """Fill `out` with elements [start, start + out.numel()) of a flat buffer given as (offset, 1-D tensor) pieces;
    elements that no piece covers (the end padding) become zero."""
    out.zero_()
    end = start + out.numel()
    for offset, piece in pieces:
        lo, hi = max(start, offset), min(end, offset + piece.numel())
        if lo < hi:
            out[lo - start:hi - start].copy_(piece[lo - offset:hi - offset])


@dataclass
class _SavedShard:
    """One saved rank's optimizer partition of every parameter group."""

    optimizer_state: Mapping[str, Any]

    def lean(self, group: int) -> int:
        """Elements of the flat buffer this rank's partition holds, its end padding excluded."""
        return self.optimizer_state["single_partition_of_fp32_groups"][group].numel()

    def padded(self, group: int) -> int:
        """Size of this rank's partition, end padding included."""
        return self.lean(group) + int(self.optimizer_state["group_paddings"][group])


def _refusal(tag_dir: str, saved: int, now: int, reason: str) -> CheckpointError:
    step_dir = os.path.dirname(os.path.dirname(os.path.abspath(tag_dir)))
    return CheckpointError(
        f"{tag_dir}: written by {saved} rank(s), this run has {now}, and its ZeRO optimizer state cannot be "
        f"re-partitioned: {reason}. Resume on {saved} rank(s), or start a new run from its weights with a fresh "
        f"optimizer: --finetune {step_dir} --name <new run>")


def _read_shards(tag_dir: str, saved: int, now: int) -> list[_SavedShard]:
    found: dict[int, str] = {}
    for path in glob.glob(os.path.join(tag_dir, "*optim_states.pt")):
        m = _OPTIM_SHARD.match(os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    if sorted(found) != list(range(saved)):
        raise _refusal(tag_dir, saved, now, f"expected optimizer shards of ranks 0..{saved - 1}, found ranks "
                                            f"{sorted(found)}")
    return [_SavedShard(load_zero_file(found[r])["optimizer_state_dict"]) for r in range(saved)]


def _check_layout(tag_dir: str, engine: Any, shards: list[_SavedShard], param_shapes: list[Mapping]) -> None:
    """Refuse unless the saved flat buffers have exactly the layout of the current ones (before the end padding)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    saved, now, optimizer = len(shards), engine.dp_world_size, engine.optimizer
    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        raise _refusal(tag_dir, saved, now, f"the run's optimizer is DeepSpeed's {type(optimizer).__name__}; only "
                                            f"ZeRO stage 1/2's DeepSpeedZeroOptimizer is supported")
    first = shards[0].optimizer_state
    if not isinstance(first["base_optimizer_state"], Mapping):
        raise _refusal(tag_dir, saved, now, "it was saved with lightning.deepspeed.elastic_checkpoint")
    shapes_now = [[(n, tuple(s)) for n, s in group.items()] for group in engine._get_zero_param_shapes()]
    shapes_saved = [[(n, tuple(s)) for n, s in group.items()] for group in param_shapes]
    if shapes_now != shapes_saved:
        raise _refusal(tag_dir, saved, now, "its trainable parameters (names, shapes or order) differ from the "
                                            "model's")
    paddings = first.get("param_alignment_paddings") or [[0] * len(g) for g in param_shapes]
    if [list(p) for p in paddings] != [list(p) for p in optimizer.round_robin_bit16_padding]:
        raise _refusal(tag_dir, saved, now, "it was saved with another lightning.deepspeed.parameter_alignment")
    for group, params in enumerate(optimizer.round_robin_bit16_groups):
        lean = sum(shard.lean(group) for shard in shards)
        expected = sum(p.numel() for p in params) + sum(optimizer.round_robin_bit16_padding[group])
        sizes = {shard.padded(group) for shard in shards}
        if lean != expected or len(sizes) != 1:
            raise _refusal(tag_dir, saved, now, f"parameter group {group} holds {lean} elements in partitions of "
                                                f"sizes {sorted(sizes)}; the model's flat buffer has {expected}")


def _repartitioned_state(shards: list[_SavedShard], group: int, start: int, size: int) -> dict[str, Any]:
    """This rank's base-optimizer state of one parameter group: partitioned tensors re-sliced, others (Adam's step)
    taken from rank 0 after checking every saved rank holds the same value."""
    padded = shards[0].padded(group)
    states = [shard.optimizer_state["base_optimizer_state"]["state"].get(group, {}) for shard in shards]
    out: dict[str, Any] = {}
    for key, value in states[0].items():
        if torch.is_tensor(value) and value.dim() == 1 and value.numel() == padded:
            pieces = [(r * padded, state[key][:shard.lean(group)]) for r, (shard, state) in
                      enumerate(zip(shards, states))]
            out[key] = torch.empty(size, dtype=value.dtype)
            copy_flat_range(pieces, start, out[key])
            continue
        same = all(torch.equal(s[key], value) if torch.is_tensor(value) else s[key] == value for s in states)
        if not same:
            raise CheckpointError(f"optimizer state {key!r} of parameter group {group} differs between the saved "
                                  f"ranks; the checkpoint is inconsistent")
        out[key] = value.clone() if torch.is_tensor(value) else value
    return out


def load_repartitioned(engine: Any, checkpoint_dir: str, load_module_strict: bool = True) -> dict[str, Any]:
    """Load a ZeRO-1/2 checkpoint written by another number of ranks into `engine`: module weights and client
    state as DeepSpeed loads them, then this rank's new slice of the fp32 master weights and optimizer state (every
    saved rank's partitions, merged and re-split). Returns the client state (Lightning's training state)."""
    ckpt_dir, tag = zero_tag_dir(checkpoint_dir)
    tag_dir = os.path.join(ckpt_dir, tag)
    states = load_zero_file(os.path.join(tag_dir, MODEL_STATES))
    saved, now = int(states["dp_world_size"]), engine.dp_world_size
    shards = _read_shards(tag_dir, saved, now)
    _check_layout(tag_dir, engine, shards, states["param_shapes"])
    del states

    _, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=False,
                                             load_lr_scheduler_states=False, load_module_strict=load_module_strict)
    if client_state is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load the module states")
    optimizer = engine.optimizer
    rank = torch.distributed.get_rank(group=optimizer.dp_process_group)
    base_state = {"state": {}, "param_groups": shards[0].optimizer_state["base_optimizer_state"]["param_groups"]}
    for group, master in enumerate(optimizer.single_partition_of_fp32_groups):
        size = master.numel()
        padded = shards[0].padded(group)
        fp32 = [(r * padded, shard.optimizer_state["single_partition_of_fp32_groups"][group])
                for r, shard in enumerate(shards)]
        copy_flat_range(fp32, rank * size, master.data)
        state = _repartitioned_state(shards, group, rank * size, size)
        if state:  # none before the first step
            base_state["state"][group] = state
    optimizer.optimizer.load_state_dict(base_state)
    optimizer._load_global_state(shards[0].optimizer_state)  # loss scaler, gradient clipping
    if rank == 0:
        log.info("re-partitioned the ZeRO optimizer state of %s from %d to %d rank(s)", tag_dir, saved, now)
    return client_state
