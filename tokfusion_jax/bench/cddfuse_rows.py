"""Rows `cddfuse` (plain-2D JAX vs the PyTorch twin) and `memory` (peak RSS of one big fuse).

Each side runs in a process of its own (`bench.worker`): the frameworks never share a thread
pool, an allocator or a peak-RSS mark. The processes are started and warmed up one after the
other, then their calls alternate (jax, torch eager[, torch compile], jax, ...), so a change in
the machine's load hits every side alike; the figures are medians of the per-call wall times
each worker measures around its own call (no IPC inside the timing).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from tokfusion_jax.bench.results import Row
from tokfusion_jax.bench.settings import Settings
from tokfusion_jax.bench.worker import PROTOCOL

PINNED_NOTE = " | pinned to CPU {}: one thread, CPU seconds per call"
TINY_NOTE = " | tiny: the JAX side is the tiny backbone (a smoke test, not a comparison)"


class Worker:
    """A `bench.worker` subprocess serving one (side, work) program."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokfusion_jax.bench.worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.ready = self._reply("ready")

    def _reply(self, key: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.startswith(PROTOCOL):
                continue
            reply = json.loads(line[len(PROTOCOL) :])
            if "error" in reply:
                self.close()
                raise RuntimeError(f"{self.spec['side']} {self.spec['work']}: {reply['error']}")
            if key in reply:
                return reply
        self.close()
        raise RuntimeError(f"{self.spec['side']} {self.spec['work']}: worker exited early")

    def run(self) -> float:
        """Seconds of one call, as the worker measured it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return float(self._reply("s")["s"])

    def quit(self) -> int:
        """Stops the worker; returns its peak RSS in bytes."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        peak = int(self._reply("peak_rss")["peak_rss"])
        self.proc.wait(timeout=60)
        return peak

    def close(self) -> None:
        """Ends the process if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def alternate(workers: Sequence[Worker], warmup: int, repeats: int) -> list[list[float]]:
    """`warmup` untimed rounds, then `repeats` rounds of one call per worker, in turn."""
    for _ in range(warmup):
        for worker in workers:
            worker.run()
    times: list[list[float]] = [[] for _ in workers]
    for _ in range(repeats):
        for i, worker in enumerate(workers):
            times[i].append(worker.run())
    return times


def torch_sides(settings: Settings) -> list[str]:
    """The PyTorch sides `--torch_compile` asks for."""
    return {"on": ["torch eager", "torch compile"], "off": ["torch eager"]}.get(
        settings.torch_compile, ["torch compile"]
    )


def compare(work: str, size: tuple[int, int], batch: int, settings: Settings) -> list[Row]:
    """Rows of one (work, size, batch): JAX and the PyTorch sides, alternating."""
    height, width = size
    name = {"fuse": "cddfuse fuse", "train": "cddfuse train step"}[work]
    sides = ["jax", *torch_sides(settings)]
    base = {"work": work, "height": height, "width": width, "batch": batch}
    base["tiny"] = settings.tiny
    base["pin_cpu"] = settings.cddfuse_pin_cpu
    workers: list[Worker] = []
    rows: list[Row] = []
    try:
        for side in sides:
            workers.append(Worker({**base, "side": side}))
        times = alternate(workers, settings.warmup, settings.cddfuse_repeats)
        for side, worker, t in zip(sides, workers, times, strict=True):
            median = statistics.median(t)
            row = Row(
                name=name,
                framework=side,
                size=f"{height}x{width}",
                compile_s=worker.ready["compile_s"],
                gflops_per_item=None
                if worker.ready["gflops"] is None
                else worker.ready["gflops"] / batch,
                memory_source="peak RSS of its own process",
                note=f"each side in its own process, {len(t)} alternating calls, median"
                + (PINNED_NOTE.format(settings.cddfuse_pin_cpu) if base["pin_cpu"] >= 0 else "")
                + (TINY_NOTE if settings.tiny else ""),
            )
            row.throughput_by_batch[batch] = batch / median
            row.best_batch, row.items_per_s = batch, batch / median
            if batch == 1:
                row.latency_ms, row.latency_runs = 1e3 * median, len(t)
            row.memory_mb = worker.quit() / 2**20
            print(f"  {name} {side} {height}x{width} batch {batch}: {1e3 * median:.1f} ms")
            rows.append(row)
    finally:
        for worker in workers:
            worker.close()
    return merge_batches(rows)


def merge_batches(rows: list[Row]) -> list[Row]:
    """One row per (name, framework, size) with the throughput of every batch measured."""
    merged: dict[tuple[str, str, str], Row] = {}
    for row in rows:
        key = (row.name, row.framework, row.size)
        if key not in merged:
            merged[key] = row
            continue
        into = merged[key]
        into.throughput_by_batch.update(row.throughput_by_batch)
        into.memory_mb = max(into.memory_mb or 0.0, row.memory_mb or 0.0)
        if row.latency_ms is not None:
            into.latency_ms, into.latency_runs = row.latency_ms, row.latency_runs
        best = max(into.throughput_by_batch, key=into.throughput_by_batch.get)
        into.best_batch, into.items_per_s = best, into.throughput_by_batch[best]
    return list(merged.values())


def bench_cddfuse(settings: Settings) -> list[Row]:
    """The `cddfuse` rows: fuse at each of `cddfuse_fuse_sizes` and the train step at
    `cddfuse_train_size`, for every batch size asked."""
    rows: list[Row] = []
    for size in settings.cddfuse_fuse_sizes:
        for batch in settings.cddfuse_fuse_batches:
            rows += compare("fuse", size, batch, settings)
    for batch in settings.cddfuse_train_batches:
        rows += compare("train", settings.cddfuse_train_size, batch, settings)
    return merge_batches(rows)


def bench_fuse_memory(settings: Settings) -> Row:
    """Peak RSS of one paper-size fuse (TokFusion + the tokenizer variant) at batch 1, from the
    compile of the fuse program on (the weights already resident) in a fresh process."""
    height, width = settings.memory_size
    variant = settings.fuse_variant
    spec = {"side": "jax", "work": "fuse_memory", "height": height, "width": width, "batch": 1}
    worker = Worker({**spec, "variant": variant, "tiny": settings.tiny})
    try:
        seconds = worker.run()
        peak = worker.quit()
    finally:
        worker.close()
    return Row(
        name=f"fuse memory {variant}",
        size=f"{height}x{width}",
        compile_s=worker.ready["compile_s"],
        latency_ms=1e3 * seconds,
        latency_runs=1,
        memory_mb=peak / 2**20,
        memory_source="peak RSS (VmHWM) of a fresh process, weights resident, compile included",
        note="one call at batch 1; peak RSS counted from the compile of the fuse program on",
    )
