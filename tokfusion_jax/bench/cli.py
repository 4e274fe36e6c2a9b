"""The command line: settings from a preset and flags, the jobs, the table, JSON."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Sequence

from tokfusion_jax import errors, host_memory, paths
from tokfusion_jax.bench import DESCRIPTION
from tokfusion_jax.bench.cddfuse_rows import bench_cddfuse, bench_fuse_memory
from tokfusion_jax.bench.fusion_rows import bench_fuse, bench_train
from tokfusion_jax.bench.ratios import ratio_lines
from tokfusion_jax.bench.results import Row, _fmt, environment, format_table, load_rows, write_json
from tokfusion_jax.bench.settings import _OVERRIDES, DTYPE_NAMES, PRESETS, ROW_NAMES, Settings
from tokfusion_jax.bench.timing import PeakFlops, device_peak_memory
from tokfusion_jax.bench.tokenizer_rows import bench_encode, bench_torch_encode


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """Settings from a preset plus command-line overrides (raises ConfigError on bad values)."""
    parser = errors.ArgumentParser(prog="python -m tokfusion_jax.bench", description=DESCRIPTION)
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
    if settings.cddfuse_repeats < 1:
        raise errors.ConfigError(f"--cddfuse_repeats={settings.cddfuse_repeats}: must be >= 1")
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
    if "cddfuse" in settings.rows:
        jobs.append(("cddfuse (jax vs pytorch twin)", lambda: bench_cddfuse(settings)))
    if "memory" in settings.rows:
        jobs.append(("fuse memory", lambda: [bench_fuse_memory(settings)]))
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
    host_memory.retain_freed_memory()  # before JAX's first computation, as the trainers
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
