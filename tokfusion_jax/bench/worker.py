"""One side of a cross-framework comparison, in a process of its own (`cddfuse_rows` drives it).

    python -m tokfusion_jax.bench.worker '{"side": "jax", "work": "fuse", "height": 256, ...}'

Builds one program (random weights), compiles or warms it, then answers on stdout, one line per
request read from stdin, each line `@@ <json>` (other output is not protocol):

    (start)   {"ready": true, "compile_s": s, "gflops": g | null}
    run       {"s": wall seconds of one call, finished on the device}
    quit      {"peak_rss": bytes}        and exits

Sides: "jax" (the plain-2D TokFusion model, CDDFuse's architecture), "torch eager" and
"torch compile" (the PyTorch twin `convert/cddfuse_torch.py`). Work: "fuse" (the test path of
one batch of pairs), "train" (one stage-II step: CDDFuse's phase-II loss, L_fusion + 2 L_decomp,
its gradient, per-module gradient clipping and the Adam updates), "fuse_memory" (JAX only: the
paper-size TokFusion fuse with the L-32 tokenizer; its `peak_rss` is counted from just before the
fuse program is compiled, the weights already resident). A failure prints {"error": "..."}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from tokfusion_jax import host_memory
from tokfusion_jax.bench.timing import peak_rss_bytes

PROTOCOL = "@@ "
SIDES = ("jax", "torch eager", "torch compile")
WORKS = ("fuse", "train", "fuse_memory")


def say(payload: dict[str, Any]) -> None:
    """One protocol line on stdout."""
    print(PROTOCOL + json.dumps(payload), flush=True)


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process (Linux `clear_refs` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def current_peak_rss() -> int:
    """VmHWM (peak RSS since the last reset) in bytes, or the lifetime peak where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return peak_rss_bytes()


# ---------------------------------------------------------------------------------------------
# JAX side.


def jax_program(spec: dict[str, Any]) -> tuple[Callable[[], None], float, float | None]:
    """(one call, compile seconds, GFLOPs per call) of the JAX side of `spec`."""
    import jax

    from tokfusion_jax import compile_options, trainer
    from tokfusion_jax.bench.fusion_rows import (
        cddfuse_train_step_program,
        fusion_model_config,
        plain_2d_model,
    )
    from tokfusion_jax.bench.measure import random_images
    from tokfusion_jax.bench.timing import compile_fn
    from tokfusion_jax.bench.tokenizer_rows import _tokenizer

    b, h, w = spec["batch"], spec["height"], spec["width"]
    vis, ir = random_images(b, h, w, 1, seed=1), random_images(b, h, w, 1, seed=2)
    options = compile_options.compiler_options()
    if spec["work"] == "fuse_memory":
        from tokfusion_jax.models.fusion import TokFusion

        variant = spec.get("variant", "l32")
        tok = _tokenizer(variant)
        model = TokFusion(fusion_model_config(variant, "float32", spec.get("tiny", False)))
        params = model.init(jax.random.key(0), stage=2, image_size=(-(-h // 8) * 8,) * 2)
        reset_peak_rss()
        fuse = jax.jit(model.fuse_images, compiler_options=options)
        compiled = compile_fn(fuse, params, tok, vis, ir)
        host_memory.release_freed_memory()  # as `export.FusionExport.executable`
        call = lambda: jax.block_until_ready(compiled.executable(params, tok, vis, ir))
    else:
        if spec["work"] == "fuse":
            model = plain_2d_model(spec.get("tiny", False))
            params = trainer.stage_params(model, jax.random.key(0), 2, (h, w))
            fuse = lambda p, v, i: model.fuse(p, None, None, v, i)[0]
            compiled = compile_fn(jax.jit(fuse, compiler_options=options), params, vis, ir)
            call = lambda: jax.block_until_ready(compiled.executable(params, vis, ir))
        else:
            program = cddfuse_train_step_program(h, w, spec.get("tiny", False))
            state, frozen, batch, rng = program.make_args(b)
            compiled = compile_fn(program.jitted, state, frozen, batch, rng)
            box = [state]

            def call() -> None:
                box[0] = jax.block_until_ready(compiled.executable(box[0], frozen, batch, rng)[0])

    gflops = compiled.flops / 1e9 if compiled.flops else None
    return call, compiled.compile_s, gflops


# ---------------------------------------------------------------------------------------------
# PyTorch side.


def _sobel(x: Any) -> Any:
    """|Kx * x| + |Ky * x|, unnormalised Sobel, zero padding (CDDFuse's Fusionloss)."""
    import torch
    import torch.nn.functional as F

    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    ky = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]).view(1, 1, 3, 3)
    return F.conv2d(x, kx, padding=1).abs() + F.conv2d(x, ky, padding=1).abs()


def _cc(a: Any, b: Any) -> Any:
    """CDDFuse's correlation coefficient per (sample, channel), clamped, averaged."""
    import torch

    eps = torch.finfo(torch.float32).eps
    a = a.flatten(2) - a.flatten(2).mean(-1, keepdim=True)
    b = b.flatten(2) - b.flatten(2).mean(-1, keepdim=True)
    c = (a * b).sum(-1) / (eps + a.square().sum(-1).sqrt() * b.square().sum(-1).sqrt())
    return c.clamp(-1.0, 1.0).mean()


def phase2_loss(model: Any, vis: Any, ir: Any) -> Any:
    """CDDFuse's phase-II loss of the twin: L1(max) + 10 L1(Sobel max) + 2 L_decomp."""
    import torch
    import torch.nn.functional as F

    base_v, detail_v = model.encode(vis)
    base_i, detail_i = model.encode(ir)
    base = model.BaseFuseLayer(base_i + base_v)
    detail = model.DetailFuseLayer(detail_i + detail_v)
    fused = model.DIDF_Decoder(vis, base, detail)[0]
    loss_in = F.l1_loss(torch.maximum(vis, ir), fused)
    loss_grad = F.l1_loss(torch.maximum(_sobel(vis), _sobel(ir)), _sobel(fused))
    decomp = _cc(detail_v, detail_i) ** 2 / (1.01 + _cc(base_v, base_i))
    return loss_in + 10.0 * loss_grad + 2.0 * decomp


def torch_program(spec: dict[str, Any]) -> tuple[Callable[[], None], float, float | None]:
    """(one call, warm-up seconds, None) of the PyTorch twin for `spec` (first call included:
    for torch.compile that is the compile)."""
    import torch

    from convert import cddfuse_torch

    b, h, w = spec["batch"], spec["height"], spec["width"]
    gen = torch.Generator().manual_seed(1)
    vis, ir = torch.rand(b, 1, h, w, generator=gen), torch.rand(b, 1, h, w, generator=gen)
    model = cddfuse_torch.build_cddfuse(seed=0)
    compiled = spec["side"] == "torch compile"
    if spec["work"] == "fuse":
        model.eval()
        fuse = torch.compile(model.fuse) if compiled else model.fuse

        def call() -> None:
            with torch.inference_mode():
                fuse(vis, ir, "vis")

    elif spec["work"] == "train":
        model.train()
        modules = [getattr(model, name) for name in cddfuse_torch.RELEASE_ENTRIES]
        optimizers = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in modules]
        loss_fn = torch.compile(phase2_loss) if compiled else phase2_loss

        def call() -> None:
            for opt in optimizers:
                opt.zero_grad()
            loss_fn(model, vis, ir).backward()
            for m in modules:  # per-module clipping, as CDDFuse's train.py
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01, norm_type=2)
            for opt in optimizers:
                opt.step()

    else:
        raise ValueError(f"work {spec['work']!r} has no PyTorch side")
    start = time.perf_counter()
    call()
    return call, time.perf_counter() - start, None


def serve(spec: dict[str, Any]) -> None:
    """Builds the program of `spec`, then answers run / quit requests from stdin.

    With `"pin_cpu": n` (>= 0) the process first binds itself to CPU n, before jax or torch
    size their thread pools from it, and reports each call's CPU time instead of its wall time:
    one core's work per call, a figure a loaded machine barely moves.
    """
    if spec.get("side") not in SIDES or spec.get("work") not in WORKS:
        raise ValueError(f"expected side in {SIDES} and work in {WORKS}, got {spec}")
    pinned = spec.get("pin_cpu", -1) >= 0
    if pinned:
        os.sched_setaffinity(0, {spec["pin_cpu"]})
    clock = time.process_time if pinned else time.perf_counter
    if spec["side"] == "jax" and spec["work"] == "train":  # as the trainers, before JAX's
        host_memory.retain_freed_memory()  # threads allocate (`fuse` keeps glibc's defaults)
    program = jax_program if spec["side"] == "jax" else torch_program
    call, compile_s, gflops = program(spec)
    say({"ready": True, "compile_s": compile_s, "gflops": gflops})
    for line in sys.stdin:
        request = line.strip()
        if request == "run":
            start = clock()
            call()
            say({"s": clock() - start})
        elif request == "quit":
            break
    say({"peak_rss": current_peak_rss()})


def main(argv: list[str] | None = None) -> None:
    """Entry point: one JSON spec as the only argument."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        serve(json.loads(argv[0]))
    except Exception as e:  # noqa: BLE001 - reported to the parent, one line
        say({"error": " ".join(f"{type(e).__name__}: {e}".split())[:400]})
        sys.exit(1)


if __name__ == "__main__":
    main()
