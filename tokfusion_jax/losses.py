"""Training losses of both stages (CDDFuse's recipe), computed in float32.

Images are NHWC (B, H, W, 1) in [0, 1]; features are NHWC (B, H, W, C). Every building block is
a public pure function:

* `cc`: correlation coefficient per (sample, channel), clamped to [-1, 1], averaged.
* `decomp_loss`: cc(D_vis, D_ir)^2 / (1.01 + cc(B_vis, B_ir)).
* `ssim_loss`: mean of clamp(1 - SSIM, 0, 1) / 2 with an 11x11 Gaussian window (sigma 1.5),
  reflect padding, C1 = 0.01^2, C2 = 0.03^2.
* `mse`, `l1`.
* `spatial_gradient`: normalised Sobel (kernel / 8), replicate padding; (B, H, W, C, 2).
* `sobel_gradient`: unnormalised Sobel magnitude |Kx * x| + |Ky * x| with zero padding.
* `fusion_loss`: L1(max(vis, ir), F) + 10 * L1(max(S(vis), S(ir)), S(F)).

`stage1_loss` and `stage2_loss` combine them with the weights of `loss_weights_config()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokfusion_jax.errors import ConfigError

Array = jax.Array

# float32 machine epsilon, the epsilon of CDDFuse's cc.
CC_EPS = float(np.finfo(np.float32).eps)
DECOMP_DELTA = 1.01
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def loss_weights_config() -> ml_collections.ConfigDict:
    """Returns the paper's loss weights (the ``config.loss`` section)."""
    w = ml_collections.ConfigDict()
    # Stage I: sum_m lambda_m (ssim_weight * SSIMloss + MSE) + lambda_d L_decomp + lambda_g L_grad.
    w.rec_vis = 1.0  # lambda_1: reconstruction of the visible image
    w.rec_ir = 1.0  # lambda_2: reconstruction of the infrared image
    w.decomp = 2.0  # lambda_d: decomposition loss (both stages)
    w.grad = 5.0  # lambda_g: L1 of normalised-Sobel gradients, visible image only
    # Stage II: lambda_f L_fusion + lambda_d L_decomp + lambda_r L_rec_fused.
    w.fusion = 1.0  # lambda_f
    # lambda_r: the paper lists 0.5 without defining the term. Our reading: the SSIM + MSE terms of
    # the fused image against both sources that CDDFuse computes in phase II but never adds,
    #   L_rec_fused = sum_{s in {vis, ir}} (ssim_weight * SSIMloss(s, F) + MSE(s, F)).
    # Set 0 for CDDFuse's own phase-II loss.
    w.rec = 0.5
    # alpha_ssim of Eq. 14 (CDDFuse hard-codes 5; alpha_mse is 1).
    w.ssim_weight = 5.0
    # alpha_g of Eq. 17 inside L_fusion (CDDFuse hard-codes 10; alpha_in is 1).
    w.fusion_grad_weight = 10.0
    return w


def _f32(x: Array) -> Array:
    return jnp.asarray(x, jnp.float32)


def cc(a: Array, b: Array) -> Array:
    """Correlation coefficient of a and b (B, H, W, C): per (sample, channel), clamped, averaged."""
    a = _f32(a)
    b = _f32(b)
    a = a - a.mean(axis=(1, 2), keepdims=True)
    b = b - b.mean(axis=(1, 2), keepdims=True)
    num = jnp.sum(a * b, axis=(1, 2))  # (B, C)
    den = CC_EPS + jnp.sqrt(jnp.sum(a * a, axis=(1, 2))) * jnp.sqrt(jnp.sum(b * b, axis=(1, 2)))
    return jnp.clip(num / den, -1.0, 1.0).mean()


def decomp_loss(base_vis: Array, base_ir: Array, detail_vis: Array, detail_ir: Array) -> Array:
    """L_decomp = cc(D_vis, D_ir)^2 / (1.01 + cc(B_vis, B_ir)) on encoder features."""
    return cc(detail_vis, detail_ir) ** 2 / (DECOMP_DELTA + cc(base_vis, base_ir))


def mse(a: Array, b: Array) -> Array:
    """Mean squared error over all elements."""
    return jnp.mean((_f32(a) - _f32(b)) ** 2)


def l1(a: Array, b: Array) -> Array:
    """Mean absolute error over all elements."""
    return jnp.mean(jnp.abs(_f32(a) - _f32(b)))


def _depthwise_filter(x: Array, kernel: Array, pad_mode: str) -> Array:
    """Cross-correlates every channel of x (B, H, W, C) with kernel (kh, kw), 'same' size."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    widths = ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0))
    if pad_mode == "zeros":
        xp = jnp.pad(x, widths)
    else:
        xp = jnp.pad(x, widths, mode=pad_mode)
    c = x.shape[-1]
    rhs = jnp.tile(kernel.astype(x.dtype)[:, :, None, None], (1, 1, 1, c))  # (kh, kw, 1, C)
    return jax.lax.conv_general_dilated(
        xp,
        rhs,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 2D Gaussian window (size, size) of the SSIM loss (outer product of 1D)."""
    x = np.arange(size, dtype=np.float64) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return np.outer(g, g).astype(np.float32)


def ssim_loss(a: Array, b: Array) -> Array:
    """SSIM loss of images (B, H, W, C) in [0, 1]: mean of clamp(1 - SSIM map, 0, 1) / 2."""
    a = _f32(a)
    b = _f32(b)
    if min(a.shape[1], a.shape[2]) <= SSIM_WINDOW // 2:
        raise ValueError(
            f"ssim_loss needs H, W > {SSIM_WINDOW // 2} for reflect padding, got {a.shape}"
        )
    window = jnp.asarray(gaussian_window())
    blur = lambda x: _depthwise_filter(x, window, "reflect")
    mu_a, mu_b = blur(a), blur(b)
    mu_a2, mu_b2, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = blur(a * a) - mu_a2
    var_b = blur(b * b) - mu_b2
    cov = blur(a * b) - mu_ab
    ssim_map = ((2.0 * mu_ab + SSIM_C1) * (2.0 * cov + SSIM_C2)) / (
        (mu_a2 + mu_b2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    )
    return jnp.mean(jnp.clip(1.0 - ssim_map, 0.0, 1.0) / 2.0)


_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], np.float32)
_SOBEL_Y = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]], np.float32)


def spatial_gradient(x: Array) -> Array:
    """Normalised Sobel gradients (kernels / 8, replicate padding) of x (B, H, W, C).

    Returns (B, H, W, C, 2): d/dx then d/dy (stage-I gradient term).
    """
    x = _f32(x)
    gx = _depthwise_filter(x, jnp.asarray(_SOBEL_X / 8.0), "edge")
    gy = _depthwise_filter(x, jnp.asarray(_SOBEL_X.T / 8.0), "edge")
    return jnp.stack([gx, gy], axis=-1)


def sobel_gradient(x: Array) -> Array:
    """Unnormalised Sobel magnitude |Kx * x| + |Ky * x| of x (B, H, W, C), zero padding."""
    x = _f32(x)
    gx = _depthwise_filter(x, jnp.asarray(_SOBEL_X), "zeros")
    gy = _depthwise_filter(x, jnp.asarray(_SOBEL_Y), "zeros")
    return jnp.abs(gx) + jnp.abs(gy)


def fusion_loss(
    vis: Array, ir: Array, fused: Array, grad_weight: float = 10.0
) -> tuple[Array, dict[str, Array]]:
    """Stage-II fusion loss: L1(max(vis, ir), F) + grad_weight * L1(max(S(vis), S(ir)), S(F)).

    vis, ir, fused: (B, H, W, 1). Only the first channel of vis is used (as CDDFuse does).
    Returns (loss, {"fusion_in": ..., "fusion_grad": ...}).
    """
    v = _f32(vis)[..., :1]
    ir = _f32(ir)
    fused = _f32(fused)
    loss_in = l1(jnp.maximum(v, ir), fused)
    grad_max = jnp.maximum(sobel_gradient(v), sobel_gradient(ir))
    loss_grad = l1(grad_max, sobel_gradient(fused))
    return loss_in + grad_weight * loss_grad, {"fusion_in": loss_in, "fusion_grad": loss_grad}


def _weight(weights: Mapping[str, Any] | ml_collections.ConfigDict, key: str) -> float:
    try:
        value = weights[key]
    except (KeyError, AttributeError) as e:
        raise ConfigError(f"loss weights: missing key {key!r}") from e
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"loss weights: key {key!r} must be a number, got {value!r}")
    return float(value)


def _optional_weight(weights: Mapping[str, Any], key: str, default: float) -> float:
    try:
        weights[key]
    except (KeyError, AttributeError):
        return default
    return _weight(weights, key)


def reconstruction_loss(target: Array, pred: Array, ssim_weight: float = 5.0) -> Array:
    """ssim_weight * SSIMloss(target, pred) + MSE(target, pred) (Eq. 14)."""
    return ssim_weight * ssim_loss(target, pred) + mse(target, pred)


def stage1_loss(
    vis: Array,
    ir: Array,
    rec_vis: Array,
    rec_ir: Array,
    feats_vis: Mapping[str, Array],
    feats_ir: Mapping[str, Array],
    weights: Mapping[str, Any],
) -> tuple[Array, dict[str, Array]]:
    """Stage-I loss (Eq. 16 plus CDDFuse's gradient term).

    vis, ir, rec_vis, rec_ir: (B, H, W, 1); feats_*: {"base", "detail"} (B, H, W, C) from the
    encoder. weights: keys rec_vis, rec_ir, decomp, grad (and optionally ssim_weight).
    Returns (total, terms) with float32 scalars.
    """
    ssim_w = _optional_weight(weights, "ssim_weight", 5.0)
    rec_v = reconstruction_loss(vis, rec_vis, ssim_w)
    rec_i = reconstruction_loss(ir, rec_ir, ssim_w)
    dec = decomp_loss(feats_vis["base"], feats_ir["base"], feats_vis["detail"], feats_ir["detail"])
    grad = l1(spatial_gradient(vis), spatial_gradient(rec_vis))
    total = (
        _weight(weights, "rec_vis") * rec_v
        + _weight(weights, "rec_ir") * rec_i
        + _weight(weights, "decomp") * dec
        + _weight(weights, "grad") * grad
    )
    terms = {"rec_vis": rec_v, "rec_ir": rec_i, "decomp": dec, "grad": grad, "total": total}
    return total, terms


def stage2_loss(
    vis: Array,
    ir: Array,
    fused: Array,
    feats: Mapping[str, Array],
    weights: Mapping[str, Any],
) -> tuple[Array, dict[str, Array]]:
    """Stage-II loss: lambda_f L_fusion + lambda_d L_decomp + lambda_r L_rec_fused (Eq. 18).

    vis, ir, fused: (B, H, W, 1); feats: {"base_vis", "detail_vis", "base_ir", "detail_ir"}.
    weights: keys fusion, decomp, rec (and optionally ssim_weight, fusion_grad_weight).
    L_rec_fused = sum over both sources of ssim_weight * SSIMloss + MSE against the fused image;
    it is not computed when rec == 0 (terms["rec"] is then 0). Returns (total, terms).
    """
    ssim_w = _optional_weight(weights, "ssim_weight", 5.0)
    grad_w = _optional_weight(weights, "fusion_grad_weight", 10.0)
    w_rec = _weight(weights, "rec")
    fus, fus_terms = fusion_loss(vis, ir, fused, grad_w)
    dec = decomp_loss(feats["base_vis"], feats["base_ir"], feats["detail_vis"], feats["detail_ir"])
    total = _weight(weights, "fusion") * fus + _weight(weights, "decomp") * dec
    terms = {"fusion": fus, **fus_terms, "decomp": dec}
    if w_rec != 0.0:
        rec = reconstruction_loss(vis, fused, ssim_w) + reconstruction_loss(ir, fused, ssim_w)
        total = total + w_rec * rec
        terms["rec"] = rec
    else:
        terms["rec"] = jnp.zeros((), jnp.float32)
    terms["total"] = total
    return total, terms
