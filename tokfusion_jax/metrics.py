"""Image-fusion quality metrics in JAX, matching the two reference evaluators number for number.

Ten metrics on gray images on the 0..255 scale (A = infrared, B = visible, F = fused):

==========  ================================================================================
EN          entropy of F's 256-level histogram, bits
SD          population standard deviation of F
SF          spatial frequency of F
AG          average gradient of F (`numpy.gradient` differences)
EI          edge intensity of F: mean Sobel magnitude, zero padding
SCD         sum of the correlations of differences, corr(F - B, A) + corr(F - A, B)
SSIM        SSIM(A, F) + SSIM(B, F)
MI          MI(A, F) + MI(B, F) from 256 x 256 joint histograms
VIF         multi-scale pixel-domain VIF, vifp(A, F) + vifp(B, F)
Qabf        Xydeas-Petrovic gradient-based fusion quality
==========  ================================================================================

Two conventions, each reproducing one public evaluator:

``ivif_zoo`` (default; the paper reports these):
  EN uses ``log2(p + 1e-7)`` (about 3e-5 below the exact entropy); SSIM uses an 11-tap Gaussian
  window (sigma 1.5), a 'valid' map and the constants C1 = 1e-4, C2 = 9e-4 on 0..255 data (the
  as-shipped evaluator scales float images to 0..65025 while keeping L = 255); MI in bits;
  VIF with its shifted Gaussian sampling and zero-padded 'same' filtering.
``cddfuse`` (the CDDFuse / EMMA / DDFM evaluator):
  exact EN; SSIM with a 7 x 7 uniform window, sample covariance, L = 2 (scikit-image 0.19's
  float default) and a 3-pixel crop; MI in nats; the MATLAB-faithful VIF (Gaussian windows
  ``fspecial('gaussian', N, N / 5)``, 'valid' filtering, NaN -> 1). It has no EI of its own: EI
  is the same (IVIF-ZOO) definition in both conventions.

SD, SF, AG, SCD and Qabf are the same in both. The fused image is rounded to uint8 first, as
the references evaluate 8-bit files; the sources are rounded too (they are 8-bit files).

Precision: everything runs inside a scoped ``jax.enable_x64`` (never the global flag).
Per-pixel maps of EN (ivif_zoo), SD, SF, AG, EI, SCD and Qabf are float32 (exact integers for
8-bit inputs where the metric allows) with float64 sums, so results do not depend on the batch
size; MI, VIF and SSIM are float64 (the references use float64 there, and VIF/SSIM lose several
digits to E[x^2] - E[x]^2 cancellation in float32; VIF's final log terms are float32).
``ssim_precision="float32"`` reproduces the float32 as-shipped SSIM arithmetic.

Everything is jit-compiled and batched over same-size images (vmapped on accelerators, a
`lax.map` loop on CPU, where it is about twice as fast per image).

The ``differentiable_*`` functions are smooth float32 versions of EI, AG, SF and SSIM for use as
training or probing objectives on float images (no rounding, safe square roots).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax.errors import TokFusionError

METRIC_NAMES: tuple[str, ...] = ("EN", "SD", "SF", "AG", "EI", "SCD", "SSIM", "MI", "VIF", "Qabf")
PAPER_METRICS: tuple[str, ...] = ("EN", "SD", "SCD", "EI", "SF", "AG", "SSIM")
CONVENTIONS: tuple[str, ...] = ("ivif_zoo", "cddfuse")
# Every metric here is "higher is better".
HIGHER_IS_BETTER: dict[str, bool] = dict.fromkeys(METRIC_NAMES, True)

_VIF_EPS = 1e-10
_VIF_SIGMA_NSQ = 2.0
_VIF_WINDOWS = (17, 9, 5, 3)  # N = 2 ** (5 - s) + 1 at scales s = 1..4


class MetricInputError(TokFusionError, ValueError):
    """Images given to the metrics have the wrong shape, size or type."""


# --------------------------------------------------------------------------------------------
# Building blocks (one image, (H, W))
# --------------------------------------------------------------------------------------------


def _correlate_valid_1d(x: jax.Array, taps: np.ndarray, axis: int) -> jax.Array:
    """'valid' cross-correlation along one axis: out[i] = sum_k taps[k] x[i + k]."""
    n = x.shape[axis]
    out_len = max(n - len(taps) + 1, 0)
    acc = None
    for k, w in enumerate(taps):
        term = float(w) * jax.lax.slice_in_dim(x, k, k + out_len, axis=axis)
        acc = term if acc is None else acc + term
    return acc


def _separable_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """'valid' 2-D filtering with the outer product taps x taps: (H, W) -> (H-N+1, W-N+1)."""
    return _correlate_valid_1d(_correlate_valid_1d(x, taps, 0), taps, 1)


def filter_maps(maps: jax.Array, taps: np.ndarray, pad: int = 0) -> jax.Array:
    """Separable 2-D cross-correlation of a stack of maps with the outer product taps x taps.

    maps (M, H, W) -> (M, H + 2 pad - N + 1, W + 2 pad - N + 1); zero padding by `pad` pixels on
    every side (0 = 'valid', N // 2 = torch's zero-padded 'same'). float64 goes through
    `lax.conv_general_dilated` (fast on XLA:CPU); other dtypes through shifted slices (XLA:CPU's
    single-channel float32 convolution is slow). Maps smaller than the window give empty output.
    """
    n = len(taps)
    if pad:
        maps = jnp.pad(maps, ((0, 0), (pad, pad), (pad, pad)))
    h, w = maps.shape[1:]
    if h < n or w < n:
        return jnp.zeros((maps.shape[0], max(h - n + 1, 0), max(w - n + 1, 0)), maps.dtype)
    if maps.dtype != jnp.float64:
        return jax.vmap(lambda m: _separable_valid(m, taps))(maps)
    kernel = jnp.asarray(taps, maps.dtype)
    dims = ("NHWC", "HWIO", "NHWC")
    out = maps[..., None]  # (M, H, W, 1)
    out = jax.lax.conv_general_dilated(
        out, kernel.reshape(n, 1, 1, 1), (1, 1), "VALID", dimension_numbers=dims
    )
    out = jax.lax.conv_general_dilated(
        out, kernel.reshape(1, n, 1, 1), (1, 1), "VALID", dimension_numbers=dims
    )
    return out[..., 0]


def _sobel(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero-padded 3x3 Sobel cross-correlations (Sx, Sy), each (H, W).

    Sx with [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], Sy with [[1, 2, 1], [0, 0, 0], [-1, -2, -1]],
    the pair Qabf's references use (the relative sign matters to atan(Sy / Sx)).
    """
    h, w = x.shape
    p = jnp.pad(x, 1)
    right, left = p[:, 2:], p[:, :w]
    col_diff = right - left  # (H+2, W)
    sx = col_diff[0:h] + 2.0 * col_diff[1 : h + 1] + col_diff[2 : h + 2]
    up, down = p[:h, :], p[2:, :]
    row_diff = up - down  # (H, W+2)
    sy = row_diff[:, 0:w] + 2.0 * row_diff[:, 1 : w + 1] + row_diff[:, 2 : w + 2]
    return sx, sy


def _np_gradient(x: jax.Array, axis: int) -> jax.Array:
    """`numpy.gradient` with unit spacing: central inside, one-sided on the two ends."""
    n = x.shape[axis]
    sl = functools.partial(jax.lax.slice_in_dim, x, axis=axis)
    first = sl(1, 2) - sl(0, 1)
    last = sl(n - 1, n) - sl(n - 2, n - 1)
    inner = (sl(2, n) - sl(0, n - 2)) * 0.5
    return jnp.concatenate([first, inner, last], axis=axis)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt with a zero (not NaN) gradient at 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _pearson(x: jax.Array, y: jax.Array) -> jax.Array:
    """Pearson correlation over all pixels (MATLAB corr2); NaN when either image is constant.

    Raw sums in the accumulator dtype: exact for integer-valued images (every product is an
    exact float32 integer and the float64 sums stay far below 2^53).
    """
    acc = _acc_dtype()
    n = x.size
    sx, sy = jnp.sum(x, dtype=acc), jnp.sum(y, dtype=acc)
    sxx, syy = jnp.sum(x * x, dtype=acc), jnp.sum(y * y, dtype=acc)
    sxy = jnp.sum(x * y, dtype=acc)
    cov = sxy - sx * sy / n
    return cov / jnp.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))


def _histogram256(x: jax.Array) -> jax.Array:
    """Counts of the integer grey levels 0..255 of an integer-valued image -> (256,) int32."""
    return jnp.bincount(x.astype(jnp.int32).reshape(-1), length=256)


# --------------------------------------------------------------------------------------------
# Metrics on one image (values 0..255, integer-valued floats)
# --------------------------------------------------------------------------------------------


def entropy(f: jax.Array, convention: str) -> jax.Array:
    """EN in bits; `ivif_zoo` adds 1e-7 inside the log (float32), `cddfuse` is exact."""
    counts = _histogram256(f)
    if convention == "ivif_zoo":
        p = counts.astype(jnp.float32) / jnp.float32(f.size)
        return -jnp.sum(p * jnp.log2(p + jnp.float32(1e-7)))
    p = counts.astype(jnp.float64) / f.size
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0))


def _acc_dtype() -> Any:
    """Accumulator dtype: float64 when 64-bit types are on (always inside `compute`)."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _mean(x: jax.Array) -> jax.Array:
    """Mean with a float64 accumulator when available (exact for integer-valued float32 terms)."""
    return jnp.sum(x, dtype=_acc_dtype()) / x.size


def standard_deviation(f: jax.Array) -> jax.Array:
    """SD: population standard deviation, from exact sums of x and x^2 for 8-bit images."""
    f = f.astype(jnp.float32)
    mean = _mean(f)
    return jnp.sqrt(jnp.maximum(_mean(f * f) - mean * mean, 0.0))


def spatial_frequency(f: jax.Array) -> jax.Array:
    """SF = sqrt(mean(row diffs^2) + mean(column diffs^2)), each mean over its own array."""
    f = f.astype(jnp.float32)
    along_w = _mean(jnp.square(f[:, 1:] - f[:, :-1]))
    along_h = _mean(jnp.square(f[1:, :] - f[:-1, :]))
    return _safe_sqrt(along_w + along_h)


def average_gradient(f: jax.Array) -> jax.Array:
    """AG = mean over H x W of sqrt((gx^2 + gy^2) / 2), numpy.gradient differences."""
    f = f.astype(jnp.float32)
    gx = _np_gradient(f, 1)
    gy = _np_gradient(f, 0)
    return _mean(_safe_sqrt((gx * gx + gy * gy) * 0.5))


def edge_intensity(f: jax.Array) -> jax.Array:
    """EI = mean over H x W of the zero-padded Sobel magnitude (no 1/8 normalisation)."""
    sx, sy = _sobel(f.astype(jnp.float32))
    return _mean(_safe_sqrt(sx * sx + sy * sy))


def scd(f: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """SCD = corr(F - B, A) + corr(F - A, B), from exact integer sums for 8-bit images."""
    f, a, b = (x.astype(jnp.float32) for x in (f, a, b))
    return _pearson(f - b, a) + _pearson(f - a, b)


def mutual_information(f: jax.Array, x: jax.Array, convention: str) -> jax.Array:
    """MI(X, F) from the 256 x 256 joint histogram; bits (`ivif_zoo`) or nats (`cddfuse`)."""
    idx = f.astype(jnp.int32).reshape(-1) * 256 + x.astype(jnp.int32).reshape(-1)
    joint = jnp.bincount(idx, length=256 * 256).reshape(256, 256).astype(jnp.float64)
    n = jnp.float64(f.size)
    pf = jnp.sum(joint, axis=1, keepdims=True)  # (256, 1) counts
    px = jnp.sum(joint, axis=0, keepdims=True)  # (1, 256)
    nonzero = joint > 0
    ratio = jnp.where(nonzero, joint * n / jnp.where(nonzero, pf * px, 1.0), 1.0)
    mi = jnp.sum(joint * jnp.log(ratio)) / n
    return mi / math.log(2.0) if convention == "ivif_zoo" else mi


def gaussian_taps(n: int, sigma: float, convention: str) -> np.ndarray:
    """1-D taps whose outer product is the 2-D VIF window, float64 (n,).

    `cddfuse`: MATLAB fspecial('gaussian'), samples at -(n-1)/2 .. (n-1)/2. `ivif_zoo`: samples at
    linspace(-(n+1)/2, (n-1)/2, n) (spacing n/(n-1), centre shifted by -0.5). Normalised to sum 1
    (for these sizes no tap falls below eps * max, so fspecial's zeroing never applies).
    """
    if convention == "ivif_zoo":
        t = np.linspace((-n) // 2, n // 2, n)
    else:
        t = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    h = np.exp(-(t * t) / (2.0 * sigma * sigma))
    return h / h.sum()


def _local_moments(
    refs: jax.Array, dist: jax.Array, taps: np.ndarray, pad: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Filtered moments of K references (K, H, W) against one distorted image (H, W).

    One stacked `filter_maps` pass. Returns mu_r (K, h, w), mu_d (h, w), E[r^2] - mu_r^2
    (K, h, w), E[d^2] - mu_d^2 (h, w) and E[r d] - mu_r mu_d (K, h, w).
    """
    k = refs.shape[0]
    maps = jnp.concatenate([refs, dist[None], refs * refs, (dist * dist)[None], refs * dist[None]])
    out = filter_maps(maps, taps, pad)  # (3K + 2, h, w)
    mu_r, mu_d = out[:k], out[k]
    e_rr, e_dd, e_rd = out[k + 1 : 2 * k + 1], out[2 * k + 1], out[2 * k + 2 :]
    return mu_r, mu_d, e_rr - mu_r * mu_r, e_dd - mu_d * mu_d, e_rd - mu_r * mu_d[None]


def vif_sum(f: jax.Array, a: jax.Array, b: jax.Array, convention: str) -> jax.Array:
    """vifp(A, F) + vifp(B, F), multi-scale pixel-domain VIF (float64, 0..255 scale)."""
    refs = jnp.stack([a, b]).astype(jnp.float64)  # (2, H, W)
    dist = f.astype(jnp.float64)  # (H, W)
    num = jnp.zeros((2,), jnp.float64)
    den = jnp.zeros((2,), jnp.float64)
    eps = _VIF_EPS
    for scale, n in enumerate(_VIF_WINDOWS, start=1):
        taps = gaussian_taps(n, n / 5.0, convention)
        pad = n // 2 if convention == "ivif_zoo" else 0  # zero-padded 'same' vs 'valid'
        if scale > 1:
            smoothed = filter_maps(jnp.concatenate([refs, dist[None]]), taps, pad)[:, ::2, ::2]
            refs, dist = smoothed[:2], smoothed[2]
        mu1, mu2, sigma1_sq, sigma2_sq, sigma12 = _local_moments(refs, dist, taps, pad)
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
        info = (g * g * sigma1_sq / (sv_sq + _VIF_SIGMA_NSQ)).astype(jnp.float32)
        prior = (sigma1_sq / _VIF_SIGMA_NSQ).astype(jnp.float32)
        num = num + jnp.sum(jnp.log1p(info), axis=(1, 2), dtype=jnp.float64) / math.log(10.0)
        den = den + jnp.sum(jnp.log1p(prior), axis=(1, 2), dtype=jnp.float64) / math.log(10.0)
    vif = num / den  # (2,)
    if convention == "cddfuse":
        vif = jnp.where(jnp.isnan(vif), 1.0, vif)
    return jnp.sum(vif)


_SSIM_GAUSS_TAPS = gaussian_taps(11, 1.5, "cddfuse")  # exp(-(k-5)^2 / 4.5), normalised
_SSIM_BOX_TAPS = np.full((7,), 1.0 / 7.0)
_SSIM_MIN_SIDE = {"ivif_zoo": 11, "cddfuse": 7}


def _ssim_constants(convention: str, precision: str) -> tuple[float, float, float, float]:
    """(input scale, C1, C2, covariance normalisation) for a convention and precision."""
    if convention == "ivif_zoo":
        if precision == "float32":
            # As shipped: to_tensor() leaves float32 images undivided, then * 255 -> 0..65025,
            # with data_range 255.
            return 255.0, (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2, 1.0
        return 1.0, 0.01**2, 0.03**2, 1.0
    return 1.0, (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2, 49.0 / 48.0  # skimage 0.19: L = 2


def ssim_multi(
    refs: Sequence[jax.Array], x: jax.Array, convention: str, precision: str = "float64"
) -> jax.Array:
    """SSIM(ref_k, x) for each reference -> (K,); `precision` is 'float64' or 'float32'."""
    dtype = jnp.float64 if precision == "float64" else jnp.float32
    scale, c1, c2, cov_norm = _ssim_constants(convention, precision)
    taps = _SSIM_GAUSS_TAPS if convention == "ivif_zoo" else _SSIM_BOX_TAPS
    refs = jnp.stack(refs).astype(dtype) * scale  # (K, H, W)
    x = x.astype(dtype) * scale
    mu_r, mu_x, var_r, var_x, cov = _local_moments(refs, x, taps)
    num = (2.0 * mu_r * mu_x + c1) * (2.0 * cov_norm * cov + c2)
    den = (mu_r * mu_r + mu_x * mu_x + c1) * (cov_norm * (var_r + var_x) + c2)
    return jnp.mean(num / den, axis=(1, 2))


def qabf(f: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """Qabf (Xydeas & Petrovic, L = 1), with the reference's G = gF rule when gA == gF."""
    f, a, b = (x.astype(jnp.float32) for x in (f, a, b))

    def strength_angle(x):
        sx, sy = _sobel(x)
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


# --------------------------------------------------------------------------------------------
# Batched, jitted entry point
# --------------------------------------------------------------------------------------------


def _metric_fn(
    name: str, convention: str, ssim_precision: str
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """The per-image function (f, a, b) -> scalar for one metric."""
    table: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
        "EN": lambda f, a, b: entropy(f, convention),
        "SD": lambda f, a, b: standard_deviation(f),
        "SF": lambda f, a, b: spatial_frequency(f),
        "AG": lambda f, a, b: average_gradient(f),
        "EI": lambda f, a, b: edge_intensity(f),
        "SCD": scd,
        "SSIM": lambda f, a, b: jnp.sum(ssim_multi([a, b], f, convention, ssim_precision)),
        "MI": lambda f, a, b: (
            mutual_information(f, a, convention) + mutual_information(f, b, convention)
        ),
        "VIF": lambda f, a, b: vif_sum(f, a, b, convention),
        "Qabf": qabf,
    }
    return table[name]


@functools.partial(jax.jit, static_argnames=("names", "convention", "ssim_precision", "sequential"))
def _compute_batch(
    fused: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    names: tuple[str, ...],
    convention: str,
    ssim_precision: str,
    sequential: bool,
) -> dict[str, jax.Array]:
    """uint8 (B, H, W) triplets -> {name: (B,)}.

    `sequential` loops over the batch with `lax.map` (CPU: the working set of one image stays
    in cache, about 2x faster per image than `vmap`); otherwise the batch is vmapped.
    """

    def one(triplet):
        f, x, y = triplet
        return {name: _metric_fn(name, convention, ssim_precision)(f, x, y) for name in names}

    if sequential:
        return jax.lax.map(one, (fused, a, b))
    return jax.vmap(lambda f, x, y: one((f, x, y)))(fused, a, b)


def to_uint8_gray(x: np.ndarray | jax.Array, what: str = "image") -> np.ndarray:
    """Round and clip a 0..255 gray image or batch to uint8 (H, W) / (B, H, W)."""
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise MetricInputError(f"{what}: expected a uint8 or float 0..255 array, got {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise MetricInputError(f"{what}: contains NaN or Inf")
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def compute(
    fused: np.ndarray | jax.Array,
    a: np.ndarray | jax.Array,
    b: np.ndarray | jax.Array,
    names: Sequence[str] | None = None,
    convention: str = "ivif_zoo",
    ssim_precision: str = "float64",
) -> dict[str, float | np.ndarray]:
    """Fusion metrics of `fused` against sources `a` (infrared) and `b` (visible).

    Args:
      fused, a, b: gray images on the 0..255 scale, uint8 or float, (H, W) or (B, H, W), all of
        one shape. Floats are rounded and clipped to uint8 first, as the references evaluate
        8-bit files.
      names: metrics to compute (default: all of `METRIC_NAMES`).
      convention: "ivif_zoo" (default) or "cddfuse"; see the module docstring.
      ssim_precision: "float64" (default) or "float32" (the as-shipped float32 arithmetic).

    Returns:
      {name: float} for (H, W) inputs, {name: np.ndarray (B,)} float64 for batches.
    """
    if convention not in CONVENTIONS:
        raise MetricInputError(f"convention={convention!r}: expected one of {CONVENTIONS}")
    if ssim_precision not in ("float64", "float32"):
        raise MetricInputError(f"ssim_precision={ssim_precision!r}: expected float64 or float32")
    names = tuple(METRIC_NAMES if names is None else names)
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise MetricInputError(f"unknown metric(s) {unknown}: expected some of {METRIC_NAMES}")
    f8, a8, b8 = (to_uint8_gray(x, w) for x, w in ((fused, "fused"), (a, "a"), (b, "b")))
    if not (f8.shape == a8.shape == b8.shape):
        raise MetricInputError(
            f"shape mismatch: fused {f8.shape}, a {a8.shape}, b {b8.shape} (expected equal)"
        )
    if f8.ndim not in (2, 3):
        raise MetricInputError(f"expected gray (H, W) or (B, H, W) images, got shape {f8.shape}")
    single = f8.ndim == 2
    if single:
        f8, a8, b8 = f8[None], a8[None], b8[None]
    h, w = f8.shape[1:]
    min_side = _SSIM_MIN_SIDE[convention] if "SSIM" in names else 2
    if min(h, w) < min_side:
        raise MetricInputError(
            f"images of size {h}x{w} are too small: {names} need both sides >= {min_side}"
        )
    with jax.enable_x64(True):
        out = _compute_batch(
            jnp.asarray(f8),
            jnp.asarray(a8),
            jnp.asarray(b8),
            names=names,
            convention=convention,
            ssim_precision=ssim_precision,
            sequential=jax.default_backend() == "cpu",
        )
        values = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    if single:
        return {k: float(v[0]) for k, v in values.items()}
    return values


# --------------------------------------------------------------------------------------------
# Differentiable float versions (objectives for probing / training)
# --------------------------------------------------------------------------------------------


def _as_batch_0_255(x: jax.Array, data_range: float) -> tuple[jax.Array, bool]:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    single = x.ndim == 2
    if single:
        x = x[None]
    return x * (255.0 / data_range), single


def _batched(fn: Callable[..., jax.Array], *images: jax.Array, data_range: float) -> jax.Array:
    scaled = [_as_batch_0_255(x, data_range) for x in images]
    out = jax.vmap(fn)(*[s[0] for s in scaled])
    return out[0] if scaled[0][1] else out


def differentiable_ei(x: jax.Array, data_range: float = 1.0) -> jax.Array:
    """EI on the 0..255 scale of a float image (H, W), (B, H, W) or (B, H, W, 1) -> () or (B,).

    `data_range` is the value of white in `x` (1.0 for [0, 1] images, 255.0 for 0..255).
    """
    return _batched(edge_intensity, x, data_range=data_range)


def differentiable_ag(x: jax.Array, data_range: float = 1.0) -> jax.Array:
    """AG on the 0..255 scale of a float image; shapes as `differentiable_ei`."""
    return _batched(average_gradient, x, data_range=data_range)


def differentiable_sf(x: jax.Array, data_range: float = 1.0) -> jax.Array:
    """SF on the 0..255 scale of a float image; shapes as `differentiable_ei`."""
    return _batched(spatial_frequency, x, data_range=data_range)


def differentiable_ssim(
    fused: jax.Array,
    a: jax.Array,
    b: jax.Array,
    data_range: float = 1.0,
    convention: str = "ivif_zoo",
) -> jax.Array:
    """SSIM(A, F) + SSIM(B, F) on the 0..255 scale of float images, float32, differentiable.

    Same definition as `compute`'s SSIM (float64 path) for the convention; the local moments
    are taken about the fused image's mean, which leaves the value unchanged and keeps float32
    cancellation small. Shapes as `differentiable_ei`.
    """
    _, c1, c2, cov_norm = _ssim_constants(convention, "float64")
    taps = _SSIM_GAUSS_TAPS if convention == "ivif_zoo" else _SSIM_BOX_TAPS

    def pair_sum(f, x, y):  # (H, W) each
        c = jnp.mean(f)
        mu_r, mu_f, var_r, var_f, cov = _local_moments(jnp.stack([x, y]) - c, f - c, taps)
        mu_r, mu_f = mu_r + c, mu_f + c
        num = (2.0 * mu_r * mu_f + c1) * (2.0 * cov_norm * cov + c2)
        den = (mu_r * mu_r + mu_f * mu_f + c1) * (cov_norm * (var_r + var_f) + c2)
        return jnp.sum(jnp.mean(num / den, axis=(1, 2)))

    return _batched(pair_sum, fused, a, b, data_range=data_range)


def differentiable(
    fused: jax.Array, a: jax.Array, b: jax.Array, data_range: float = 1.0
) -> dict[str, jax.Array]:
    """{'EI', 'SF', 'AG', 'SSIM'} of float images (ivif_zoo definitions), differentiable."""
    return {
        "EI": differentiable_ei(fused, data_range),
        "SF": differentiable_sf(fused, data_range),
        "AG": differentiable_ag(fused, data_range),
        "SSIM": differentiable_ssim(fused, a, b, data_range),
    }


@functools.partial(jax.jit, static_argnames=("data_range",))
def _wang_ssim(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_r, mu_x, var_r, var_x, cov = _local_moments(x[None], y, _SSIM_GAUSS_TAPS)
    num = (2.0 * mu_r * mu_x + c1) * (2.0 * cov + c2)
    den = (mu_r * mu_r + mu_x * mu_x + c1) * (var_r + var_x + c2)
    return jnp.mean(num / den)


def ssim(x: np.ndarray | jax.Array, y: np.ndarray | jax.Array, data_range: float = 255.0) -> float:
    """Standard SSIM (Wang et al.: Gaussian 11 / 1.5, 'valid', K = 0.01, 0.03) of two (H, W)
    images with white at `data_range`, in float64. Used for reconstruction quality, not fusion.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 2 or min(x.shape) < 11:
        raise MetricInputError(
            f"ssim: expected two equal (H, W) images >= 11 px, got {x.shape}, {y.shape}"
        )
    with jax.enable_x64(True):
        return float(_wang_ssim(jnp.asarray(x), jnp.asarray(y), float(data_range)))
