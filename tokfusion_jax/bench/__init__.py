"""Speed, memory and FLOP benchmark of the tokenizer, fusion inference and the training steps.

Prints one table (and writes JSON) with, per configuration: trainable and frozen parameters,
FLOPs per item from XLA's cost analysis (checked against a hand count for the TiTok encoder),
compile time, batch-1 latency (median of >= 20 device-synchronised runs after warm-up),
throughput at the best batch size, peak device memory and MFU against the device's peak.

    python -m tokfusion_jax.bench                                  # the CPU preset, all rows
    python -m tokfusion_jax.bench --rows=encode,torch_encode --variants=l32 --dtypes=float32
    python -m tokfusion_jax.bench --rows=cddfuse,memory --json=runs/cddfuse.json
    python -m tokfusion_jax.bench --preset=gpu --json=runs/bench.json
    python -m tokfusion_jax.bench --preset=tiny                    # seconds; a smoke test

Rows (``--rows``): ``encode`` (TiTok encoder, JAX), ``torch_encode`` (the same encoder in the
PyTorch reference, eager and ``torch.compile``), ``fuse`` (inference at 256x256 and at native
640x480), ``train`` (stage I and II steps, with the tokenizer inside the step and with cached
tokens), ``cddfuse`` (the plain-2D model, CDDFuse's architecture: fuse and the stage-II train
step in JAX against the PyTorch twin `convert/cddfuse_torch.py`, each side in its own process,
calls alternating, medians, peak RSS), ``memory`` (peak RSS of one paper-size fuse at 768x576).

Layout: `timing` (timing loops, compilation, peaks), `flops`, `results` (rows, table, JSON),
`settings` (presets, flags), `measure` (one JAX row over batch sizes), one module per row family
(`tokenizer_rows`, `fusion_rows`, `cddfuse_rows`), `worker` (the per-process side of
`cddfuse_rows`), `ratios` (the headline lines) and `cli`.
"""

DESCRIPTION = __doc__.split("\n\n")[0]

from tokfusion_jax.bench.cli import main, parse_settings, report_from_json, run_rows  # noqa: E402
from tokfusion_jax.bench.flops import (  # noqa: E402
    lowered_flops,
    titok_config_encoder_flops,
    titok_encoder_flops,
    unrolled,
)
from tokfusion_jax.bench.fusion_rows import (  # noqa: E402
    TrainStepProgram,
    bench_fuse,
    bench_train,
    cddfuse_train_step_program,
    fusion_model_config,
    plain_2d_model,
    train_step_program,
)
from tokfusion_jax.bench.measure import measure_jax_row, random_images  # noqa: E402
from tokfusion_jax.bench.ratios import cache_ratios, encoder_ratios, ratio_lines  # noqa: E402
from tokfusion_jax.bench.results import (  # noqa: E402
    COLUMNS,
    Row,
    environment,
    format_table,
    load_rows,
    write_json,
)
from tokfusion_jax.bench.settings import (  # noqa: E402
    PRESETS,
    Settings,
    _sizes,
)
from tokfusion_jax.bench.timing import (  # noqa: E402
    MIN_REPEATS,
    PEAK_FLOPS,
    Compiled,
    PeakFlops,
    Timing,
    _repeats_within,
    compile_fn,
    count_params,
    device_peak_memory,
    measure_matmul_flops,
    peak_rss_bytes,
    table_peak_flops,
    time_calls,
    time_fn,
    time_stateful,
    time_torch,
)
from tokfusion_jax.bench.tokenizer_rows import (  # noqa: E402
    DECODE_ONLY_PARAMS,
    bench_encode,
    bench_torch_encode,
    encoder_param_count,
    tokenizer_config,
)

__all__ = [
    "COLUMNS",
    "DECODE_ONLY_PARAMS",
    "DESCRIPTION",
    "MIN_REPEATS",
    "PEAK_FLOPS",
    "PRESETS",
    "Compiled",
    "PeakFlops",
    "Row",
    "Settings",
    "Timing",
    "TrainStepProgram",
    "_repeats_within",
    "_sizes",
    "bench_encode",
    "bench_fuse",
    "bench_torch_encode",
    "bench_train",
    "cache_ratios",
    "cddfuse_train_step_program",
    "compile_fn",
    "count_params",
    "device_peak_memory",
    "encoder_param_count",
    "encoder_ratios",
    "environment",
    "format_table",
    "fusion_model_config",
    "load_rows",
    "lowered_flops",
    "main",
    "measure_jax_row",
    "measure_matmul_flops",
    "parse_settings",
    "peak_rss_bytes",
    "plain_2d_model",
    "random_images",
    "ratio_lines",
    "report_from_json",
    "run_rows",
    "table_peak_flops",
    "time_calls",
    "time_fn",
    "time_stateful",
    "time_torch",
    "titok_config_encoder_flops",
    "titok_encoder_flops",
    "tokenizer_config",
    "train_step_program",
    "unrolled",
    "write_json",
]
