"""Where the shipped configs live: next to the package in a source checkout, or under `<prefix>/share/vwm/configs`
in an installed wheel (pyproject.toml's data-files), so `--base configs/training/vista_phase1.yaml` works from
any directory and from an installed package."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path

CONFIG_PREFIX = "configs"
"""The leading folder of a shipped config path (`configs/training/vista_phase1.yaml`)."""


def shipped_config_dirs() -> list[Path]:
    """Candidate folders holding the shipped configs, best first: the source checkout's `configs/`, then the
    data folders of the installation (`share/vwm/configs` under the environment, the user base, the prefix)."""
    here = Path(__file__).resolve()
    checkout = here.parent.parent / CONFIG_PREFIX
    # <prefix>/lib/pythonX.Y/site-packages/vwm/resources.py -> <prefix> (any scheme: venv, --prefix, --user)
    roots = [here.parents[4] if len(here.parents) > 4 else None, sysconfig.get_paths().get("data"), sys.prefix,
             getattr(site, "USER_BASE", None)]
    candidates = [checkout] + [Path(r) / "share" / "vwm" / CONFIG_PREFIX for r in roots if r]
    seen: list[Path] = []
    for path in candidates:
        if path not in seen:
            seen.append(path)
    return [p for p in seen if (p / "base").is_dir()]


def find_config(path: str | os.PathLike) -> Path:
    """`path` itself when it exists; else, for a relative path, the shipped config of that name
    (`configs/training/x.yaml` or `training/x.yaml`); else `path` unchanged (the caller reports it missing)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == CONFIG_PREFIX else path.parts
    for folder in shipped_config_dirs():
        candidate = folder.joinpath(*parts)
        if candidate.is_file():
            return candidate
    return path
