"""Result rows, the Markdown table, JSON files and the environment recorded with them."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import jax

from tokfusion_jax import errors


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
