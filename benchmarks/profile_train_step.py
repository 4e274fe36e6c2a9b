"""Where a training step's time goes: op time from a `jax.profiler` trace, grouped by module.

    python benchmarks/profile_train_step.py --size=128x128 --stage=1            # cached tokens
    python benchmarks/profile_train_step.py --size=64x64 --stage=2 --tokenizer  # L-32 in the step
    python benchmarks/profile_train_step.py --size=128x128 --cddfuse            # plain 2D, stage II

Compiles the same train step as `python -m tokfusion_jax.bench` (`bench.train_step_program`:
L-32 setting, random weights, batch 1; with `--cddfuse` the plain-2D stage-II step of the
`cddfuse` rows, `bench.cddfuse_train_step_program`), times and traces `--steps` steps, and reads the
Perfetto trace that `jax.profiler` writes. Each executed HLO op is mapped back to the JAX
source op through the compiled module's metadata (`op_name`), then summed:

* by kind: GEMM (XLA:CPU's YNNPACK fusions, dots), dense convolution, grouped/depthwise tap
  sums, while loops (their bodies are listed again inside), everything else (elementwise,
  reductions, copies);
* by module path (first `--depth` levels, forward vs backward, repeated blocks together),
  largest first.

Op times are summed over XLA's worker threads, so their total exceeds the step's wall time on a
multi-core machine. Writes nothing outside `--trace_dir` (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokfusion_jax import bench  # noqa: E402

_OP_NAME = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]+)\"")


def op_names(compiled_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op it came from (its `op_name` metadata)."""
    names = {}
    for line in compiled_text.splitlines():
        match = _OP_NAME.match(line)
        if match:
            names.setdefault(match.group(1), match.group(2))
    return names


def trace_op_times(trace_dir: str) -> collections.Counter:
    """Total duration (microseconds) of every traced event name in the newest Perfetto trace."""
    files = sorted(glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True))
    if not files:
        raise SystemExit(f"no Perfetto trace was written under {trace_dir}")
    with gzip.open(files[-1]) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += event.get("dur", 0)
    return totals


def kind_of(hlo_name: str, op: str) -> str:
    if hlo_name.startswith("while"):
        return "while loops (bodies counted again below)"
    if "conv_general_dilated" in op:
        return "dense convolution"
    if re.search(r"/(dwconv|qkv_dwconv|dw)(/|$)", op):
        return "grouped/depthwise tap sums"
    if hlo_name.startswith(("ynn_fusion", "dot")):
        return "GEMM"
    return "elementwise, reductions, copies"


def module_of(op: str, depth: int) -> str:
    """'transpose(jvp(Encoder))/level1_2/ffn/dwconv/...' -> 'bwd Encoder/level1_*/ffn/dwconv'.

    Repeated blocks share one row (their index becomes `*`).
    """
    direction = "bwd" if "transpose(" in op else "fwd"
    parts = re.sub(r"transpose\(|jvp\(|\)", "", op).split("/")
    path = "/".join(re.sub(r"_\d+$", "_*", part) for part in parts[:depth])
    if path.startswith("/"):  # an op outside every flax module: losses, resizing, optimizer
        path = "(no module)" + path
    return f"{direction} {path}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="128x128", help="HxW of the training crop")
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2))
    parser.add_argument("--tokenizer", action="store_true", help="tokenizer inside the step")
    parser.add_argument("--variant", default="l32", help="tokenizer variant (l32, b64, s128)")
    parser.add_argument(
        "--cddfuse", action="store_true", help="the plain-2D (CDDFuse) stage-II step, no tokens"
    )
    parser.add_argument("--batch", type=int, default=1, help="pairs per step")
    parser.add_argument("--steps", type=int, default=2, help="steps traced")
    parser.add_argument("--top", type=int, default=30, help="module rows printed")
    parser.add_argument("--depth", type=int, default=4, help="module path levels kept")
    parser.add_argument("--trace_dir", default="", help="keep the trace here")
    args = parser.parse_args(argv)
    size = bench._sizes(args.size)[0]

    if args.cddfuse:
        program = bench.cddfuse_train_step_program(*size, tiny=args.variant == "tiny")
    else:
        program = bench.train_step_program(
            args.variant, "float32", args.variant == "tiny", args.stage, not args.tokenizer, size
        )
    state, *inputs = program.make_args(args.batch)
    step = program.jitted.lower(state, *inputs).compile()  # compiled once, run and inspected
    names = op_names(step.as_text())

    def run(state, steps: int):  # the state is donated: thread it through
        for _ in range(steps):
            state = jax.block_until_ready(step(state, *inputs)[0])
        return state

    state = run(state, 1)
    start = time.perf_counter()
    state = run(state, args.steps)
    wall_ms = 1e3 * (time.perf_counter() - start) / args.steps

    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="tokfusion_trace_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run(state, args.steps)
    totals = trace_op_times(trace_dir)

    by_kind, by_module = collections.Counter(), collections.Counter()
    for name, micros in totals.items():
        op = names.get(name)
        if op is None:  # runtime events (executor, thread pool, Python), not HLO ops
            continue
        op = re.sub(r"^jit\(train_step\)/", "", op)
        ms = micros / 1e3 / args.steps
        by_kind[kind_of(name, op)] += ms
        if not name.startswith("while"):
            by_module[module_of(op, args.depth)] += ms
    op_total = sum(v for k, v in by_kind.items() if not k.startswith("while"))

    where = "tokenizer inside" if args.tokenizer else "cached tokens"
    stage = args.stage
    if args.cddfuse:
        where, stage = "plain 2D (cddfuse)", 2
    device = jax.devices()[0]
    print(f"train step stage {stage}, {args.size}, {where}, batch {args.batch} on {device}")
    print(f"wall {wall_ms:.0f} ms per step; op time {op_total:.0f} ms (summed over threads)\n")
    print("| kind | ms | share |\n|---|---|---|")
    for kind, ms in by_kind.most_common():
        share = "" if kind.startswith("while") else f"{100 * ms / op_total:.0f} %"
        print(f"| {kind} | {ms:.0f} | {share} |")
    print("\n| module | ms | share |\n|---|---|---|")
    for module, ms in by_module.most_common(args.top):
        print(f"| {module} | {ms:.1f} | {100 * ms / op_total:.1f} % |")


if __name__ == "__main__":
    main()
