"""Weights in and out: one module per job.

- `errors`: CheckpointError (every reader and loader raises it).
- `unpickle`: the restricted unpickler (weights-only, DeepSpeed's allow-listed classes).
- `manifest`: MANIFEST.json of a committed checkpoint directory, written by the commit protocol and checked here.
- `formats`: read any weight file or directory -> (state dict, metadata).
- `zero`: DeepSpeed ZeRO-1/2 checkpoint directories (verify, merge).
- `keys`: key transforms (prefixes, phase families, EMA fold/fill, LoRA merge, reduced precision).
- `loading`: strict `load_weights` and `check_state_dict`.
- `handoff`: `check_handoff` and `load_finetune` (a phase's starting weights).

The names below are re-exported so `from vwm.checkpoint import X` keeps working for users and scripts.
"""

from vwm.checkpoint.errors import CheckpointError
from vwm.checkpoint.formats import ZERO_TO_FP32_FILES, read_config_metadata, read_safetensors, read_state_dict
from vwm.checkpoint.handoff import HANDOFF_NETWORK_PARAMS, check_handoff, load_finetune
from vwm.checkpoint.keys import (
    EMA_COUNTERS,
    PHASE_ADDITIONS,
    PREFIXES,
    WHOLE_FAMILIES,
    PhaseAddition,
    check_ema_shadows,
    ema_key,
    ema_shadows,
    family_of,
    fill_from_ema,
    fold_ema,
    has_ema,
    merge_lora,
    restore_reduced_precision,
    strip_prefixes,
)
from vwm.checkpoint.loading import LoadReport, check_state_dict, load_weights
from vwm.checkpoint.unpickle import CONVERT_HINT, load_zero_file, verify_pickles
from vwm.checkpoint.zero import merge_zero_checkpoint, verify_zero_files, zero_tag_dir

__all__ = [
    "CONVERT_HINT", "EMA_COUNTERS", "HANDOFF_NETWORK_PARAMS", "PHASE_ADDITIONS", "PREFIXES", "WHOLE_FAMILIES",
    "ZERO_TO_FP32_FILES", "CheckpointError", "LoadReport", "PhaseAddition", "check_ema_shadows", "check_handoff",
    "check_state_dict", "ema_key", "ema_shadows", "family_of", "fill_from_ema", "fold_ema", "has_ema",
    "load_finetune", "load_weights", "load_zero_file", "merge_lora", "merge_zero_checkpoint", "read_config_metadata",
    "read_safetensors", "read_state_dict", "restore_reduced_precision", "strip_prefixes", "verify_pickles",
    "verify_zero_files", "zero_tag_dir",
]
