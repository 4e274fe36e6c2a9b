"""How much memory a batch needs and how much is free: the batch-size choice of `fuse`.

The need of a compiled program comes from XLA's own `memory_analysis` (arguments + outputs +
temporaries, less what is aliased); the weights it reads are already resident, so they are
subtracted. Two compiles of the same program (batch 1 and batch 2) give a line

    need(B) = base + B * per_item          # bytes beyond the resident weights

and the batch is the largest one, up to the caller's upper bound, whose need fits in a fraction
(`HEADROOM`) of the free memory. Free memory is, on CPU, the smaller of the kernel's
`MemAvailable` (/proc/meminfo) and what the process's cgroup still allows (v2 `memory.max` -
`memory.current`, or v1 `limit_in_bytes` - `usage_in_bytes`); on GPU/TPU, the device's
`bytes_limit - bytes_in_use`. Where nothing is known the caller's bound is kept.

All choices are pure functions of these numbers (`choose_batch`), so they are tested with planted
budgets; `is_out_of_memory` recognises the allocation failures a smaller batch can avoid.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

# Share of the free memory a batch may plan to use: XLA's analysis leaves out the runtime's own
# buffers (thread stacks, the host copies of inputs and outputs, allocator fragmentation).
HEADROOM = 0.7
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """need(batch) = base_bytes + batch * per_item_bytes (bytes beyond the resident weights)."""

    base_bytes: int
    per_item_bytes: int

    def need(self, batch: int) -> int:
        """Bytes one call at `batch` needs beyond the resident weights."""
        return self.base_bytes + batch * self.per_item_bytes

    @classmethod
    def from_two(cls, need_1: int, need_2: int) -> MemoryModel:
        """The line through need(1) and need(2); a per-item cost of at least need(1) / 2 when the
        analysis shows no growth (XLA reusing a buffer is not a promise for larger batches)."""
        per_item = max(need_2 - need_1, need_1 // 2, 1)
        return cls(max(need_1 - per_item, 0), per_item)


def choose_batch(
    free_bytes: int | None, model: MemoryModel | None, upper: int, headroom: float = HEADROOM
) -> int:
    """The largest batch in [1, upper] whose need fits in `headroom * free_bytes`.

    Unknown free memory or need keeps `upper`. A batch of 1 is returned even when it does not
    fit: one pair is the least `fuse` can do, and a real shortage then surfaces as an error.
    """
    if upper < 1:
        raise ValueError(f"upper batch bound must be >= 1, got {upper}")
    if free_bytes is None or model is None:
        return upper
    budget = headroom * free_bytes - model.base_bytes
    fits = int(budget // model.per_item_bytes) if budget > 0 else 0
    return max(1, min(upper, fits))


def program_need_bytes(compiled: Any, resident_bytes: int = 0) -> int | None:
    """Bytes a compiled executable needs per call beyond `resident_bytes` of inputs that already
    live in memory (the weights), from XLA's `memory_analysis`; None where not reported."""
    try:
        mem = compiled.memory_analysis()
        total = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
    except Exception:  # noqa: BLE001 - some backends do not implement memory analysis
        return None
    return max(int(total) - int(resident_bytes), 0)


def tree_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree."""
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(tree)))


def meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """`MemAvailable` in bytes, or None where the file or the field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def cgroup_free(root: str = "/sys/fs/cgroup") -> int | None:
    """What the cgroup still lets this process allocate, or None without a limit."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # cgroup v1
    ):
        limit = _read_int(os.path.join(root, limit_file))
        usage = _read_int(os.path.join(root, usage_file))
        if limit is not None and usage is not None and limit < 2**60:  # v1 "no limit" is ~2^63
            return max(limit - usage, 0)
    return None


def free_bytes(device: jax.Device | None = None) -> int | None:
    """Free memory for new buffers on `device` (default: the first device); None if unknown."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        known = [b for b in (meminfo_available(), cgroup_free()) if b is not None]
        return min(known) if known else None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    if "bytes_limit" not in stats:
        return None
    return max(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), 0)


_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM", "failed to allocate")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure that a smaller batch could avoid."""
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return any(marker in text for marker in _OOM_MARKERS)
