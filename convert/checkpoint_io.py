"""Reading PyTorch checkpoints safely, and validating them against an expected layout.

Shared by every converter (``python -m convert titok|cddfuse``):

* `read_state_dict`: a ``.safetensors`` file (safetensors' numpy loader, no torch) or a
  ``.bin``/``.pt``/``.pth`` file (``torch.load(weights_only=True)``: never arbitrary code) as a
  flat ``{key: float32 array}``. Nested dicts of tensors (e.g. CDDFuse's four state_dicts) are
  flattened with ``.``, the layout a ``.safetensors`` file of the same weights has.
* `check_keys`: one `CheckpointError` listing every missing, unexpected and mis-shaped key.
* `check_finite`: a `CheckpointError` naming the tensors that hold NaN or Inf.
* `file_sha256`, `fmt_shape`.

Every failure is a `CheckpointError` naming the file: empty, truncated or corrupt, refused as
unsafe by ``weights_only``, not a state_dict, or holding something other than tensors.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tokfusion_jax.errors import CheckpointError

Shape = tuple[int, ...]
PROGRESS_BYTES = 64 << 20  # show progress bars for files larger than this
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_WRAPPERS = ("state_dict", "model")  # training checkpoints that wrap the state_dict
_UNSAFE_GLOBAL = re.compile(r"(Unsupported global: GLOBAL \S+|unsupported GLOBAL \S+)")


def quiet(size: int) -> bool | None:
    """tqdm's ``disable`` for a file of ``size`` bytes (None: tqdm hides itself off a terminal)."""
    return True if size < PROGRESS_BYTES else None


def fmt_shape(shape: Shape) -> str:
    """``(64, 1, 3, 3)``; ``(64)`` for one dimension."""
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def file_sha256(path: Path) -> str:
    """sha256 of a file, with a progress bar for large ones."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        path.open("rb") as f,
        tqdm(total=size, unit="B", unit_scale=True, desc="sha256", disable=quiet(size)) as bar,
    ):
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A ``.safetensors`` (no torch) or ``.bin``/``.pt``/``.pth`` file as flat float32 arrays."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise CheckpointError(
        f"{path}: unsupported file type {path.suffix!r} (use .safetensors, .bin, .pt or .pth)"
    )


def reason(e: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, without terminal colours, cut at a sentence end."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    return text[: end + 1] if end > 0 else text[:limit] + " ..."


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            keys = list(f.keys())
            bar = tqdm(keys, desc="reading", unit="tensor", disable=quiet(path.stat().st_size))
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in bar}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"{path}: cannot read safetensors file, truncated or corrupt ({reason(e)})"
        ) from None


def _unsafe_pickle_error(path: Path, e: BaseException) -> CheckpointError:
    """The error for a pickle that ``weights_only`` loading refused (loading it would run code)."""
    found = _UNSAFE_GLOBAL.search(reason(e, limit=10_000))
    what = f" ({found.group(1)})" if found else ""
    return CheckpointError(
        f"{path}: refused as unsafe by torch.load(weights_only=True): the pickle holds Python "
        f"objects beyond tensors{what}, and loading them could run arbitrary code. If you trust "
        "the file, re-save its tensors in an isolated environment, e.g. "
        "safetensors.torch.save_file(torch.load(FILE, weights_only=False), 'model.safetensors'), "
        "and convert the .safetensors file"
    )


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the file is in the zip format."""
    import pickle
    import zipfile

    import torch

    try:  # the legacy (pre-1.6, non-zip) serialisation cannot be memory-mapped
        return torch.load(
            str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # weights_only refused to import a class or function
            raise _unsafe_pickle_error(path, e) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(e), re.S)
        why = f"weights-only unpickler: {' '.join(detail.group(1).split())}" if detail else ""
        raise CheckpointError(
            f"{path}: cannot read torch file, truncated or corrupt ({why or reason(e)})"
        ) from None
    except Exception as e:  # zip and stream errors of many kinds
        raise CheckpointError(
            f"{path}: cannot read torch file, truncated or corrupt ({reason(e)})"
        ) from None


def _flatten(obj: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, f"{name}.", out)
        else:
            out[name] = value


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    import torch

    obj = _torch_load(path)
    for wrapper in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and len(obj) <= 3:
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    flat: dict[str, Any] = {}
    _flatten(obj, "", flat)
    not_tensors = [k for k, v in flat.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path}: entries that are not tensors: {', '.join(map(str, not_tensors[:5]))}"
        )
    items = tqdm(flat.items(), desc="reading", unit="tensor", disable=quiet(path.stat().st_size))
    return {str(k): v.detach().float().numpy() for k, v in items}


def check_finite(state: Mapping[str, np.ndarray], source: str) -> None:
    """Raises `CheckpointError` naming the tensors with NaN or Inf values (a diverged run)."""
    bad = [k for k, v in state.items() if not np.isfinite(v).all()]
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CheckpointError(
            f"{source}: non-finite (NaN or Inf) values in {len(bad)} tensor(s): "
            f"{', '.join(bad[:5])}{more}"
        )


def check_keys(shapes: Mapping[str, Shape], expected: Mapping[str, Shape], problem: str) -> None:
    """Raises one `CheckpointError` listing every missing, unexpected and mis-shaped key.

    ``problem`` starts the message, e.g. ``"model.pth does not match the TiTok architecture"``.
    """
    missing = [f"{k} {fmt_shape(expected[k])}" for k in expected if k not in shapes]
    unexpected = [f"{k} {fmt_shape(shapes[k])}" for k in shapes if k not in expected]
    wrong = [
        f"{k} expected {fmt_shape(expected[k])} found {fmt_shape(shapes[k])}"
        for k in expected
        if k in shapes and tuple(shapes[k]) != tuple(expected[k])
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            parts.append(f"{len(items)} {label}: " + ", ".join(items))
    if parts:
        raise CheckpointError(f"{problem}; " + "; ".join(parts))
