"""The top-level error handler (cli_main), argparse and absl-flags parsing under the contract."""

from __future__ import annotations

import errno
import os
import sys

import pytest
from absl import flags
from cli_helpers import call, error_line, run_module
from ml_collections import config_flags

from tokfusion_jax import errors
from tokfusion_jax.errors import ConfigError, DataError


def test_user_errors_and_os_errors_become_one_line_exit_2(tmp_path, capsys):
    @errors.cli_main
    def raises(exc):
        raise exc

    line = error_line(call(raises, DataError("a.png: broken\nreally"), capsys), "a.png: broken")
    assert line == "error: a.png: broken really"  # newlines collapse into the one line
    missing = tmp_path / "nope.png"
    os_error = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(missing))
    line = error_line(call(raises, os_error, capsys), missing)
    assert line == f"error: {missing}: No such file or directory"
    rename = OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b")
    assert error_line(call(raises, rename, capsys)) == "error: a -> b: Invalid cross-device link"


def test_a_bug_keeps_its_traceback():
    @errors.cli_main
    def buggy(argv=None):
        return {}["key"]

    with pytest.raises(KeyError):
        buggy()


def test_ctrl_c_exits_130(capsys):
    @errors.cli_main
    def interrupted(argv):
        raise KeyboardInterrupt

    result = call(interrupted, [], capsys)
    assert result.code == 130 and result.err.strip() == "error: interrupted"


def test_argparse_mistakes_are_one_line(capsys):
    @errors.cli_main
    def main(argv):
        parser = errors.ArgumentParser(prog="tool")
        parser.add_argument("--n", type=int, required=True)
        return parser.parse_args(argv).n

    assert call(main, ["--n=3"], capsys).value == 3
    error_line(call(main, ["--n=x"], capsys), "--n", "invalid int value", "tool --help")
    error_line(call(main, [], capsys), "--n", "required")
    error_line(call(main, ["--n=1", "--bogus"], capsys), "--bogus")


# ----------------------------------------------------------------------------- absl + configs


def _config_file(tmp_path, body: str, name: str = "cfg.py") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


GOOD_CONFIG = """
import ml_collections

def get_config(arg=None):
    if arg not in (None, "", "small"):
        raise ValueError(f"unknown variant {arg!r} (expected '' or 'small')")
    c = ml_collections.ConfigDict()
    c.optim = ml_collections.ConfigDict({"lr": 1e-4})
    c.name = "small" if arg else "base"
    return c
"""


def _parse(argv, capsys):
    """parse_absl_flags on a private FlagValues with one config-file flag (`--config`)."""
    # ml_collections loads the file as module "config_config" and re-executes an existing one
    # in place (old attributes survive): a CLI loads once, these tests load many files.
    sys.modules.pop("config_config", None)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "a config", flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "a folder", flag_values=fv)
    return call(lambda a: (errors.parse_absl_flags(a, fv), fv)[1], argv, capsys)


def test_absl_config_file_is_loaded_and_overridden(tmp_path, capsys):
    cfg = _config_file(tmp_path, GOOD_CONFIG)
    result = _parse(["prog", f"--config={cfg}:small", "--config.optim.lr=0.5"], capsys)
    assert result.code == 0, result.err
    assert result.value.config.optim.lr == 0.5 and result.value.config.name == "small"


CONFIG_MISTAKES = [
    ("missing", ["nope.py", "config file not found"]),
    ("folder", ["is a folder"]),
    ("variant", ["--config=CFG:tinyy", "unknown variant 'tinyy'"]),
    ("unknown key", ["--config.optim.lrr=1", "no key 'lrr'", 'Did you mean "lr"']),
    ("unknown section", ["--config.nosection.lr=1", "no key 'nosection'"]),
    ("wrong type", ["--config.optim.lr=abc", "could not convert"]),
    ("syntax", ["bad.py:2", "syntax error"]),
    ("no get_config", ["empty.py", "does not define get_config()"]),
    ("returns None", ["none.py", "returned None"]),
    ("import error", ["imports.py", "ModuleNotFoundError", "no_such_module_xyz"]),
    ("unknown flag", ["Unknown command line flag 'worckdir'"]),
]

BROKEN_FILES = {  # case -> (file name, contents)
    "syntax": ("bad.py", "x = 1\ndef get_config(:"),
    "no get_config": ("empty.py", "x = 1"),
    "returns None": ("none.py", "def get_config():\n    pass"),
    "import error": ("imports.py", "import no_such_module_xyz"),
}


@pytest.mark.parametrize("case, expected", CONFIG_MISTAKES)
def test_absl_config_mistakes_are_one_line(case, expected, tmp_path, capsys):
    cfg = _config_file(tmp_path, GOOD_CONFIG)
    if case in BROKEN_FILES:
        argv = [f"--config={_config_file(tmp_path, BROKEN_FILES[case][1], BROKEN_FILES[case][0])}"]
    else:
        argv = {
            "missing": [f"--config={tmp_path / 'nope.py'}"],
            "folder": [f"--config={tmp_path}"],
            "variant": [f"--config={cfg}:tinyy"],
            "unknown key": [f"--config={cfg}", "--config.optim.lrr=1"],
            "unknown section": [f"--config={cfg}", "--config.nosection.lr=1"],
            "wrong type": [f"--config={cfg}", "--config.optim.lr=abc"],
            "unknown flag": [f"--config={cfg}", "--worckdir=x"],
        }[case]
    expected = [e.replace("CFG", cfg) for e in expected]
    error_line(_parse(["prog", *argv], capsys), *expected)


def test_training_cli_config_errors_in_a_real_process():
    """The issue's cases through ``python -m tokfusion_jax.train`` itself: exit 2, one line."""
    missing = run_module("tokfusion_jax.train", "--config=configs/nope.py", "--workdir=unused")
    error_line(missing, "configs/nope.py", "not found")
    variant = run_module("tokfusion_jax.train", "--config=configs/ivif.py:tinyy", "--workdir=x")
    line = error_line(variant, "configs/ivif.py", "unknown variant 'tinyy'")
    assert "File " not in line and len(line) < 200  # no flattened traceback


def test_config_error_is_a_tokfusion_error():
    assert issubclass(ConfigError, errors.TokFusionError)
    assert errors.one_line(" a\n\tb  c ") == "a b c"
