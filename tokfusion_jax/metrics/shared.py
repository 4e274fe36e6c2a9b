"""Metric definitions that several conventions share, on one gray image (H, W), 0..255.

A = infrared, B = visible, F = fused. Each convention module picks these (with its own
parameters) or defines its own variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax.metrics import ops

VIF_EPS = 1e-10
VIF_SIGMA_NSQ = 2.0
VIF_WINDOWS = (17, 9, 5, 3)  # N = 2 ** (5 - s) + 1 at scales s = 1..4


def entropy(f: jax.Array) -> jax.Array:
    """EN in bits of the 256-level histogram, exact (empty bins dropped; MATLAB `entropy`)."""
    return ops.entropy_of_counts(ops.histogram256(f))


def standard_deviation(f: jax.Array) -> jax.Array:
    """SD: population standard deviation, from exact sums of x and x^2 for 8-bit images."""
    f = f.astype(jnp.float32)
    m = ops.mean(f)
    return jnp.sqrt(jnp.maximum(ops.mean(f * f) - m * m, 0.0))


def spatial_frequency(f: jax.Array) -> jax.Array:
    """SF = sqrt(mean(row diffs^2) + mean(column diffs^2)), each mean over its own array."""
    f = f.astype(jnp.float32)
    along_w = ops.mean(jnp.square(f[:, 1:] - f[:, :-1]))
    along_h = ops.mean(jnp.square(f[1:, :] - f[:-1, :]))
    return ops.safe_sqrt(along_w + along_h)


def gradient_magnitudes(f: jax.Array) -> jax.Array:
    """sqrt((gx^2 + gy^2) / 2) with numpy / MATLAB `gradient` differences, (H, W)."""
    gx = ops.np_gradient(f, 1)
    gy = ops.np_gradient(f, 0)
    return ops.safe_sqrt((gx * gx + gy * gy) * 0.5)


def average_gradient(f: jax.Array) -> jax.Array:
    """AG = mean over H x W of sqrt((gx^2 + gy^2) / 2) (the Python evaluators' normalisation)."""
    return ops.mean(gradient_magnitudes(f.astype(jnp.float32)))


def average_gradient_matlab(f: jax.Array) -> jax.Array:
    """AG with the MATLAB evaluators' normalisation: the sum divided by (H - 1)(W - 1)."""
    h, w = f.shape
    total = jnp.sum(gradient_magnitudes(f.astype(jnp.float32)), dtype=ops.acc_dtype())
    return total / ((h - 1) * (w - 1))


def edge_intensity(f: jax.Array, border: str = "zero") -> jax.Array:
    """EI = mean over H x W of the Sobel magnitude (no 1/8 normalisation)."""
    sx, sy = ops.sobel(f.astype(jnp.float32), border)
    return ops.mean(ops.safe_sqrt(sx * sx + sy * sy))


def scd(f: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """SCD = corr(F - B, A) + corr(F - A, B), from exact integer sums for 8-bit images."""
    f, a, b = (x.astype(jnp.float32) for x in (f, a, b))
    return ops.pearson(f - b, a) + ops.pearson(f - a, b)


def correlation_mean(f: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """CC = (corr(A, F) + corr(B, F)) / 2."""
    f, a, b = (x.astype(jnp.float32) for x in (f, a, b))
    return 0.5 * (ops.pearson(a, f) + ops.pearson(b, f))


def mutual_information(f: jax.Array, x: jax.Array) -> jax.Array:
    """MI(X, F) in nats from the 256 x 256 joint histogram of integer grey levels."""
    joint = ops.joint_histogram256(f, x).astype(jnp.float64)
    n = jnp.float64(f.size)
    pf = jnp.sum(joint, axis=1, keepdims=True)  # (256, 1) counts
    px = jnp.sum(joint, axis=0, keepdims=True)  # (1, 256)
    nonzero = joint > 0
    ratio = jnp.where(nonzero, joint * n / jnp.where(nonzero, pf * px, 1.0), 1.0)
    return jnp.sum(joint * jnp.log(ratio)) / n


def fspecial_gaussian_taps(n: int, sigma: float) -> np.ndarray:
    """1-D taps whose outer product is MATLAB fspecial('gaussian', n, sigma), float64 (n,).

    Samples at -(n-1)/2 .. (n-1)/2, normalised to sum 1 (for the sizes used here no tap falls
    below eps * max, so fspecial's zeroing never applies).
    """
    t = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    h = np.exp(-(t * t) / (2.0 * sigma * sigma))
    return h / h.sum()


def local_moments(
    refs: jax.Array, dist: jax.Array, taps: np.ndarray, pad: int = 0, mode: str = "zero"
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Filtered moments of K references (K, H, W) against one distorted image (H, W).

    One stacked `filter_maps` pass. Returns mu_r (K, h, w), mu_d (h, w), E[r^2] - mu_r^2
    (K, h, w), E[d^2] - mu_d^2 (h, w) and E[r d] - mu_r mu_d (K, h, w).
    """
    k = refs.shape[0]
    maps = jnp.concatenate([refs, dist[None], refs * refs, (dist * dist)[None], refs * dist[None]])
    out = ops.filter_maps(maps, taps, pad, mode)  # (3K + 2, h, w)
    mu_r, mu_d = out[:k], out[k]
    e_rr, e_dd, e_rd = out[k + 1 : 2 * k + 1], out[2 * k + 1], out[2 * k + 2 :]
    return mu_r, mu_d, e_rr - mu_r * mu_r, e_dd - mu_d * mu_d, e_rd - mu_r * mu_d[None]


def ssim_maps(
    refs: Sequence[jax.Array] | jax.Array,
    x: jax.Array,
    taps: np.ndarray,
    c1: float,
    c2: float,
    *,
    cov_norm: float = 1.0,
    pad: int = 0,
    mode: str = "zero",
) -> jax.Array:
    """Local SSIM maps of each reference (K, H, W) against x (H, W) -> (K, h, w).

    ((2 mu_r mu_x + C1)(2 s_rx + C2)) / ((mu_r^2 + mu_x^2 + C1)(s_r^2 + s_x^2 + C2)), the
    moments from the separable window `taps` (times `cov_norm` for sample statistics), in the
    dtype of the inputs.
    """
    refs = jnp.stack(list(refs)) if not isinstance(refs, jax.Array) else refs
    mu_r, mu_x, var_r, var_x, cov = local_moments(refs, x, taps, pad, mode)
    num = (2.0 * mu_r * mu_x + c1) * (2.0 * cov_norm * cov + c2)
    den = (mu_r * mu_r + mu_x * mu_x + c1) * (cov_norm * (var_r + var_x) + c2)
    return num / den


def vif_pair(
    f: jax.Array,
    a: jax.Array,
    b: jax.Array,
    taps_for: dict[int, np.ndarray],
    same_size: bool,
) -> jax.Array:
    """(vifp(A, F), vifp(B, F)), multi-scale pixel-domain VIF (float64, 0..255 scale) -> (2,).

    `taps_for[N]` is the separable window at size N; `same_size` filters with zero-padded
    'same' output (IVIF-ZOO) instead of MATLAB's 'valid'. NaN where num / den is 0 / 0.
    """
    refs = jnp.stack([a, b]).astype(jnp.float64)  # (2, H, W)
    dist = f.astype(jnp.float64)  # (H, W)
    num = jnp.zeros((2,), jnp.float64)
    den = jnp.zeros((2,), jnp.float64)
    eps = VIF_EPS
    for scale, n in enumerate(VIF_WINDOWS, start=1):
        taps = taps_for[n]
        pad = n // 2 if same_size else 0
        if scale > 1:
            smoothed = ops.filter_maps(jnp.concatenate([refs, dist[None]]), taps, pad)
            smoothed = smoothed[:, ::2, ::2]
            refs, dist = smoothed[:2], smoothed[2]
        mu1, mu2, sigma1_sq, sigma2_sq, sigma12 = local_moments(refs, dist, taps, pad)
        sigma1_sq = jnp.maximum(sigma1_sq, 0.0)  # (2, h, w)
        sigma2_sq = jnp.broadcast_to(jnp.maximum(sigma2_sq, 0.0), sigma1_sq.shape)

        g = sigma12 / (sigma1_sq + eps)
        sv_sq = sigma2_sq - g * sigma12
        low1 = sigma1_sq < eps
        g = jnp.where(low1, 0.0, g)
        sv_sq = jnp.where(low1, sigma2_sq, sv_sq)
        sigma1_sq = jnp.where(low1, 0.0, sigma1_sq)
        low2 = sigma2_sq < eps
        g = jnp.where(low2, 0.0, g)
        sv_sq = jnp.where(low2, 0.0, sv_sq)
        negative = g < 0
        sv_sq = jnp.where(negative, sigma2_sq, sv_sq)
        g = jnp.where(negative, 0.0, g)
        sv_sq = jnp.maximum(sv_sq, eps)

        # The masks above need float64 variances; the log terms do not (float32 log1p with a
        # float64 sum: ~1e-7 relative).
        info = (g * g * sigma1_sq / (sv_sq + VIF_SIGMA_NSQ)).astype(jnp.float32)
        prior = (sigma1_sq / VIF_SIGMA_NSQ).astype(jnp.float32)
        num = num + jnp.sum(jnp.log1p(info), axis=(1, 2), dtype=jnp.float64) / math.log(10.0)
        den = den + jnp.sum(jnp.log1p(prior), axis=(1, 2), dtype=jnp.float64) / math.log(10.0)
    return num / den


MATLAB_VIF_TAPS = {n: fspecial_gaussian_taps(n, n / 5.0) for n in VIF_WINDOWS}


def qabf(f: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """Qabf (Xydeas & Petrovic, L = 1), with the reference's G = gF rule when gA == gF."""
    f, a, b = (x.astype(jnp.float32) for x in (f, a, b))

    def strength_angle(x):
        sx, sy = ops.sobel(x)
        g = jnp.sqrt(sx * sx + sy * sy)
        zero = sx == 0
        alpha = jnp.where(zero, jnp.pi / 2, jnp.arctan(sy / jnp.where(zero, 1.0, sx)))
        return g, alpha

    g_f, a_f = strength_angle(f)

    def preservation(x):
        g_x, a_x = strength_angle(x)
        safe_gx = jnp.where(g_x == 0, 1.0, g_x)
        safe_gf = jnp.where(g_f == 0, 1.0, g_f)
        g_ratio = jnp.where(g_x > g_f, g_f / safe_gx, jnp.where(g_x == g_f, g_f, g_x / safe_gf))
        a_sim = 1.0 - jnp.abs(a_x - a_f) / (jnp.pi / 2)
        q_g = 0.9994 / (1.0 + jnp.exp(-15.0 * (g_ratio - 0.5)))
        q_a = 0.9879 / (1.0 + jnp.exp(-22.0 * (a_sim - 0.8)))
        return q_g * q_a, g_x

    q_af, g_a = preservation(a)
    q_bf, g_b = preservation(b)
    num = jnp.sum(q_af * g_a + q_bf * g_b, dtype=jnp.float64)
    return num / jnp.sum(g_a + g_b, dtype=jnp.float64)
