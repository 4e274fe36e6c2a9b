"""VQ terms, codebook usage statistics and dead-code restarts against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokfusion_jax import codebook, optim


def test_vq_terms_values_and_gradient_routes():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 4, 3)).astype(np.float32)
    z_q = rng.normal(size=(2, 4, 3)).astype(np.float32)
    terms = codebook.vq_terms(jnp.asarray(z), jnp.asarray(z_q), 0.25)
    sq = np.mean((z.astype(np.float64) - z_q) ** 2)
    assert float(terms["commitment"]) == pytest.approx(0.25 * sq, rel=1e-6)
    assert float(terms["codebook"]) == pytest.approx(sq, rel=1e-6)
    # Commitment moves the encoder vectors only, the codebook term the codes only.
    g_z, g_q = jax.grad(lambda a, b: codebook.vq_terms(a, b, 0.25)["commitment"], (0, 1))(
        jnp.asarray(z), jnp.asarray(z_q)
    )
    np.testing.assert_allclose(g_z, 0.25 * 2 * (z - z_q) / z.size, rtol=1e-5)
    assert not np.any(g_q)
    g_z, g_q = jax.grad(lambda a, b: codebook.vq_terms(a, b, 0.25)["codebook"], (0, 1))(
        jnp.asarray(z), jnp.asarray(z_q)
    )
    assert not np.any(g_z)
    np.testing.assert_allclose(g_q, 2 * (z_q - z) / z.size, rtol=1e-5)


def test_kl_term_matches_the_closed_form():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(3, 5, 4))
    logvar = rng.normal(size=(3, 5, 4))
    want = np.mean(0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2)))
    got = codebook.kl_term(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(codebook.kl_term(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)))) == 0.0


def test_counts_usage_and_stats_on_a_planted_assignment():
    """K = 8; a batch uses codes 0..3 (counts 4, 2, 1, 1), codes 4..7 never."""
    k = 8
    indices = jnp.asarray([[0, 0, 0, 0], [1, 1, 2, 3]], jnp.int32)
    counts = codebook.code_counts(indices, k)
    np.testing.assert_array_equal(counts, [4, 2, 1, 1, 0, 0, 0, 0])
    usage = jnp.full((k,), 1.0 / k)
    for _ in range(200):  # the EMA converges to the batch's shares
        usage = codebook.update_usage(usage, counts, 0.95)
    share = np.array([4, 2, 1, 1, 0, 0, 0, 0]) / 8
    decay = 0.95**200  # usage_t = d^t usage_0 + (1 - d^t) share
    np.testing.assert_allclose(usage, (1 - decay) * share + decay / k, atol=1e-6)
    stats = codebook.usage_stats(counts, usage, dead_threshold=0.5)
    p = share[:4]
    assert float(stats["perplexity"]) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-6)
    assert float(stats["used"]) == 0.5
    assert float(stats["active"]) == 0.5  # usage >= 0.5 / 8 for codes 0..3 only
    np.testing.assert_array_equal(codebook.dead_codes(usage, 0.5), [0, 0, 0, 0, 1, 1, 1, 1])
    uniform = codebook.usage_stats(jnp.ones((k,)), jnp.full((k,), 1.0 / k), 0.5)
    assert float(uniform["perplexity"]) == pytest.approx(k, rel=1e-6)


def test_restart_reseeds_only_dead_codes_with_distinct_batch_vectors():
    rng = np.random.default_rng(2)
    k, c, m = 8, 3, 6
    embedding = rng.normal(size=(k, c)).astype(np.float32)
    candidates = rng.normal(size=(m, c)).astype(np.float32)
    usage = jnp.asarray([0.3, 0.3, 0.2, 0.2, 0.0, 0.0, 0.0, 0.0])
    dead = codebook.dead_codes(usage, 0.1)
    new, new_usage = codebook.restart_dead_codes(
        jnp.asarray(embedding), usage, jnp.asarray(candidates), dead, jax.random.key(0)
    )
    new, new_usage = np.asarray(new), np.asarray(new_usage)
    np.testing.assert_array_equal(new[:4], embedding[:4])  # live codes untouched
    np.testing.assert_array_equal(new_usage[:4], np.asarray(usage)[:4])
    np.testing.assert_allclose(new_usage[4:], 1.0 / k)
    rows = [int(np.flatnonzero((candidates == row).all(axis=1))[0]) for row in new[4:]]
    assert len(set(rows)) == 4  # four distinct batch vectors
    again, _ = codebook.restart_dead_codes(
        jnp.asarray(embedding), usage, jnp.asarray(candidates), dead, jax.random.key(0)
    )
    np.testing.assert_array_equal(np.asarray(again), new)  # keyed by the rng: reproducible
    # More dead codes than candidates: they cycle through a permutation of all candidates.
    all_dead = jnp.ones((k,), bool)
    cyc, _ = codebook.restart_dead_codes(
        jnp.asarray(embedding), usage, jnp.asarray(candidates), all_dead, jax.random.key(1)
    )
    cyc = np.asarray(cyc)
    np.testing.assert_array_equal(cyc[m:], cyc[: k - m])
    assert {tuple(r) for r in cyc[:m]} == {tuple(r) for r in candidates}
    # Nothing dead: nothing changes.
    same, same_usage = codebook.restart_dead_codes(
        jnp.asarray(embedding),
        usage,
        jnp.asarray(candidates),
        jnp.zeros((k,), bool),
        jax.random.key(0),
    )
    np.testing.assert_array_equal(np.asarray(same), embedding)
    np.testing.assert_array_equal(np.asarray(same_usage), np.asarray(usage))


def test_warmup_cosine_schedule_and_ema_decay_follow_the_official_formulas():
    import math

    base, end, warm, total = 1e-3, 1e-5, 10, 110
    sched = optim.warmup_cosine_schedule(base, warm, total, end)
    for step in (0, 3, 9, 10, 35, 60, 109, 110):
        if step < warm:
            want = base * step / warm
        else:
            progress = (step - warm) / (total - warm)
            want = end + (base - end) * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), step
    assert float(optim.ema_decay(0, 0.999)) == 0.0
    assert float(optim.ema_decay(5, 0.999)) == pytest.approx(6 / 15, rel=1e-6)
    assert float(optim.ema_decay(100_000, 0.999)) == pytest.approx(0.999, rel=1e-6)


def test_decay_mask_skips_norms_biases_and_embeddings():
    params = {
        "encoder": {
            "patch_embed": {"kernel": 1, "bias": 1},
            "transformer": {"blocks": {"ln_1": {"scale": 1}, "c_fc": {"kernel": 1, "bias": 1}}},
            "positional_embedding": 1,
        },
        "latent_tokens": 1,
        "quantize": {"embedding": 1},
        "decoder": {"mask_token": 1, "ffn_0": {"kernel": 1}},
    }
    mask = optim.decay_mask(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == [
        "['decoder']['ffn_0']['kernel']",
        "['encoder']['transformer']['blocks']['c_fc']['kernel']",
    ]
