"""The headline ratio lines, computed from the rows of one or several runs."""

from __future__ import annotations

from collections.abc import Sequence

from tokfusion_jax.bench.results import Row
from tokfusion_jax.bench.settings import Settings


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
    lines += cddfuse_lines(rows)
    for row in rows:
        if row.name.startswith("fuse memory") and row.memory_mb:
            gb = row.memory_mb * 2**20 / 1e9
            lines.append(f"fuse peak memory {row.size} batch 1: {gb:.1f} GB")
    return lines


def cddfuse_ratios(
    rows: Sequence[Row], name: str, framework: str = "torch eager"
) -> dict[tuple[str, int], float]:
    """JAX over PyTorch throughput of a cddfuse row, per (size, batch) both measured."""
    out = {}
    for size in sorted({r.size for r in rows if r.name == name}, key=_pixels):
        jax_tp = _throughput(rows, name, "jax", "float32", size)
        torch_tp = _throughput(rows, name, framework, "float32", size)
        for b in sorted(set(jax_tp) & set(torch_tp)):
            out[(size, b)] = jax_tp[b] / torch_tp[b]
    return out


TORCH_LABELS = (("torch eager", "PyTorch eager"), ("torch compile", "torch.compile"))


def cddfuse_lines(rows: Sequence[Row]) -> list[str]:
    """`cddfuse train step JAX vs PyTorch eager: 1.62x` and the fuse line (the minimum over the
    sizes and batches measured), each followed by the individual figures."""
    lines = []
    for name, label in (("cddfuse train step", "train step"), ("cddfuse fuse", "fuse")):
        for framework, against in TORCH_LABELS:
            ratios = cddfuse_ratios(rows, name, framework)
            if not ratios:
                continue
            lines.append(f"cddfuse {label} JAX vs {against}: {min(ratios.values()):.2f}x")
            lines += [f"  {size} batch {b}: {r:.2f}x" for (size, b), r in ratios.items()]
    return lines
