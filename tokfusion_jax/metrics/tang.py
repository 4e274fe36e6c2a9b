"""The ``tang`` convention: Linfeng-Tang/Evaluation-for-Image-Fusion (MATLAB).

``Evaluation/analysis_Reference.m``, the evaluation that SeAFusion, PIAFusion, SwinFusion and
many later papers report. Images are ``imread`` (``rgb2gray`` for 3-channel files), EN and MI
see uint8, everything else ``im2double(x) * 255`` (double, 0..255):

* EN: MATLAB ``entropy`` (exact, bits).
* MI: ``MI_evaluation``: H(X) + H(F) - H(X, F) in bits per source, where the joint histogram
  (``Hab``) indexes ``uint8 + 1``, which saturates: grey levels 254 and 255 share a joint bin.
* SF, SD, SCD (``corr2``), Qabf: as in ``shared``. AG: sum divided by (H - 1)(W - 1).
* CC: mean of corr(A, F) and corr(B, F).
* MSE: mean of the two mean squared errors on the 0..1 scale; PSNR = 20 log10(255 / sqrt(MSE))
  on that same 0..1 MSE (as the code computes it, about 48 dB above the usual value).
* VIF: ``vifp_mscale`` (MATLAB windows, 'valid'), vifp(A, F) + vifp(B, F), NaN kept.
* SSIM (the ``easy = 0`` branch): 0.5 ssim(F, A) + 0.5 ssim(F, B) with MATLAB's built-in
  ``ssim`` defaults: an 11 x 11 Gaussian window (sigma 1.5) with replicate padding ('same'
  map), population moments, and DynamicRange 1 for double input, so C1 = 1e-4 and C2 = 9e-4
  on these 0..255 images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokfusion_jax.metrics import ops, shared

SSIM_TAPS = shared.fspecial_gaussian_taps(11, 1.5)
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # DynamicRange 1


def mutual_information(f: jax.Array, x: jax.Array) -> jax.Array:
    """MI_evaluation's MI(X, F) in bits: exact marginals, joint bins of min(level, 254)."""
    joint = ops.joint_histogram256(jnp.minimum(f, 254), jnp.minimum(x, 254))
    return shared.entropy(x) + shared.entropy(f) - ops.entropy_of_counts(joint)


def mse(f: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """0.5 mean((F - A)^2) + 0.5 mean((F - B)^2) on the 0..1 scale."""
    f, a, b = (x.astype(jnp.float64) / 255.0 for x in (f, a, b))
    return 0.5 * jnp.mean(jnp.square(f - a)) + 0.5 * jnp.mean(jnp.square(f - b))


def psnr(f: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """20 log10(255 / sqrt(MSE)) with the 0..1-scale MSE."""
    return 20.0 * jnp.log10(255.0 / jnp.sqrt(mse(f, a, b)))


def ssim(f: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """0.5 SSIM(F, A) + 0.5 SSIM(F, B) with MATLAB ssim's defaults on double 0..255 data."""
    refs = jnp.stack([a, b]).astype(jnp.float64)
    maps = shared.ssim_maps(
        refs, f.astype(jnp.float64), SSIM_TAPS, SSIM_C1, SSIM_C2, pad=5, mode="edge"
    )
    return 0.5 * jnp.sum(jnp.mean(maps, axis=(1, 2)))


def metric_fns(ssim_precision: str = "float64") -> dict:
    """{name: (f, a, b) -> scalar} for this convention (gray (H, W) images)."""
    del ssim_precision  # the MATLAB code is double throughout
    return {
        "EN": lambda f, a, b: shared.entropy(f),
        "SD": lambda f, a, b: shared.standard_deviation(f),
        "SF": lambda f, a, b: shared.spatial_frequency(f),
        "AG": lambda f, a, b: shared.average_gradient_matlab(f),
        "SCD": shared.scd,
        "CC": shared.correlation_mean,
        "SSIM": ssim,
        "MI": lambda f, a, b: mutual_information(f, a) + mutual_information(f, b),
        "VIF": lambda f, a, b: jnp.sum(
            shared.vif_pair(f, a, b, shared.MATLAB_VIF_TAPS, same_size=False)
        ),
        "Qabf": shared.qabf,
        "MSE": mse,
        "PSNR": psnr,
    }


MIN_SIDE = {"AG": 2}
