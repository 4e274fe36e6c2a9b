"""Fusion metrics against an independent float64 NumPy/SciPy implementation written here.

The reference functions below follow the definitions in the metric notes (per convention) but are
written differently from the JAX code: scipy.ndimage / scipy.signal filters with full 2-D kernels,
numpy.gradient, numpy histograms and the entropy identity for MI.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, signal

from tokfusion_jax import metrics

# --------------------------------------------------------------------------------------------
# Independent float64 reference
# --------------------------------------------------------------------------------------------

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
        t = np.arange(11) - 5.0
        g = np.exp(-(t**2) / (2 * 1.5**2))
        g /= g.sum()
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


# Tolerances (metric notes §12): rel 1e-5 for the exact-math metrics (ours are float32 in
# places), EI rel 1e-5, ivif_zoo EN abs 1e-6; an absolute floor for values near zero.
RTOL = dict.fromkeys(metrics.METRIC_NAMES, 1e-5)
ATOL = dict.fromkeys(metrics.METRIC_NAMES, 1e-6)
ATOL["SCD"] = 2e-6
RTOL["SSIM"], ATOL["SSIM"] = 1e-8, 1e-8  # both float64
RTOL["MI"], ATOL["MI"] = 1e-9, 1e-10  # both float64
RTOL["VIF"], ATOL["VIF"] = 1e-6, 1e-8  # float64 statistics, float32 log terms


def assert_matches(got, want, label):
    for name in metrics.METRIC_NAMES:
        g, w = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        np.testing.assert_allclose(
            g, w, rtol=RTOL[name], atol=ATOL[name], equal_nan=True, err_msg=f"{label} {name}"
        )


def load_case(case_dir: pathlib.Path):
    return tuple(np.array(Image.open(case_dir / f"{n}.png")) for n in ("fused", "ir", "vis"))


def grouped_cases(root: pathlib.Path) -> dict[tuple[int, int], list[tuple[str, tuple]]]:
    groups: dict[tuple[int, int], list] = {}
    for case in sorted(p for p in root.iterdir() if p.is_dir()):
        f, a, b = load_case(case)
        groups.setdefault(f.shape, []).append((case.name, (f, a, b)))
    return groups


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def _special_batch(rng, h, w):
    """Random triplets plus constant and all-zero images, one size."""
    rand = lambda: rng.integers(0, 256, (h, w)).astype(np.uint8)  # noqa: E731
    smooth = lambda: np.clip(  # noqa: E731
        ndimage.gaussian_filter(rng.normal(128, 60, (h, w)), 2.0), 0, 255
    ).round()
    zeros = np.zeros((h, w), np.uint8)
    const = np.full((h, w), 77, np.uint8)
    sat = np.where(rng.random((h, w)) < 0.5, 255, 254).astype(np.uint8)
    triplets = [
        (rand(), rand(), rand()),
        (smooth(), smooth(), smooth()),
        (const, rand(), rand()),  # constant fused
        (zeros, rand(), smooth()),  # all-zero fused
        (rand(), const, rand()),  # constant source -> SCD undefined (NaN in the references)
        (zeros, zeros, zeros),  # everything zero
        (sat, rand(), sat),
    ]
    return [tuple(np.asarray(x, np.float64) for x in t) for t in triplets]


SPECIAL_SHAPES = ((64, 64), (97, 131))  # odd sizes ride along with the metric_cases batches
N_SPECIAL = 7


CASE_SHAPES = ((64, 64), (97, 131), (128, 128), (480, 640), (576, 768))


def test_metric_cases_are_all_covered(metric_cases):
    groups = grouped_cases(metric_cases)
    assert sum(len(v) for v in groups.values()) == 8
    assert set(groups) == set(CASE_SHAPES)


@pytest.mark.parametrize("shape", CASE_SHAPES)
@pytest.mark.parametrize("convention", metrics.CONVENTIONS)
def test_metric_cases_and_special_images_match_reference(metric_cases, convention, shape):
    """The metric_cases triplets of one size, plus random, constant and all-zero images.

    One compile per image size: the random/special triplets join the batch of the same size.
    """
    groups = {shape: grouped_cases(metric_cases).get(shape, [])}
    assert groups[shape]
    rng = np.random.default_rng(0 if convention == "ivif_zoo" else 1)
    if shape in SPECIAL_SHAPES:
        specials = _special_batch(rng, *shape)
        groups[shape] += [(f"special{i}", t) for i, t in enumerate(specials)]
    for shape, items in groups.items():
        f, a, b = (np.stack([t[k] for _, t in items]) for k in range(3))
        got = metrics.compute(f, a, b, convention=convention)
        for i, (name, (fi, ai, bi)) in enumerate(items):
            want = reference(fi, ai, bi, convention)
            row = {k: v[i] for k, v in got.items()}
            assert_matches(row, want, f"{name} {shape}")
            # No NaN where the reference gives a number.
            for metric in metrics.METRIC_NAMES:
                if np.isfinite(want[metric]):
                    assert np.isfinite(row[metric]), (name, shape, metric)
        if shape in SPECIAL_SHAPES:
            sp = {k: v[-N_SPECIAL:] for k, v in got.items()}
            assert sp["SSIM"][5] == pytest.approx(2.0)  # identical (zero) images
            assert np.isnan(sp["SCD"][4])  # constant source: corr2 is 0/0 in every reference
            assert sp["MI"][2] == pytest.approx(0.0, abs=1e-12)  # constant fused: no information
            # all-zero triplet: VIF is 0/0; cddfuse maps each NaN to 1 (sum 2), ivif_zoo keeps NaN
            np.testing.assert_equal(sp["VIF"][5], 2.0 if convention == "cddfuse" else np.nan)


def test_conventions_differ_where_documented():
    rng = np.random.default_rng(0)
    f, a, b = (rng.integers(0, 256, (24, 24)).astype(np.uint8) for _ in range(3))
    names = ("EN", "MI", "SSIM", "SD", "Qabf")
    iv = metrics.compute(f, a, b, names=names, convention="ivif_zoo")
    cd = metrics.compute(f, a, b, names=names, convention="cddfuse")
    assert iv["MI"] == pytest.approx(cd["MI"] / np.log(2.0), rel=1e-9)  # bits vs nats
    # ivif_zoo EN is lower by ~1.44e-7 per occupied bin.
    assert 0 < cd["EN"] - iv["EN"] < 1.5e-7 * 256 + 1e-6
    assert iv["SD"] == cd["SD"] and iv["Qabf"] == cd["Qabf"]
    assert iv["SSIM"] != pytest.approx(cd["SSIM"], abs=1e-3)


def test_single_image_returns_floats_and_rounds_fused():
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (32, 40)).astype(np.uint8) for _ in range(2))
    fused_float = (a.astype(np.float64) + b) / 2.0  # .5 values: rounded as np.round does
    got = metrics.compute(fused_float, a, b, names=["EN", "SD", "MI"])
    assert set(got) == {"EN", "SD", "MI"}
    assert all(isinstance(v, float) for v in got.values())
    want = metrics.compute(np.round(fused_float).astype(np.uint8), a, b, names=["EN", "SD", "MI"])
    assert got == want


def test_ssim_float32_as_shipped_is_close_to_float64():
    rng = np.random.default_rng(2)
    base = ndimage.gaussian_filter(rng.normal(120, 50, (32, 32)), 3)
    f, a, b = (np.clip(base + rng.normal(0, s, base.shape), 0, 255) for s in (3, 8, 12))
    hi = metrics.compute(f, a, b, names=["SSIM"])["SSIM"]
    lo = metrics.compute(f, a, b, names=["SSIM"], ssim_precision="float32")["SSIM"]
    assert hi != lo
    assert abs(hi - lo) < 0.02


def test_bad_inputs_raise_clear_errors():
    x = np.zeros((16, 16), np.uint8)
    with pytest.raises(metrics.MetricInputError, match="shape mismatch"):
        metrics.compute(x, x, np.zeros((16, 17), np.uint8))
    with pytest.raises(metrics.MetricInputError, match="unknown metric"):
        metrics.compute(x, x, x, names=["PSNR"])
    with pytest.raises(metrics.MetricInputError, match="convention"):
        metrics.compute(x, x, x, convention="matlab")
    with pytest.raises(metrics.MetricInputError, match="too small"):
        metrics.compute(x[:8, :8], x[:8, :8], x[:8, :8], names=["SSIM"])
    with pytest.raises(metrics.MetricInputError, match="NaN"):
        metrics.compute(np.full((16, 16), np.nan), x, x)
    with pytest.raises(metrics.MetricInputError, match=r"\(H, W\)"):
        metrics.compute(
            np.zeros((2, 2, 16, 16)), np.zeros((2, 2, 16, 16)), np.zeros((2, 2, 16, 16))
        )


def test_differentiable_versions_match_and_have_finite_gradients():
    rng = np.random.default_rng(3)
    h, w = 24, 20
    base = ndimage.gaussian_filter(rng.uniform(0, 255, (2, h, w)), (0, 2, 2))
    f, a, b = (np.round(np.clip(base + rng.normal(0, 10, base.shape), 0, 255)) for _ in range(3))
    f[1] = 0.0  # a flat image: gradients must stay finite (safe square roots)
    exact = metrics.compute(f, a, b, names=["EI", "AG", "SF", "SSIM"])
    unit = [jnp.asarray(x / 255.0, jnp.float32) for x in (f, a, b)]
    smooth = jax.jit(metrics.differentiable)(*unit)
    for name in ("EI", "AG", "SF"):
        np.testing.assert_allclose(smooth[name], exact[name], rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(smooth["SSIM"], exact["SSIM"], atol=2e-3)
    # 0..255 inputs with data_range=255 and a (B, H, W, 1) layout give the same values.
    ei255 = metrics.differentiable_ei(jnp.asarray(f[..., None], jnp.float32), data_range=255.0)
    np.testing.assert_allclose(ei255, exact["EI"], rtol=1e-5)

    def objective(x):
        d = metrics.differentiable(x, unit[1], unit[2])
        return jnp.sum(d["EI"] + d["AG"] + d["SF"] + d["SSIM"])

    grad = jax.jit(jax.grad(objective))(unit[0])
    assert grad.shape == (2, h, w)
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad[0]).sum()) > 0
    # A single (H, W) image gives a scalar.
    assert metrics.differentiable_sf(unit[0][0]).shape == ()


def test_vmapped_batch_equals_sequential_loop():
    """The accelerator path (vmap) and the CPU path (lax.map) give the same numbers."""
    rng = np.random.default_rng(4)
    f, a, b = (jnp.asarray(rng.integers(0, 256, (3, 20, 24)).astype(np.uint8)) for _ in range(3))
    kw = dict(names=metrics.METRIC_NAMES, convention="ivif_zoo", ssim_precision="float64")
    with jax.enable_x64(True):
        seq = metrics._compute_batch(f, a, b, sequential=True, **kw)
        vec = metrics._compute_batch(f, a, b, sequential=False, **kw)
    for name in metrics.METRIC_NAMES:
        np.testing.assert_allclose(vec[name], seq[name], rtol=1e-6, err_msg=name)
