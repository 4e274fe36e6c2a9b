"""Timing loops, AOT compilation with XLA's cost and memory analyses, device peaks, peak RSS."""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------------------------
# Device peak FLOP/s.

PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100", {"bfloat16": 989e12, "float32": 494e12}),
    ("h200", {"bfloat16": 989e12, "float32": 494e12}),
    ("a100", {"bfloat16": 312e12, "float32": 156e12}),
    ("v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("v6", {"bfloat16": 918e12, "float32": 918e12}),
    ("v4", {"bfloat16": 275e12, "float32": 275e12}),
)


def table_peak_flops(device_kind: str, dtype: str) -> float | None:
    """Datasheet dense peak FLOP/s for a device kind and compute dtype, or None when unknown."""
    kind = device_kind.lower()
    for key, peaks in PEAK_FLOPS:
        if key in kind:
            return peaks.get(dtype)
    return None


def measure_matmul_flops(dtype: str, size: int, repeats: int = 5) -> float:
    """Achieved FLOP/s of one (size, size) x (size, size) matmul on the default device."""
    keys = jax.random.split(jax.random.key(0), 2)
    a = jax.random.normal(keys[0], (size, size), jnp.dtype(dtype))  # (n, n)
    b = jax.random.normal(keys[1], (size, size), jnp.dtype(dtype))  # (n, n)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    timing = time_fn(matmul, a, b, warmup=2, repeats=repeats)
    return 2.0 * size**3 / timing.median_s


class PeakFlops:
    """Peak FLOP/s per compute dtype of the default device: the datasheet table on GPU/TPU, an
    achieved matmul on CPU (measured once per dtype in this process)."""

    def __init__(self, matmul_size: int) -> None:
        self.matmul_size = matmul_size
        self.device_kind = jax.devices()[0].device_kind
        self.cache: dict[str, tuple[float, str]] = {}

    def __call__(self, dtype: str) -> tuple[float, str]:
        """(peak FLOP/s, where it came from) for `dtype`."""
        if dtype not in self.cache:
            peak = table_peak_flops(self.device_kind, dtype)
            if peak is not None:
                self.cache[dtype] = (peak, f"datasheet {self.device_kind}")
            else:
                measured = measure_matmul_flops(dtype, self.matmul_size)
                self.cache[dtype] = (measured, f"measured {self.matmul_size}^3 {dtype} matmul")
        return self.cache[dtype]


# ---------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds per call over `runs` device-synchronised calls after warm-up."""

    median_s: float
    min_s: float
    max_s: float
    runs: int


def _summarise(times: Sequence[float]) -> Timing:
    return Timing(statistics.median(times), min(times), max(times), len(times))


MIN_REPEATS = 5


def _repeats_within(
    repeats: int, budget_s: float | None, call_s: float, min_repeats: int = MIN_REPEATS
) -> int:
    """`repeats`, lowered (not below `min_repeats`) so that timing takes about `budget_s`."""
    if not budget_s or call_s <= 0:
        return repeats
    return max(min(repeats, min_repeats), min(repeats, int(budget_s / call_s)))


def time_calls(
    call: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 20,
    budget_s: float | None = None,
    min_repeats: int = MIN_REPEATS,
) -> Timing:
    """Times `call()`, which must return only once its work is done on the device.

    `warmup` untimed calls first (first-call dispatch, autotuning, caches), then `repeats` timed;
    with `budget_s`, slow calls get fewer repeats (at least `min_repeats`) to fit that budget.
    """
    call_s = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        call()
        call_s = time.perf_counter() - start
    times = []
    for _ in range(_repeats_within(repeats, budget_s, call_s, min_repeats)):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return _summarise(times)


def time_fn(fn: Callable[..., Any], *args: Any, **timing: Any) -> Timing:
    """Times `fn(*args)`, blocking on every output leaf so device work is included. `timing`:
    the keyword arguments of `time_calls`."""
    return time_calls(lambda: jax.block_until_ready(fn(*args)), **timing)


def time_stateful(step: Callable[[Any], Any], state: Any, **timing: Any) -> tuple[Timing, Any]:
    """Times `state = step(state)` (a train step with donated state); returns the last state."""
    box = [state]

    def call() -> None:
        box[0] = jax.block_until_ready(step(box[0]))

    return time_calls(call, **timing), box[0]


def time_torch(fn: Callable[[], Any], sync: Callable[[], None], **timing: Any) -> Timing:
    """Times a PyTorch closure; `sync` waits for the device (a no-op on CPU)."""
    return time_calls(lambda: (fn(), sync()), **timing)


# ---------------------------------------------------------------------------------------------
# Compilation and memory.


@dataclasses.dataclass(frozen=True)
class Compiled:
    """An AOT-compiled executable and what XLA says about it."""

    executable: Any
    compile_s: float  # lower + compile wall time
    flops: float | None  # per call, from cost_analysis
    bytes_accessed: float | None
    memory_bytes: int | None  # arguments + outputs + temporaries - aliased, from memory_analysis


def _cost_entry(cost: Any) -> dict[str, float]:
    """cost_analysis() returns a dict (new jax) or a one-element list of dicts (old jax)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_fn(jitted: Any, *args: Any) -> Compiled:
    """Lowers and compiles `jitted` for `args`, timing it and reading cost and memory analyses."""
    start = time.perf_counter()
    executable = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    flops = bytes_accessed = memory = None
    try:
        cost = _cost_entry(executable.cost_analysis())
        flops = float(cost["flops"]) if "flops" in cost else None
        bytes_accessed = float(cost["bytes accessed"]) if "bytes accessed" in cost else None
    except Exception:  # noqa: BLE001 - some backends do not implement cost analysis
        pass
    try:
        mem = executable.memory_analysis()
        memory = int(
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
    except Exception:  # noqa: BLE001 - some backends do not implement memory analysis
        pass
    return Compiled(executable, compile_s, flops, bytes_accessed, memory)


def device_peak_memory(device: jax.Device | None = None) -> int | None:
    """Process-lifetime peak bytes in use on `device` (GPU/TPU); None where unreported (CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


def count_params(tree: Any) -> int:
    """Number of scalar parameters in a pytree of arrays."""
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)
