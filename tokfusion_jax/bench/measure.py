"""Compiling and timing one JAX row over its batch sizes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tokfusion_jax.bench.results import Row
from tokfusion_jax.bench.settings import Settings
from tokfusion_jax.bench.timing import compile_fn, time_fn, time_stateful


def measure_jax_row(
    row: Row,
    jitted: Any,
    make_args: Callable[[int], tuple[Any, ...]],
    batches: Sequence[int],
    settings: Settings,
    peak: float | None,
    stateful: bool = False,
    flops: Callable[[int], float | None] | None = None,
) -> Row:
    """Compiles and times `jitted(*make_args(b))` for each batch size b; fills `row`.

    The smallest batch gives compile time, FLOPs per item, memory and (at b = 1) the latency; the
    best throughput over `batches` gives items/s and MFU. With `stateful`, the first argument is
    a state threaded through calls (`jitted` returns (state, ...), state may be donated).
    `flops(b)` overrides XLA's count of the compiled program (see `unrolled`).
    """
    best_flops_per_s = None
    for i, batch in enumerate(sorted(batches)):
        try:
            args = make_args(batch)
            compiled = compile_fn(jitted, *args)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch
            if i == 0:
                raise
            row.note += f" | batch {batch} failed: " + " ".join(str(e).split())[:120]
            break
        if flops is not None:
            # FLOPs are linear in the batch: count once (a lowering costs seconds), then scale.
            if i == 0:
                per_item = (flops(batch) or 0.0) / batch
            compiled = dataclasses.replace(compiled, flops=per_item * batch or None)
        if i == 0:
            row.compile_s = compiled.compile_s
            if compiled.flops:
                row.gflops_per_item = compiled.flops / batch / 1e9
            if compiled.memory_bytes is not None:
                row.memory_mb = compiled.memory_bytes / 2**20
                row.memory_source = f"XLA memory_analysis at batch {batch}"
        repeats = settings.repeats if batch == 1 else settings.throughput_repeats
        budget = settings.budget_s or None
        try:
            if stateful:
                step = lambda state, _exe=compiled.executable, _rest=args[1:]: _exe(state, *_rest)[
                    0
                ]
                timing, _ = time_stateful(
                    step,
                    args[0],
                    warmup=settings.warmup,
                    repeats=repeats,
                    budget_s=budget,
                    min_repeats=settings.min_repeats,
                )
            else:
                timing = time_fn(
                    compiled.executable,
                    *args,
                    warmup=settings.warmup,
                    repeats=repeats,
                    budget_s=budget,
                    min_repeats=settings.min_repeats,
                )
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch
            if i == 0:
                raise
            row.note += f" | batch {batch} failed: " + " ".join(str(e).split())[:120]
            break
        finally:
            del args
        if batch == 1:
            row.latency_ms = 1e3 * timing.median_s
            row.latency_runs = timing.runs
        row.throughput_by_batch[batch] = batch / timing.median_s
        if row.best_batch is None or row.throughput_by_batch[batch] > (row.items_per_s or 0.0):
            row.best_batch, row.items_per_s = batch, row.throughput_by_batch[batch]
            best_flops_per_s = compiled.flops / timing.median_s if compiled.flops else None
        print(f"  {row.name} {row.dtype} batch {batch}: {1e3 * timing.median_s:.2f} ms", flush=True)
    if peak and best_flops_per_s:
        row.mfu = best_flops_per_s / peak
    return row


def random_images(batch: int, height: int, width: int, channels: int, seed: int = 0) -> jax.Array:
    """Uniform [0, 1) float32 images (B, H, W, C) on the default device (never zeros)."""
    key = jax.random.fold_in(jax.random.key(seed), batch * 100_003 + height * 1009 + width)
    return jax.random.uniform(key, (batch, height, width, channels), jnp.float32)
