"""Float64 NumPy reference of Linfeng-Tang/Evaluation-for-Image-Fusion's analysis_Reference.m.

The same math as the .m files (checked against their values under GNU Octave in
tests/data/tang/), written with NumPy/SciPy; SF, SD, SCD and Qabf are the shared definitions
of `python_evaluators`. SSIM (the easy = 0 branch) follows MATLAB's built-in ssim defaults:
fspecial('gaussian', 11, 1.5) with imfilter(..., 'replicate') ('same' map), DynamicRange 1.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from metric_refs import python_evaluators as py


def _entropy(x):
    p = np.bincount(x.astype(np.int64).ravel(), minlength=256) / x.size
    p = p[p > 0]
    return -np.sum(p * np.log2(p))


def _hab(x, y):  # uint8 + 1 saturates: index min(level + 1, 255)
    i = np.minimum(x.astype(np.int64) + 1, 255) - 1
    j = np.minimum(y.astype(np.int64) + 1, 255) - 1
    p = np.bincount((i * 256 + j).ravel(), minlength=65536) / x.size
    p = p[p > 0]
    return -np.sum(p * np.log2(p))


def mi(f, a, b):
    return _entropy(a) + _entropy(f) - _hab(f, a) + _entropy(b) + _entropy(f) - _hab(f, b)


def mse(f, a, b):
    f, a, b = (x.astype(np.float64) / 255.0 for x in (f, a, b))
    m, n = f.shape
    return 0.5 * np.sum((f - a) ** 2) / (m * n) + 0.5 * np.sum((f - b) ** 2) / (m * n)


def psnr(f, a, b):
    return 20 * np.log10(255 / np.sqrt(mse(f, a, b)))


def ag(f):
    gy, gx = np.gradient(f.astype(np.float64))
    r, c = f.shape
    return np.sum(np.sqrt((gx**2 + gy**2) / 2)) / ((r - 1) * (c - 1))


def cc(f, a, b):
    f, a, b = (x.astype(np.float64) for x in (f, a, b))

    def r(x):
        return np.sum((x - x.mean()) * (f - f.mean())) / np.sqrt(
            np.sum((x - x.mean()) ** 2) * np.sum((f - f.mean()) ** 2)
        )

    return np.mean([r(a), r(b)])


def _matlab_ssim(x, ref):
    x, ref = x.astype(np.float64), ref.astype(np.float64)
    w = py.fspecial_gaussian(11, 1.5)
    c1, c2 = 0.01**2, 0.03**2

    def filt(z):
        return ndimage.correlate(z, w, mode="nearest")

    mx, my = filt(x), filt(ref)
    sx, sy, sxy = filt(x * x) - mx * mx, filt(ref * ref) - my * my, filt(x * ref) - mx * my
    return np.mean(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sx + sy + c2)))


def ssim(f, a, b):
    return 0.5 * _matlab_ssim(f, a) + 0.5 * _matlab_ssim(f, b)


def vif(f, a, b):
    def one(ref):
        with np.errstate(invalid="ignore", divide="ignore"):
            return py.ref_vifp(ref, f, "tang")

    return float(one(a) + one(b))


def reference(f, a, b):
    """All tang metrics of one gray uint8 triplet (a = infrared, b = visible)."""
    return {
        "EN": _entropy(f),
        "SD": py.ref_sd(f),
        "SF": py.ref_sf(f),
        "AG": ag(f),
        "SCD": py.ref_scd(f, a, b),
        "CC": cc(f, a, b),
        "SSIM": ssim(f, a, b),
        "MI": mi(f, a, b),
        "VIF": vif(f, a, b),
        "Qabf": py.ref_qabf(f, a, b),
        "MSE": mse(f, a, b),
        "PSNR": psnr(f, a, b),
    }
