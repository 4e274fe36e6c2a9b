"""Smooth float32 versions of EI, AG, SF and SSIM (objectives for probing and training), and
the standard Wang et al. SSIM used for reconstruction quality."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax.metrics import cddfuse, ivif_zoo, shared
from tokfusion_jax.metrics.errors import MetricInputError

WANG_SSIM_TAPS = shared.fspecial_gaussian_taps(11, 1.5)


def _as_batch_0_255(x: jax.Array, data_range: float) -> tuple[jax.Array, bool]:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    single = x.ndim == 2
    if single:
        x = x[None]
    return x * (255.0 / data_range), single


def _batched(fn: Callable[..., jax.Array], *images: jax.Array, data_range: float) -> jax.Array:
    scaled = [_as_batch_0_255(x, data_range) for x in images]
    out = jax.vmap(fn)(*[s[0] for s in scaled])
    return out[0] if scaled[0][1] else out


def differentiable_ei(x: jax.Array, data_range: float = 1.0) -> jax.Array:
    """EI on the 0..255 scale of a float image (H, W), (B, H, W) or (B, H, W, 1) -> () or (B,).

    `data_range` is the value of white in `x` (1.0 for [0, 1] images, 255.0 for 0..255).
    """
    return _batched(shared.edge_intensity, x, data_range=data_range)


def differentiable_ag(x: jax.Array, data_range: float = 1.0) -> jax.Array:
    """AG on the 0..255 scale of a float image; shapes as `differentiable_ei`."""
    return _batched(shared.average_gradient, x, data_range=data_range)


def differentiable_sf(x: jax.Array, data_range: float = 1.0) -> jax.Array:
    """SF on the 0..255 scale of a float image; shapes as `differentiable_ei`."""
    return _batched(shared.spatial_frequency, x, data_range=data_range)


def _ssim_setup(convention: str) -> tuple[np.ndarray, float, float, float]:
    """(float32 taps, C1, C2, covariance normalisation) of a convention's float64 SSIM."""
    if convention == "ivif_zoo":
        return ivif_zoo.IVIF_ZOO_SSIM_TAPS, 0.01**2, 0.03**2, 1.0
    if convention == "cddfuse":
        taps = cddfuse.SSIM_BOX_TAPS.astype(np.float32)
        return taps, cddfuse.SSIM_C1, cddfuse.SSIM_C2, cddfuse.SSIM_COV_NORM
    raise MetricInputError(
        f"differentiable_ssim: convention={convention!r}: expected ivif_zoo or cddfuse"
    )


def differentiable_ssim(
    fused: jax.Array,
    a: jax.Array,
    b: jax.Array,
    data_range: float = 1.0,
    convention: str = "ivif_zoo",
) -> jax.Array:
    """SSIM(A, F) + SSIM(B, F) on the 0..255 scale of float images, float32, differentiable.

    Same definition as `compute`'s SSIM (float64 path) for the convention (ivif_zoo or
    cddfuse); the local moments are taken about the fused image's mean, which leaves the value
    unchanged and keeps float32 cancellation small. Shapes as `differentiable_ei`.
    """
    taps, c1, c2, cov_norm = _ssim_setup(convention)

    def pair_sum(f, x, y):  # (H, W) each
        c = jnp.mean(f)
        mu_r, mu_f, var_r, var_f, cov = shared.local_moments(jnp.stack([x, y]) - c, f - c, taps)
        mu_r, mu_f = mu_r + c, mu_f + c
        num = (2.0 * mu_r * mu_f + c1) * (2.0 * cov_norm * cov + c2)
        den = (mu_r * mu_r + mu_f * mu_f + c1) * (cov_norm * (var_r + var_f) + c2)
        return jnp.sum(jnp.mean(num / den, axis=(1, 2)))

    return _batched(pair_sum, fused, a, b, data_range=data_range)


def differentiable(
    fused: jax.Array, a: jax.Array, b: jax.Array, data_range: float = 1.0
) -> dict[str, jax.Array]:
    """{'EI', 'SF', 'AG', 'SSIM'} of float images (ivif_zoo definitions), differentiable."""
    return {
        "EI": differentiable_ei(fused, data_range),
        "SF": differentiable_sf(fused, data_range),
        "AG": differentiable_ag(fused, data_range),
        "SSIM": differentiable_ssim(fused, a, b, data_range),
    }


@functools.partial(jax.jit, static_argnames=("data_range",))
def _wang_ssim(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return jnp.mean(shared.ssim_maps(x[None], y, WANG_SSIM_TAPS, c1, c2))


def ssim(x: np.ndarray | jax.Array, y: np.ndarray | jax.Array, data_range: float = 255.0) -> float:
    """Standard SSIM (Wang et al.: Gaussian 11 / 1.5, 'valid', K = 0.01, 0.03) of two (H, W)
    images with white at `data_range`, in float64. Used for reconstruction quality, not fusion.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 2 or min(x.shape) < 11:
        raise MetricInputError(
            f"ssim: expected two equal (H, W) images >= 11 px, got {x.shape}, {y.shape}"
        )
    with jax.enable_x64(True):
        return float(_wang_ssim(jnp.asarray(x), jnp.asarray(y), float(data_range)))
