"""User-facing errors and the one top-level handler every CLI goes through.

The contract: bad input (a file, a key, a value, a flag) ends the command with exactly one line
``error: <message>`` on stderr naming the file, key or value, and exit status 2; no traceback.
`cli_main` wraps an entry point with that contract: every `TokFusionError`, and every `OSError`
(a missing, unreadable or unwritable path the user gave), becomes the line. Any other exception
is a bug and keeps its traceback. `ArgumentParser` (argparse) and `parse_absl_flags` / `run_absl`
(absl flags and ml_collections config files) route command-line mistakes into the same line.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


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
    """A configuration value, flag or config file is missing, of the wrong type or out of range."""


class NonFiniteError(TokFusionError):
    """A loss, a gradient or a model output became NaN or Inf."""


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def os_error_message(e: OSError) -> str:
    """``path: reason`` for an OS error on a path (``src -> dst: reason`` for renames)."""
    reason = e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or str(e)
    if e.filename is None:
        return one_line(str(e) or reason)
    where = os.fsdecode(e.filename)
    if e.filename2 is not None:
        where += f" -> {os.fsdecode(e.filename2)}"
    return one_line(f"{where}: {reason}")


def fail(message: str) -> NoReturn:
    """Prints ``error: <message>`` (one line) on stderr and exits with status 2."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def cli_main(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a CLI entry point with the error contract (see the module docstring).

    `TokFusionError` and `OSError` -> ``error: ...`` and exit 2; Ctrl-C -> exit 130; anything
    else propagates with its traceback (it is a bug).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TokFusionError as e:
            fail(str(e))
        except OSError as e:
            fail(os_error_message(e))
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the error contract: a bad flag raises `ConfigError` (one line, exit 2
    under `cli_main`) instead of printing the usage block. Sub-parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


# ------------------------------------------------------------------ absl flags + config files


def _innermost(e: BaseException) -> BaseException:
    """The original exception under the wrappers absl and ml_collections put around it."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    return e


def _raised_at(e: BaseException) -> str:
    """`` (file:line)`` of the innermost frame outside installed packages, or ""."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "-packages" not in f.filename]
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _override_for(key: str, argv: Sequence[str]) -> str | None:
    """The ``--flag.a.b=v`` argument whose dotted path contains `key`, if any."""
    for arg in argv:
        name = arg.partition("=")[0]
        if arg.startswith("-") and key in name.split(".")[1:]:
            return arg
    return None


def flag_error_message(e: BaseException, argv: Sequence[str], config_arg: str = "") -> str:
    """One line for an exception raised while absl parses `argv`.

    `config_arg` (e.g. ``--config=configs/ivif.py:tinyy``) names the config file whose loading
    may have raised `e`.
    """
    from absl import flags

    if isinstance(e, flags.Error):
        text = str(e).strip()
        if "Traceback (most recent call last)" in text:  # ml_collections pastes the traceback
            flag = text.partition(": ")[0].removeprefix("flag ")  # --config=FILE[:ARG]
            inner = _innermost(e)
            kind = "" if isinstance(inner, (ValueError, TypeError)) else f"{type(inner).__name__}: "
            return f"{flag}: {kind}{one_line(str(inner))}"
        return one_line(text).removeprefix("flag ")
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: syntax error in the config file: {e.msg}"
    if isinstance(e, (KeyError, AttributeError)):
        # ConfigDict's message is a repr: quotes and newlines arrive escaped.
        lines = str(e).replace("\\n", "\n").replace("\\'", "'").split("\n")
        key = lines[0].strip("'\" ")
        if (arg := _override_for(key, argv)) is not None:
            hint = one_line(" ".join(lines[1:])).strip("'\" ")
            return f"{arg}: the config has no key {key!r}" + (f" ({hint})" if hint else "")
        if "get_config" in str(e):
            return f"{config_arg}: the config file does not define get_config()"
    prefix = f"{config_arg}: " if config_arg else ""
    return f"{prefix}{type(e).__name__}: {one_line(str(e))}{_raised_at(e)}"


def _config_file_args(argv: Sequence[str], flag_values: Any) -> list[tuple[Any, str, str]]:
    """(flag, argument, file path) for each ml_collections config-file flag set in `argv`."""
    from ml_collections.config_flags import config_flags  # the module, for the parser class

    found = []
    for flag in flag_values._flags().values():
        if not isinstance(flag.parser, config_flags.ConfigFileFlagParser):
            continue
        for arg in argv[1:]:
            for prefix in (f"--{flag.name}=", f"-{flag.name}="):
                if arg.startswith(prefix):
                    found.append((flag, arg, arg[len(prefix) :].partition(":")[0]))
    return found


def _check_config_file(arg: str, path: str) -> None:
    """A config-file flag must name an existing Python file."""
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a folder, not a config file ({arg})")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found ({arg})")


def _check_loaded_config(flag: Any, arg: str) -> None:
    """ml_collections defers a config file's load error to its first access: raise it now."""
    deferred = getattr(flag.value, "_error", None)
    if isinstance(deferred, BaseException):
        raise ConfigError(f"{arg}: cannot load the config file ({deferred})")
    if flag.value is None:
        raise ConfigError(f"{arg}: get_config() returned None (a missing return?)")


def parse_absl_flags(argv: Sequence[str], flag_values: Any = None) -> list[str]:
    """absl flag parsing (``app.run``'s ``flags_parser``) under the error contract.

    A missing config file, an unknown variant, an unknown key or a value of the wrong type in
    ``--config.key=value``, an unknown flag: one ``error:`` line naming it, exit 2.
    """
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    try:
        config_args = _config_file_args(argv, fv)
        for _, arg, path in config_args:
            _check_config_file(arg, path)
        try:
            remaining = fv(list(argv))
        except TokFusionError:
            raise
        except Exception as e:  # anything a config file or an override raises is user input
            first = config_args[0][1] if config_args else ""
            raise ConfigError(flag_error_message(e, argv, first)) from None
        for flag, arg, _ in config_args:
            _check_loaded_config(flag, arg)
        return remaining
    except TokFusionError as e:
        fail(str(e))


def run_absl(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """``absl.app.run(main)`` with the error contract for the flags and for `main`."""
    from absl import app

    argv = None if argv is None else list(argv)
    app.run(cli_main(main), argv=argv, flags_parser=parse_absl_flags)
