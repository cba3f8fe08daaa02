"""One error style for every command-line entry point (train.py, sample.py, bin_to_st.py, the data builders and
`vwm ...`): a user error prints one line `<prog>: error: <what is wrong and what to do>` on stderr and exits with
code 2; the traceback is shown only with `--debug` (or `-d` where the command has no such flag of its own) or
the environment variable VWM_DEBUG=1. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence

from vwm.checkpoint import CheckpointError
from vwm.data.sources import DataBudgetError

EXIT_USAGE = 2
"""Exit code of a user error (bad flag or config value, missing file, unusable checkpoint or data)."""
DEBUG_ENV = "VWM_DEBUG"
"""Environment switch for full tracebacks (1/true/yes)."""
DEBUG_FLAGS = ("--debug",)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the user must change a flag, a config value, a file or the data."""
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                         IsADirectoryError, PermissionError, CheckpointError, DataBudgetError]
    return tuple(errors)


def debug_requested(argv: Sequence[str], short: bool = False) -> bool:
    """True when the command line asks for tracebacks (`--debug`, `-d` when `short`) or VWM_DEBUG is set."""
    if os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "y"):
        return True
    return any(a in DEBUG_FLAGS or (short and a == "-d") for a in argv)


def strip_debug(argv: Sequence[str], short: bool = False) -> list[str]:
    """argv without the debug switches (for parsers that do not declare them)."""
    return [a for a in argv if a not in DEBUG_FLAGS and not (short and a == "-d")]


def one_line(err: BaseException) -> str:
    """The message of an error on one line (OS errors as 'reason: path')."""
    if isinstance(err, OSError) and err.strerror and err.filename:  # raised by the OS: "[Errno 2] ..."
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def report(prog: str, err: BaseException) -> int:
    """Print a user error in the common style and return the exit code."""
    print(f"{prog}: error: {one_line(err)}  (traceback: --debug or {DEBUG_ENV}=1)", file=sys.stderr)
    return EXIT_USAGE


def run_cli(prog: str, body: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
            short_debug: bool = False) -> int:
    """Run `body(argv)` (argv without debug switches) and turn user errors into one line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv, short_debug)
    try:
        result = body(strip_debug(argv, short_debug))
    except SystemExit as exit_:  # argparse's usage errors (2) and --help (0)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USAGE)
    except user_errors() as err:
        if debug:
            raise
        return report(prog, err)
    return int(result or 0)


QUIET_WARNINGS = (
    r".*litlogger.*",
    r".*LitLogger.*",
    r".*in eval mode at the start of training.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*torch\.cuda\.amp\..* is deprecated.*",
    r".*`torch\.cpu\.amp\.autocast\(args\.\.\.\)` is deprecated.*",
    r".*pkg_resources is deprecated.*",
    r".*TypedStorage is deprecated.*",
    r".*The `srun` command is available on your system but is not used.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*You defined a `validation_step` but have no `val_dataloader`.*",
    r".*GPU available but not used.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)
"""Known, harmless messages of Lightning, torch and DeepSpeed that a user cannot act on."""
QUIET_LOGGERS = {
    "pytorch_lightning.utilities.rank_zero": r"(.*litlogger.*|.*LitLogger.*|.*Tip:.*)",
    "lightning.pytorch.utilities.rank_zero": r"(.*litlogger.*|.*LitLogger.*|.*Tip:.*)",
    "pytorch_lightning.callbacks.model_summary": r".*modules? in eval mode.*",
}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern, re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet(verbose: bool = False) -> None:
    """Silence the known messages a user cannot act on (Lightning's litlogger tip, the count of modules in eval
    mode, known deprecation warnings); `verbose` (VWM_VERBOSE=1) keeps them."""
    if verbose or os.environ.get("VWM_VERBOSE", "").lower() in ("1", "true", "yes"):
        return
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for category in (FutureWarning, UserWarning):  # libraries' notices about their own APIs
        warnings.filterwarnings("ignore", message=r"(?s).*\bdeprecated\b", category=category)
    for name, pattern in QUIET_LOGGERS.items():
        logging.getLogger(name).addFilter(_DropMatching(pattern))
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # DataLoader workers, spawned ranks
