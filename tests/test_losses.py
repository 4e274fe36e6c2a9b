"""Losses against float64 NumPy implementations written from the CDDFuse reference notes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import probable_bound, rounding_bound

from tokfusion_jax import losses
from tokfusion_jax.errors import ConfigError

B, H, W = 2, 37, 53
N = B * H * W  # the terms of every image mean

# float32 losses against float64 twins (tests/tolerances.py). The means run over thousands of
# terms: the probabilistic bound of the reduction chain applies (the worst case would be
# ~ N u, far above what any reduction order gives). Images are in [0, 1].


def cc_bound(n: int) -> float:
    """cc over n values per (sample, channel): two means, centring, three n-term sums, sqrt,
    division; |cc| <= 1 and each sum's sum of |terms| is within its Cauchy-Schwarz bound."""
    return probable_bound(3 * n + 12, 1.0)


def decomp_bound(cc_detail: np.ndarray, cc_base: np.ndarray, n: int) -> float:
    """cc_d^2 / (1.01 + cc_b): the cc errors scaled by the derivatives 2|cc_d| / (1.01 + cc_b)
    and cc_d^2 / (1.01 + cc_b)^2, then a few roundings."""
    den = 1.01 + np.asarray(cc_base, np.float64)
    gain = 2 * np.abs(cc_detail) / den + np.asarray(cc_detail) ** 2 / den**2
    return float(gain.max()) * cc_bound(n) + rounding_bound(4, float((cc_detail**2 / den).max()))


# SSIM: 11x11 Gaussian blurs (242 roundings), E[x^2] - E[x]^2 loses up to a factor 4 to
# cancellation on [0, 1] images (E[x^2] <= 1, var >= 1/4 of it here), the map's ten operations,
# the mean over N.
SSIM = probable_bound(N + 3 * 242 + 20, 4.0)
MSE = probable_bound(N + 3, 1.0)
FILTER = rounding_bound(18, 1.0)  # 3x3 Sobel / 8: 9 products and sums, sum |k| / 8 = 1
SOBEL = rounding_bound(20, 16.0)  # |Kx * x| + |Ky * x|, sum |K| = 8 each
GRAD_L1 = probable_bound(2 * N + 20, 2.0)  # mean over both directions of |g_a - g_b|
FUSION = probable_bound(N + 2, 1.0) + 10 * probable_bound(N + 22, 16.0)  # L1 + 10 L1(Sobel)


def images(seed, shape=(B, H, W, 1)):
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.standard_normal(shape), axis=2) * 0.05  # some structure
    return np.clip(0.5 + smooth + 0.1 * rng.standard_normal(shape), 0, 1).astype(np.float32)


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------- NumPy twins


def np_filter(x, kernel, mode):
    """Same-size cross-correlation of every (B, H, W, C) channel; mode as np.pad's."""
    kh, kw = kernel.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)), mode=mode)
    out = np.zeros(x.shape, np.float64)
    for i in range(kh):
        for j in range(kw):
            out += kernel[i, j] * xp[:, i : i + x.shape[1], j : j + x.shape[2]]
    return out


def np_cc(a, b):
    a = a.astype(np.float64) - a.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    b = b.astype(np.float64) - b.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    eps = np.finfo(np.float32).eps
    num = (a * b).sum(axis=(1, 2))
    den = eps + np.sqrt((a * a).sum(axis=(1, 2))) * np.sqrt((b * b).sum(axis=(1, 2)))
    return np.clip(num / den, -1, 1).mean()


def np_ssim_loss(a, b):
    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    g /= g.sum()
    win = np.outer(g, g)
    a, b = a.astype(np.float64), b.astype(np.float64)
    f = lambda t: np_filter(t, win, "reflect")
    ma, mb = f(a), f(b)
    va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return (np.clip(1 - ssim, 0, 1) / 2).mean()


SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)


def np_grad_l1(a, b):
    """L1 of kornia-style normalised Sobel gradients (replicate padding), over both directions."""
    diffs = [
        np_filter(a, k / 8, "edge") - np_filter(b, k / 8, "edge") for k in (SOBEL_X, SOBEL_X.T)
    ]
    return np.mean(np.abs(np.stack(diffs)))


def np_sobel(x):
    return np.abs(np_filter(x, SOBEL_X, "constant")) + np.abs(np_filter(x, SOBEL_X.T, "constant"))


def np_fusion_loss(vis, ir, fused):
    l_in = np.mean(np.abs(np.maximum(vis, ir) - fused))
    l_grad = np.mean(np.abs(np.maximum(np_sobel(vis), np_sobel(ir)) - np_sobel(fused)))
    return l_in + 10 * l_grad


# ----------------------------------------------------------------------------- building blocks


def test_cc_matches_numpy_and_its_limits():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((B, H, W, 3)).astype(np.float32)
    b = (0.6 * a + rng.standard_normal(a.shape)).astype(np.float32)
    assert max_err(losses.cc(a, b), np_cc(a, b)) <= cc_bound(H * W)
    assert abs(float(losses.cc(a, 2 * a + 1)) - 1) <= cc_bound(H * W)
    assert abs(float(losses.cc(a, -a)) + 1) <= cc_bound(H * W)
    const = np.ones_like(a)
    assert float(losses.cc(const, a)) == 0.0  # eps keeps the constant case finite


def test_decomp_loss_matches_numpy():
    rng = np.random.default_rng(1)
    bv, bi, dv, di = (rng.standard_normal((B, 9, 11, 4)).astype(np.float32) for _ in range(4))
    bi = bi + bv  # correlated bases
    want = np_cc(dv, di) ** 2 / (1.01 + np_cc(bv, bi))
    bound = decomp_bound(np_cc(dv, di), np_cc(bv, bi), 9 * 11)
    assert max_err(losses.decomp_loss(bv, bi, dv, di), want) <= bound


def test_ssim_loss_matches_numpy():
    a, b = images(2), images(3)
    assert max_err(losses.ssim_loss(a, b), np_ssim_loss(a, b)) <= SSIM
    assert float(losses.ssim_loss(a, a)) <= SSIM
    win = losses.gaussian_window()
    # 121 weights, each rounded to float32, then their sum
    assert win.shape == (11, 11) and abs(win.sum() - 1) <= rounding_bound(122, 1.0)


def test_gradient_terms_match_numpy():
    a, b = images(4), images(5)
    got = losses.spatial_gradient(a)
    assert got.shape == (B, H, W, 1, 2)
    assert max_err(got[..., 0], np_filter(a, SOBEL_X / 8, "edge")) <= FILTER
    l1 = losses.l1(losses.spatial_gradient(a), losses.spatial_gradient(b))
    assert max_err(l1, np_grad_l1(a, b)) <= GRAD_L1 + 2 * FILTER
    assert max_err(losses.sobel_gradient(a), np_sobel(a)) <= SOBEL


def test_fusion_loss_and_mse_match_numpy():
    vis, ir, fused = images(6), images(7), images(8)
    loss, terms = losses.fusion_loss(vis, ir, fused)
    assert max_err(loss, np_fusion_loss(vis, ir, fused)) <= FUSION
    want_in = np.mean(np.abs(np.maximum(vis, ir) - fused))
    assert max_err(terms["fusion_in"], want_in) <= probable_bound(N + 2, 1.0)
    assert max_err(losses.mse(vis, ir), np.mean((vis.astype(np.float64) - ir) ** 2)) <= MSE


# ----------------------------------------------------------------------------- stage totals


def test_stage1_loss_matches_numpy_and_uses_weights():
    vis, ir, rv, ri = images(9), images(10), images(11), images(12)
    rng = np.random.default_rng(13)
    fv = {"base": rng.standard_normal((B, H, W, 4)), "detail": rng.standard_normal((B, H, W, 4))}
    fi = {k: (0.5 * v + rng.standard_normal(v.shape)) for k, v in fv.items()}
    fv = {k: v.astype(np.float32) for k, v in fv.items()}
    fi = {k: v.astype(np.float32) for k, v in fi.items()}
    w = losses.loss_weights_config()
    w.rec_ir, w.grad = 0.7, 3.0
    total, terms = losses.stage1_loss(vis, ir, rv, ri, fv, fi, w)
    rec_v = 5 * np_ssim_loss(vis, rv) + np.mean((vis.astype(np.float64) - rv) ** 2)
    rec_i = 5 * np_ssim_loss(ir, ri) + np.mean((ir.astype(np.float64) - ri) ** 2)
    dec = np_cc(fv["detail"], fi["detail"]) ** 2 / (1.01 + np_cc(fv["base"], fi["base"]))
    want = rec_v + 0.7 * rec_i + 2 * dec + 3.0 * np_grad_l1(vis, rv)
    dec_b = decomp_bound(np_cc(fv["detail"], fi["detail"]), np_cc(fv["base"], fi["base"]), H * W)
    # the weighted terms' bounds (rec weights 1 and 0.7), then the weighted sum of five terms
    # whose total size stays below 20
    bound = 1.7 * (5 * SSIM + MSE) + 2 * dec_b + 3 * (GRAD_L1 + 2 * FILTER) + rounding_bound(8, 20)
    assert max_err(total, want) <= bound
    assert total.dtype == jnp.float32
    assert set(terms) == {"rec_vis", "rec_ir", "decomp", "grad", "total"}


def test_stage2_loss_matches_numpy_with_and_without_rec():
    vis, ir, fused = images(14), images(15), images(16)
    rng = np.random.default_rng(17)
    feats = {
        k: rng.standard_normal((B, H, W, 4)).astype(np.float32)
        for k in ("base_vis", "base_ir", "detail_vis", "detail_ir")
    }
    dec = np_cc(feats["detail_vis"], feats["detail_ir"]) ** 2 / (
        1.01 + np_cc(feats["base_vis"], feats["base_ir"])
    )
    rec = sum(
        5 * np_ssim_loss(s, fused) + np.mean((s.astype(np.float64) - fused) ** 2) for s in (vis, ir)
    )
    w = losses.loss_weights_config()
    total, terms = losses.stage2_loss(vis, ir, fused, feats, w)
    cc_d = np_cc(feats["detail_vis"], feats["detail_ir"])
    dec_b = decomp_bound(cc_d, np_cc(feats["base_vis"], feats["base_ir"]), H * W)
    bound0 = FUSION + 2 * dec_b + rounding_bound(6, 200.0)  # the weighted sum of the terms
    bound = bound0 + 0.5 * 2 * (5 * SSIM + MSE)
    assert max_err(total, np_fusion_loss(vis, ir, fused) + 2 * dec + 0.5 * rec) <= bound
    w.rec = 0.0  # CDDFuse's own phase-II loss
    total0, terms0 = losses.stage2_loss(vis, ir, fused, feats, w)
    assert max_err(total0, np_fusion_loss(vis, ir, fused) + 2 * dec) <= bound0
    assert set(terms) == set(terms0) and float(terms0["rec"]) == 0.0


def test_loss_weights_defaults_and_errors():
    w = losses.loss_weights_config()
    assert (w.rec_vis, w.rec_ir, w.decomp, w.grad) == (1.0, 1.0, 2.0, 5.0)
    assert (w.fusion, w.decomp, w.rec) == (1.0, 2.0, 0.5)
    x = np.zeros((1, 16, 16, 1), np.float32)
    f = {"base": x, "detail": x}
    with pytest.raises(ConfigError, match="'grad'"):
        losses.stage1_loss(x, x, x, x, f, f, {"rec_vis": 1, "rec_ir": 1, "decomp": 2})
    bad = {**w.to_dict(), "fusion": "one"}
    feats = {k: x for k in ("base_vis", "base_ir", "detail_vis", "detail_ir")}
    with pytest.raises(ConfigError, match="'fusion'"):
        losses.stage2_loss(x, x, x, feats, bad)
