"""How much an edit at the probed token positions moves the fusion metrics, against random ones.

    python benchmarks/ste_vs_random.py --workdir=runs/demo --ste=runs/demo/probe/ste.json \
        [--random=8] [--steps=100] [--eval_batches=4] [--json=out.json]

With the trained model and the tokenizer frozen (the run's export), one offset Delta (N, C),
shared by both modalities and masked to a set of positions x channels, is optimised with Adam to
maximise the probe's objective (EI, AG, SF and SSIM of the fused image, each divided by its
unedited value; `tokfusion_jax.probe.normalized_objective`) on the run's training pairs; then the
fused images of other batches of the training pairs (the same pipeline, another shuffle seed;
not necessarily unseen by the optimisation) are scored with Delta and without. Rows: the probed
mask (`--ste`), and `--random` masks of the same size (random positions, random channels), whose
mean and spread are reported. Each entry is the mean relative
change of a metric over the evaluation images, in percent. Delta = offset_scale * tanh(raw)
bounds the edit like the probe does (the tokens are unit vectors).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tokfusion_jax import export, probe

METRICS = ("ei", "ag", "sf", "ssim")


def masked_delta(raw: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """The bounded, masked offset (N, C)."""
    return scale * jnp.tanh(raw) * mask


def make_functions(token_fn, terms_fn, *, lr: float, scale: float, weights):
    """(step, scores) jitted once; the mask, the frozen trees and the batch are arguments."""
    opt = optax.adam(lr)

    def objective(raw, mask, frozen, batch):
        tokens = token_fn(frozen, batch)  # (B, 2, N, C)
        base = jax.lax.stop_gradient(terms_fn(frozen, tokens, batch))
        edited = tokens + masked_delta(raw, mask, scale)[None, None]
        return probe.normalized_objective(terms_fn(frozen, edited, batch), base, weights)

    @jax.jit
    def step(raw, opt_state, mask, frozen, batch):
        grad = jax.grad(objective)(raw, mask, frozen, batch)
        updates, opt_state = opt.update(-grad, opt_state, raw)  # gradient ascent
        return optax.apply_updates(raw, updates), opt_state

    @jax.jit
    def scores(delta, frozen, batch):
        tokens = token_fn(frozen, batch)
        return terms_fn(frozen, tokens, batch), terms_fn(frozen, tokens + delta[None, None], batch)

    return opt, step, scores


def optimise(fns, frozen, batches, mask, steps: int) -> jax.Array:
    """Adam ascent on the raw offset from 0; returns the raw (N, C) after ``steps`` steps."""
    opt, step, _ = fns
    raw = jnp.zeros(mask.shape, jnp.float32)
    opt_state = opt.init(raw)
    for _ in range(steps):
        raw, opt_state = step(raw, opt_state, mask, frozen, next(batches))
    return raw


def relative_changes(fns, frozen, eval_batches, delta) -> dict[str, float]:
    """Mean over images of (metric with delta - without) / without, in percent."""
    ratios = {k: [] for k in METRICS}
    for batch in eval_batches:
        base, edited = jax.device_get(fns[2](delta, frozen, batch))
        for k in METRICS:
            b, e = np.asarray(base[k], np.float64), np.asarray(edited[k], np.float64)
            ratios[k].extend(100.0 * (e - b) / np.maximum(np.abs(b), 1e-12))
    return {k: float(np.mean(v)) for k, v in ratios.items()}


def mask_of(positions, channels, n: int, c: int) -> jax.Array:
    m = np.zeros((n, c), np.float32)
    m[np.ix_(list(positions), list(channels))] = 1.0
    return jnp.asarray(m)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a finished training run (its export)")
    p.add_argument("--ste", required=True, help="the probe's ste.json")
    p.add_argument("--random", type=int, default=8, help="random masks of the same size")
    p.add_argument("--steps", type=int, default=100, help="Adam steps per mask")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the rows here")
    args = p.parse_args()

    exp = export.load_export(args.workdir)
    n, c = int(exp.tokenizer.config.num_tokens), int(exp.tokenizer.config.token_size)
    ste = probe.load_ste_snippet(args.ste, num_tokens=n, token_dim=c)
    token_fn, terms_fn = probe.fusion_problem(exp.model)
    frozen = {"params": exp.params, "tokenizer": exp.tokenizer}
    settings = probe.ProbeSettings()
    weights = dict(settings.weights)

    def batches(seed):
        it = probe._data_batches(exp.config, exp.tokenizer, args.batch_size, seed)
        keep = ("vis", "ir")
        return ({k: jnp.asarray(b[k]) for k in keep} for b in it)

    eval_set = [
        b for _, b in zip(range(args.eval_batches), batches(args.seed + 1000), strict=False)
    ]
    rng = np.random.default_rng(args.seed)
    masks = [("probed", tuple(ste.positions), tuple(ste.channels))]
    for i in range(args.random):
        pos = tuple(sorted(rng.choice(n, len(ste.positions), replace=False).tolist()))
        ch = tuple(sorted(rng.choice(c, len(ste.channels), replace=False).tolist()))
        masks.append((f"random {i}", pos, ch))

    fns = make_functions(
        token_fn, terms_fn, lr=args.lr, scale=settings.offset_scale, weights=weights
    )
    rows = []
    start = time.perf_counter()
    for label, pos, ch in masks:
        mask = mask_of(pos, ch, n, c)
        raw = optimise(fns, frozen, batches(args.seed), mask, args.steps)
        delta = masked_delta(raw, mask, settings.offset_scale)
        change = relative_changes(fns, frozen, eval_set, delta)
        rows.append({"mask": label, "positions": list(pos), "channels": list(ch), **change})
        print(
            f"{label:>10}  positions {list(pos)!s:<10} channels {list(ch)!s:<12} "
            + "  ".join(f"{k.upper()} {change[k]:+6.2f}%" for k in METRICS),
            flush=True,
        )
    rand = rows[1:]
    if rand:
        summary = "  ".join(
            f"{k.upper()} {np.mean([r[k] for r in rand]):+6.2f}±{np.std([r[k] for r in rand]):.2f}%"
            for k in METRICS
        )
        print(f"{'random':>10}  mean ± std over {len(rand)} masks:             {summary}")
    print(f"({time.perf_counter() - start:.0f} s, {args.steps} Adam steps per mask)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
