"""vwm: a trainer for action-conditioned driving world models (SVD-XT / Vista family)."""

from vwm import _compat  # noqa: F401  (must run before torchvision / open_clip / Lightning import)

__version__ = "0.1.0"

__all__ = ["load_config", "build_model", "load_weights", "__version__"]


def __getattr__(name: str):
    # Lazy public API: `import vwm` stays cheap for the data workers and the CLIs' --help.
    if name == "load_config":
        from vwm.config import load_config

        return load_config
    if name == "build_model":
        from vwm.config import build_model

        return build_model
    if name == "load_weights":
        from vwm.checkpoint import load_weights

        return load_weights
    raise AttributeError(f"module 'vwm' has no attribute {name!r}")
