"""`chunking`: a per-sample network over a sharded batch, a few samples at a time.

Unit checks of the slicing on elementwise functions (bit-exact: the same ops on the same
numbers), then the tiny model's train step chunked against the whole batch on a 2-device mesh:
same losses and gradient norms within the float32 bound of two programs of the same step, and
no data moved between the devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import FAST_OPTIM, IMAGE, load_config, loss_rtol

from tokfusion_jax import chunking, configlib, optim, trainer
from tokfusion_jax import sharding as shd
from tokfusion_jax.models.fusion import TokFusion


def per_sample(x, z, y):
    """Sample-independent outputs: (B, 3) and a dict of (B,) and (B, 2, 2)."""
    out = x * 2.0 + jnp.sin(y).sum(axis=(1, 2))[:, None]
    return out, {"mean": x.mean(axis=1), "square": y * y + (0.0 if z is None else 1.0)}


@pytest.mark.parametrize(
    "shards, per_shard, chunk",
    [
        (1, 4, 1),
        (1, 4, 2),
        (1, 4, 3),
        (2, 2, 1),
        (2, 3, 2),
        (3, 2, 1),
        (1, 4, 0),
        (2, 2, 5),
    ],
)
def test_map_in_chunks_equals_the_whole_batch(shards, per_shard, chunk):
    """Every split, ragged last chunks included, gives the whole batch's outputs in order."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(shards * per_shard, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(x.shape[0], 2, 2)), jnp.float32)
    want = per_sample(x, None, y)
    got = chunking.map_in_chunks(per_sample, (x, None, y), shards, chunk)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))  # same ops, same numbers


def test_map_in_chunks_refuses_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="3 shards"):
        chunking.map_in_chunks(lambda a: a, (jnp.zeros((4, 3)),), 3, 1)


def test_auto_chunk_size_fits_the_cache():
    mib = 1 << 20
    sample = chunking.widest_activation_bytes(128, 128, 64, 2.0, 4)
    assert sample == 16 * mib  # (128, 128, 256) float32
    assert chunking.auto_chunk_size(sample, "cpu", cache_bytes=32 * mib) == 2
    assert chunking.auto_chunk_size(sample, "cpu", cache_bytes=8 * mib) == 1  # never 0
    assert chunking.auto_chunk_size(sample, "gpu", cache_bytes=32 * mib) == 0
    assert chunking.auto_chunk_size(sample, "tpu") == 0
    assert chunking.last_level_cache_bytes() >= 1 << 16  # read from the OS, or the fallback


@pytest.mark.heavy(seconds=20)
def test_chunked_train_step_matches_the_whole_batch():
    """Stage II, batch 4 on 2 devices: chunks of 1 per device vs the whole per-device batch,
    two steps. Losses within `loss_rtol` (two programs of the same step); the per-module
    gradient norms of the first step within the same bound; no all-gather or permute of the
    batch between the devices in the chunked program (gradients are still all-reduced)."""
    c = configlib.apply_overrides(load_config("tiny"), FAST_OPTIM.items(), "test")
    model = TokFusion(c.model)
    opt = optim.ModuleOptimizer(c.optim, steps_per_epoch=2)
    mesh = shd.make_mesh(devices=jax.devices()[:2])
    rng = np.random.default_rng(1)
    t = c.model.tokens
    batches = [
        {k: rng.uniform(size=(4, IMAGE, IMAGE, 1)).astype(np.float32) for k in ("vis", "ir")}
        | {
            k: rng.normal(size=(4, t.num_tokens, t.token_dim)).astype(np.float32)
            for k in ("vis_tokens", "ir_tokens")
        }
        for _ in range(2)
    ]
    params = jax.device_get(trainer.stage_params(model, jax.random.key(0), 2, (IMAGE, IMAGE)))
    runs = {}
    for chunk in (0, 1):
        ctx = trainer.StepContext(
            model,
            opt,
            c.loss.to_dict(),
            stage=2,
            use_token_cache=True,
            use_tokens=True,
            chunk_size=chunk,
            batch_shards=mesh.size,
        )
        step = trainer.compile_train_step(ctx, mesh, None)
        state = jax.device_put(trainer.new_state(params, opt), shd.replicated(mesh))
        if chunk:
            args = (state, None, shd.global_batch(batches[0], mesh), jax.random.key(1))
            hlo = step.lower(*args).compile().as_text()
            assert "all-gather" not in hlo and "collective-permute" not in hlo
            assert "all-to-all" not in hlo
        runs[chunk] = []
        for b in batches:
            state, m = step(state, None, shd.global_batch(b, mesh), jax.random.key(1))
            runs[chunk].append(jax.device_get(m))
    for k, (chunked, whole) in enumerate(zip(runs[1], runs[0], strict=True)):
        a, b = float(chunked["loss"]), float(whole["loss"])
        assert abs(a - b) <= loss_rtol(k, batch=4) * abs(b), (k, a, b)
    norms = [key for key in runs[0][0] if key.startswith("grad_norm/")]
    assert norms
    for key in norms:
        a, b = float(runs[1][0][key]), float(runs[0][0][key])
        assert abs(a - b) <= loss_rtol(0, batch=4) * abs(b) + 1e-30, (key, a, b)
