"""Config helpers: loading Python config files by path (configs/*.py are files, not an
importable package) and applying dotted-key overrides."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import ml_collections

from tokfusion_jax.errors import ConfigError


def load_module(path: str | pathlib.Path) -> ModuleType:
    """Executes the Python file at `path` and returns it as a module."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"tokfusion_cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path` (the `file.py:arg` convention)."""
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a config file must define get_config(arg)")
    return module.get_config(arg)


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, Any]], where: str
) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted-key overrides; unknown keys fail naming them.

    Field references survive the copy (e.g. MIF's ``data.val_root`` follows ``data.root``).
    """
    out = ml_collections.ConfigDict(config.to_dict(preserve_field_references=True))
    for key, value in overrides:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"{where}: override {key!r}: no section {part!r} in the config")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{where}: override {key!r}: unknown key {leaf!r}")
        old = node[leaf]
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"{where}: override {key}={value!r}: {e}") from None
    return out


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing for the ``--config`` CLIs: a config error (unknown key, wrong type,
    unreadable file) becomes one ``error: invalid --config ...`` line and exit status 2."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("'\" ").split())
        where = f" (overrides: {', '.join(overrides)})" if overrides else ""
        print(f"error: invalid --config{where}: {detail}", file=sys.stderr, flush=True)
        sys.exit(2)
