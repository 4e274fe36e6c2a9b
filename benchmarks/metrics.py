"""Speed of every convention's metrics on 640x480 triplets: JAX (batch 1 and N) vs float64 NumPy.

    python benchmarks/metrics.py [--batch=32] [--repeats=3] [--convention=NAME|all]

Prints a table of seconds per triplet (wall and process CPU time; CPU time is the fairer
figure on a shared machine) for `tokfusion_jax.metrics.compute` with all of a convention's
metrics, and for the independent float64 NumPy/SciPy reference of the same convention that the
tests check against (tests/metric_refs/), with the ratio NumPy / JAX measured in the same run,
plus the speed-up against the CDDFuse Evaluator's ~2.2 s per triplet on a 2-core CPU. vifb is
timed on colour triplets (every metric per channel). Compile time is reported separately and
excluded from the per-triplet figures.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import numpy as np

from tokfusion_jax import metrics

CDDFUSE_EVALUATOR_S = 2.2  # all metrics, one 480x640 triplet, 2-core CPU (reference notes §14)
REPO = pathlib.Path(__file__).resolve().parents[1]


def _numpy_reference(convention: str):
    """The float64 NumPy reference of `convention`: (f, a, b) -> {name: value}."""
    sys.path.insert(0, str(REPO / "tests"))
    from metric_refs import python_evaluators, tang, vifb

    if convention == "vifb":
        return vifb.reference
    if convention == "tang":
        return tang.reference
    return lambda f, a, b: python_evaluators.reference(f, a, b, convention)


def _triplets(n: int, seed: int = 0, colour: bool = False):
    """Smooth-ish random 480x640 uint8 triplets (B, 480, 640), or (B, 480, 640, 3)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 60, 80) + ((3,) if colour else ())).astype(np.float32)
    base = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)  # blocky structure + noise
    out = []
    for s in (10.0, 20.0, 30.0):
        noisy = base + rng.normal(0.0, s, base.shape)
        out.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    return out[0], out[1], out[2]


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Best (wall, cpu) seconds over `repeats` calls."""
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - w)
        best_cpu = min(best_cpu, time.process_time() - c)
    return best_wall, best_cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--numpy_triplets", type=int, default=2)
    p.add_argument("--convention", default="all", choices=(*metrics.CONVENTIONS, "all"))
    args = p.parse_args()
    conventions = metrics.CONVENTIONS if args.convention == "all" else (args.convention,)
    ref = CDDFUSE_EVALUATOR_S
    print(f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| convention | implementation | batch | compile s | s/triplet wall | s/triplet CPU "
          "| NumPy / this, CPU | CDDFuse Evaluator (2.2 s) / this, wall / CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for conv in conventions:
        f, a, b = _triplets(args.batch, colour=conv in metrics.COLOR_CONVENTIONS)
        reference = _numpy_reference(conv)
        k = args.numpy_triplets
        w, c = _timed(
            lambda: [reference(f[i], a[i], b[i]) for i in range(k)],  # noqa: B023
            1,
        )
        np_w, np_c = w / k, c / k
        for batch in (1, args.batch):
            fb, ab, bb = f[:batch], a[:batch], b[:batch]
            t0 = time.perf_counter()
            metrics.compute(fb, ab, bb, convention=conv)  # compile + first run
            compile_s = time.perf_counter() - t0
            wall, cpu = _timed(lambda: metrics.compute(fb, ab, bb, convention=conv), args.repeats)  # noqa: B023
            per_w, per_c = wall / batch, cpu / batch
            print(f"| {conv} | JAX | {batch} | {compile_s:.1f} | {per_w:.4f} | {per_c:.4f} "
                  f"| {np_c / per_c:.1f}x | {ref / per_w:.1f}x / {ref / per_c:.1f}x |")  # fmt: skip
        print(f"| {conv} | NumPy float64 (tests) | 1 | - | {np_w:.4f} | {np_c:.4f} | 1.0x "
              f"| {ref / np_w:.1f}x / {ref / np_c:.1f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
