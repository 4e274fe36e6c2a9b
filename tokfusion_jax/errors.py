"""User-facing errors and the CLI wrapper that turns them into one-line messages."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class TokFusionError(Exception):
    """An error caused by the user's input (a file, a key, a value), not by a bug.

    The message is one line that names the offending file, key or value and says what was
    expected. CLIs print it as ``error: <message>`` and exit with status 2.
    """


class DataError(TokFusionError):
    """A dataset, folder or image cannot be used (missing, unpaired, corrupt, wrong size)."""


class CheckpointError(TokFusionError):
    """A checkpoint or export is missing, corrupt or does not match the expected layout."""


class ConfigError(TokFusionError):
    """A configuration value is missing, of the wrong type or out of range."""


class NonFiniteError(TokFusionError):
    """A loss or gradient became NaN or Inf during training."""


EXIT_USER_ERROR = 2


def cli_main(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a CLI entry point: a `TokFusionError` becomes `error: ...` on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TokFusionError as e:
            message = " ".join(str(e).split())  # always a single line
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
