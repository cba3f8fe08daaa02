"""Configs: load and merge YAML files plus `a.b=c` overrides, map the reference's class paths to ours, check
every `{target, params}` node against its constructor before anything is built, and instantiate.

A node is `{target: dotted.path, params: {...}}`; keys beside `target`/`params` (the conditioner's `input_key`,
`ucg_rate`, `is_trainable`) are constructor arguments too, except the reserved `base_learning_rate`, which
the trainer reads. Instantiation is depth-first: a parameter whose value is a node receives the built object.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from vwm.aliases import (  # noqa: F401  (PARAM_ALIASES, Alias, ParamAliases re-exported: the alias layer's API)
    ALIASES,
    PARAM_ALIASES,
    REFERENCE_SUBSETS,
    Alias,
    ParamAliases,
    constructor_arguments,
    param_aliases,
)
from vwm.resources import find_config

if TYPE_CHECKING:  # vwm.models.engine instantiates its parts through this module
    from vwm.models.engine import DiffusionEngine

log = logging.getLogger(__name__)

INJECTED_SECTIONS = ("lightning.logger",)
"""Config sections whose nodes receive some required arguments from the trainer (a logger's save_dir)."""

RESERVED_KEYS = frozenset({"target", "params", "base_learning_rate"})
"""Node keys that are not constructor arguments."""

ALLOWED_TARGET_PREFIXES = ("vwm.", "torch.nn.", "torch.optim.", "pytorch_lightning.callbacks.",
                           "pytorch_lightning.loggers.")
"""Targets are resolved only inside these packages: a config cannot import arbitrary code."""


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the dotted key."""


BASE_KEY = "_base_"
"""A YAML file may list files it extends (paths relative to itself); they are merged first, in order."""


def _load_yaml(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    if not chain:
        path = find_config(path)
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{BASE_KEY} cycle: {' -> '.join(str(p) for p in (*chain, path))}")
    if not path.is_file():
        where = f" (listed in {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file {str(path)!r} does not exist{where}")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    bases = cfg.pop(BASE_KEY, None)
    if bases is None:
        return cfg
    if isinstance(bases, str):
        bases = [bases]
    parents = [_load_yaml(path.parent / str(b), (*chain, path)) for b in bases]
    return OmegaConf.merge(*parents, cfg)


def apply_override(cfg: DictConfig, item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as in YAML (numbers, lists, null, ...) and
    integer path parts index lists (`model.params.conditioner_config.params.emb_models.5.ucg_rate=0.2`)."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like key.subkey=value")
    key = _resolve_named_items(cfg, key, item)
    value = OmegaConf.from_dotlist([f"v={text}"])["v"]
    try:
        OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    except Exception as exc:  # omegaconf raises several types for a path that does not fit the config
        raise ConfigError(f"override {item!r} cannot be applied: {exc}") from exc


def _item_names(item: Any) -> set[str]:
    """Names a list item answers to in an override path: a plain string item is its own name (the reference's
    subset names); a node answers to its class name and to the reference name mapped to its class."""
    if isinstance(item, str):
        return {item}
    if isinstance(item, DictConfig) and isinstance(item.get("target"), str):
        target = item.target
        names = {target.rsplit(".", 1)[-1]}
        for name, (ref_target, _) in REFERENCE_SUBSETS.items():
            if ref_target == target:
                names.add(name)
        return names
    return set()


def _resolve_named_items(cfg: DictConfig, key: str, item: str) -> str:
    """Replace list-item names in an override key by their index: `data.params.subsets.NuScenes.data_root=/x`
    points the subset named NuScenes (a reference name, expanded to its {target, params} node with the
    reference's defaults, or a node of that class) at /x without retyping the list."""
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, ListConfig) and not part.lstrip("-").isdigit():
            matches = [j for j, value in enumerate(node) if part in _item_names(value)]
            if len(matches) != 1:
                names = sorted(set().union(*(_item_names(v) for v in node))) if len(node) else []
                problem = "matches several items" if matches else "names no item"
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} {problem} of "
                                  f"{'.'.join(parts[:i]) or '<root>'}; names there: {names}, or use the index "
                                  f"0..{len(node) - 1}")
            j = matches[0]
            value = node[j]
            if isinstance(value, str) and value in REFERENCE_SUBSETS:
                target, params = REFERENCE_SUBSETS[value]
                node[j] = {"target": target, "params": dict(params)}
            parts[i] = part = str(j)
            if is_node(node[j]) and parts[i + 1] not in RESERVED_KEYS:
                parts.insert(i + 1, "params")  # `subsets.NuScenes.data_root` means its params.data_root
                return _resolve_named_items(cfg, ".".join(parts), item)
        if isinstance(node, ListConfig):
            index = int(part)
            node = node[index] if -len(node) <= index < len(node) else None
        elif isinstance(node, DictConfig):
            node = node.get(part)
        else:
            node = None
        if node is None:
            break
    return ".".join(parts)


def load_config(paths: str | Path | Iterable[str | Path], overrides: Sequence[str] = ()) -> DictConfig:
    """Merge YAML files left to right (each after the files its `_base_` lists), then `a.b=c` overrides;
    resolve reference class paths and validate every node."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    configs = [_load_yaml(Path(p)) for p in paths]
    cfg = OmegaConf.merge(*configs) if configs else OmegaConf.create()
    if not isinstance(cfg, DictConfig):
        raise ConfigError("a config must be a mapping at the top level")
    for item in overrides:
        apply_override(cfg, item)
    resolve_aliases(cfg)
    validate(cfg)
    from vwm.schema import validate_sections  # vwm.schema checks values with this module's type matcher

    validate_sections(cfg)
    return cfg


def resolve_aliases(node: Any, path: str = "") -> None:
    """Rewrite reference class paths to vwm's in place and drop the parameters vwm derives (logged)."""
    if isinstance(node, DictConfig):
        target = node.get("target") if "target" in node else None
        if isinstance(target, str) and target in ALIASES:
            alias = ALIASES[target]
            node.target = alias.target
            params = node.get("params")
            for name in alias.derived:
                if isinstance(params, DictConfig) and name in params:
                    log.debug("%s.params.%s: derived by vwm, value from config ignored", path or "<root>", name)
                    del params[name]
        for key in list(node.keys()):
            resolve_aliases(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            resolve_aliases(node._get_node(i), f"{path}[{i}]")


def locate(target: str, path: str = "target") -> Any:
    """Import the object named by a dotted path inside the allowed packages."""
    if not target.startswith(ALLOWED_TARGET_PREFIXES):
        raise ConfigError(
            f"{path}={target!r}: targets must live in {', '.join(p.rstrip('.') for p in ALLOWED_TARGET_PREFIXES)} "
            f"(reference paths are mapped by vwm.config.ALIASES)"
        )
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{path}={target!r}: module {module_name!r} not found ({err})") from err
    if not hasattr(module, attr):
        raise ConfigError(f"{path}={target!r}: {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


# ------------------------------------------------------------------------------------------------ validation


def is_node(value: Any) -> bool:
    """True for a `{target: ...}` mapping."""
    return isinstance(value, (Mapping, DictConfig)) and "target" in value


def config_parameters(cls: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """The parameters a config node of `cls` may set, under their config names (PARAM_ALIASES: renamed ones under
    the reference's name, dropped ones as optional and untyped), and their type hints."""
    params, hints = _signature_params(cls)
    aliases = param_aliases(cls)
    back = {new: old for old, new in aliases.renames.items()}
    params = {back.get(name, name): p for name, p in params.items()}
    hints = {back.get(name, name): h for name, h in hints.items()}
    for name in aliases.drops:
        params.setdefault(name, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    return params, hints


def _signature_params(cls: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """Keyword parameters of a class constructor (following **kwargs into base classes) and their type hints."""
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    classes = cls.__mro__ if inspect.isclass(cls) else (cls,)
    for klass in classes:
        init = klass.__init__ if inspect.isclass(klass) else klass
        if init is object.__init__:
            break
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            break
        try:
            hints_here = typing.get_type_hints(init)
        except (NameError, TypeError) as err:
            log.debug("type hints of %s unavailable: %s", klass, err)
            hints_here = {}
        has_var_kw = False
        for name, p in sig.parameters.items():
            if name == "self" or p.kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                has_var_kw = True
                continue
            params.setdefault(name, p)
            if name in hints_here:
                hints.setdefault(name, hints_here[name])
        if not has_var_kw:
            break
    return params, hints


def node_arguments(node: Mapping | DictConfig) -> dict[str, Any]:
    """The constructor arguments of a node: its params plus the non-reserved keys beside target/params."""
    args = {k: v for k, v in node.items() if k not in RESERVED_KEYS}
    params = node.get("params") or {}
    if not isinstance(params, (Mapping, DictConfig)):
        raise ConfigError(f"params must be a mapping, got {type(params).__name__}")
    args.update(params)
    return args


def validate(node: Any, path: str = "", injected: bool = False) -> None:
    """Check every node below `node`: the target exists and each argument is a known, well-typed parameter.

    `injected`: the nodes are built later by their owner, which supplies some arguments itself (a class's
    `config_unbuilt` parameters), so missing required arguments are not an error there.
    """
    if isinstance(node, (Mapping, DictConfig)):
        if is_node(node):
            # Loggers get save_dir (the run directory) from train.py when their node does not set it.
            _validate_node(node, path, injected or path.startswith(INJECTED_SECTIONS))
            return
        for key, value in node.items():
            validate(value, f"{path}.{key}" if path else str(key), injected)
    elif isinstance(node, (list, tuple, ListConfig)):
        for i, value in enumerate(node):
            validate(value, f"{path}[{i}]", injected)


def _validate_node(node: Mapping | DictConfig, path: str, injected: bool = False) -> None:
    where = path or "<root>"
    target = node["target"]
    if not isinstance(target, str):
        raise ConfigError(f"{where}.target must be a dotted class path, got {target!r}")
    cls = locate(target, f"{where}.target")
    params, hints = config_parameters(cls)
    args = node_arguments(node)
    unbuilt = set(getattr(cls, "config_unbuilt", ()))
    for name, value in args.items():
        key = f"{where}.params.{name}" if name in (node.get("params") or {}) else f"{where}.{name}"
        if name not in params:
            allowed = ", ".join(sorted(params)) or "(none)"
            raise ConfigError(f"{key}: unknown parameter of {target}; allowed: {allowed}")
        if name not in unbuilt:
            _check_type(value, hints.get(name, Any), key)
        validate(value, key, injected=name in unbuilt)
    missing = [
        n for n, p in params.items()
        if p.default is inspect.Parameter.empty and n not in args and p.kind is not inspect.Parameter.POSITIONAL_ONLY
    ]
    if missing and not injected:
        raise ConfigError(f"{where}: missing required parameter(s) {', '.join(missing)} of {target}")


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(value: Any, tp: Any, key: str) -> None:
    """Raise ConfigError if a config value cannot be an instance of the annotated parameter type."""
    if not _matches(value, tp):
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _matches(value: Any, tp: Any) -> bool:  # noqa: C901 - one branch per typing construct
    if tp is Any or tp is inspect.Parameter.empty or tp is object:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if value is None:
        return False
    if origin is Literal:
        return value in args
    if is_node(value):
        cls = tp if inspect.isclass(tp) else origin
        return cls is None or not inspect.isclass(cls) or cls in (dict, Mapping) or not issubclass(
            cls, (int, float, str, bool, list, tuple, Sequence, Mapping)
        )
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is Path:
        return isinstance(value, (str, Path))
    seq_origins = (list, tuple, Sequence, typing.Sequence, Iterable)
    if tp in seq_origins or origin in seq_origins or origin in (set, frozenset):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        if not isinstance(value, (Mapping, DictConfig)):
            return False
        return len(args) != 2 or all(_matches(v, args[1]) for v in value.values())
    if origin is Callable or tp is Callable:
        return is_node(value)
    if inspect.isclass(tp) and issubclass(tp, torch.nn.Module):
        return False  # a module parameter needs a {target, params} node
    return True


# --------------------------------------------------------------------------------------------- instantiation


def to_container(value: Any) -> Any:
    """OmegaConf containers to plain Python (resolving interpolations); other values unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


class ConstructorError(ConfigError):
    """A constructor refused the values of a config node; the message names the node's dotted key."""


def instantiate(node: Any, config_path: str = "<node>", **extra: Any) -> Any:
    """Build the object a node describes, building nested nodes first; `extra` adds keyword arguments.

    A ValueError or TypeError raised by a constructor is re-raised as ConstructorError naming the dotted key of
    the innermost node that failed (`model.params.network_config: set exactly one of ...`)."""
    node = to_container(node)
    if not is_node(node):
        raise ConfigError(f"cannot instantiate {node!r}: not a {{target, params}} node")
    cls = locate(node["target"])
    skip = set(getattr(cls, "config_unbuilt", ()))
    kwargs = {k: (v if k in skip else _build(v, f"{config_path}.params.{k}")) for k, v in node_arguments(node).items()}
    kwargs = constructor_arguments(cls, kwargs, config_path)
    kwargs.update(extra)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConstructorError(f"{config_path} ({node['target']}): {err}") from err


def _build(value: Any, config_path: str) -> Any:
    if is_node(value):
        return instantiate(value, config_path)
    if isinstance(value, list):
        return [_build(v, f"{config_path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _build(v, f"{config_path}.{k}") for k, v in value.items()}
    return value


def build_model(cfg: DictConfig | Mapping, device: str | torch.device | None = None) -> DiffusionEngine:
    """Instantiate `cfg.model` (or `cfg` if it is the model node); `device="meta"` builds without allocating."""
    node = cfg["model"] if "model" in cfg else cfg
    if not is_node(node):
        raise ConfigError("the config has no model node (model.target)")
    where = "model" if "model" in cfg else "<model>"
    if device is None:
        return instantiate(node, where)
    with torch.device(device):
        return instantiate(node, where)
