"""`chunking`: a per-sample network over a sharded batch, a few samples at a time.

Unit checks of the slicing on elementwise functions (bit-exact: the same ops on the same
numbers), then the tiny model's train step chunked against the whole batch on a 2-device mesh:
same losses and gradient norms within the float32 bound of two programs of the same step, and
no data moved between the devices.
"""

import types

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
    paper = types.SimpleNamespace(dim=64, ffn_expansion=2.0, dtype="float32")
    sample = chunking.widest_activation_bytes(paper, 128, 128)
    assert sample == 16 * mib  # (128, 128, 256) float32
    assert chunking.auto_chunk_size(sample, "cpu", cache_bytes=32 * mib) == 2
    assert chunking.auto_chunk_size(sample, "cpu", cache_bytes=8 * mib) == 1  # never 0
    assert chunking.auto_chunk_size(sample, "gpu", cache_bytes=32 * mib) == 0
    assert chunking.auto_chunk_size(sample, "tpu") == 0
    assert chunking.last_level_cache_bytes() >= 1 << 16  # read from the OS, or the fallback


@pytest.mark.heavy(seconds=12)
@pytest.mark.parametrize("stage", [1, 2])
def test_chunked_loss_matches_the_whole_batch(stage):
    """Batch 4 on 2 devices: the network in chunks of 1 per device vs the whole per-device
    batch. The loss, its terms and the output images within `loss_rtol` (two programs of the
    same computation); no all-gather or permute of the batch between the devices in the chunked
    program. (Gradients are JAX's of slices and concatenations of the same network.)"""
    c = configlib.apply_overrides(load_config("tiny"), FAST_OPTIM.items(), "test")
    model = TokFusion(c.model)
    opt = optim.ModuleOptimizer(c.optim, steps_per_epoch=2)
    mesh = shd.make_mesh(devices=jax.devices()[:2])
    rng = np.random.default_rng(stage)
    t = c.model.tokens
    batch = {k: rng.uniform(size=(4, IMAGE, IMAGE, 1)).astype(np.float32) for k in ("vis", "ir")}
    for k in ("vis_tokens", "ir_tokens"):
        batch[k] = rng.normal(size=(4, t.num_tokens, t.token_dim)).astype(np.float32)
    batch = shd.global_batch(batch, mesh)
    params = jax.device_put(
        trainer.stage_params(model, jax.random.key(0), stage, (IMAGE, IMAGE)),
        shd.replicated(mesh),
    )
    results = {}
    for chunk in (0, 1):
        ctx = trainer.StepContext(
            model,
            opt,
            c.loss.to_dict(),
            stage=stage,
            use_token_cache=True,
            use_tokens=True,
            chunk_size=chunk,
            batch_shards=mesh.size,
        )
        loss_fn = lambda p, b, ctx=ctx: trainer.compute_loss(ctx, p, None, b)
        compiled = jax.jit(loss_fn).lower(params, batch).compile()
        if chunk:
            hlo = compiled.as_text()
            assert "all-gather" not in hlo and "collective-permute" not in hlo
            assert "all-to-all" not in hlo
        results[chunk] = jax.device_get(compiled(params, batch))
    (loss_c, (terms_c, out_c)), (loss_w, (terms_w, out_w)) = results[1], results[0]
    rtol = loss_rtol(0, batch=4)
    assert abs(loss_c - loss_w) <= rtol * abs(loss_w), (loss_c, loss_w)
    assert terms_c.keys() == terms_w.keys()
    for key in terms_w:
        assert abs(terms_c[key] - terms_w[key]) <= rtol * abs(terms_w[key]) + 1e-30, key
    assert out_c.shape == out_w.shape == (4, IMAGE, IMAGE, 1)
    assert float(np.abs(out_c - out_w).max()) <= rtol  # sigmoid outputs in (0, 1)
