"""Float64 NumPy/SciPy references of the two Python evaluators (ivif_zoo, cddfuse).

Written independently of the JAX code from the metric notes: scipy.ndimage / scipy.signal
filters with full 2-D kernels, numpy.gradient, numpy histograms and the entropy identity for MI.
The only value taken from the package is data: the 11 float32 SSIM taps torch computes for
IVIF-ZOO's window (tests/test_metrics_torch.py regenerates them with torch).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, signal

from tokfusion_jax.metrics.ivif_zoo import IVIF_ZOO_SSIM_TAPS_HEX

IVIF_ZOO_TAPS = np.array([float.fromhex(h) for h in IVIF_ZOO_SSIM_TAPS_HEX], np.float64)

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)


def ref_en(f, convention):
    f = f.astype(np.float64)
    if convention == "ivif_zoo":
        # torch.histc(bins=256, min=0, max=255): edges 0, 255/256, ..., 255 (last bin closed).
        counts, _ = np.histogram(f, bins=np.linspace(0.0, 255.0, 257))
        p = counts / f.size
        return float(-np.sum(p * np.log2(p + 1e-7)))
    _, counts = np.unique(f, return_counts=True)
    p = counts / f.size
    return float(-np.sum(p * np.log2(p)))


def ref_sd(f):
    return float(np.std(f.astype(np.float64)))


def ref_sf(f):
    f = f.astype(np.float64)
    rf = np.mean(np.diff(f, axis=1) ** 2)
    cf = np.mean(np.diff(f, axis=0) ** 2)
    return float(np.sqrt(rf + cf))


def ref_ag(f):
    gy, gx = np.gradient(f.astype(np.float64))
    return float(np.mean(np.sqrt((gx**2 + gy**2) / 2.0)))


def ref_ei(f):
    f = f.astype(np.float64)
    sx = ndimage.correlate(f, SOBEL_X, mode="constant", cval=0.0)
    sy = ndimage.correlate(f, SOBEL_X.T, mode="constant", cval=0.0)
    return float(np.mean(np.hypot(sx, sy)))


def ref_scd(f, a, b):
    f, a, b = (x.astype(np.float64).ravel() for x in (f, a, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        r1 = np.corrcoef(f - b, a)[0, 1]
        r2 = np.corrcoef(f - a, b)[0, 1]
    return float(r1 + r2)


def ref_mi_one(f, x, convention):
    joint, _, _ = np.histogram2d(
        f.ravel().astype(np.float64), x.ravel().astype(np.float64), bins=256, range=[[0, 256]] * 2
    )
    p = joint / joint.sum()

    def h(q):
        q = q[q > 0]
        return -np.sum(q * np.log(q))

    mi = h(p.sum(1)) + h(p.sum(0)) - h(p.ravel())
    return mi / np.log(2.0) if convention == "ivif_zoo" else mi


def ref_mi(f, a, b, convention):
    return float(ref_mi_one(f, a, convention) + ref_mi_one(f, b, convention))


def _valid_conv(x, k):
    if x.shape[0] < k.shape[0] or x.shape[1] < k.shape[1]:
        return np.zeros((max(x.shape[0] - k.shape[0] + 1, 0), max(x.shape[1] - k.shape[1] + 1, 0)))
    return signal.fftconvolve(x, k[::-1, ::-1], mode="valid")


def _same_zero_corr(x, k):
    """Zero-padded 'same' cross-correlation (odd kernel), = ndimage.correlate(mode='constant')."""
    return signal.fftconvolve(x, k[::-1, ::-1], mode="same")


def fspecial_gaussian(n, sigma):
    """MATLAB fspecial('gaussian', n, sigma), 2-D."""
    half = (n - 1) / 2.0
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(np.float64).eps * h.max()] = 0
    return h / h.sum()


def ivif_gaussian(n, sigma):
    """IVIF-ZOO's kernel: samples at linspace(-n//2, n//2, n) in both axes, 2-D."""
    t = np.linspace(-n // 2, n // 2, n)
    y, x = np.meshgrid(t, t, indexing="ij")
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    return h / h.sum()


def ref_vifp(ref, dist, convention):
    ref = ref.astype(np.float64)
    dist = dist.astype(np.float64)
    eps, sigma_nsq = 1e-10, 2.0
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        if convention == "ivif_zoo":
            win = ivif_gaussian(n, n / 5.0)
            filt = _same_zero_corr
        else:
            win = fspecial_gaussian(n, n / 5.0)
            filt = _valid_conv
        if scale > 1:
            ref = filt(ref, win)[::2, ::2]
            dist = filt(dist, win)[::2, ::2]
        mu1, mu2 = filt(ref, win), filt(dist, win)
        s1 = filt(ref * ref, win) - mu1 * mu1
        s2 = filt(dist * dist, win) - mu2 * mu2
        s12 = filt(ref * dist, win) - mu1 * mu2
        s1[s1 < 0] = 0
        s2[s2 < 0] = 0
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        m = s1 < eps
        g[m] = 0
        sv[m] = s2[m]
        s1[m] = 0
        m = s2 < eps
        g[m] = 0
        sv[m] = 0
        m = g < 0
        sv[m] = s2[m]
        g[m] = 0
        sv[sv <= eps] = eps
        num += np.sum(np.log10(1 + g * g * s1 / (sv + sigma_nsq)))
        den += np.sum(np.log10(1 + s1 / sigma_nsq))
    with np.errstate(invalid="ignore", divide="ignore"):
        vif = num / den
    if convention == "cddfuse" and np.isnan(vif):
        return 1.0
    return vif


def ref_vif(f, a, b, convention):
    return float(ref_vifp(a, f, convention) + ref_vifp(b, f, convention))


def ref_ssim_one(x, y, convention):
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    if convention == "ivif_zoo":
        g = IVIF_ZOO_TAPS  # torch's float32 taps, cast to float64 (win.type_as(X))
        win = np.outer(g, g)

        def filt(z):
            return signal.fftconvolve(z, win, mode="valid")

        c1, c2, norm = 1e-4, 9e-4, 1.0
    else:

        def filt(z):  # skimage: uniform_filter, then crop 3 pixels on each side
            return ndimage.uniform_filter(z, size=7)[3:-3, 3:-3]

        c1, c2, norm = (0.01 * 2) ** 2, (0.03 * 2) ** 2, 49.0 / 48.0
    ux, uy = filt(x), filt(y)
    vx = norm * (filt(x * x) - ux * ux)
    vy = norm * (filt(y * y) - uy * uy)
    vxy = norm * (filt(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.mean()


def ref_ssim(f, a, b, convention):
    return float(ref_ssim_one(a, f, convention) + ref_ssim_one(b, f, convention))


def ref_qabf(f, a, b):
    def grad(x):
        x = x.astype(np.float64)
        sx = ndimage.correlate(x, SOBEL_X, mode="constant")
        sy = ndimage.correlate(x, SOBEL_X.T[::-1], mode="constant")  # [[1,2,1],[0,0,0],[-1,-2,-1]]
        g = np.sqrt(sx**2 + sy**2)
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.arctan(sy / sx)
        alpha[sx == 0] = np.pi / 2
        return g, alpha

    gf, af = grad(f)

    def q(x):
        gx, ax = grad(x)
        G = np.empty_like(gx)
        with np.errstate(divide="ignore", invalid="ignore"):
            big = gx > gf
            eq = gx == gf
            small = ~big & ~eq
            G[big] = gf[big] / gx[big]
            G[eq] = gf[eq]
            G[small] = gx[small] / gf[small]
        A = 1 - np.abs(ax - af) / (np.pi / 2)
        Qg = 0.9994 / (1 + np.exp(-15 * (G - 0.5)))
        Qa = 0.9879 / (1 + np.exp(-22 * (A - 0.8)))
        return Qg * Qa, gx

    qa, ga = q(a)
    qb, gb = q(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.sum(qa * ga + qb * gb) / np.sum(ga + gb))


def reference(f, a, b, convention):
    """All ten metrics of one triplet, float64 NumPy."""
    return {
        "EN": ref_en(f, convention),
        "SD": ref_sd(f),
        "SF": ref_sf(f),
        "AG": ref_ag(f),
        "EI": ref_ei(f),
        "SCD": ref_scd(f, a, b),
        "SSIM": ref_ssim(f, a, b, convention),
        "MI": ref_mi(f, a, b, convention),
        "VIF": ref_vif(f, a, b, convention),
        "Qabf": ref_qabf(f, a, b),
    }
