"""Loading Python config files by path (configs/*.py are files, not an importable package)."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

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
