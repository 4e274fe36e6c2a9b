"""The Python evaluators' conventions (ivif_zoo, cddfuse) against independent float64 NumPy
references (tests/metric_refs/python_evaluators.py), and the front door's contract."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from metric_refs.python_evaluators import reference
from PIL import Image
from scipy import ndimage

from tokfusion_jax import metrics

# Tolerances (metric notes §12): rel 1e-5 for the exact-math metrics (ours are float32 in
# places), EI rel 1e-5, ivif_zoo EN abs 1e-6; an absolute floor for values near zero.
PY_NAMES = metrics.convention_metrics("ivif_zoo")
RTOL = dict.fromkeys(PY_NAMES, 1e-5)
ATOL = dict.fromkeys(PY_NAMES, 1e-6)
ATOL["SCD"] = 2e-6
RTOL["SSIM"], ATOL["SSIM"] = 1e-8, 1e-8  # both float64
RTOL["MI"], ATOL["MI"] = 1e-9, 1e-10  # both float64
RTOL["VIF"], ATOL["VIF"] = 1e-6, 1e-8  # float64 statistics, float32 log terms


def assert_matches(got, want, label):
    for name in PY_NAMES:
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
@pytest.mark.parametrize("convention", ["ivif_zoo", "cddfuse"])
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
            for metric in PY_NAMES:
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
        metrics.compute(x, x, x, names=["PSNRX"])
    with pytest.raises(metrics.MetricInputError, match="does not define"):
        metrics.compute(x, x, x, names=["Qcb"], convention="ivif_zoo")
    with pytest.raises(metrics.MetricInputError, match="does not define"):
        metrics.compute(x, x, x, names=["EI"], convention="tang")
    with pytest.raises(metrics.MetricInputError, match="colour"):
        metrics.compute(*(np.zeros((16, 16, 3), np.uint8),) * 3, convention="tang")
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
    kw = dict(names=PY_NAMES, convention="ivif_zoo", ssim_precision="float64")
    with jax.enable_x64(True):
        seq = metrics._compute_batch(f, a, b, sequential=True, **kw)
        vec = metrics._compute_batch(f, a, b, sequential=False, **kw)
    for name in PY_NAMES:
        np.testing.assert_allclose(vec[name], seq[name], rtol=1e-6, err_msg=name)
