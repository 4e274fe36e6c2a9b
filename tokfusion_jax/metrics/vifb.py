"""The ``vifb`` convention: xingchenzhang/VIFB ``metrics/metrics*.m`` (MATLAB, double).

Images are scored as stored (uint8, gray (H, W) or colour (H, W, 3)); here every image arrives
as (H, W, C) with C = 1 or 3, A = infrared, B = visible, F = fused.

Colour. For a colour F each metric is computed per channel k against (B_k, A_k), or against
the single A channel when A is gray, and the three values are averaged; VIFB's code stops with
an error when B is gray (it indexes B(:, :, k)), and so do Qcb and Qcv for a gray F with
colour sources: such values are NaN (VIFB writes no value). For a gray F, colour sources go
through MATLAB ``rgb2gray``: rounded to uint8 in MI, SSIM and CE, unrounded in Qabf, PSNR and
RMSE. SF has no channel loop: MATLAB's two-subscript indexing reads H x W x 3 as the H x 3W
image [R | G | B] (seam columns included), both sums divided by H * 3W. AG and EI filter the
channels of F and average them.

* EN, SD: exact entropy and population SD. SF: sqrt((sum dx^2 + sum dy^2) / (H W)).
* AG: MATLAB ``gradient``, sqrt((gx^2 + gy^2) / 2) summed and divided by (H - 1)(W - 1).
* EI: Sobel [1 2 1; 0 0 0; -1 -2 -1] and its transpose, replicate border, mean magnitude.
* MI: each image min-max stretched to 0..255 and rounded, natural log; MI(B, F) + MI(A, F).
* SSIM: Gaussian 11 / 1.5, 'valid', population moments, L = 255; SSIM(B, F) + SSIM(A, F).
* Qabf: as ``shared``. CE: (KL(B || F) + KL(A || F)) / 2 of the 256-bin histograms in bits,
  bins where either is empty skipped.
* "mse" = sqrt(sum (X - F)^2) / (H W) (not a mean square); RMSE = the mean of the two,
  PSNR = 20 log10(255 / sqrt(that mean)).
* Qcb (Chen-Blum) and Qcv (Chen-Varshney): the images min-max stretched to 0..255 and rounded,
  contrast-sensitivity filtering in the frequency domain on MATLAB's ``freqspace`` grid;
  Qcb's local contrast from 31 x 31 Gaussians (sigma 2 and 4, zero-padded 'same'); Qcv's
  region saliency and distortion over 16 x 16 ``blkproc`` tiles (zero-padded partial tiles,
  distortion = the mean over all 256 tile pixels). Qcv is a distortion: lower is better.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax.metrics import ops, shared

SSIM_TAPS = shared.fspecial_gaussian_taps(11, 1.5)
SSIM_C1, SSIM_C2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
PairFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (f, a, b), each (H, W)


# --------------------------------------------------------------------------------------------
# Colour handling
# --------------------------------------------------------------------------------------------


def _per_channel(fn: PairFn, gray_sources: str | None) -> PairFn:
    """VIFB's channel loop around a gray metric fn(f, a, b) -> (H, W, C) triplets -> scalar.

    `gray_sources`: how a gray F sees colour sources: "round" (rgb2gray of uint8), "exact"
    (rgb2gray of double) or None (VIFB's code fails: NaN).
    """

    def loop(f: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        cf, ca, cb = f.shape[-1], a.shape[-1], b.shape[-1]
        if cf == 1:
            if (ca == 3 or cb == 3) and gray_sources is None:
                return jnp.float64(jnp.nan)
            a2, b2 = (
                ops.rgb2gray_matlab(x, gray_sources == "round") if x.shape[-1] == 3 else x[..., 0]
                for x in (a, b)
            )
            return fn(f[..., 0].astype(jnp.float64), a2.astype(jnp.float64), b2.astype(jnp.float64))
        if cb != 3:
            return jnp.float64(jnp.nan)
        values = [fn(f[..., k], a[..., k] if ca == 3 else a[..., 0], b[..., k]) for k in range(cf)]
        return jnp.mean(jnp.stack([jnp.asarray(v, jnp.float64) for v in values]))

    return loop


def _channel_mean(fn: Callable[[jax.Array], jax.Array]) -> PairFn:
    """A metric of F alone, averaged over F's channels (AG, EI: no source indexing)."""

    def mean_fn(f, a, b):
        del a, b
        return jnp.mean(jnp.stack([fn(f[..., k]) for k in range(f.shape[-1])]))

    return mean_fn


# --------------------------------------------------------------------------------------------
# Metrics on one channel (H, W), float64 0..255
# --------------------------------------------------------------------------------------------


def spatial_frequency(f: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """SF of F read as one H x (C W) image [F_1 | ... | F_C], both sums divided by its size."""
    del a, b
    wide = jnp.concatenate([f[..., k] for k in range(f.shape[-1])], axis=1).astype(jnp.float64)
    dx = jnp.sum(jnp.square(wide[:, 1:] - wide[:, :-1]))
    dy = jnp.sum(jnp.square(wide[1:, :] - wide[:-1, :]))
    return jnp.sqrt((dx + dy) / wide.size)


def _stretch_round(x: jax.Array) -> jax.Array:
    """min-max to 0..1 (constant -> 0), then int16(x * 255): rounded 0..255."""
    lo, hi = jnp.min(x), jnp.max(x)
    span = hi - lo
    unit = jnp.where(span != 0, ops.divide_exact(x - lo, jnp.where(span != 0, span, 1.0)), 0.0)
    return ops.matlab_round(unit * 255.0)


def _mutinf(x: jax.Array, f: jax.Array) -> jax.Array:
    """mutinf(X, F): H(X) + H(F) - H(X, F) of the stretched images, nats."""
    xs, fs = _stretch_round(x), _stretch_round(f)
    joint = ops.joint_histogram256(xs, fs)
    hx = ops.entropy_of_counts(ops.histogram256(xs), jnp.log)
    hf = ops.entropy_of_counts(ops.histogram256(fs), jnp.log)
    return hx + hf - ops.entropy_of_counts(joint, jnp.log)


def mutual_information(f, a, b):
    """MI(B, F) + MI(A, F), nats, stretched images."""
    return _mutinf(b, f) + _mutinf(a, f)


def ssim(f, a, b):
    """SSIM(B, F) + SSIM(A, F): Wang et al., L = 255, Gaussian 11 / 1.5, 'valid'."""
    maps = shared.ssim_maps(jnp.stack([b, a]), f, SSIM_TAPS, SSIM_C1, SSIM_C2)
    return jnp.sum(jnp.mean(maps, axis=(1, 2)))


def _vifb_mse(x: jax.Array, f: jax.Array) -> jax.Array:
    """VIFB's "mse": sqrt(sum (X - F)^2) / (H W)."""
    return jnp.sqrt(jnp.sum(jnp.square(x - f))) / f.size


def rmse(f, a, b):
    """(mse(B, F) + mse(A, F)) / 2 with VIFB's mse."""
    return 0.5 * (_vifb_mse(b, f) + _vifb_mse(a, f))


def psnr(f, a, b):
    """20 log10(255 / sqrt(RMSE))."""
    return 20.0 * jnp.log10(255.0 / jnp.sqrt(rmse(f, a, b)))


def _kl_bits(x: jax.Array, f: jax.Array) -> jax.Array:
    """sum p_x log2(p_x / p_f) over the grey levels where both histograms are non-zero."""
    px = ops.histogram256(x).astype(jnp.float64) / x.size
    pf = ops.histogram256(f).astype(jnp.float64) / x.size
    both = (px != 0) & (pf != 0)
    ratio = jnp.where(both, px / jnp.where(both, pf, 1.0), 1.0)
    return jnp.sum(jnp.where(both, px * jnp.log2(ratio), 0.0))


def cross_entropy(f, a, b):
    """(KL(B || F) + KL(A || F)) / 2, bits."""
    return 0.5 * (_kl_bits(b, f) + _kl_bits(a, f))


def _normalize255(x: jax.Array) -> jax.Array:
    """Z. Liu's normalize1: round((x - min) / (max - min) * 255); all-zero stays; NaN if flat."""
    lo, hi = jnp.min(x), jnp.max(x)
    stretched = ops.matlab_round(ops.divide_exact(x - lo, hi - lo) * 255.0)
    return jnp.where((hi == 0) & (lo == 0), x, stretched)


def _gaussian31(sigma: float) -> tuple[np.ndarray, float]:
    """Separable taps of exp(-(x^2 + y^2) / (2 sigma^2)) on -15..15 and the 1 / (2 pi sigma^2)."""
    t = np.arange(-15, 16, dtype=np.float64)
    return np.exp(-(t * t) / (2.0 * sigma * sigma)), 1.0 / (2.0 * math.pi * sigma * sigma)


_QCB_G1, _QCB_G2 = _gaussian31(2.0), _gaussian31(4.0)


def _qcb_csf(shape: tuple[int, int]) -> np.ndarray:
    """Qcb's DoG contrast sensitivity on the freqspace grid scaled by (W / 30, H / 30)."""
    h, w = shape
    r = ops.freqspace_radius(shape, w / 30.0, h / 30.0)
    return np.exp(-((r / 15.3870) ** 2)) - 0.7622 * np.exp(-((r / 1.3456) ** 2))


def qcb(f, a, b):
    """Chen-Blum: contrast preservation weighted by saliency, the mean of the quality map."""
    images = jnp.stack([_normalize255(x) for x in (b, a, f)])  # (3, H, W): im1, im2, fused
    filtered = ops.fft_filter(images, _qcb_csf(f.shape))
    (t1, s1), (t2, s2) = _QCB_G1, _QCB_G2
    fine = ops.filter_maps(filtered, t1, pad=15) * s1
    coarse = ops.filter_maps(filtered, t2, pad=15) * s2
    c = jnp.abs(fine / coarse - 1.0)
    cp = c**3 / (c**2 + 1e-4)  # (3, H, W)
    c1p, c2p, cfp = cp[0], cp[1], cp[2]

    def preservation(cxp):
        mask = (cxp < cfp).astype(jnp.float64)
        return (cxp / cfp) * mask + (cfp / cxp) * (1.0 - mask)

    total = c1p * c1p + c2p * c2p
    q = (c1p * c1p / total) * preservation(c1p) + (c2p * c2p / total) * preservation(c2p)
    return jnp.mean(q)


def _qcv_csf(shape: tuple[int, int]) -> np.ndarray:
    """Mannos-Sakrison CSF on the freqspace grid scaled by (W / 8, H / 8)."""
    h, w = shape
    r = ops.freqspace_radius(shape, w / 8.0, h / 8.0)
    return 2.6 * (0.0192 + 0.144 * r) * np.exp(-((0.144 * r) ** 1.1))


def qcv(f, a, b):
    """Chen-Varshney: saliency-weighted CSF-filtered squared differences over 16 x 16 tiles."""
    im1, im2, fused = (_normalize255(x) for x in (b, a, f))

    def saliency(x):
        sx, sy = ops.sobel(x)
        return ops.block_sums(jnp.sqrt(sx * sx + sy * sy) ** 5, 16)

    diffs = ops.fft_filter(jnp.stack([im1 - fused, im2 - fused]), _qcv_csf(f.shape))
    d1, d2 = (ops.block_sums(jnp.square(d), 16) / 256.0 for d in diffs)
    r1, r2 = saliency(im1), saliency(im2)
    return jnp.sum(r1 * d1 + r2 * d2) / jnp.sum(r1 + r2)


def metric_fns(ssim_precision: str = "float64") -> dict:
    """{name: (f, a, b) -> scalar} for (H, W, C) uint8 triplets (C = 1 or 3 per image)."""
    del ssim_precision  # the MATLAB code is double throughout
    fused_only = lambda fn: lambda f, a, b: fn(f)  # noqa: E731
    f64 = lambda x: x.astype(jnp.float64)  # noqa: E731
    return {
        "EN": _per_channel(fused_only(shared.entropy), "exact"),
        "SD": _per_channel(fused_only(lambda f: shared.standard_deviation(f)), "exact"),
        "SF": spatial_frequency,
        "AG": _channel_mean(shared.average_gradient_matlab),
        "EI": _channel_mean(lambda f: shared.edge_intensity(f, border="edge")),
        "MI": _per_channel(mutual_information, "round"),
        "SSIM": _per_channel(lambda f, a, b: ssim(f64(f), f64(a), f64(b)), "round"),
        "Qabf": _per_channel(shared.qabf, "exact"),
        "PSNR": _per_channel(lambda f, a, b: psnr(f64(f), f64(a), f64(b)), "exact"),
        "RMSE": _per_channel(lambda f, a, b: rmse(f64(f), f64(a), f64(b)), "exact"),
        "CE": _per_channel(cross_entropy, "round"),
        "Qcb": _per_channel(lambda f, a, b: qcb(f64(f), f64(a), f64(b)), None),
        "Qcv": _per_channel(lambda f, a, b: qcv(f64(f), f64(a), f64(b)), None),
    }


MIN_SIDE = {"SSIM": 11, "AG": 2}
