"""The ``tang`` convention against its MATLAB code's values (GNU Octave) and a NumPy reference.

tests/data/tang/tang_octave_values.json holds what Linfeng-Tang/Evaluation-for-Image-Fusion's
analysis_Reference.m (easy = 1, commit 0e87153) computes on ../shared/metric_cases under GNU
Octave 7.3 with the image package 2.14, written by tests/data/tang/tang_reference.m (see the
README there). SSIM is the easy = 0 branch (MATLAB's built-in ``ssim``, which Octave lacks):
it is checked against the NumPy reference of that definition only.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from metric_refs import tang as ref
from PIL import Image

from tokfusion_jax import metrics

OCTAVE_VALUES = pathlib.Path(__file__).parent / "data" / "tang" / "tang_octave_values.json"
TANG_NAMES = metrics.convention_metrics("tang")
# Qabf, SD, AG use float32 maps with float64 sums (~1e-7 relative); the rest is float64.
RTOL = {**dict.fromkeys(TANG_NAMES, 1e-9), "Qabf": 1e-6, "SD": 1e-6, "AG": 1e-6, "VIF": 1e-6}


def _load(case: pathlib.Path):
    return tuple(np.array(Image.open(case / f"{n}.png")) for n in ("fused", "ir", "vis"))


@pytest.fixture(scope="module")
def tang_values(metric_cases):
    """{case: {name: value}} for every metric case, one compute per image size."""
    groups: dict[tuple[int, int], list] = {}
    for case in sorted(p for p in metric_cases.iterdir() if p.is_dir()):
        triplet = _load(case)
        groups.setdefault(triplet[0].shape, []).append((case.name, triplet))
    out = {}
    for items in groups.values():
        f, a, b = (np.stack([t[k] for _, t in items]) for k in range(3))
        got = metrics.compute(f, a, b, convention="tang")
        for i, (name, triplet) in enumerate(items):
            out[name] = ({k: float(v[i]) for k, v in got.items()}, triplet)
    return out


# Both tests read the module fixture `tang_values` (one compute per image size, ~15 s): one worker.
@pytest.mark.xdist_group("tang_values")
def test_matches_octave_run_of_the_matlab_code(tang_values):
    expected = json.loads(OCTAVE_VALUES.read_text())
    assert set(expected) == set(tang_values)
    for case, want in expected.items():
        got = tang_values[case][0]
        assert set(want) == set(TANG_NAMES) - {"SSIM"}
        for name, value in want.items():
            # Octave is double throughout; our float32 maps (Qabf, SD, AG) add ~1e-7.
            assert got[name] == pytest.approx(value, rel=1e-6), (case, name)


@pytest.mark.xdist_group("tang_values")
def test_matches_numpy_reference_including_ssim(tang_values):
    for case, (got, (f, a, b)) in tang_values.items():
        want = ref.reference(f, a, b)
        for name in TANG_NAMES:
            rtol = 1e-7 if name == "SSIM" else RTOL[name]
            np.testing.assert_allclose(got[name], want[name], rtol=rtol, err_msg=f"{case} {name}")


def test_saturated_levels_share_a_joint_bin_in_mi():
    """uint8 + 1 saturates in Hab: F holding both 254 and 255 gives more MI than exact MI."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    f = np.where(rng.random((32, 32)) < 0.5, 254, 255).astype(np.uint8)
    tang = metrics.compute(f, a, a, names=["MI"], convention="tang")["MI"]
    exact_bits = metrics.compute(f, a, a, names=["MI"], convention="ivif_zoo")["MI"]
    assert tang == pytest.approx(ref.mi(f, a, a), rel=1e-12)
    assert tang > exact_bits + 0.1
