"""Speed, memory and FLOP benchmark of the tokenizer, fusion inference and the training steps.

Prints one table (and writes JSON) with, per configuration: trainable and frozen parameters,
FLOPs per item from XLA's cost analysis (checked against a hand count for the TiTok encoder),
compile time, batch-1 latency (median of >= 20 device-synchronised runs after warm-up),
throughput at the best batch size, peak device memory and MFU against the device's peak.

    python -m tokfusion_jax.bench                                  # the CPU preset, all rows
    python -m tokfusion_jax.bench --rows=encode,torch_encode --variants=l32 --dtypes=float32
    python -m tokfusion_jax.bench --preset=gpu --json=runs/bench.json
    python -m tokfusion_jax.bench --preset=tiny                    # seconds; a smoke test

Rows (``--rows``): ``encode`` (TiTok encoder, JAX), ``torch_encode`` (the same encoder in the
PyTorch reference, eager and ``torch.compile``), ``fuse`` (inference at 256x256 and at native
640x480), ``train`` (stage I and II steps, with the tokenizer inside the step and with cached
tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax import errors, paths

# ---------------------------------------------------------------------------------------------
# Device peak FLOP/s.

# Dense peak FLOP/s per chip by device-kind substring (lower case), in matching order. On NVIDIA
# Hopper, float32 matmuls run on the tensor cores as TF32 under XLA's default precision, so its
# float32 peak is the dense TF32 rate; TPUs run float32 matmuls as bfloat16 passes by default.
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


# ---------------------------------------------------------------------------------------------
# Timing, compilation, memory.


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


# ---------------------------------------------------------------------------------------------
# Hand FLOP count of the TiTok encoder (2 FLOPs per multiply-add; matmuls and convs only).


def titok_encoder_flops(
    width: int, depth: int, num_tokens: int, image_size: int, patch_size: int, token_size: int
) -> float:
    """FLOPs of one TiTok encoder forward pass on one image (matmuls only, 2 per MAC).

    Sequence L = 1 + (image_size / patch_size)^2 + num_tokens. Per block: qkv (3 W^2), out
    projection (W^2) and MLP (2 * 4 W^2) per position, plus scores and values (2 L^2 W).
    Patch embedding: P * (3 p^2) * W; the output 1x1 projection: N * W * C.
    TiTok-L-32 at 256x256 gives 183.2 GFLOPs.
    """
    patches = (image_size // patch_size) ** 2
    seq = 1 + patches + num_tokens
    linear = depth * seq * 12 * width * width
    attention = depth * 2 * seq * seq * width
    patch_embed = patches * 3 * patch_size * patch_size * width
    projection = num_tokens * width * token_size
    return 2.0 * (linear + attention + patch_embed + projection)


def titok_config_encoder_flops(config: Any) -> float:
    """`titok_encoder_flops` for a `TiTokConfig` (its encoder output width is token_size, or
    2 * token_size for the VAE variants)."""
    out = config.token_size * (2 if getattr(config, "quantize_mode", "vq") == "vae" else 1)
    return titok_encoder_flops(
        config.enc_width,
        config.enc_depth,
        config.num_tokens,
        config.image_size,
        config.patch_size,
        out,
    )


# ---------------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass
class Row:
    """One benchmarked configuration. Per-item figures are per image (encode) or per pair."""

    name: str
    framework: str = "jax"
    dtype: str = "float32"
    size: str = ""
    trainable_params: int | None = None
    frozen_params: int | None = None
    gflops_per_item: float | None = None  # XLA cost analysis
    hand_gflops_per_item: float | None = None
    compile_s: float | None = None
    latency_ms: float | None = None  # batch 1, median
    latency_runs: int | None = None
    best_batch: int | None = None
    items_per_s: float | None = None  # at best_batch
    throughput_by_batch: dict[int, float] = dataclasses.field(default_factory=dict)
    memory_mb: float | None = None  # peak device memory, see memory_source
    memory_source: str = ""
    mfu: float | None = None  # at best_batch, vs peak_flops
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (batch keys as strings)."""
        d = dataclasses.asdict(self)
        d["throughput_by_batch"] = {str(k): v for k, v in self.throughput_by_batch.items()}
        return d


COLUMNS: tuple[tuple[str, str], ...] = (
    ("row", "name"),
    ("fw", "framework"),
    ("dtype", "dtype"),
    ("size", "size"),
    ("train P", "trainable_params"),
    ("frozen P", "frozen_params"),
    ("GFLOP/item", "gflops_per_item"),
    ("hand", "hand_gflops_per_item"),
    ("compile s", "compile_s"),
    ("b1 ms", "latency_ms"),
    ("runs", "latency_runs"),
    ("best B", "best_batch"),
    ("items/s", "items_per_s"),
    ("mem MB", "memory_mb"),
    ("MFU", "mfu"),
)


def _fmt(value: Any, key: str) -> str:
    if value is None or value == "":
        return "-"
    if key in ("trainable_params", "frozen_params"):
        return f"{value / 1e6:.2f}M" if value >= 1e4 else str(value)
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"
    return str(value)


def format_table(rows: Iterable[Row]) -> str:
    """A Markdown table of the rows."""
    rows = list(rows)
    header = [title for title, _ in COLUMNS]
    body = [[_fmt(getattr(r, key), key) for _, key in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
    widths = widths if body else [len(h) for h in header]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(cells) for cells in body]
    return "\n".join(out)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Writes `payload` to `path` atomically (temporary file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def environment() -> dict[str, Any]:
    """Device, software versions and date, recorded with every result."""
    device = jax.devices()[0]
    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        import flax

        env["flax"] = flax.__version__
    except ImportError:
        pass
    if "torch" in sys.modules:
        env["torch"] = sys.modules["torch"].__version__
    return env


# ---------------------------------------------------------------------------------------------
# Measuring one row over batch sizes.


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
        "tiny": True,
        "warmup": 1,
        "repeats": 3,
        "throughput_repeats": 2,
        "matmul_size": 256,
    },
}


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


# ---------------------------------------------------------------------------------------------
# Rows.


def random_images(batch: int, height: int, width: int, channels: int, seed: int = 0) -> jax.Array:
    """Uniform [0, 1) float32 images (B, H, W, C) on the default device (never zeros)."""
    key = jax.random.fold_in(jax.random.key(seed), batch * 100_003 + height * 1009 + width)
    return jax.random.uniform(key, (batch, height, width, channels), jnp.float32)


def tokenizer_config(variant: str) -> Any:
    """`TiTokConfig` of an official variant name, or the tiny test config for "tiny"."""
    from tokfusion_jax.models import titok

    if variant == "tiny":
        return titok.TiTokConfig.tiny()
    return titok.TiTokConfig.variant(variant)


def encoder_param_count(params: Any) -> int:
    """Parameters the encode path reads: encoder, latent tokens and the quantizer codebook."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path).lower()
        used = "encoder" in name or "latent_token" in name or "quantiz" in name
        if used and "decoder" not in name and "pixel" not in name:
            total += int(np.prod(np.shape(leaf)))
    return total


def bench_encode(variant: str, dtype: str, settings: Settings, peak: PeakFlops) -> Row:
    """TiTok encode (encoder + quantizer) in JAX with random weights, per image."""
    from tokfusion_jax.models import titok

    tok = _tokenizer(variant)
    config = tok.config
    size = config.image_size
    jitted = jax.jit(lambda tok, images: titok.encode(tok, images, dtype=jnp.dtype(dtype)))
    row = Row(
        name=f"encode {variant}",
        dtype=dtype,
        size=f"{size}x{size}",
        trainable_params=0,
        frozen_params=encoder_param_count(tok.params),
        hand_gflops_per_item=titok_config_encoder_flops(config) / 1e9,
    )

    def make_args(batch: int) -> tuple[Any, ...]:
        return tok, random_images(batch, size, size, 3)  # (B, S, S, 3)

    flat = unrolled(tok)
    flops = lambda b: lowered_flops(jitted, flat, make_args(b)[1])
    return measure_jax_row(
        row, jitted, make_args, settings.encode_batches, settings, peak(dtype)[0], flops=flops
    )


def _torch_encoder(variant: str, dtype: str, device: str) -> Any:
    """The PyTorch reference TiTok (encoder, latent tokens, quantizer only), random weights."""
    import torch

    from convert import titok_torch

    config = tokenizer_config(variant)
    with torch.device("meta"):
        model = titok_torch.TiTokTorch(config)
    for name in ("decoder", "pixel_decoder", "pixel_quantize"):
        if hasattr(model, name):
            delattr(model, name)  # encode never reads them; keeps memory and set-up small
    model = model.to_empty(device=device)
    titok_torch.init_random_(model, seed=0)
    model = model.to(getattr(torch, dtype)).eval()
    if hasattr(model, "quantize"):
        model.quantize.float()  # the quantizer runs in float32, as in the original
    return model, config


def bench_torch_encode(variant: str, dtype: str, settings: Settings, peak: PeakFlops) -> list[Row]:
    """The same encode in the PyTorch reference (NCHW): eager, and torch.compile if enabled."""
    import torch

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, config = _torch_encoder(variant, dtype, device)
    size = config.image_size
    hand = titok_config_encoder_flops(config)
    frozen = sum(p.numel() for p in model.parameters())
    modes = {"on": ["torch eager", "torch compile"], "off": ["torch eager"]}.get(
        settings.torch_compile, ["torch compile"]
    )
    rows = []
    for mode in modes:
        row = Row(
            name=f"encode {variant}",
            framework=mode,
            dtype=dtype,
            size=f"{size}x{size}",
            trainable_params=0,
            frozen_params=frozen,
            hand_gflops_per_item=hand / 1e9,
            note=f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads",
        )
        encode = model.encode if mode == "torch eager" else torch.compile(model.encode)
        try:
            for batch in sorted(settings.torch_batches):
                images = torch.rand(
                    batch, 3, size, size, device=device, dtype=getattr(torch, dtype)
                )

                def call(images: Any = images, encode: Any = encode) -> Any:
                    with torch.inference_mode():
                        return encode(images)

                if mode == "torch compile" and row.compile_s is None:
                    start = time.perf_counter()
                    call()
                    sync()
                    row.compile_s = time.perf_counter() - start
                repeats = settings.repeats if batch == 1 else settings.throughput_repeats
                timing = time_torch(
                    call,
                    sync,
                    # a new batch size can recompile more than once (static, then dynamic)
                    warmup=settings.warmup if mode == "torch eager" else max(settings.warmup, 3),
                    repeats=repeats,
                    budget_s=settings.budget_s or None,
                    min_repeats=settings.min_repeats,
                )
                if batch == 1:
                    row.latency_ms, row.latency_runs = 1e3 * timing.median_s, timing.runs
                row.throughput_by_batch[batch] = batch / timing.median_s
                if row.throughput_by_batch[batch] > (row.items_per_s or 0.0):
                    row.best_batch, row.items_per_s = batch, row.throughput_by_batch[batch]
                print(f"  {mode} {variant} {dtype} batch {batch}: {1e3 * timing.median_s:.1f} ms")
        except Exception as e:  # noqa: BLE001 - torch.compile is best effort
            if mode == "torch eager" or len(modes) == 1:
                raise
            row.note += " | failed: " + " ".join(f"{type(e).__name__}: {e}".split())[:200]
        if row.items_per_s:
            row.mfu = row.items_per_s * hand / peak(dtype)[0]
            row.note += " | MFU from the hand FLOP count"
        rows.append(row)
    return rows


def unrolled(tok: Any) -> Any:
    """The same tokenizer with its transformer loops fully unrolled.

    XLA's cost analysis counts a while loop's body once, so FLOPs are read from a lowering of the
    unrolled model (same parameters, same arithmetic); what is timed keeps the configured unroll.
    """
    from tokfusion_jax.models import titok

    depth = max(tok.config.enc_depth, tok.config.dec_depth)
    config = dataclasses.replace(tok.config, scan_unroll=depth)
    return dataclasses.replace(tok, config=config, model=titok.TiTok(config))


def lowered_flops(jitted: Any, *args: Any) -> float | None:
    """FLOPs per call from the cost analysis of the lowered (not yet optimised) program."""
    try:
        cost = _cost_entry(jitted.lower(*args).cost_analysis())
    except Exception:  # noqa: BLE001 - cost analysis is best effort on some backends
        return None
    return float(cost["flops"]) if "flops" in cost else None


def fusion_model_config(variant: str, dtype: str, tiny: bool) -> Any:
    """The paper's model section (dim 64, L-32 tokens), sized to the tokenizer `variant`."""
    from tokfusion_jax.models.config import model_config

    tconf = tokenizer_config(variant)
    cfg = model_config()
    cfg.tokens.num_tokens = tconf.num_tokens
    cfg.tokens.token_dim = tconf.token_size
    cfg.tokens.input_size = tconf.image_size
    cfg.dtype = dtype
    if tiny:
        cfg.dim, cfg.heads = 8, 2
        cfg.enc_blocks = cfg.dec_blocks = cfg.detail_layers = cfg.fuse_detail_layers = 1
        cfg.coarse_size = max(tconf.image_size // 8, 4)
        cfg.ste.positions = (1, tconf.num_tokens - 1)
    return cfg


DECODE_ONLY_PARAMS = ("decoder", "pixel_quantize", "pixel_decoder")


@functools.lru_cache(maxsize=2)
def _tokenizer(variant: str) -> Any:
    """A random-weight tokenizer holding only what encoding reads (encoder, latent tokens,
    codebook), as an inference deployment would: the decoders never reach the device."""
    from tokfusion_jax.models import titok

    config = tokenizer_config(variant)
    model = titok.TiTok(config)
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    init = functools.partial(model.init, method=titok.TiTok.encode)  # encode's params only
    with jax.default_device(jax.devices("cpu")[0]):  # no init temporaries on the device
        params = jax.jit(init)(jax.random.key(0), images)["params"]
    params = jax.device_put(params, jax.devices()[0])
    return titok.Tokenizer(model=model, params=params, config=config)


def bench_fuse(size: tuple[int, int], dtype: str, settings: Settings, peak: PeakFlops) -> Row:
    """`TokFusion.fuse_images` (tokens of both images + the 2D path), per pair, stage-II params."""
    from tokfusion_jax.models.fusion import TokFusion

    variant = settings.fuse_variant
    model = TokFusion(fusion_model_config(variant, dtype, settings.tiny))
    tok = _tokenizer(variant)
    height, width = size
    m = 8
    params = model.init(jax.random.key(0), stage=2, image_size=(-(-height // m) * m,) * 2)
    jitted = jax.jit(model.fuse_images)
    row = Row(
        name=f"fuse {variant}",
        dtype=dtype,
        size=f"{height}x{width}",
        trainable_params=count_params(params),
        frozen_params=encoder_param_count(tok.params),
        hand_gflops_per_item=2 * titok_config_encoder_flops(tok.config) / 1e9,
        note="hand = the two tokenizer encodes only",
    )

    def make_args(batch: int, tok: Any = tok) -> tuple[Any, ...]:
        vis = random_images(batch, height, width, 1, seed=1)  # (B, H, W, 1)
        ir = random_images(batch, height, width, 1, seed=2)
        return params, tok, vis, ir

    flops = lambda b: lowered_flops(jitted, *make_args(b, unrolled(tok)))
    return measure_jax_row(
        row, jitted, make_args, settings.fuse_batches, settings, peak(dtype)[0], flops=flops
    )


class TrainStepProgram(NamedTuple):
    """A jitted `trainer.train_step` (state donated) and a maker of its arguments."""

    jitted: Any
    # make_args(batch, frozen=tokenizer) -> (state, frozen, data, rng); fresh state each call.
    make_args: Callable[..., tuple[Any, ...]]
    params: Any  # the stage's initial trainable parameters
    tokenizer: Any  # None with cached tokens


def train_step_program(
    variant: str, dtype: str, tiny: bool, stage: int, cached: bool, size: tuple[int, int]
) -> TrainStepProgram:
    """The paper recipe's train step of `stage` on random (H, W) = `size` gray pairs, with the
    tokens cached (random unit vectors) or computed by a random-weight tokenizer in the step."""
    from tokfusion_jax import optim, trainer
    from tokfusion_jax.losses import loss_weights_config
    from tokfusion_jax.models.fusion import TokFusion

    cfg = fusion_model_config(variant, dtype, tiny)
    model = TokFusion(cfg)
    optimizer = optim.ModuleOptimizer(optim.optim_config(), 100)
    ctx = trainer.StepContext(
        model=model,
        optimizer=optimizer,
        loss_weights=loss_weights_config().to_dict(),
        stage=stage,
        use_token_cache=cached,
        use_tokens=True,
    )
    jitted = jax.jit(functools.partial(trainer.train_step, ctx=ctx), donate_argnums=(0,))
    tok = None if cached else _tokenizer(variant)
    height, width = size
    n, c = cfg.tokens.num_tokens, cfg.tokens.token_dim
    params = trainer.stage_params(model, jax.random.key(0), stage, size)

    def make_args(batch: int, frozen: Any = tok) -> tuple[Any, ...]:
        state = trainer.new_state(jax.tree_util.tree_map(jnp.copy, params), optimizer)
        data = {
            "vis": random_images(batch, height, width, 1, seed=1),  # (B, H, W, 1)
            "ir": random_images(batch, height, width, 1, seed=2),
        }
        if cached:
            for i, key in enumerate(("vis_tokens", "ir_tokens")):
                z = jax.random.normal(jax.random.key(10 + i), (batch, n, c))  # (B, N, C)
                data[key] = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
        return state, frozen, data, jax.random.key(1)

    return TrainStepProgram(jitted, make_args, params, tok)


def bench_train(stage: int, cached: bool, settings: Settings, peak: PeakFlops) -> Row:
    """`trainer.train_step` of `stage` (donated state), tokens cached or from the tokenizer."""
    dtype = settings.train_dtype
    jitted, make_args, params, tok = train_step_program(
        settings.train_variant, dtype, settings.tiny, stage, cached, settings.train_size
    )
    height, width = settings.train_size
    row = Row(
        name=f"train stage {stage} {'cached' if cached else 'tokenizer'}",
        dtype=dtype,
        size=f"{height}x{width}",
        trainable_params=count_params(params),
        frozen_params=0 if tok is None else encoder_param_count(tok.params),
        hand_gflops_per_item=None
        if tok is None
        else 2 * titok_config_encoder_flops(tok.config) / 1e9,
        note="" if tok is None else "hand = the two tokenizer encodes only",
    )

    def flops(batch: int) -> float | None:
        return lowered_flops(jitted, *make_args(batch, None if tok is None else unrolled(tok)))

    return measure_jax_row(
        row,
        jitted,
        make_args,
        settings.train_batches,
        settings,
        peak(dtype)[0],
        stateful=True,
        flops=flops,
    )


# ---------------------------------------------------------------------------------------------
# Ratios and the command line.


def _throughput(
    rows: Sequence[Row], name: str, framework: str, dtype: str, size: str | None = None
) -> dict[int, float]:
    for row in rows:
        same = row.name == name and row.framework == framework and row.dtype == dtype
        if same and (size is None or row.size == size):
            return row.throughput_by_batch
    return {}


def encoder_ratios(
    rows: Sequence[Row], variant: str, dtype: str = "float32", framework: str = "torch eager"
) -> dict[int, float]:
    """JAX encode speed over the PyTorch encoder's, per batch size both measured."""
    jax_tp = _throughput(rows, f"encode {variant}", "jax", dtype)
    torch_tp = _throughput(rows, f"encode {variant}", framework, dtype)
    return {b: jax_tp[b] / torch_tp[b] for b in sorted(set(jax_tp) & set(torch_tp))}


def _pixels(size: str) -> int:
    h, _, w = size.partition("x")
    return int(h) * int(w) if h.isdigit() and w.isdigit() else 0


def cache_ratios(rows: Sequence[Row], dtype: str) -> dict[tuple[str, int, int], float]:
    """Train-step speed with cached tokens over with the tokenizer inside, per
    (image size, stage, batch), largest image size first."""
    sizes = sorted({r.size for r in rows if r.name.startswith("train")}, key=_pixels, reverse=True)
    out = {}
    for size in sizes:
        for stage in (1, 2):
            cached = _throughput(rows, f"train stage {stage} cached", "jax", dtype, size)
            inside = _throughput(rows, f"train stage {stage} tokenizer", "jax", dtype, size)
            for b in sorted(set(cached) & set(inside)):
                out[(size, stage, b)] = cached[b] / inside[b]
    return out


def ratio_lines(rows: Sequence[Row], settings: Settings) -> list[str]:
    """The headline ratios, each on a line of its own (the minimum over the batch sizes and
    stages measured; for the train step, at the largest image size measured), followed by the
    individual figures."""
    lines = []
    for variant in settings.torch_variants:
        for framework in ("torch eager", "torch compile"):
            for dtype in settings.torch_dtypes:
                ratios = encoder_ratios(rows, variant, dtype, framework)
                if not ratios:
                    continue
                label = "PyTorch eager" if framework == "torch eager" else "torch.compile"
                tag = "" if (dtype == "float32" and variant == "l32") else f" ({variant} {dtype})"
                lines.append(f"encoder JAX vs {label}{tag}: {min(ratios.values()):.2f}x")
                per_batch = ", ".join(f"batch {b}: {r:.2f}x" for b, r in ratios.items())
                lines.append(f"  {variant} {dtype} {per_batch}")
    ratios = cache_ratios(rows, settings.train_dtype)
    if ratios:
        largest = next(iter(ratios))[0]
        headline = min(r for (size, _, _), r in ratios.items() if size == largest)
        lines.append(f"train step with token cache vs without: {headline:.2f}x")
        for (size, stage, b), r in ratios.items():
            lines.append(
                f"  {settings.train_variant} {settings.train_dtype} {size} stage {stage} "
                f"batch {b}: {r:.2f}x"
            )
    return lines


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


ROW_NAMES = ("encode", "torch_encode", "fuse", "train")
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
    "warmup": int,
    "repeats": int,
    "throughput_repeats": int,
    "budget_s": float,
    "min_repeats": int,
    "matmul_size": int,
}


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """Settings from a preset plus command-line overrides (raises ConfigError on bad values)."""
    parser = errors.ArgumentParser(
        prog="python -m tokfusion_jax.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--preset", default="cpu", help=f"one of {sorted(PRESETS)}")
    for name in _OVERRIDES:
        default = getattr(Settings(), name)
        parser.add_argument(f"--{name}", default=None, help=f"(preset default {default})")
    parser.add_argument("--torch_compile", choices=("on", "off", "only"), default=None)
    parser.add_argument("--json", default="", help="write all results to this JSON file")
    parser.add_argument(
        "--from_json",
        default="",
        help="print the table and ratios of earlier --json files (comma-separated); runs nothing",
    )
    parser.add_argument("--table", default="", help="write the table (Markdown) to this file")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        raise errors.ConfigError(f"--preset={args.preset!r}: expected one of {sorted(PRESETS)}")
    fields = dict(PRESETS[args.preset])
    for name, parse in _OVERRIDES.items():
        value = getattr(args, name)
        if value is not None:
            try:
                fields[name] = parse(value)
            except ValueError as e:
                raise errors.ConfigError(f"--{name}={value!r} is not valid: {e}") from None
    if args.torch_compile is not None:
        fields["torch_compile"] = args.torch_compile
    settings = Settings(**fields)
    for row in settings.rows:
        if row not in ROW_NAMES:
            raise errors.ConfigError(f"--rows: unknown row {row!r}; expected {ROW_NAMES}")
    dtypes = settings.dtypes + settings.torch_dtypes + settings.fuse_dtypes
    for dtype in (*dtypes, settings.train_dtype):
        if dtype not in DTYPE_NAMES:
            raise errors.ConfigError(f"unknown dtype {dtype!r}; expected one of {DTYPE_NAMES}")
    if min(settings.repeats, settings.throughput_repeats, settings.min_repeats) < 1:
        raise errors.ConfigError("--repeats, --throughput_repeats and --min_repeats must be >= 1")
    if settings.warmup < 0:
        raise errors.ConfigError(f"--warmup={settings.warmup}: must be >= 0")
    return settings, args


def run_rows(settings: Settings, on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Runs every selected row; a row that fails is recorded with its error, not fatal.

    `on_row(rows so far)` is called after each job (e.g. to save partial results).
    """
    peak = PeakFlops(settings.matmul_size)
    jobs: list[tuple[str, Callable[[], list[Row]]]] = []
    if "encode" in settings.rows:
        for variant in settings.variants:
            for dtype in settings.dtypes:
                jobs.append(
                    (
                        f"encode {variant} {dtype}",
                        lambda v=variant, d=dtype: [bench_encode(v, d, settings, peak)],
                    )
                )
    if "torch_encode" in settings.rows:
        for variant in settings.torch_variants:
            for dtype in settings.torch_dtypes:
                jobs.append(
                    (
                        f"torch encode {variant} {dtype}",
                        lambda v=variant, d=dtype: bench_torch_encode(v, d, settings, peak),
                    )
                )
    if "fuse" in settings.rows:
        for dtype in settings.fuse_dtypes:
            for size in settings.fuse_sizes:
                jobs.append(
                    (
                        f"fuse {size} {dtype}",
                        lambda s=size, d=dtype: [bench_fuse(s, d, settings, peak)],
                    )
                )
    if "train" in settings.rows:
        for stage in settings.train_stages:
            for cached in (False, True):
                jobs.append(
                    (
                        f"train stage {stage} cached={cached}",
                        lambda s=stage, c=cached: [bench_train(s, c, settings, peak)],
                    )
                )
    rows: list[Row] = []
    for label, job in jobs:
        print(f"[bench] {label}", flush=True)
        start = time.perf_counter()
        try:
            rows.extend(job())
        except errors.TokFusionError:
            raise
        except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
            message = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            print(f"[bench] {label} FAILED: {message}", flush=True)
            rows.append(Row(name=label, note=f"failed: {message}"))
        print(f"[bench] {label} done in {time.perf_counter() - start:.1f} s", flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def load_rows(path: str) -> tuple[list[Row], dict[str, Any]]:
    """Rows and environment of a JSON file written with --json (partial files too)."""
    try:
        with open(path) as f:
            payload = json.load(f)
        rows = []
        for d in payload["rows"]:
            d = dict(d)
            d["throughput_by_batch"] = {int(k): v for k, v in d["throughput_by_batch"].items()}
            rows.append(Row(**d))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise errors.ConfigError(f"--from_json: cannot read results from {path} ({e})") from None
    return rows, payload.get("environment", {})


def report_from_json(paths: Sequence[str], settings: Settings) -> tuple[list[Row], str]:
    """One table and the ratios over several result files (e.g. the parts of a GPU run)."""
    rows: list[Row] = []
    headers = []
    for path in paths:
        part, env = load_rows(path)
        rows += part
        headers.append(
            f"{os.path.basename(path)}: {env.get('date_utc', '?')} | {env.get('backend', '?')} "
            f"{env.get('device_kind', '?')} | jax {env.get('jax', '?')} | peak device memory "
            f"{_fmt(env.get('device_peak_memory_mb'), 'memory_mb')} MB"
        )
    notes = [f"{r.name} {r.framework} {r.dtype}: {r.note}" for r in rows if r.note]
    lines = ratio_lines(rows, settings)
    return rows, "\n".join([*headers, "", format_table(rows), "", *lines, *notes])


@errors.cli_main
def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Command-line entry point: runs the rows, prints the table and ratios, writes JSON."""
    settings, args = parse_settings(argv)
    for flag, path in (("--json", args.json), ("--table", args.table)):
        if path:  # checked now, not after minutes of timing
            paths.check_output_file(path, flag, overwrite=True)
    if args.from_json:
        rows, text = report_from_json(args.from_json.split(","), settings)
        print(text)
        return rows
    start = time.perf_counter()

    def save_partial(rows: list[Row]) -> None:
        if args.json:
            partial = {"environment": environment(), "settings": dataclasses.asdict(settings)}
            write_json(args.json, {**partial, "rows": [r.to_json() for r in rows], "partial": True})

    rows = run_rows(settings, save_partial)
    env = environment()
    env["device_peak_memory_mb"] = None if (m := device_peak_memory()) is None else m / 2**20
    env["total_s"] = time.perf_counter() - start
    table = format_table(rows)
    lines = ratio_lines(rows, settings)
    notes = [f"{r.name} {r.framework} {r.dtype}: {r.note}" for r in rows if r.note]
    header = (
        f"{env['date_utc']} | {env['backend']} {env['device_kind']} x{env['device_count']} | "
        f"jax {env['jax']} | python {env['python']} | {env['total_s']:.0f} s"
    )
    text = "\n".join([header, "", table, "", *lines, *notes])
    print("\n" + text, flush=True)
    if args.table:
        directory = os.path.dirname(os.path.abspath(args.table))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{args.table}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.table)
    if args.json:
        payload = {
            "environment": env,
            "settings": dataclasses.asdict(settings),
            "rows": [r.to_json() for r in rows],
            "ratios": lines,
        }
        write_json(args.json, payload)
    return rows


if __name__ == "__main__":
    main()
