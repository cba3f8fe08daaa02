"""Phase hand-off: a phase's starting weights (`train.py --finetune`) must come from a model whose config differs
from the training config only in what the phase adds; then they load strictly."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from vwm.actions import ACTION_KEYS
from vwm.checkpoint.errors import CheckpointError
from vwm.checkpoint.formats import read_config_metadata, read_state_dict
from vwm.checkpoint.loading import LoadReport, load_weights
from vwm.config import is_node, locate, node_arguments, param_aliases, to_container

HANDOFF_NETWORK_PARAMS = frozenset({
    "add_lora", "lora_rank", "lora_scale", "action_control", "separate_cond_time_embed", "use_checkpoint",
    "checkpoint_budget_gib",
})
"""Network parameters a training phase may set differently from the config of its starting weights: the
families it adds (initialised by `load_weights`) and memory settings. Dead reference keys (PARAM_ALIASES drops)
never count."""

_EMBEDDER_TRAINING_KEYS = ("ucg_rate", "is_trainable")


def _normalized(value: object) -> object:
    """A plain-container config value with every node's constructor defaults filled in, so an explicit default
    and an omitted one compare equal."""
    if is_node(value):
        cls = locate(value["target"])
        aliases = param_aliases(cls)
        back = {new: old for old, new in aliases.renames.items()}
        simple = (bool, int, float, str, type(None))
        args = {back.get(name, name): p.default for name, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty and isinstance(p.default, simple)}
        args.update(node_arguments(value))
        args = {k: v for k, v in args.items() if k not in aliases.drops}  # dead keys never change the weights
        return {"target": value["target"], **{k: _normalized(v) for k, v in args.items()}}
    if isinstance(value, Mapping):
        return {k: _normalized(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    return value


def _flatten(value: object, prefix: str) -> dict[str, object]:
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out or {prefix: {}}
    if isinstance(value, list):
        out = {prefix + ".len": len(value)}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _architecture(model_node: Mapping) -> dict[str, object]:
    """The parts of a model config that decide what its weights mean (flattened, defaults filled)."""
    node = _normalized(model_node)
    network = dict(node.get("network_config") or {})
    for key in HANDOFF_NETWORK_PARAMS:
        network.pop(key, None)
    embedders = ((node.get("conditioner_config") or {}).get("emb_models") or [])
    embedders = [{k: v for k, v in e.items() if k not in _EMBEDDER_TRAINING_KEYS} for e in embedders]
    arch = {
        "target": node.get("target"),
        "scale_factor": node.get("scale_factor"),
        "network_config": network,
        "denoiser_config": node.get("denoiser_config"),
        "first_stage_config": node.get("first_stage_config"),
        "conditioner_config.emb_models": embedders,
    }
    return _flatten(arch, "model.params")


def check_handoff(source_model: Mapping, target_model: Mapping, name: str) -> None:
    """Refuse to start a phase from weights whose embedded model config differs from the training config in
    anything but what a phase may add (LoRA, action control, the condition-frame timestep MLP, appended action
    embedders): differences such as the preconditioning, head count or latent scale change no tensor shape, so
    a strict load alone cannot see them."""
    source, target = _architecture(to_container(source_model)), _architecture(to_container(target_model))
    emb = "model.params.conditioner_config.emb_models"
    n_src, n_tgt = source.pop(emb + ".len", 0), target.pop(emb + ".len", 0)
    appended = [target.get(f"{emb}[{i}].input_key") for i in range(n_src, n_tgt)]
    problems = []
    if n_tgt < n_src or any(key not in ACTION_KEYS for key in appended):
        problems.append(f"{emb}: checkpoint has {n_src} embedders, config {n_tgt} (a phase may only append "
                        f"action embedders {', '.join(ACTION_KEYS)}; it appends {appended})")
    added = tuple(f"{emb}[{i}]" for i in range(n_src, n_tgt))
    target = {k: v for k, v in target.items() if not k.startswith(added)}
    for key in sorted(set(source) | set(target)):
        old, new = source.get(key, "<absent>"), target.get(key, "<absent>")
        if old != new:
            problems.append(f"{key}: checkpoint {old!r}, config {new!r}")
    if problems:
        raise CheckpointError(
            f"{name}: its embedded model config (vwm_config) does not match the training config beyond what "
            f"a phase may add ({', '.join(sorted(HANDOFF_NETWORK_PARAMS))}, action embedders): "
            + "; ".join(problems[:8])
            + (f"; ... (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        )


def load_finetune(model: nn.Module, path: str | Path, model_config: Mapping) -> LoadReport:
    """Load a phase's starting weights (`train.py --finetune`): the config check of `check_handoff` when the
    file embeds its config (a bin_to_st.py export), then the strict `load_weights` with the phase families."""
    sd, metadata = read_state_dict(path)
    embedded = read_config_metadata(metadata)
    lora_scale = 1.0
    if embedded is not None:
        check_handoff(embedded["model"], model_config, str(path))
        network = (embedded["model"].get("params") or {}).get("network_config") or {}
        lora_scale = float((network.get("params") or {}).get("lora_scale", 1.0))
    return load_weights(model, sd, lora_scale=lora_scale, name=str(path))

