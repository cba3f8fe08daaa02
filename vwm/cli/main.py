"""`vwm`: one command with subcommands for everything (also `python -m vwm`):

    vwm train  --base configs/training/vista_phase1.yaml --finetune ckpts/svd_xt.safetensors   (= train.py)
    vwm sample --ckpt ckpts/vista.safetensors --dataset NUSCENES --action traj                   (= sample.py)
    vwm reward --ckpt ckpts/vista.safetensors --dataset NUSCENES                      (= sample.py reward)
    vwm export logs/<run>/checkpoints/step-N ckpts/out.safetensors                            (= bin_to_st.py)
    vwm eval ...                                                                 (the evaluation CLI, if installed)
    vwm data nuscenes build --data_root data/nuscenes --split train --out annos/nuScenes.json
    vwm data opendv index --data_root data/YouTube --out annos/YouTube.json
    vwm data latents build --config CFG --ckpt ckpts/svd_xt.safetensors --out cache/DIR
    vwm configs                                  (the shipped configs and where the installation keeps them)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from vwm import __version__
from vwm.resources import shipped_config_dirs

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vwm.cli.train", "train or fine-tune a world model (train.py)"),
    "sample": ("vwm.cli.sample", "videos, long rollouts and rewards from a checkpoint (sample.py)"),
    "reward": ("vwm.cli.sample", "ensemble reward of a checkpoint (sample.py reward)"),
    "export": ("vwm.cli.export", "checkpoint -> verified inference safetensors (bin_to_st.py)"),
    "eval": ("vwm.cli.evaluate", "FID / FVD / action-following evaluation"),
    "data": ("", "data preparation: nuscenes build | opendv index | latents build"),
    "configs": ("", "list the shipped configs and where they are"),
}
DATA_COMMANDS: dict[str, tuple[str, str]] = {
    "nuscenes": ("vwm.data.nuscenes", "build: nuScenes annotation JSON (reference schema) from the raw data"),
    "opendv": ("vwm.data.opendv", "index: OpenDV-YouTube clip list from frame folders and videos"),
    "latents": ("vwm.data.latents", "build: latent cache (VAE posterior moments) of a config's data"),
}


def usage() -> str:
    """The help text."""
    lines = ["usage: vwm COMMAND [ARGS...]   (vwm COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<8s} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "data commands (vwm data NAME ...):"]
    lines += [f"  {name:<8s} {text}" for name, (_, text) in DATA_COMMANDS.items()]
    lines += ["", "Errors print one line and exit with code 2; --debug or VWM_DEBUG=1 shows the traceback."]
    return "\n".join(lines)


def _entry(module: str, prog: str) -> Callable[..., int]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise SystemExit(f"vwm: error: {prog} is not available in this installation ({module} is missing)")
    return mod.main


def list_configs() -> int:
    """Print the shipped configs, one per line, with the folder they are read from."""
    dirs = shipped_config_dirs()
    if not dirs:
        print("vwm: error: no shipped configs found (reinstall vwm)", file=sys.stderr)
        return 2
    root = dirs[0]
    print(f"# shipped configs in {root} (pass them as configs/<name>, from any directory)")
    for path in sorted(root.rglob("*.yaml")):
        print(f"configs/{path.relative_to(root)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch `vwm COMMAND ...` to the command's own CLI; returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"vwm {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vwm: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command == "configs":
        return list_configs()
    if command == "data":
        if not rest or rest[0] not in DATA_COMMANDS:
            print(f"vwm data: error: choose one of {', '.join(DATA_COMMANDS)} (vwm --help)", file=sys.stderr)
            return 2
        module = DATA_COMMANDS[rest[0]][0]
        return int(_entry(module, f"vwm data {rest[0]}")(rest[1:], prog=f"vwm data {rest[0]}") or 0)
    if command == "reward":
        rest = ["reward", *rest]
    return int(_entry(COMMANDS[command][0], f"vwm {command}")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
