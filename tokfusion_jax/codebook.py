"""Training terms of TiTok's latent bottleneck: VQ losses, codebook usage, dead-code restarts.

All functions are pure and jit-able; they run in float32.

* `vq_terms`: the official quantizer's losses, computed on the (l2-normalised, when the
  codebook is) encoder vectors z and their codebook vectors z_q:
  commitment = beta * mean((sg[z_q] - z)^2), codebook = mean((z_q - sg[z])^2).
* `kl_term`: the VAE posterior's KL to N(0, I), summed over tokens and channels, averaged over
  the batch (the official DiagonalGaussianDistribution.kl, then sum / B).
* `code_counts`, `update_usage`, `usage_stats`: how often each code is picked; ``usage`` is an
  exponential moving average of each code's share of the assignments (uniform = 1 / K).
* `restart_dead_codes`: codes whose usage fell below ``threshold / K`` are re-seeded with encoder
  vectors of the current batch (distinct ones, in a random order keyed by the step's rng), and
  their usage is reset to uniform so that they get a fair window before the next check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def vq_terms(z: Array, z_q: Array, commitment_cost: float) -> dict[str, Array]:
    """Commitment and codebook losses of encoder vectors z and their codes z_q, (B, N, C) each.

    Gradients: commitment reaches the encoder only, codebook the codebook only.
    """
    z, z_q = z.astype(jnp.float32), z_q.astype(jnp.float32)
    commitment = commitment_cost * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
    codebook = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
    return {"commitment": commitment, "codebook": codebook}


def kl_term(mean: Array, logvar: Array) -> Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over (N, C), averaged over the batch."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2))  # (B,)
    return jnp.mean(kl)


def code_counts(indices: Array, codebook_size: int) -> Array:
    """How many times each code is picked in ``indices`` (any shape): (K,) float32."""
    flat = indices.reshape(-1)
    return jnp.zeros((codebook_size,), jnp.float32).at[flat].add(1.0)


def update_usage(usage: Array, counts: Array, decay: float) -> Array:
    """EMA of each code's share of the assignments: decay * usage + (1 - decay) * counts / sum."""
    share = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return decay * usage + (1.0 - decay) * share


def usage_stats(counts: Array, usage: Array, dead_threshold: float) -> dict[str, Array]:
    """Codebook health of one step.

    perplexity: exp(entropy) of this batch's code distribution (K when uniform, 1 when one
    code takes everything); used: the fraction of codes picked in this batch; active: the
    fraction whose usage EMA is at least ``dead_threshold / K``.
    """
    k = counts.shape[0]
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {
        "perplexity": jnp.exp(entropy),
        "used": jnp.mean((counts > 0).astype(jnp.float32)),
        "active": jnp.mean((usage >= dead_threshold / k).astype(jnp.float32)),
    }


def dead_codes(usage: Array, dead_threshold: float) -> Array:
    """(K,) bool: codes whose usage EMA is below ``dead_threshold / K``."""
    return usage < dead_threshold / usage.shape[0]


def restart_dead_codes(
    embedding: Array, usage: Array, candidates: Array, dead: Array, rng: Array
) -> tuple[Array, Array]:
    """Re-seeds the ``dead`` codes with distinct ``candidates`` (M, C) in a random order.

    The r-th dead code (in index order) takes candidate ``perm[r mod M]`` of a permutation drawn
    from ``rng``, so up to M dead codes get distinct vectors. Returns (embedding (K, C), usage
    (K,)); restarted codes get the uniform usage 1 / K, the others keep theirs.
    """
    k, m = embedding.shape[0], candidates.shape[0]
    perm = jax.random.permutation(rng, m)
    rank = jnp.cumsum(dead.astype(jnp.int32)) - 1  # (K,) index among the dead codes
    chosen = candidates[perm[jnp.mod(rank, m)]].astype(embedding.dtype)  # (K, C)
    new_embedding = jnp.where(dead[:, None], chosen, embedding)
    new_usage = jnp.where(dead, jnp.float32(1.0 / k), usage)
    return new_embedding, new_usage
