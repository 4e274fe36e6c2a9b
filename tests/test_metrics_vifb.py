"""The ``vifb`` convention against VIFB's published values and a float64 NumPy reference.

VIFB (github.com/xingchenzhang/VIFB) ships no licence, so none of its files are copied here.
With a local copy, point ``TOKFUSION_VIFB_DIR`` at its root (the folder holding ``input/`` and
``output/``) and the published check runs: every VIFB metric on all 21 pairs for every method
with fused images (or the comma list in ``TOKFUSION_VIFB_METHODS``), SwinFusion and YDTR left
out (their values come from files that are not the stored JPEGs).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from metric_refs import vifb as ref
from PIL import Image
from scipy import ndimage

from tokfusion_jax import metrics

VIFB_NAMES = metrics.convention_metrics("vifb")
# float32 Sobel / gradient maps with float64 sums (~1e-7); everything else is float64 on both
# sides (FFTs and filters in another order: ~1e-12).
RTOL = {**dict.fromkeys(VIFB_NAMES, 1e-9), "SD": 1e-6, "AG": 1e-6, "EI": 1e-6, "Qabf": 1e-5}
RTOL.update(Qcb=1e-7, Qcv=1e-7)
EXCLUDED_METHODS = ("SwinFusion", "YDTR")


def _smooth_rgb(rng, shape, channels):
    x = ndimage.gaussian_filter(rng.uniform(0, 255, (*shape, channels)), (2, 2, 0))
    x = np.clip((x - x.mean()) * 4 + 128 + rng.normal(0, 6, x.shape), 0, 255).round()
    return x.astype(np.uint8) if channels == 3 else x[..., 0].astype(np.uint8)


def _check(got, triplets, names, label):
    for i, (f, a, b) in enumerate(triplets):
        want = ref.reference(f, a, b, names)
        for name in names:
            g = got[name][i] if np.ndim(got[name]) else got[name]
            np.testing.assert_allclose(
                g,
                want[name],
                rtol=RTOL[name],
                atol=1e-12,
                equal_nan=True,
                err_msg=f"{label} {name}",
            )


@pytest.mark.parametrize(
    "channels", [(3, 3, 3), (3, 1, 3), (1, 3, 3)], ids=["rgb", "rgb_gray_ir", "gray_fused"]
)
def test_colour_and_gray_mixes_match_numpy_reference(channels):
    """(fused, ir, vis) channel counts; a gray fused image sees rgb2gray'd colour sources."""
    rng = np.random.default_rng(sum(channels))
    shape = (38, 52)
    triplets = []
    for _ in range(2):
        triplets.append(tuple(_smooth_rgb(rng, shape, c) for c in channels))
    f, a, b = (np.stack([t[k] for t in triplets]) for k in range(3))
    got = metrics.compute(f, a, b, convention="vifb")
    _check(got, triplets, VIFB_NAMES, f"channels {channels}")
    if channels[0] == 1:  # VIFB's Qcb / Qcv fail on 3-D sources with a gray fused image
        assert np.isnan(got["Qcb"]).all() and np.isnan(got["Qcv"]).all()
        assert np.isfinite(got["MI"]).all()


def test_gray_metric_cases_match_numpy_reference(metric_cases):
    cases = [c for c in sorted(metric_cases.iterdir()) if c.name == "syn_97x131"]
    triplets = [
        tuple(np.array(Image.open(c / f"{n}.png")) for n in ("fused", "ir", "vis")) for c in cases
    ]
    rng = np.random.default_rng(5)
    flat = np.full((97, 131), 40, np.uint8)
    triplets.append((flat, triplets[0][1], triplets[0][2]))  # flat fused: Qcb / Qcv NaN
    triplets.append((_smooth_rgb(rng, (97, 131), 1), flat, triplets[0][2]))  # flat source
    f, a, b = (np.stack([t[k] for t in triplets]) for k in range(3))
    got = metrics.compute(f, a, b, convention="vifb")
    _check(got, triplets, VIFB_NAMES, "metric_cases")


def test_where_vifb_fails_the_value_is_nan():
    rng = np.random.default_rng(7)
    f, a = _smooth_rgb(rng, (24, 24), 3), _smooth_rgb(rng, (24, 24), 3)
    b = _smooth_rgb(rng, (24, 24), 1)  # gray visible with a colour fused image
    got = metrics.compute(f, a, b, names=["EN", "SF", "AG", "Qabf"], convention="vifb")
    assert np.isnan(got["EN"]) and np.isnan(got["Qabf"])  # VIFB indexes vis(:, :, k)
    assert np.isfinite(got["SF"]) and np.isfinite(got["AG"])  # no channel loop there
    want = ref.reference(f, a, b, ["EN", "SF", "AG", "Qabf"])
    assert np.isnan(want["EN"]) and got["SF"] == pytest.approx(want["SF"], rel=1e-9)


def _vifb_dir() -> pathlib.Path:
    root = os.environ.get("TOKFUSION_VIFB_DIR")
    if not root:
        pytest.skip("TOKFUSION_VIFB_DIR (a local copy of xingchenzhang/VIFB) is not set")
    path = pathlib.Path(root)
    if not (path / "output" / "evaluation_metrics_single").is_dir():
        pytest.skip(f"{path}: no output/evaluation_metrics_single")
    return path


def _sig5(x: float) -> float:
    return float(f"{x:.5g}")


def test_published_vifb_values():
    """All metrics VIFB computes, on all 21 pairs, after rounding to VIFB's 5 digits."""
    root = _vifb_dir()
    fused_dir, values_dir = (
        root / "output" / "fused_images",
        root / "output" / "evaluation_metrics_single",
    )
    pairs = sorted(p.stem for p in (root / "input" / "VI").glob("*.jpg"))
    methods = os.environ.get("TOKFUSION_VIFB_METHODS", "")
    methods = (
        methods.split(",")
        if methods
        else sorted(
            {p.stem.split("_", 1)[1] for p in fused_dir.glob("*.jpg")} - set(EXCLUDED_METHODS)
        )
    )
    assert len(pairs) == 21 and len(methods) >= 5
    worst = dict.fromkeys(VIFB_NAMES, 0.0)
    for pair in pairs:
        vi = np.array(Image.open(root / "input" / "VI" / f"{pair}.jpg"))
        ir = np.array(Image.open(root / "input" / "IR" / f"{pair}.jpg"))
        fused = np.stack([np.array(Image.open(fused_dir / f"{pair}_{m}.jpg")) for m in methods])
        n = len(methods)
        got = metrics.compute(fused, np.stack([ir] * n), np.stack([vi] * n), convention="vifb")
        for i, m in enumerate(methods):
            for name in VIFB_NAMES:
                text = (values_dir / f"{pair}_{m}_{ref.NAMES[name]}.txt").read_text()
                want = float(text)
                rel = abs(_sig5(got[name][i]) - want) / abs(want)
                worst[name] = max(worst[name], rel)
                assert rel <= 1e-4, (pair, m, name, got[name][i], want)
    print("worst relative error per metric:", worst)
