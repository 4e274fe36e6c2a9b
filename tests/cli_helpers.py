"""Calling a CLI entry point in-process and checking the error contract.

The contract (tokfusion_jax.errors): bad input ends a command with exactly one ``error:`` line on
stderr naming the file or key, exit status 2, no traceback.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str
    value: Any = None


def call(main: Callable[..., Any], argv: Any, capsys: pytest.CaptureFixture) -> Result:
    """Runs ``main(argv)``; a SystemExit becomes the exit code (0 when main returns)."""
    capsys.readouterr()  # drop earlier output
    try:
        value = main(list(argv) if isinstance(argv, (list, tuple)) else argv)
        code = 0
    except SystemExit as e:
        value, code = None, (e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err, value)


def run_module(module: str, *args: str, timeout: int = 300, **env: str) -> Result:
    """``python -m module args...`` in a subprocess (CPU only), from the repository root."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full_env,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def error_line(result: Result, *names: object) -> str:
    """Asserts the contract on `result` and that the line names each of `names`; returns it."""
    assert result.code == 2, (result.code, result.err[-3000:])
    assert "Traceback" not in result.err, result.err[-3000:]
    errors = [ln for ln in result.err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.err[-3000:]
    line = errors[0]
    assert result.err.strip().splitlines()[-1] == line, result.err[-3000:]
    for name in names:
        assert str(name) in line, (name, line)
    return line
