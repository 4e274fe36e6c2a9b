"""What a bench run measures: `Settings`, the presets and the flag parsers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tokfusion_jax.bench.timing import MIN_REPEATS


@dataclasses.dataclass
class Settings:
    """What to run and how long to time it (a preset, then command-line overrides)."""

    rows: tuple[str, ...] = ("encode", "torch_encode", "fuse", "train")
    variants: tuple[str, ...] = ("s128", "b64", "l32")
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    encode_batches: tuple[int, ...] = (1, 8)
    torch_variants: tuple[str, ...] = ("l32",)
    torch_dtypes: tuple[str, ...] = ("float32",)
    torch_batches: tuple[int, ...] = (1, 8)
    torch_compile: str = "on"  # "on" (eager and compiled), "off" (eager), "only" (compiled)
    fuse_variant: str = "l32"
    fuse_dtypes: tuple[str, ...] = ("float32",)
    fuse_sizes: tuple[tuple[int, int], ...] = ((256, 256), (480, 640))  # (H, W)
    fuse_batches: tuple[int, ...] = (1, 4)
    train_variant: str = "l32"
    train_dtype: str = "float32"
    train_size: tuple[int, int] = (256, 256)
    train_stages: tuple[int, ...] = (1, 2)
    train_batches: tuple[int, ...] = (1,)
    # cddfuse rows: the plain-2D model in JAX vs the PyTorch twin, each side in its own process.
    cddfuse_fuse_sizes: tuple[tuple[int, int], ...] = ((256, 256), (480, 640))  # (H, W)
    cddfuse_fuse_batches: tuple[int, ...] = (1,)
    cddfuse_train_size: tuple[int, int] = (128, 128)
    cddfuse_train_batches: tuple[int, ...] = (1, 4)
    cddfuse_repeats: int = 5  # alternating timed calls per side
    # >= 0: each worker binds to that CPU (one thread) and reports CPU time per call, a
    # load-robust measure of work for busy machines; -1: all cores, wall time (the figures).
    cddfuse_pin_cpu: int = -1
    # memory row: peak RSS of one fuse of the paper-size model (fuse_variant tokenizer), batch 1.
    memory_size: tuple[int, int] = (768, 576)  # (H, W)
    tiny: bool = False  # tiny tokenizer and backbone (smoke tests)
    warmup: int = 2
    repeats: int = 20  # batch-1 latency runs
    throughput_repeats: int = 5  # runs at batch > 1
    # Seconds of timed runs per batch size; slower calls get fewer repeats (>= min_repeats).
    budget_s: float = 0.0  # 0 = no cap
    min_repeats: int = MIN_REPEATS
    matmul_size: int = 2048  # CPU peak: achieved FLOP/s of this square matmul


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "torch_compile": "off",  # inductor's compile of L-32 takes minutes on 2 cores
        "fuse_batches": (1,),
        "warmup": 1,
        # The whole preset in under 10 minutes on 2 cores: a 256x256 L-32 train step takes
        # ~11 s there, so slow calls are timed 3 times (fast ones still 20).
        "budget_s": 20.0,
        "min_repeats": 3,
    },
    "gpu": {
        "encode_batches": (1, 8, 64),
        "torch_dtypes": ("bfloat16", "float32"),
        "torch_batches": (1, 8, 64),
        "fuse_dtypes": ("bfloat16",),
        "fuse_batches": (1, 32),
        "train_dtype": "bfloat16",
        "train_batches": (8,),
        "throughput_repeats": 20,
        "matmul_size": 8192,
    },
    # The cddfuse comparison, the fuse memory row and the L-32 train steps at 256x256 (their
    # MFU is the ratio to the FLOP bound): about 12 minutes on 2 idle cores.
    "cddfuse": {
        "rows": ("cddfuse", "memory", "train"),
        "torch_compile": "off",
        "train_stages": (1,),
        "warmup": 1,
        "budget_s": 20.0,
        "min_repeats": 3,
    },
    "tiny": {
        "variants": ("tiny",),
        "torch_variants": ("tiny",),
        "fuse_variant": "tiny",
        "train_variant": "tiny",
        "encode_batches": (1, 2),
        "torch_batches": (1, 2),
        "torch_compile": "off",
        "fuse_sizes": ((32, 32), (24, 40)),
        "fuse_batches": (1, 2),
        "train_size": (32, 32),
        "train_batches": (1, 2),
        "cddfuse_fuse_sizes": ((16, 24),),
        "cddfuse_train_size": (16, 16),
        "cddfuse_train_batches": (1,),
        "cddfuse_repeats": 2,
        "memory_size": (24, 40),
        "tiny": True,
        "warmup": 1,
        "repeats": 3,
        "throughput_repeats": 2,
        "matmul_size": 256,
    },
}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise ValueError("expected comma-separated integers") from None


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'256x256,480x640' (H x W) -> ((256, 256), (480, 640))."""
    out = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"expected sizes like 256x256,480x640 (HxW), got {item!r}")
        out.append((int(parts[0]), int(parts[1])))
    return tuple(out)


def _strings(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


ROW_NAMES = ("encode", "torch_encode", "fuse", "train", "cddfuse", "memory")

DTYPE_NAMES = ("float32", "bfloat16")

_OVERRIDES: dict[str, Callable[[str], Any]] = {
    "rows": _strings,
    "variants": _strings,
    "dtypes": _strings,
    "encode_batches": _ints,
    "torch_variants": _strings,
    "torch_dtypes": _strings,
    "torch_batches": _ints,
    "fuse_variant": str,
    "fuse_dtypes": _strings,
    "fuse_sizes": _sizes,
    "fuse_batches": _ints,
    "train_variant": str,
    "train_dtype": str,
    "train_size": lambda t: _sizes(t)[0],
    "train_stages": _ints,
    "train_batches": _ints,
    "cddfuse_fuse_sizes": _sizes,
    "cddfuse_fuse_batches": _ints,
    "cddfuse_train_size": lambda t: _sizes(t)[0],
    "cddfuse_train_batches": _ints,
    "cddfuse_repeats": int,
    "cddfuse_pin_cpu": int,
    "memory_size": lambda t: _sizes(t)[0],
    "warmup": int,
    "repeats": int,
    "throughput_repeats": int,
    "budget_s": float,
    "min_repeats": int,
    "matmul_size": int,
}
