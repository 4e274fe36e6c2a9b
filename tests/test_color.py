"""BT.601 colour conversion: against a float64 reference and exact round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import BT601_FORWARD, BT601_ROUND_TRIP

from tokfusion_jax import color

FORWARD, ROUND_TRIP = BT601_FORWARD, BT601_ROUND_TRIP  # tests/tolerances.py


def reference_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """JFIF YCbCr in float64 from the published BT.601 matrix (offsets 0.5 on chroma)."""
    m = np.array(
        [
            [0.299, 0.587, 0.114],
            [-0.168735892, -0.331264108, 0.5],
            [0.5, -0.418687589, -0.081312411],
        ]
    )
    return rgb.astype(np.float64) @ m.T + np.array([0.0, 0.5, 0.5])


def rgb_grid() -> np.ndarray:
    """Every 8-bit colour on a stride-5 lattice plus the corners, float32 in [0, 1]."""
    v = np.unique(np.r_[np.arange(0, 256, 5), 255]).astype(np.float32) / 255.0
    return np.stack(np.meshgrid(v, v, v, indexing="ij"), axis=-1).reshape(-1, 3)


def test_matches_float64_reference():
    rgb = rgb_grid()
    np.testing.assert_allclose(color.rgb_to_ycbcr(rgb), reference_ycbcr(rgb), atol=FORWARD)


def test_round_trip_within_one_level():
    rgb = rgb_grid()
    back = color.ycbcr_to_rgb(color.rgb_to_ycbcr(rgb))
    assert back.dtype == np.float32
    assert np.abs(back - rgb).max() <= ROUND_TRIP  # far inside the 1/255 requirement
    assert np.array_equal(np.round(back * 255), np.round(rgb * 255))


def test_jax_matches_numpy_and_jits():
    rgb = rgb_grid()[:4096].reshape(64, 64, 3)
    ycc_np = color.rgb_to_ycbcr(rgb)
    ycc_jax = jax.jit(color.rgb_to_ycbcr)(jnp.asarray(rgb))
    assert isinstance(ycc_jax, jax.Array)
    np.testing.assert_allclose(np.asarray(ycc_jax), ycc_np, atol=2 * FORWARD)  # two programs
    back = jax.jit(color.ycbcr_to_rgb)(ycc_jax)
    np.testing.assert_allclose(np.asarray(back), rgb, atol=ROUND_TRIP)


def test_luma_of_gray_is_gray_and_chroma_neutral():
    g = np.linspace(0, 1, 256, dtype=np.float32)
    rgb = np.repeat(g[:, None], 3, axis=1)
    ycc = color.rgb_to_ycbcr(rgb)
    np.testing.assert_allclose(ycc[:, 0], g, atol=FORWARD)
    np.testing.assert_allclose(ycc[:, 1:], 0.5, atol=FORWARD)
    np.testing.assert_allclose(color.rgb_to_y(rgb)[:, 0], g, atol=FORWARD)
    assert color.is_gray(rgb) and not color.is_gray(rgb_grid())


def test_merge_restores_colour_and_clips():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 1, (8, 8, 3)).astype(np.float32)
    ycc = color.rgb_to_ycbcr(rgb)
    np.testing.assert_allclose(color.merge_y_cbcr(ycc[..., :1], ycc[..., 1:]), rgb, atol=ROUND_TRIP)
    # A bright fused luma with saturated chroma leaves the gamut: the result is clipped.
    out = color.merge_y_cbcr(np.ones((1, 1, 1), np.float32), np.array([[[0.0, 1.0]]], np.float32))
    assert out.min() >= 0.0 and out.max() <= 1.0
    unclipped = color.ycbcr_to_rgb(np.array([1.0, 0.0, 1.0], np.float32), clip=False)
    assert unclipped.max() > 1.0


@pytest.mark.parametrize("shape", [(3,), (2, 5, 3), (1, 4, 4, 3)])
def test_any_leading_shape(shape):
    x = np.full(shape, 0.25, np.float32)
    assert color.rgb_to_ycbcr(x).shape == shape
    assert color.rgb_to_y(x).shape == shape[:-1] + (1,)
