"""BT.601 full-range colour conversion between RGB and YCbCr, for floats in [0, 1].

Fusion works on the luma channel Y; the chroma channels Cb and Cr of the colour source (the
visible image, or a pseudo-colour PET/SPECT image) are kept and put back after fusion. The
conversion is the JPEG/JFIF form of BT.601 (no head-room offsets):

    Y  = 0.299 R + 0.587 G + 0.114 B            (the luma CDDFuse and OpenCV's GRAY use)
    Cb = 0.5 + (B - Y) / (2 (1 - 0.114))
    Cr = 0.5 + (R - Y) / (2 (1 - 0.299))

`ycbcr_to_rgb` is its exact algebraic inverse. Both functions accept NumPy or JAX arrays with
the channel axis last and return the same array type, so they run inside `jax.jit` as well as in
the NumPy data pipeline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KR, KG, KB = 0.299, 0.587, 0.114  # BT.601 luma weights
_CB_SCALE = 0.5 / (1.0 - KB)  # 0.5643...
_CR_SCALE = 0.5 / (1.0 - KR)  # 0.7132...

Array = Any  # np.ndarray or jax.Array


def _xp(x: Array) -> Any:
    """The array module (numpy or jax.numpy) that owns `x`."""
    if isinstance(x, np.ndarray | np.generic):
        return np
    import jax.numpy as jnp  # deferred: the data workers never need jax

    return jnp


def rgb_to_y(rgb: Array) -> Array:
    """Luma of an RGB image: (..., 3) -> (..., 1), same float dtype."""
    y = KR * rgb[..., 0:1] + KG * rgb[..., 1:2] + KB * rgb[..., 2:3]
    return y.astype(rgb.dtype)


def rgb_to_ycbcr(rgb: Array) -> Array:
    """RGB in [0, 1] -> YCbCr in [0, 1] (BT.601 full range): (..., 3) -> (..., 3)."""
    xp = _xp(rgb)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = KR * r + KG * g + KB * b
    cb = 0.5 + _CB_SCALE * (b - y)
    cr = 0.5 + _CR_SCALE * (r - y)
    return xp.stack([y, cb, cr], axis=-1).astype(rgb.dtype)


def ycbcr_to_rgb(ycbcr: Array, clip: bool = True) -> Array:
    """YCbCr in [0, 1] -> RGB: (..., 3) -> (..., 3), the exact inverse of `rgb_to_ycbcr`.

    With `clip` (the default) the result is clipped to [0, 1]: a fused Y combined with the
    chroma of another image can leave the RGB gamut.
    """
    xp = _xp(ycbcr)
    y = ycbcr[..., 0]
    cb = ycbcr[..., 1] - 0.5
    cr = ycbcr[..., 2] - 0.5
    r = y + cr / _CR_SCALE
    b = y + cb / _CB_SCALE
    g = (y - KR * r - KB * b) / KG
    rgb = xp.stack([r, g, b], axis=-1).astype(ycbcr.dtype)
    return xp.clip(rgb, 0.0, 1.0) if clip else rgb


def merge_y_cbcr(y: Array, cbcr: Array) -> Array:
    """Puts chroma back on a (fused) luma: Y (..., 1) and CbCr (..., 2) -> RGB (..., 3)."""
    xp = _xp(y)
    return ycbcr_to_rgb(xp.concatenate([y, cbcr.astype(y.dtype)], axis=-1))


def is_gray(rgb: np.ndarray, tol: float = 0.0) -> bool:
    """Whether an (H, W, 3) image has identical channels (gray stored as RGB), up to `tol`."""
    return bool(
        np.abs(rgb[..., 0] - rgb[..., 1]).max() <= tol
        and np.abs(rgb[..., 0] - rgb[..., 2]).max() <= tol
    )


def gray_u8_opencv(rgb255: np.ndarray) -> np.ndarray:
    """8-bit gray the way CDDFuse's test scripts read images: (H, W, 3) RGB floats in 0..255 ->
    (H, W) uint8 = round(0.299 R + 0.587 G + 0.114 B) computed in float32 (OpenCV's BGR2GRAY on
    a float32 image, then ``np.round``)."""
    rgb = np.asarray(rgb255, np.float32)
    y = rgb[..., 0] * np.float32(KR) + rgb[..., 1] * np.float32(KG)
    y = y + rgb[..., 2] * np.float32(KB)
    return np.clip(np.round(y), 0, 255).astype(np.uint8)
