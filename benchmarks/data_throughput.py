"""Data pipeline throughput: pairs/s for 640x480 PNG pairs resized to 256x256.

    python benchmarks/data_throughput.py                     # synthetic PNG pairs, 2 workers
    python benchmarks/data_throughput.py --workers 0 1 2 4   # a table over worker counts
    python benchmarks/data_throughput.py --root data/MSRS/train --dataset msrs

The synthetic pairs (an RGB visible PNG and a gray infrared PNG, 640x480, textured so that they
compress like real MSRS frames) are written to a temporary folder.
The first batches (worker start-up) are excluded from the timing. `pairs/s` is wall-clock
throughput; `pairs/cpu-s` divides by the CPU time of this process and its workers, which stays
meaningful when other jobs share the machine (with N idle cores, throughput approaches
N x pairs/cpu-s as long as the workers keep them busy).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from tokfusion_jax.data import pipeline, sources


def write_synthetic_pairs(root: str, count: int, size: tuple[int, int] = (480, 640)) -> None:
    """`count` pairs in root/vis (RGB) and root/ir (gray) that compress like MSRS frames.

    Smooth scenes (bicubic-upsampled coarse noise) with a little sensor noise: about 300-400 KB
    per visible PNG and 100-150 KB per infrared PNG, like the real 640x480 MSRS files.
    """
    rng = np.random.default_rng(0)
    h, w = size
    os.makedirs(os.path.join(root, "vis"), exist_ok=True)
    os.makedirs(os.path.join(root, "ir"), exist_ok=True)
    for i in range(count):
        coarse = rng.uniform(0, 255, (h // 24, w // 24, 3)).astype(np.uint8)
        base = np.asarray(
            Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32
        )
        vis = np.clip(base + rng.normal(0, 1.5, base.shape), 0, 255).astype(np.uint8)
        ir = np.clip(base.mean(-1) + rng.normal(0, 1.5, (h, w)), 0, 255).astype(np.uint8)
        Image.fromarray(vis).save(os.path.join(root, "vis", f"{i:05d}.png"))
        Image.fromarray(ir).save(os.path.join(root, "ir", f"{i:05d}.png"))


def _tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (grain workers).

    NaN when psutil (installed with the `tfds` extra) is missing.
    """
    try:
        import psutil
    except ImportError:
        return float("nan")

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(
    source: sources.PairedSource, workers: int, batch_size: int, batches: int, warmup: int
) -> tuple[float, float]:
    """(pairs per wall-clock second, pairs per CPU second of all processes) after warm-up."""
    ds = pipeline.make_pipeline(
        source,
        batch_size=batch_size,
        image_size=(256, 256),
        seed=0,
        worker_count=workers,
        process_index=0,
        process_count=1,
    )
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    cpu0, start = _tree_cpu_seconds(), time.perf_counter()
    pairs = 0
    for _ in range(batches):
        pairs += len(next(it)["name"])
    elapsed = time.perf_counter() - start
    cpu = _tree_cpu_seconds() - cpu0
    close = getattr(it, "close", None)
    if close is not None:
        close()
    return pairs / elapsed, pairs / cpu if cpu > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=64, help="synthetic pairs to write")
    parser.add_argument("--root", default="", help="use a real dataset instead")
    parser.add_argument("--dataset", default="bundle", help="preset for --root")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.root:
            source = sources.from_preset(args.dataset, args.root)
            what = f"{args.dataset} {args.root}"
        else:
            write_synthetic_pairs(tmp, args.pairs)
            source = sources.from_preset("bundle", tmp)
            vis_kb = os.path.getsize(os.path.join(tmp, "vis", "00000.png")) / 1e3
            ir_kb = os.path.getsize(os.path.join(tmp, "ir", "00000.png")) / 1e3
            what = (
                f"{args.pairs} synthetic 640x480 PNG pairs "
                f"(vis {vis_kb:.0f} KB RGB, ir {ir_kb:.0f} KB gray)"
            )
        print(f"data: {what}; output 256x256; batch {args.batch_size}; cpus {os.cpu_count()}")
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        print(f"{'workers':>8} {'pairs/s':>10} {'pairs/cpu-s':>12}")
        for workers in args.workers:
            rate, per_cpu = measure(source, workers, args.batch_size, args.batches, args.warmup)
            print(f"{workers:>8d} {rate:>10.1f} {per_cpu:>12.1f}")
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
