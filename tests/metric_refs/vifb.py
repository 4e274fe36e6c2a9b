"""Float64 NumPy/SciPy reference of VIFB's metrics/metrics*.m, one literal reading per file.

Channel loops, rgb2gray calls and the failing combinations follow the .m files; full 2-D
kernels (scipy.signal), numpy.fft with explicit fftshift / ifftshift, loops over blkproc tiles.
Checked against VIFB's published per-image values (tests/test_metrics_vifb.py).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, signal

from metric_refs.python_evaluators import fspecial_gaussian

RGB2GRAY = np.linalg.inv(
    np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.106, 1.703]])
)[0]
NAMES = {  # ours -> VIFB's file name part
    "EN": "Entropy",
    "SD": "Variance",
    "SF": "Spatial_frequency",
    "AG": "Avg_gradient",
    "EI": "Edge_intensity",
    "MI": "Mutinf",
    "SSIM": "Ssim",
    "Qabf": "Qabf",
    "PSNR": "Psnr",
    "RMSE": "Rmse",
    "CE": "Cross_entropy",
    "Qcb": "Qcb",
    "Qcv": "Qcv",
}


def mround(x):
    """MATLAB round: halves away from zero."""
    x = np.asarray(x, np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def gray_u8(x):
    """rgb2gray of a uint8 image (rounded, saturated)."""
    return np.clip(mround(x.astype(np.float64) @ RGB2GRAY), 0, 255)


def gray_double(x):
    """rgb2gray of a double image."""
    return x.astype(np.float64) @ RGB2GRAY


class VifbError(Exception):
    """Where VIFB's MATLAB code stops with an error (it writes no value)."""


def channel_loop(fn, vi, ir, f):
    """The b == 1 / b1 == 1 / else dispatch of the metricsX.m wrappers."""
    if f.ndim == 2:
        return fn(vi, ir, f)
    if vi.ndim == 2:
        raise VifbError("img1(:,:,k) of a gray visible image")
    if ir.ndim == 2:
        return np.mean([fn(vi[..., k], ir, f[..., k]) for k in range(3)])
    return np.mean([fn(vi[..., k], ir[..., k], f[..., k]) for k in range(3)])


def entropy(vi, ir, f):
    def one(a, b, x):
        x = gray_double(x) if x.ndim == 3 else x
        h = np.bincount(np.floor(x).astype(np.int64).ravel(), minlength=256) / x.size
        h = h[h > 0]
        return -np.sum(h * np.log2(h))

    return channel_loop(one, vi, ir, f.astype(np.float64))


def variance(vi, ir, f):
    def one(a, b, x):
        x = gray_double(x) if x.ndim == 3 else x.astype(np.float64)
        return np.sqrt(np.sum((x - x.mean()) ** 2) / x.size)

    return channel_loop(one, vi, ir, f.astype(np.float64))


def spatial_frequency(vi, ir, f):
    f = f.astype(np.float64)
    if f.ndim == 3:  # fused(i, j) with two subscripts: the H x 3W matrix [R | G | B]
        f = f.reshape(f.shape[0], -1, order="F")
    rf = np.sum(np.diff(f, axis=1) ** 2) / f.size
    cf = np.sum(np.diff(f, axis=0) ** 2) / f.size
    return np.sqrt(rf + cf)


def avg_gradient(vi, ir, f):
    f = f.astype(np.float64)
    f = f[..., None] if f.ndim == 2 else f
    r, c, _ = f.shape
    g = []
    for k in range(f.shape[2]):
        gy, gx = np.gradient(f[..., k])
        g.append(np.sum(np.sqrt((gx**2 + gy**2) / 2)) / ((r - 1) * (c - 1)))
    return np.mean(g)


def edge_intensity(vi, ir, f):
    f = f.astype(np.float64)
    f = f[..., None] if f.ndim == 2 else f
    w = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float64)  # fspecial('sobel')
    mags = []
    for k in range(f.shape[2]):
        gx = ndimage.correlate(f[..., k], w, mode="nearest")  # imfilter 'replicate'
        gy = ndimage.correlate(f[..., k], w.T, mode="nearest")
        mags.append(np.sqrt(gx * gx + gy * gy))
    return np.mean(np.stack(mags))


def _mutinf(a, b):
    a = gray_u8(a) if a.ndim == 3 else a
    b = gray_u8(b) if b.ndim == 3 else b

    def stretch(x):
        x = x.astype(np.float64)
        x = (x - x.min()) / (x.max() - x.min()) if x.max() != x.min() else np.zeros_like(x)
        return mround(x * 255).astype(np.int64)

    a, b = stretch(a), stretch(b)

    def h(counts):
        p = counts / counts.sum()
        p = p[p > 0]
        return -np.sum(p * np.log(p))

    hab = np.bincount((a * 256 + b).ravel(), minlength=65536).astype(np.float64)
    return (
        h(np.bincount(a.ravel(), minlength=256)) + h(np.bincount(b.ravel(), minlength=256)) - h(hab)
    )


def mutinf(vi, ir, f):
    return channel_loop(lambda a, b, x: _mutinf(a, x) + _mutinf(b, x), vi, ir, f.astype(np.float64))


def _ssim(a, f):
    a = gray_u8(a) if a.ndim == 3 else a
    a, f = a.astype(np.float64), f.astype(np.float64)
    w = fspecial_gaussian(11, 1.5)
    w = w / w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def filt(z):
        return signal.correlate(z, w, mode="valid")

    ua, ub = filt(a), filt(f)
    sa, sb, sab = filt(a * a) - ua * ua, filt(f * f) - ub * ub, filt(a * f) - ua * ub
    return np.mean(((2 * ua * ub + c1) * (2 * sab + c2)) / ((ua**2 + ub**2 + c1) * (sa + sb + c2)))


def ssim(vi, ir, f):
    return channel_loop(lambda a, b, x: _ssim(a, x) + _ssim(b, x), vi, ir, f.astype(np.float64))


def _qabf(a, b, f):
    a = gray_double(a) if a.ndim == 3 else a.astype(np.float64)
    b = gray_double(b) if b.ndim == 3 else b.astype(np.float64)
    a, b, f = 255 * a, 255 * b, 255 * f.astype(np.float64)  # 255 * im2double(double)
    h1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float64)
    h3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)

    def grad(x):
        sx, sy = signal.convolve2d(x, h3, mode="same"), signal.convolve2d(x, h1, mode="same")
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sqrt(sx**2 + sy**2), np.where(sx == 0, np.pi / 2, np.arctan(sy / sx))

    (ga, aa), (gb, ab), (gf, af) = grad(a), grad(b), grad(f)

    def q(gx, ax):
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where(gx > gf, gf / gx, np.where(gx == gf, gf, gx / gf))
        al = 1 - np.abs(ax - af) / (np.pi / 2)
        return 0.9994 / (1 + np.exp(-15 * (g - 0.5))) * 0.9879 / (1 + np.exp(-22 * (al - 0.8)))

    return np.sum(q(ga, aa) * ga + q(gb, ab) * gb) / np.sum(ga + gb)


def qabf(vi, ir, f):
    return channel_loop(_qabf, vi, ir, f.astype(np.float64))


def _mse(a, b):
    a = gray_double(a) if a.ndim == 3 else a
    return np.sqrt(np.sum((a - b) ** 2)) / b.size


def psnr(vi, ir, f):
    def one(a, b, x):
        return 20 * np.log10(255 / np.sqrt((_mse(a, x) + _mse(b, x)) / 2))

    return channel_loop(one, vi.astype(np.float64), ir.astype(np.float64), f.astype(np.float64))


def rmse(vi, ir, f):
    def one(a, b, x):
        return (_mse(a, x) + _mse(b, x)) / 2

    return channel_loop(one, vi.astype(np.float64), ir.astype(np.float64), f.astype(np.float64))


def _cross_entropy(a, f):
    a = gray_u8(a) if a.ndim == 3 else a
    p1 = np.bincount(a.astype(np.int64).ravel(), minlength=256) / a.size
    p2 = np.bincount(f.astype(np.int64).ravel(), minlength=256) / a.size
    both = (p1 != 0) & (p2 != 0)
    return np.sum(p1[both] * np.log2(p1[both] / p2[both]))


def cross_entropy(vi, ir, f):
    def one(a, b, x):
        return (_cross_entropy(a, x) + _cross_entropy(b, x)) / 2

    return channel_loop(one, vi, ir, f.astype(np.float64))


def _freqspace_mesh(m, n):
    f1 = (np.arange(n) - np.floor(n / 2)) * (2 / n)
    f2 = (np.arange(m) - np.floor(m / 2)) * (2 / m)
    return np.meshgrid(f1, f2)


def _normalize1(x):
    x = x.astype(np.float64)
    da, xiao = x.max(), x.min()
    if da == 0 and xiao == 0:
        return x
    with np.errstate(divide="ignore", invalid="ignore"):
        return mround((x - xiao) / (da - xiao) * 255)


def _csf(x, s):
    return np.real(np.fft.ifft2(np.fft.ifftshift(np.fft.fftshift(np.fft.fft2(x)) * s)))


def _needs_gray(*images):
    if any(x.ndim == 3 for x in images):
        raise VifbError("a 3-D source in Qcb / Qcv")


def _qcb(im1, im2, fu):
    _needs_gray(im1, im2)
    im1, im2, fu = _normalize1(im1), _normalize1(im2), _normalize1(fu)
    hang, lie = im1.shape
    u, v = _freqspace_mesh(hang, lie)
    r = np.sqrt((lie / 30 * u) ** 2 + (hang / 30 * v) ** 2)
    sd = np.exp(-((r / 15.3870) ** 2)) - 0.7622 * np.exp(-((r / 1.3456) ** 2))
    x, y = np.meshgrid(np.arange(-15, 16), np.arange(-15, 16))
    g1, g2 = (np.exp(-(x * x + y * y) / (2 * s * s)) / (2 * math.pi * s * s) for s in (2, 4))
    with np.errstate(divide="ignore", invalid="ignore"):

        def cp(im):
            c = np.abs(
                signal.correlate(im, g1, mode="same") / signal.correlate(im, g2, mode="same") - 1
            )
            return c**3 / (c**2 + 0.0001)

        c1p, c2p, cfp = cp(_csf(im1, sd)), cp(_csf(im2, sd)), cp(_csf(fu, sd))

        def pres(cx):
            mask = (cx < cfp).astype(np.float64)
            return (cx / cfp) * mask + (cfp / cx) * (1 - mask)

        lam1 = c1p * c1p / (c1p * c1p + c2p * c2p)
        lam2 = c2p * c2p / (c1p * c1p + c2p * c2p)
        return np.mean(lam1 * pres(c1p) + lam2 * pres(c2p))


def qcb(vi, ir, f):
    return channel_loop(_qcb, vi.astype(np.float64), ir.astype(np.float64), f.astype(np.float64))


def _blkproc(x, fn, bs=16):
    h, w = x.shape
    nh, nw = -(-h // bs), -(-w // bs)
    padded = np.zeros((nh * bs, nw * bs))
    padded[:h, :w] = x
    return np.array(
        [
            [fn(padded[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs]) for j in range(nw)]
            for i in range(nh)
        ]
    )


def _qcv(im1, im2, fu):
    _needs_gray(im1, im2)
    im1, im2, fu = _normalize1(im1), _normalize1(im2), _normalize1(fu)
    flt1 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
    flt2 = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float64)

    def grad(x):
        gx, gy = signal.correlate(x, flt1, mode="same"), signal.correlate(x, flt2, mode="same")
        return np.sqrt(gx * gx + gy * gy)

    lam1 = _blkproc(grad(im1), lambda t: np.sum(t**5))
    lam2 = _blkproc(grad(im2), lambda t: np.sum(t**5))
    hang, lie = im1.shape
    u, v = _freqspace_mesh(hang, lie)
    r = np.sqrt((lie / 8 * u) ** 2 + (hang / 8 * v) ** 2)
    theta = 2.6 * (0.0192 + 0.144 * r) * np.exp(-((0.144 * r) ** 1.1))
    d1 = _blkproc(_csf(im1 - fu, theta), lambda t: np.mean(t**2))
    d2 = _blkproc(_csf(im2 - fu, theta), lambda t: np.mean(t**2))
    return np.sum(lam1 * d1 + lam2 * d2) / np.sum(lam1 + lam2)


def qcv(vi, ir, f):
    return channel_loop(_qcv, vi, ir, f.astype(np.float64))


FUNCTIONS = {
    "EN": entropy,
    "SD": variance,
    "SF": spatial_frequency,
    "AG": avg_gradient,
    "EI": edge_intensity,
    "MI": mutinf,
    "SSIM": ssim,
    "Qabf": qabf,
    "PSNR": psnr,
    "RMSE": rmse,
    "CE": cross_entropy,
    "Qcb": qcb,
    "Qcv": qcv,
}


def reference(f, a, b, names=tuple(FUNCTIONS)):
    """{name: value} of one triplet as VIFB computes it (a = infrared, b = visible); NaN where
    VIFB's code fails. Images uint8, (H, W) or (H, W, 3)."""
    out = {}
    for name in names:
        try:
            out[name] = float(FUNCTIONS[name](b, a, f))
        except VifbError:
            out[name] = float("nan")
    return out
