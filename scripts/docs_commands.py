"""Every command shown in README.md and docs/*.md, accounted for: run as written with tiny stand-ins, checked as a
synopsis against the tool's --help, or covered by a named test (tests/test_docs_commands.py runs this).

    python scripts/docs_commands.py --list          # each fenced command and how it is covered
    python scripts/docs_commands.py --run DIR       # run them in a sandbox DIR (tiny models, synthetic data)

Stand-ins, so the real command lines run on a CPU in minutes: the sandbox holds `configs/...` files with the real
names that extend the tiny configs (configs/tiny/), tiny `ckpts/svd_xt.safetensors` and `ckpts/vista.safetensors`
(no embedded config, like the released file), a synthetic nuScenes v1.0-trainval with CAN bus data and its
annotation files. Launchers (`torchrun`, `srun`) start one CPU process; train.py gets `--accelerator cpu
--max_steps 2`; sample.py gets a 64x64 size, 2 denoising steps and one sample; `step-<number>` checkpoint paths
point to the newest checkpoint of that run.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_ORDER = ["docs/data.md", "README.md", "docs/checkpoints.md", "docs/training.md", "docs/sampling.md"]
"""Files whose commands depend on earlier ones come later (annotations, then training, then exports)."""
COMMAND_WORDS = {"python", "python3", "torchrun", "srun", "make", "bash", "vwm", "pip", "tensorboard", "."}
"""First words of a line that is a command (other lines in fenced blocks are listings or output)."""

COVERED: list[tuple[str, str, str]] = [
    (r"^make demo\b", "tests/test_demo.py::test_demo_script_runs_end_to_end_and_reports_its_verdict",
     "scripts/demo.py (what make demo runs) end to end on a 2-step budget"),
    (r"^make test\b", ".ci/run", "CI's command: make test PYTEST_ARGS=..."),
    (r"^pip install --no-deps -e \.", "tests/test_first_day.py::test_an_installed_wheel_finds_its_configs",
     "the package installs (wheel, --prefix) and finds its configs"),
]
"""(pattern, test or script, what it checks) for commands covered elsewhere."""
NEEDS_INDEX: list[tuple[str, str]] = [
    (r"^python -m pip wheel -w wheelhouse", "downloads from the package index; scripts/setup_env.sh (make setup) "
                                            "installs the same requirements in CI"),
    (r"^python -m venv --system-site-packages", "creates a venv on a GPU cluster; scripts/setup_env.sh does the "
                                                "same in CI"),
    (r"^pip install --no-index --find-links wheelhouse", "installs a wheelhouse built with the index; "
                                                         "scripts/setup_env.sh installs the same requirements"),
]
"""Commands that need the package index or a cluster: not runnable in CI, with what exercises the same steps."""
NEEDS_GPU: list[tuple[str, str]] = [
    (r"^python bench/", "a GPU benchmark (bench/): tests/test_bench.py runs bench/train_step.py's code path on CPU"),
]
"""GPU benchmarks: not runnable in CI."""
STAND_IN_CONFIGS = {
    "configs/training/vista_phase1.yaml": "configs/tiny/phase1.yaml",
    "configs/training/vista_phase2_stage1.yaml": "configs/tiny/phase2_stage1.yaml",
    "configs/training/vista_phase2_stage2.yaml": "configs/tiny/phase2_stage2.yaml",
    "configs/example/nusc_train.yaml": "configs/tiny/train.yaml",
    "configs/inference/vista.yaml": "configs/tiny/model.yaml",
}
"""Real config path -> the tiny config of the same structure that stands in for it in the sandbox."""
PLACEHOLDERS = {"SRC", "DST", "DIR", "N", "M", "S", "T", "H", "W", "F", "YAML", "PATH", "NAME", "FILE", "CFG"}
"""Capitalised words that stand for a value in a synopsis line."""


@dataclass(frozen=True)
class Command:
    """One command of a fenced block: where it is and its text (continuation lines joined, comment removed)."""

    file: str
    line: int
    text: str

    @property
    def where(self) -> str:
        """file:line."""
        return f"{self.file}:{self.line}"


def extract(files: list[str] | None = None) -> list[Command]:
    """The commands in the fenced code blocks (not yaml/json/python) of README.md and docs/*.md."""
    files = files or ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs",
                                                                                                        "*.md")))
    out = []
    for rel in files:
        with open(os.path.join(REPO, rel), encoding="utf-8") as f:
            lines = f.read().split("\n")
        fence, pending, start = None, "", 0
        for i, raw in enumerate(lines, 1):
            stripped = raw.strip()
            if stripped.startswith("```"):
                fence = None if fence is not None else stripped[3:].strip()
                continue
            if fence is None or fence in ("yaml", "json", "python", "text"):
                continue
            if not pending:
                start = i
            pending += (" " if pending else "") + stripped.rstrip("\\").strip()
            if stripped.endswith("\\"):
                continue
            text, pending = _strip_comment(pending), ""
            if text and text.split()[0] in COMMAND_WORDS:
                out.append(Command(rel, start, text))
    return out


def _strip_comment(text: str) -> str:
    return re.split(r"\s+#\s", text, maxsplit=1)[0].strip() if not text.startswith("#") else ""


def classify(command: Command) -> tuple[str, str]:
    """('covered' | 'index' | 'gpu' | 'synopsis' | 'run', detail)."""
    for pattern, target, what in COVERED:
        if re.search(pattern, command.text):
            return "covered", f"{target}: {what}"
    for pattern, why in NEEDS_INDEX:
        if re.search(pattern, command.text):
            return "index", why
    for pattern, why in NEEDS_GPU:
        if re.search(pattern, command.text):
            return "gpu", why
    tokens = command.text.split()
    if any(t.startswith(("[", "<")) or "..." in t or t.strip("[]") in PLACEHOLDERS for t in tokens):
        return "synopsis", "every flag it names is checked against the tool's --help"
    return "run", "run as written with tiny stand-ins"


# ------------------------------------------------------------------------------------------------- sandbox


def _python() -> list[str]:
    return [sys.executable]


def tool_and_args(text: str) -> list[str]:
    """The argv of a command after removing launchers (torchrun ..., srun ...) and resolving the tools."""
    argv = shlex.split(text.replace("$RANK", "0").replace("$MASTER", "localhost"))
    for i, token in enumerate(argv):
        if token.endswith(".py") or token in ("-m",) or token == "vwm" or token == "tensorboard":
            break
    else:
        raise ValueError(f"no tool in {text!r}")
    if argv[0] in ("torchrun", "srun"):  # one CPU process stands in for the launch
        first = next(i for i, t in enumerate(argv) if t.endswith(".py"))
        argv = ["python", *argv[first:]]
    if argv[0] in ("python", "python3"):
        argv = [*_python(), *argv[1:]]
    elif argv[0] == "vwm":
        argv = [*_python(), "-m", "vwm", *argv[1:]]
    elif argv[0] == "tensorboard":
        argv = [*_python(), "-m", "tensorboard.main", *argv[1:]]
    for i, token in enumerate(argv):
        if token in ("train.py", "sample.py", "bin_to_st.py", "evaluate.py") or token.startswith(("scripts/", "bench/")):
            argv[i] = os.path.join(REPO, token)
    return argv


def _drop(argv: list[str], flag: str, values: int = 1) -> list[str]:
    while flag in argv:
        i = argv.index(flag)
        del argv[i:i + 1 + values]
    return argv


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def stand_in(argv: list[str], sandbox: str) -> list[str]:
    """The tiny stand-in of a real command line (module docstring)."""
    argv = list(argv)
    tool = os.path.basename(argv[1]) if len(argv) > 1 else ""
    if tool == "train.py" or argv[1:3] == ["-m", "vwm"] and argv[3:4] == ["train"]:
        argv = _drop(_drop(argv, "--num_nodes"), "--n_devices")
        argv = _set(argv, "--accelerator", "cpu")
        argv = _set(argv, "--max_steps", "2")
    elif tool == "sample.py":
        for flag, value in (("--height", "64"), ("--width", "64"), ("--n_steps", "2"), ("--device", "cpu")):
            argv = _set(argv, flag, value)
        if "--index" not in argv:
            argv = _set(argv, "--n_samples", "1")
        if "reward" in argv:
            argv = _set(argv, "--ens_size", "2")
    elif tool == "evaluate.py":
        # The stand-in model has 5 frames, fewer than I3D takes (9): FID and the action score run, FVD has its own
        # end-to-end test (tests/test_evaluate.py). The weight files are random stand-ins at the documented paths.
        for flag, value in (("--height", "64"), ("--width", "64"), ("--n_steps", "2"), ("--device", "cpu"),
                            ("--limit", "1")):
            argv = _set(argv, flag, value)
        argv = [*argv, "--metrics", "fid", "action", "--allow_unverified_weights"]
        if "--out" in argv:  # one output folder per documented command: a folder resumes only the same settings
            i = argv.index("--out") + 1
            argv[i] = f"{argv[i]}-{zlib.crc32(' '.join(argv).encode()):08x}"
    elif tool == "bin_to_st.py":
        argv = [_newest_step(a, sandbox) for a in argv]
    elif "vwm.data.latents" in argv:
        argv = _set(argv, "--device", "cpu")
    elif "tensorboard.main" in argv:
        argv.append("--inspect")  # prints what the log directory holds and exits (no server)
    return argv


def _newest_step(token: str, sandbox: str) -> str:
    match = re.fullmatch(r"(logs/[^/]+/checkpoints)/step-(\d+|N)", token)
    if not match:
        return token
    steps = sorted(glob.glob(os.path.join(sandbox, match.group(1), "step-*")))
    if not steps:
        raise FileNotFoundError(f"{token}: no checkpoint of that run in the sandbox (run its train.py command first)")
    return os.path.relpath(steps[-1], sandbox)


def setup_sandbox(sandbox: str) -> None:
    """Tiny stand-ins for the weights, configs and data the documented commands use."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    sys.path.insert(0, REPO)
    import vwm  # noqa: F401
    from fixtures_data import NUSCENES_SCENES, write_nuscenes
    from safetensors.torch import save_file

    from vwm.config import build_model, load_config, to_container
    from vwm.data.nuscenes import main as nuscenes_main

    os.makedirs(sandbox, exist_ok=True)
    for real, tiny in STAND_IN_CONFIGS.items():
        path = os.path.join(sandbox, real)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"# tiny stand-in for {real}\n_base_: {os.path.join(REPO, tiny)}\n")
    os.makedirs(os.path.join(sandbox, "ckpts"), exist_ok=True)

    def weights(config: str, drop: tuple[str, ...] = ()) -> dict:
        import torch

        torch.manual_seed(0)
        model = build_model(load_config(os.path.join(REPO, config)))
        return {k: v.contiguous() for k, v in model.state_dict().items()
                if not k.startswith("model_ema.") and not any(d in k for d in drop)}

    # SVD-XT has no condition-frame timestep MLP: phase 1 adds it (copied from time_embed).
    save_file(weights("configs/tiny/phase1.yaml", ("cond_time_stack_embed",)),
              os.path.join(sandbox, "ckpts", "svd_xt.safetensors"))
    tiny = weights("configs/tiny/model.yaml")
    save_file(tiny, os.path.join(sandbox, "ckpts", "vista.safetensors"))  # no config, like the released file
    config = json.dumps({"model": to_container(load_config(os.path.join(REPO, "configs/tiny/model.yaml")).model)})
    save_file(tiny, os.path.join(sandbox, "ckpts", "tiny.safetensors"), metadata={"vwm_config": config})
    # nuScenes v1.0-trainval: 3 train scenes and scene-0553 (val) long enough for --index 7.
    scenes = tuple(dataclasses.replace(s, num_samples=14) if s.name == "scene-0553" else s for s in NUSCENES_SCENES)
    write_nuscenes(os.path.join(sandbox, "data", "nuscenes"), version="v1.0-trainval", scenes=scenes)
    for split, out in (("train", "nuScenes.json"), ("val", "nuScenes_val.json")):
        code = nuscenes_main(["build", "--data_root", os.path.join(sandbox, "data", "nuscenes"), "--version",
                              "v1.0-trainval", "--split", split, "--out", os.path.join(sandbox, "annos", out)])
        if code != 0:
            raise RuntimeError(f"building the stand-in annotations ({split}) failed")
    import torch

    from vwm.eval.features import random_init_
    from vwm.eval.i3d import InceptionI3d
    from vwm.eval.inception import FIDInceptionV3

    os.makedirs(os.path.join(sandbox, "weights"), exist_ok=True)
    for cls, name in ((FIDInceptionV3, "pt_inception-2015-12-05-6726825d.pth"), (InceptionI3d, "i3d_pretrained_400.pt")):
        torch.save(random_init_(cls(), seed=1).state_dict(), os.path.join(sandbox, "weights", name))
    frames = os.path.join(sandbox, "my_frames")
    os.makedirs(frames, exist_ok=True)
    first = sorted(glob.glob(os.path.join(sandbox, "data", "nuscenes", "samples", "CAM_FRONT", "*.jpg")))[0]
    shutil.copy(first, os.path.join(frames, "000.jpg"))
    with open(os.path.join(sandbox, "left.json"), "w") as f:  # the example of docs/sampling.md
        json.dump([{"command": "left", "trajectory": [[4, 0.2], [8, 0.9], [12, 2.1], [15, 3.8]]},
                   {"command": "left", "speed": [25, 25, 24, 24], "angle": [60, 90, 90, 60]}], f)


def help_command(command: Command) -> tuple[str, ...]:
    """The command whose --help lists the flags of a synopsis line: the tool, and its subcommand if it has one."""
    argv = tool_and_args(command.text)
    prefix = argv[:2] if argv[1] != "-m" else argv[:3]
    rest = argv[len(prefix):]
    if rest and not rest[0].startswith("-") and rest[0].isalpha() and rest[0] in ("build", "index", "write",
                                                                                  "reward"):
        prefix.append(rest[0])
    return tuple(prefix)


class HelpTexts:
    """The --help output of each tool, every one started at once in the background and each read when first needed
    (a tool's --help takes seconds, most of them imports: started together, they overlap)."""

    def __init__(self, prefixes: list[tuple[str, ...]]):
        self._procs = {p: subprocess.Popen([*p, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True, cwd=REPO, env=_env()) for p in dict.fromkeys(prefixes)}
        self._texts: dict[tuple[str, ...], str] = {}

    def __getitem__(self, prefix: tuple[str, ...]) -> str:
        if prefix not in self._texts:
            proc = self._procs[prefix]
            out, err = proc.communicate(timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(prefix)} --help failed (exit {proc.returncode}):\n{err[-3000:]}")
            self._texts[prefix] = out
        return self._texts[prefix]

    def close(self) -> None:
        """Stop the ones still running (after an error elsewhere)."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def check_synopsis(command: Command, helps: HelpTexts) -> list[str]:
    """Flags of a synopsis line that the tool's --help (from `helps`) does not list (empty: all known)."""
    argv = tool_and_args(command.text)
    flags = sorted({t.strip("[]|").split("=")[0] for t in argv if t.strip("[]").startswith("--")})
    prefix = help_command(command)
    help_text = helps[prefix]
    if "train.py" in prefix[-1]:  # any Trainer argument passes through to lightning.trainer
        import inspect

        import pytorch_lightning as pl

        help_text += " ".join(f"--{n}" for n in inspect.signature(pl.Trainer.__init__).parameters)
    return [f for f in flags if not re.search(re.escape(f) + r"\b", help_text)]


def _env() -> dict[str, str]:
    drop = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
            "GROUP_RANK", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    return env


def run_all(sandbox: str, log=print) -> list[dict]:
    """Set up the sandbox, then run every runnable command (deduplicated) and check every synopsis; raises
    RuntimeError naming the first command that fails."""
    commands = extract()
    order = {f: i for i, f in enumerate(DOC_ORDER)}
    commands.sort(key=lambda c: (order.get(c.file, len(order)), c.line))
    helps = HelpTexts([help_command(c) for c in commands if classify(c)[0] == "synopsis"])  # meanwhile, the runs
    try:
        return _run_in_sandbox(sandbox, commands, helps, log)
    finally:
        helps.close()


def _run_in_sandbox(sandbox: str, commands: list[Command], helps: HelpTexts, log) -> list[dict]:
    """run_all's body, once the --help commands are started."""
    setup_sandbox(sandbox)
    done: dict[tuple[str, ...], str] = {}
    report = []
    for command in commands:
        kind, detail = classify(command)
        entry = {"where": command.where, "command": command.text, "kind": kind}
        if kind == "synopsis":
            unknown = check_synopsis(command, helps)
            if unknown:
                raise RuntimeError(f"{command.where}: {command.text!r} names flags the tool does not take: {unknown}")
        elif kind == "run":
            argv = stand_in(tool_and_args(command.text), sandbox)
            key = tuple(argv)
            if key in done:
                entry["same_as"] = done[key]
            else:
                log(f"== {command.where}: {shlex.join(argv[1:])}")
                result = subprocess.run(argv, cwd=sandbox, env=_env(), capture_output=True, text=True, timeout=900)
                if result.returncode != 0:
                    raise RuntimeError(f"{command.where}: {command.text!r} failed (exit {result.returncode}) as "
                                       f"{shlex.join(argv)}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
                done[key] = command.where
        report.append(entry)
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="print each command and how it is covered")
    p.add_argument("--run", metavar="DIR", help="run the commands in a new sandbox DIR")
    args = p.parse_args()
    if args.run:
        for entry in run_all(args.run):
            print(json.dumps(entry))
        return 0
    for command in extract():
        kind, detail = classify(command)
        print(f"{command.where:28s} {kind:9s} {command.text[:90]}\n{'':38s}{detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
