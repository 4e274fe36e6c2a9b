"""The ``cddfuse`` convention: Zhaozixiang1228/MMIF-CDDFuse ``utils/Evaluator.py``.

The evaluator of CDDFuse, EMMA, DDFM and their forks (NumPy, scikit-image 0.19, scikit-learn):

* EN exact; MI in nats (``sklearn.metrics.mutual_info_score``).
* SSIM: ``skimage.metrics.structural_similarity`` without ``data_range`` on float32 images,
  which 0.19 reads as L = 2 (C1 = 4e-4, C2 = 3.6e-3 on 0..255 data); a 7 x 7 uniform window,
  sample covariance (x 49 / 48) and a 3-pixel crop before the mean.
* VIF: the MATLAB-faithful ``vifp_mscale`` (``fspecial('gaussian', N, N / 5)``, 'valid'),
  a NaN ratio replaced by 1.
* It has no EI: EI is IVIF-ZOO's definition (zero-padded Sobel). SD, SF, AG, SCD, Qabf as in
  ``shared``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax.metrics import shared

SSIM_BOX_TAPS = np.full((7,), 1.0 / 7.0)
SSIM_MIN_SIDE = 7
SSIM_C1, SSIM_C2, SSIM_COV_NORM = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2, 49.0 / 48.0


def ssim_pair(f: jax.Array, a: jax.Array, b: jax.Array, precision: str = "float64") -> jax.Array:
    """(SSIM(A, F), SSIM(B, F)) -> (2,) as scikit-image 0.19 computes them (crop of 3)."""
    dtype = jnp.float64 if precision == "float64" else jnp.float32
    refs = jnp.stack([a, b]).astype(dtype)
    taps = SSIM_BOX_TAPS.astype(np.float64 if dtype == jnp.float64 else np.float32)
    maps = shared.ssim_maps(
        refs, f.astype(dtype), taps, SSIM_C1, SSIM_C2, cov_norm=SSIM_COV_NORM
    )  # 'valid' 7 x 7 = uniform_filter followed by the crop of 3
    return jnp.mean(maps, axis=(1, 2))


def vif(f: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """vifp(A, F) + vifp(B, F), MATLAB windows, each NaN ratio replaced by 1."""
    pair = shared.vif_pair(f, a, b, shared.MATLAB_VIF_TAPS, same_size=False)
    return jnp.sum(jnp.where(jnp.isnan(pair), 1.0, pair))


def metric_fns(ssim_precision: str = "float64") -> dict:
    """{name: (f, a, b) -> scalar} for this convention (gray (H, W) images)."""
    return {
        "EN": lambda f, a, b: shared.entropy(f),
        "SD": lambda f, a, b: shared.standard_deviation(f),
        "SF": lambda f, a, b: shared.spatial_frequency(f),
        "AG": lambda f, a, b: shared.average_gradient(f),
        "EI": lambda f, a, b: shared.edge_intensity(f),
        "SCD": shared.scd,
        "SSIM": lambda f, a, b: jnp.sum(ssim_pair(f, a, b, ssim_precision)),
        "MI": lambda f, a, b: shared.mutual_information(f, a) + shared.mutual_information(f, b),
        "VIF": vif,
        "Qabf": shared.qabf,
    }


MIN_SIDE = {"SSIM": SSIM_MIN_SIDE}
