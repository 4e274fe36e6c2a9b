"""The benchmark: hand FLOP count vs the reference figures and XLA, the harness, the CLI."""

import json
import re

import jax
import jax.numpy as jnp
import pytest

from tokfusion_jax import bench, errors
from tokfusion_jax.models import titok


@pytest.mark.parametrize(
    "variant, gflops",
    [("l32", 183.2), ("b64", 58.6), ("s128", 22.0)],  # reference notes, titok.md section 8
)
def test_hand_flops_match_reference_figures(variant, gflops):
    config = titok.TiTokConfig.variant(variant)
    assert bench.titok_config_encoder_flops(config) / 1e9 == pytest.approx(gflops, abs=0.05)


def test_hand_flops_formula_by_parts():
    # L-32 parts from the reference: 174.55 linear + 8.21 attention + 0.40 patch embedding.
    w, depth, n, seq = 1024, 24, 32, 1 + 256 + 32
    total = bench.titok_encoder_flops(w, depth, n, 256, 16, 12)
    linear = 2 * depth * seq * 12 * w * w
    attention = 2 * depth * 2 * seq * seq * w
    assert linear / 1e9 == pytest.approx(174.55, abs=0.01)
    assert attention / 1e9 == pytest.approx(8.21, abs=0.01)
    assert (total - linear - attention) / 1e9 == pytest.approx(0.40, abs=0.01)


def test_xla_flops_of_l32_encoder_agree_with_hand_count():
    """XLA's count of the real (unrolled) L-32 encode, lowered from shapes only, no weights."""
    config = titok.TiTokConfig.variant("l32")
    shapes = titok.abstract_params(config)
    enc_only = {k: v for k, v in shapes.items() if k not in bench.DECODE_ONLY_PARAMS}
    tok = titok.Tokenizer(model=titok.TiTok(config), params=enc_only, config=config)
    images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    jitted = jax.jit(lambda t, x: titok.encode(t, x))
    xla = bench.lowered_flops(jitted, bench.unrolled(tok), images)
    hand = bench.titok_config_encoder_flops(config)
    # XLA also counts LayerNorm, GELU, softmax and the quantizer: a little above the matmuls.
    assert 1.0 <= xla / hand < 1.03
    # The scanned (rolled) program is what XLA undercounts: the loop body once.
    rolled = bench.lowered_flops(jitted, tok, images)
    assert rolled < 0.2 * hand


def test_peak_table():
    assert bench.table_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert bench.table_peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert bench.table_peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert bench.table_peak_flops("TPU v4", "float32") == 275e12
    assert bench.table_peak_flops("cpu", "float32") is None


def test_time_fn_counts_runs_and_orders_statistics():
    calls = []
    fn = lambda x: calls.append(1) or x * 2
    timing = bench.time_fn(fn, jnp.ones(4), warmup=2, repeats=5)
    assert len(calls) == 7 and timing.runs == 5
    assert 0 < timing.min_s <= timing.median_s <= timing.max_s


def test_slow_calls_get_fewer_repeats_but_never_below_the_minimum():
    assert bench._repeats_within(20, None, 5.0) == 20  # no budget: all repeats
    assert bench._repeats_within(20, 30.0, 0.5) == 20  # fast call: all 20 fit the budget
    assert bench._repeats_within(20, 30.0, 3.0) == 10
    assert bench._repeats_within(20, 30.0, 11.0) == bench.MIN_REPEATS
    assert bench._repeats_within(20, 20.0, 11.0, min_repeats=3) == 3
    assert bench._repeats_within(2, 20.0, 11.0, min_repeats=3) == 2  # never above `repeats`
    assert bench.parse_settings(["--preset=cpu"])[0].min_repeats == 3
    assert bench.parse_settings(["--preset=gpu"])[0].min_repeats == bench.MIN_REPEATS


def test_compile_fn_reads_flops_and_memory():
    a = jnp.ones((64, 32), jnp.float32)
    b = jnp.ones((32, 16), jnp.float32)
    compiled = bench.compile_fn(jax.jit(jnp.matmul), a, b)
    assert compiled.flops == pytest.approx(2 * 64 * 32 * 16, rel=0.01)
    # arguments + output, float32
    assert compiled.memory_bytes >= 4 * (64 * 32 + 32 * 16 + 64 * 16)
    assert compiled.compile_s > 0


def _row(name, framework, throughput, dtype="float32"):
    return bench.Row(name=name, framework=framework, dtype=dtype, throughput_by_batch=throughput)


def test_ratio_lines_use_the_worst_batch():
    rows = [
        _row("encode l32", "jax", {1: 3.0, 8: 4.0}),
        _row("encode l32", "torch eager", {1: 2.0, 8: 2.5}),
        _row("train stage 1 tokenizer", "jax", {1: 1.0}),
        _row("train stage 1 cached", "jax", {1: 6.0}),
        _row("train stage 2 tokenizer", "jax", {1: 1.0}),
        _row("train stage 2 cached", "jax", {1: 5.1}),
    ]
    lines = bench.ratio_lines(rows, bench.Settings(torch_compile="off"))
    assert "encoder JAX vs PyTorch eager: 1.50x" in lines
    assert "train step with token cache vs without: 5.10x" in lines


def test_table_and_json(tmp_path):
    row = bench.Row(name="encode l32", latency_ms=12.345, mfu=0.5, trainable_params=1_300_000)
    table = bench.format_table([row])
    assert "encode l32" in table and "12.3" in table and "50.0%" in table and "1.30M" in table
    path = tmp_path / "out" / "b.json"
    bench.write_json(str(path), {"rows": [row.to_json()]})
    assert json.loads(path.read_text())["rows"][0]["latency_ms"] == 12.345
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]  # no temporary left


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--rows=encode,nope"], "nope"),
        (["--preset=huge"], "huge"),
        (["--dtypes=float16"], "float16"),
        (["--encode_batches=1,x"], "encode_batches"),
        (["--fuse_sizes=256"], "256"),
        (["--min_repeats=0"], "min_repeats"),
    ],
)
def test_bad_flags_are_config_errors(argv, match):
    with pytest.raises(errors.ConfigError, match=match):
        bench.parse_settings(argv)


def test_cli_exits_2_on_bad_flag(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--rows=bogus"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --rows")


@pytest.mark.heavy(seconds=15)
def test_tiny_bench_end_to_end(tmp_path, capsys):
    """The whole CLI on the tiny preset: JAX and PyTorch encode, fuse (train steps compile for a
    minute on 2 cores: they are covered by the benchmark runs, not here)."""
    out = tmp_path / "bench.json"
    rows = bench.main(
        [
            "--preset=tiny",
            "--rows=encode,torch_encode,fuse",
            "--dtypes=float32",
            "--encode_batches=1,2",
            "--torch_batches=1,2",
            "--fuse_sizes=24x40",
            "--fuse_batches=1",
            "--repeats=2",
            "--throughput_repeats=1",
            f"--json={out}",
        ]
    )
    text = capsys.readouterr().out
    names = [(r.name, r.framework) for r in rows]
    assert names == [
        ("encode tiny", "jax"),
        ("encode tiny", "torch eager"),
        ("fuse tiny", "jax"),
    ]
    assert not [r.note for r in rows if "failed" in r.note]
    for r in rows:
        assert r.latency_ms > 0 and r.items_per_s > 0 and r.latency_runs == 2
        assert r.framework != "jax" or r.gflops_per_item > 0
    encode, fuse = rows[0], rows[2]
    assert encode.best_batch in (1, 2) and set(encode.throughput_by_batch) == {1, 2}
    assert encode.memory_mb > 0 and encode.compile_s > 0
    assert fuse.size == "24x40" and fuse.trainable_params > 0
    # Fusing a pair encodes both images: at least twice the encoder's work.
    assert fuse.gflops_per_item > 2 * encode.gflops_per_item
    assert "encoder JAX vs PyTorch eager (tiny float32):" in text
    payload = json.loads(out.read_text())
    assert len(payload["rows"]) == 3 and payload["environment"]["backend"] == "cpu"
    again, _ = bench.report_from_json([str(out)], bench.Settings(torch_variants=("tiny",)))
    assert [r.latency_ms for r in again] == [r.latency_ms for r in rows]


@pytest.mark.heavy(seconds=29)
def test_profile_train_step_script_reports_kinds_and_modules(capsys):
    """benchmarks/profile_train_step.py on the tiny variant: a trace is read back and mapped."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "profile_train_step.py"
    spec = importlib.util.spec_from_file_location("profile_train_step", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.module_of("transpose(jvp(Encoder))/level1_3/ffn/dwconv/x", 4) == (
        "bwd Encoder/level1_*/ffn/dwconv"
    )
    assert script.module_of("jvp()/conv_general_dilated", 3).startswith("fwd (no module)")
    script.main(["--variant=tiny", "--size=32x32", "--stage=1", "--steps=1", "--top=200"])
    out = capsys.readouterr().out
    assert "train step stage 1, 32x32, cached tokens" in out
    op_ms = float(out.split("op time ")[1].split(" ms")[0])
    assert op_ms > 0  # HLO ops were found in the trace and mapped back to JAX ops
    assert "| GEMM |" in out and "| dense convolution |" in out
    assert "Encoder/" in out  # module rows (--top=200: every module, whatever its rank)


@pytest.mark.heavy(seconds=24)
def test_cddfuse_and_memory_rows_each_side_in_its_own_process(capsys):
    """The cddfuse fuse row (JAX worker vs the PyTorch twin's worker, alternating) and the fuse
    memory row, tiny sizes; the ratio lines come out in the contract's form."""
    rows = bench.main(
        [
            "--preset=tiny",
            "--rows=cddfuse,memory",
            "--cddfuse_train_batches=",
            "--cddfuse_repeats=2",
            "--warmup=0",
        ]
    )
    text = capsys.readouterr().out
    assert [(r.name, r.framework) for r in rows] == [
        ("cddfuse fuse", "jax"),
        ("cddfuse fuse", "torch eager"),
        ("fuse memory tiny", "jax"),
    ]
    for r in rows:
        assert r.latency_ms > 0 and r.memory_mb > 50  # a Python process with jax or torch
    assert rows[0].gflops_per_item > 0 and rows[1].gflops_per_item is None
    assert re.search(r"^cddfuse fuse JAX vs PyTorch eager: \d+\.\d\dx$", text, re.M)
    assert re.search(r"^fuse peak memory 24x40 batch 1: \d+\.\d GB$", text, re.M)
    assert "cddfuse train step" not in text  # no train batches asked
