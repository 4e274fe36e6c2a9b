"""ivif_zoo SSIM against IVIF-ZOO's own ``Metric/ssim.py`` arithmetic, run in torch.

``_ivif_zoo_ssim`` below restates that file's code path for SSIM_function (the window built by
``_fspecial_gauss_1d`` in float32, ``win.type_as(X)``, grouped 'valid' conv2d along H then W,
``_ssim``'s formula and mean). torchvision is not needed: its ``to_tensor`` on a float HxW array
is ``torch.from_numpy(x)[None]`` (no division, only uint8 is divided by 255), which is what is
done here before the ``* 255.0``.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tokfusion_jax import metrics
from tokfusion_jax.metrics import ivif_zoo

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _window() -> torch.Tensor:
    coords = torch.arange(11, dtype=torch.float32)
    coords -= 11 // 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g /= g.sum()
    return g


def _ivif_zoo_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """IVIF-ZOO ssim(X, Y) with its defaults (data_range 255, K = (0.01, 0.03))."""
    tx = torch.from_numpy(x)[None][None] * 255.0  # to_tensor(x).unsqueeze(0)... squeezed
    ty = torch.from_numpy(y)[None][None] * 255.0
    win = _window().reshape(1, 1, 1, 11).type_as(tx)

    def blur(t):
        t = F.conv2d(t, win.permute(0, 1, 3, 2), groups=1)  # along H
        return F.conv2d(t, win, groups=1)  # along W

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = blur(tx), blur(ty)
    s1 = blur(tx * tx) - mu1.pow(2)
    s2 = blur(ty * ty) - mu2.pow(2)
    s12 = blur(tx * ty) - mu1 * mu2
    cs = (2 * s12 + c2) / (s1 + s2 + c2)
    ssim_map = ((2 * mu1 * mu2 + c1) / (mu1.pow(2) + mu2.pow(2) + c1)) * cs
    return float(torch.flatten(ssim_map, 2).mean(-1).mean())


def test_committed_taps_are_torchs_float32_values():
    assert [float(v).hex() for v in _window()] == [
        float(h).hex() for h in ivif_zoo.IVIF_ZOO_SSIM_TAPS.astype(np.float64)
    ]
    # NumPy's float32 exp gives other last bits: the reason the taps are constants.
    t = np.arange(11, dtype=np.float32) - 5
    numpy_taps = np.exp(-(t * t) / np.float32(4.5))
    assert not np.array_equal(numpy_taps / numpy_taps.sum(), ivif_zoo.IVIF_ZOO_SSIM_TAPS)


def test_ssim_matches_ivif_zoo_code_on_real_cases(metric_cases):
    torch.set_num_threads(1)
    cases = sorted(p for p in metric_cases.iterdir() if p.is_dir())
    for case in cases:
        f, a, b = (np.array(Image.open(case / f"{n}.png")) for n in ("fused", "ir", "vis"))
        want = sum(_ivif_zoo_ssim(x.astype(np.float64), f.astype(np.float64)) for x in (a, b))
        got = metrics.compute(f, a, b, names=["SSIM"])["SSIM"]
        assert got == pytest.approx(want, rel=1e-6), case.name
        if case.name == "real_msrs_00055D_avg":  # float32 as shipped: cancellation-dominated
            want32 = sum(_ivif_zoo_ssim(x.astype(np.float32), f.astype(np.float32)) for x in (a, b))
            got32 = metrics.compute(f, a, b, names=["SSIM"], ssim_precision="float32")["SSIM"]
            assert abs(got32 - want32) < abs(got - want32)
