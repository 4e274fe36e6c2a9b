"""Array building blocks of the metrics: filters, gradients, histograms, MATLAB arithmetic.

Everything here works on one image (H, W) (or a stack of maps (M, H, W)) and knows nothing
about any metric or convention.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# MATLAB rgb2gray: the first row of inv([1 0.956 0.621; 1 -0.272 -0.647; 1 -1.106 1.703])
# (documented as 0.2989 R + 0.5870 G + 0.1140 B). Octave's rgb2gray rounds these to 6 digits.
MATLAB_GRAY_COEFFS: tuple[float, float, float] = tuple(
    float(c)
    for c in np.linalg.inv(
        np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.106, 1.703]])
    )[0]
)


def acc_dtype() -> Any:
    """Accumulator dtype: float64 when 64-bit types are on (always inside `metrics.compute`)."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def mean(x: jax.Array) -> jax.Array:
    """Mean with a float64 accumulator when available (exact for integer-valued float32 terms)."""
    return jnp.sum(x, dtype=acc_dtype()) / x.size


def safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt with a zero (not NaN) gradient at 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def matlab_round(x: jax.Array) -> jax.Array:
    """MATLAB `round` (and integer conversion): halves away from zero, exact for |x| < 2^52."""
    mag = jnp.abs(x)
    low = jnp.floor(mag)
    return jnp.sign(x) * (low + (mag - low >= 0.5))


def divide_exact(x: jax.Array, divisor: jax.Array) -> jax.Array:
    """x / divisor, elementwise IEEE division by a scalar.

    XLA rewrites a division by a broadcast scalar into a multiplication by its reciprocal,
    which is off by one ulp for some elements; where the quotient is rounded next (the min-max
    stretches of the MATLAB metrics, with exact halves such as 36 / 216 * 255 = 42.5), that
    ulp moves a grey level. Spreading the divisor over the array keeps the true division.
    """
    return x / (divisor + jnp.zeros_like(x) * x)


def rgb2gray_matlab(rgb: jax.Array, to_uint8: bool) -> jax.Array:
    """MATLAB `rgb2gray` of an (H, W, 3) image on the 0..255 scale -> (H, W) float64.

    `to_uint8` reproduces it on a uint8 image (rounded and saturated to 0..255); otherwise it is
    the double-input version (no rounding).
    """
    rgb = rgb.astype(jnp.float64)
    c0, c1, c2 = MATLAB_GRAY_COEFFS
    gray = rgb[..., 0] * c0 + rgb[..., 1] * c1 + rgb[..., 2] * c2
    return jnp.clip(matlab_round(gray), 0.0, 255.0) if to_uint8 else gray


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------


def _correlate_valid_1d(x: jax.Array, taps: np.ndarray, axis: int) -> jax.Array:
    """'valid' cross-correlation along one axis: out[i] = sum_k taps[k] x[i + k]."""
    n = x.shape[axis]
    out_len = max(n - len(taps) + 1, 0)
    acc = None
    for k, w in enumerate(taps):
        term = w * jax.lax.slice_in_dim(x, k, k + out_len, axis=axis)
        acc = term if acc is None else acc + term
    return acc


def _separable_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """'valid' 2-D filtering with the outer product taps x taps: (H, W) -> (H-N+1, W-N+1)."""
    taps = np.asarray(taps, x.dtype)  # float32 taps stay float32 in float32 arithmetic
    return _correlate_valid_1d(_correlate_valid_1d(x, taps, 0), taps, 1)


def filter_maps(maps: jax.Array, taps: np.ndarray, pad: int = 0, mode: str = "zero") -> jax.Array:
    """Separable 2-D cross-correlation of a stack of maps with the outer product taps x taps.

    maps (M, H, W) -> (M, H + 2 pad - N + 1, W + 2 pad - N + 1); padding by `pad` pixels on
    every side, with zeros (`mode="zero"`: 0 = 'valid', N // 2 = zero-padded 'same') or copies
    of the border (`mode="edge"`: MATLAB's 'replicate'). float64 goes through
    `lax.conv_general_dilated` (fast on XLA:CPU); other dtypes through shifted slices (XLA:CPU's
    single-channel float32 convolution is slow). Maps smaller than the window give empty output.
    """
    n = len(taps)
    if pad:
        maps = jnp.pad(
            maps, ((0, 0), (pad, pad), (pad, pad)), mode="edge" if mode == "edge" else "constant"
        )
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


def sobel(x: jax.Array, border: str = "zero") -> tuple[jax.Array, jax.Array]:
    """3x3 Sobel cross-correlations (Sx, Sy) of (H, W), each (H, W).

    Sx with [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], Sy with [[1, 2, 1], [0, 0, 0], [-1, -2, -1]],
    the pair Qabf's references use (the relative sign matters to atan(Sy / Sx)). `border`:
    "zero" (zero padding, conv2 / filter2 'same') or "edge" (imfilter 'replicate').
    """
    h, w = x.shape
    p = jnp.pad(x, 1, mode="edge" if border == "edge" else "constant")
    col_diff = p[:, 2:] - p[:, :w]  # (H+2, W)
    sx = col_diff[0:h] + 2.0 * col_diff[1 : h + 1] + col_diff[2 : h + 2]
    row_diff = p[:h, :] - p[2:, :]  # (H, W+2)
    sy = row_diff[:, 0:w] + 2.0 * row_diff[:, 1 : w + 1] + row_diff[:, 2 : w + 2]
    return sx, sy


def np_gradient(x: jax.Array, axis: int) -> jax.Array:
    """`numpy.gradient` / MATLAB `gradient` with unit spacing: central inside, one-sided ends."""
    n = x.shape[axis]
    sl = functools.partial(jax.lax.slice_in_dim, x, axis=axis)
    first = sl(1, 2) - sl(0, 1)
    last = sl(n - 1, n) - sl(n - 2, n - 1)
    inner = (sl(2, n) - sl(0, n - 2)) * 0.5
    return jnp.concatenate([first, inner, last], axis=axis)


def freqspace_radius(shape: tuple[int, int], scale_x: float, scale_y: float) -> np.ndarray:
    """sqrt(u^2 + v^2) on MATLAB's `freqspace(shape, 'meshgrid')` grid, u and v scaled, (H, W).

    freqspace samples ((0:n-1) - floor(n/2)) * 2/n along each axis (u along the columns, v
    along the rows), the layout of an `fftshift`-ed spectrum.
    """
    h, w = shape
    u = (np.arange(w) - w // 2) * (2.0 / w) * scale_x
    v = (np.arange(h) - h // 2) * (2.0 / h) * scale_y
    uu, vv = np.meshgrid(u, v)
    return np.sqrt(uu * uu + vv * vv)


def fft_filter(x: jax.Array, response: np.ndarray) -> jax.Array:
    """ifft2(ifftshift(fftshift(fft2(x)) .* response)) of a real (..., H, W) stack, real part.

    `response` (H, W) is laid out like an fftshift-ed spectrum. For the even responses of the
    references (functions of |frequency| on freqspace's grid) the result is real in exact
    arithmetic, and MATLAB returns it as real.
    """
    h, w = x.shape[-2:]
    r = np.fft.ifftshift(np.asarray(response, np.float64))[:, : w // 2 + 1]  # rfft layout
    spectrum = jnp.fft.rfft2(x.astype(jnp.float64)) * jnp.asarray(r)
    return jnp.fft.irfft2(spectrum, s=(h, w))


def block_sums(x: jax.Array, block: int) -> jax.Array:
    """Sums over `block` x `block` tiles of (H, W), zero-padded on the right and bottom to whole
    tiles (MATLAB `blkproc`) -> (ceil(H / block), ceil(W / block))."""
    h, w = x.shape
    nh, nw = -(-h // block), -(-w // block)
    x = jnp.pad(x, ((0, nh * block - h), (0, nw * block - w)))
    return jnp.sum(x.reshape(nh, block, nw, block), axis=(1, 3))


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def pearson(x: jax.Array, y: jax.Array) -> jax.Array:
    """Pearson correlation over all pixels (MATLAB corr2); NaN when either image is constant.

    Raw sums in the accumulator dtype: exact for integer-valued images (every product is an
    exact float32 integer and the float64 sums stay far below 2^53).
    """
    acc = acc_dtype()
    n = x.size
    sx, sy = jnp.sum(x, dtype=acc), jnp.sum(y, dtype=acc)
    sxx, syy = jnp.sum(x * x, dtype=acc), jnp.sum(y * y, dtype=acc)
    sxy = jnp.sum(x * y, dtype=acc)
    cov = sxy - sx * sy / n
    return cov / jnp.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))


def histogram256(x: jax.Array) -> jax.Array:
    """Counts of the integer grey levels 0..255 of an integer-valued image -> (256,) int32."""
    return jnp.bincount(x.astype(jnp.int32).reshape(-1), length=256)


def joint_histogram256(x: jax.Array, y: jax.Array) -> jax.Array:
    """256 x 256 joint counts of two integer-valued images: [i, j] counts (x = i, y = j)."""
    idx = x.astype(jnp.int32).reshape(-1) * 256 + y.astype(jnp.int32).reshape(-1)
    return jnp.bincount(idx, length=256 * 256).reshape(256, 256)


def entropy_of_counts(counts: jax.Array, log: Any = jnp.log2) -> jax.Array:
    """-sum p log p of a histogram (any shape), zero bins dropped, float64."""
    p = counts.astype(jnp.float64) / jnp.sum(counts, dtype=jnp.float64)
    return -jnp.sum(jnp.where(p > 0, p * log(jnp.where(p > 0, p, 1.0)), 0.0))
