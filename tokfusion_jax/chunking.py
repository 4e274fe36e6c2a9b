"""A per-sample network over a device-sharded batch, run a few samples at a time (exact).

On XLA:CPU a train step over the whole per-device batch streams every full-resolution activation
(B x H x W x 256 float32 in the feed-forward blocks: 16 MiB per 128x128 sample) through main
memory between the op that writes it and the op that reads it. When a chunk's activations fit
in the last-level cache they stay there: the plain-2D 128x128 step at batch 4 took 21.1 s whole,
13.8 s in chunks of 2 and 12.3 s in chunks of 1 on a 2-core Zen 4 with a 32 MiB L3
(`benchmarks/NOTES.md` #23). Every op of the network acts on each sample on its own (no batch
statistics), so the outputs are the same up to the order of float additions inside the GEMMs;
batch-coupled losses still see the whole batch.

The chunks are unrolled in the program (a `lax.map` over them ran 6x slower on XLA:CPU), so
compile time grows with their number; `auto_chunk_size` therefore takes the largest chunk that
fits the cache (read from the OS at run time). Accelerators keep the whole batch: there the
batch is what fills the device.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

FALLBACK_CACHE_BYTES = 32 << 20  # where the OS does not report its caches
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def last_level_cache_bytes() -> int:
    """Size of CPU 0's largest cache (Linux sysfs, e.g. "32768K"), else `FALLBACK_CACHE_BYTES`."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = _UNITS.get(text[-1:].upper(), 1)
        digits = text[:-1] if text[-1:].upper() in _UNITS else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=FALLBACK_CACHE_BYTES)


def widest_activation_bytes(model: Any, height: int, width: int) -> int:
    """Bytes of the backbone's widest per-sample activation at (H, W): the GDFN's 1x1 output,
    (H, W, 2 * int(dim * ffn_expansion)) in the compute dtype. `model`: a model config or
    `ModelSpec` (anything with `dim`, `ffn_expansion` and `dtype`)."""
    channels = 2 * int(model.dim * model.ffn_expansion)
    return height * width * channels * jnp.dtype(model.dtype).itemsize


def auto_chunk_size(sample_bytes: int, backend: str, cache_bytes: int | None = None) -> int:
    """Samples per chunk when the config says 0 (auto): on CPU as many as fit in the last-level
    cache (at least 1); 0 (the whole per-device batch) on GPU/TPU."""
    if backend != "cpu":
        return 0
    cache = last_level_cache_bytes() if cache_bytes is None else cache_bytes
    return max(1, cache // max(1, sample_bytes))


def map_in_chunks(fn: Callable[..., PyTree], inputs: PyTree, shards: int, chunk_size: int):
    """``fn(*inputs)``, computed `chunk_size` samples per shard at a time, outputs concatenated.

    inputs: a tuple of pytrees whose leaves are (B, ...) with B = shards * b, split over
    `shards` devices in contiguous blocks of b (None leaves pass through). Chunk k takes rows
    k*c .. min((k+1)*c, b) - 1 of every shard's block (the last one may be shorter), so no data
    leaves its device. `chunk_size` 0, or >= b: one call on the whole batch. fn's output leaves
    must be (batch, ...) as well.
    """
    leaves = [x for x in jax.tree_util.tree_leaves(inputs) if x is not None]
    batch = leaves[0].shape[0]
    per_shard = batch // shards
    if per_shard * shards != batch:
        raise ValueError(f"batch {batch} does not split over {shards} shards")
    if chunk_size <= 0 or chunk_size >= per_shard:
        return fn(*inputs)

    def take(x: jax.Array, start: int, size: int) -> jax.Array:  # (B, ...) -> (shards*size, ...)
        blocks = x.reshape(shards, per_shard, *x.shape[1:])
        return blocks[:, start : start + size].reshape(shards * size, *x.shape[1:])

    sizes = [min(chunk_size, per_shard - start) for start in range(0, per_shard, chunk_size)]
    starts = [k * chunk_size for k in range(len(sizes))]
    outs = [
        fn(*jax.tree_util.tree_map(lambda x, s=start, n=size: take(x, s, n), inputs))
        for start, size in zip(starts, sizes, strict=True)
    ]

    def join(*parts: jax.Array) -> jax.Array:  # chunks of (shards * size, ...) -> (B, ...)
        blocks = [p.reshape(shards, n, *p.shape[1:]) for p, n in zip(parts, sizes, strict=True)]
        return jnp.concatenate(blocks, axis=1).reshape(batch, *parts[0].shape[1:])

    return jax.tree_util.tree_map(join, *outs)
