"""The error every weight reader and loader raises, and how it lists keys."""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(RuntimeError):
    """A weight file that cannot be used; the message names the file and the reason."""



def format_keys(keys: Iterable[str], limit: int = 12) -> str:
    """Sorted keys joined by commas, at most `limit` shown, with a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
