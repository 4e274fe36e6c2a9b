"""The ``ivif_zoo`` convention: RollingPlain/IVIF_ZOO ``Metric/eval_torch.py`` (the paper's).

* EN: ``torch.histc`` 256 bins and ``log2(p + 1e-7)`` in float32 (about 3e-5 below the exact
  entropy).
* SSIM: ``Metric/ssim.py`` (a pytorch_msssim copy) as shipped: an 11-tap Gaussian window
  (sigma 1.5) built in float32 by torch, 'valid' filtering, population moments, and, because
  ``to_tensor`` leaves float32 images undivided before the ``* 255``, C1 = 1e-4, C2 = 9e-4 on
  0..255 data. The taps are torch's float32 values (``IVIF_ZOO_SSIM_TAPS``): in float64 they
  sum to 0.99999997, and with such small constants that last bit moves SSIM by up to 2e-3.
* MI in bits; SD, SF, AG, EI (zero-padded Sobel), SCD and Qabf as in ``shared``.
* VIF: its active ``fspecial_gaussian`` samples the Gaussian at
  ``linspace(-(N+1)/2, (N-1)/2, N)`` and filters with zero-padded 'same' convolutions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax.metrics import ops, shared

# torch 2.13 (CPU; the same with ATEN_CPU_CAPABILITY=default, avx2 and avx512) running
# IVIF-ZOO's _fspecial_gauss_1d(11, 1.5): coords = torch.arange(11, dtype=torch.float32) - 5;
# g = torch.exp(-(coords ** 2) / (2 * 1.5 ** 2)); g /= g.sum(); printed with float.hex().
# NumPy's float32 exp differs from torch's in the last bit for four of these taps.
IVIF_ZOO_SSIM_TAPS_HEX: tuple[str, ...] = (
    "0x1.0d95700000000p-10",
    "0x1.f1fe020000000p-8",
    "0x1.26eb180000000p-5",
    "0x1.bff0fe0000000p-4",
    "0x1.b43c3e0000000p-3",
    "0x1.1065600000000p-2",
    "0x1.b43c3e0000000p-3",
    "0x1.bff0fe0000000p-4",
    "0x1.26eb180000000p-5",
    "0x1.f1fe020000000p-8",
    "0x1.0d95700000000p-10",
)
IVIF_ZOO_SSIM_TAPS = np.array([float.fromhex(h) for h in IVIF_ZOO_SSIM_TAPS_HEX], np.float32)
SSIM_MIN_SIDE = 11


def entropy(f: jax.Array) -> jax.Array:
    """EN in bits with 1e-7 inside the log, float32 (torch.histc over 0..255, 256 bins)."""
    p = ops.histogram256(f).astype(jnp.float32) / jnp.float32(f.size)
    return -jnp.sum(p * jnp.log2(p + jnp.float32(1e-7)))


def ssim_pair(f: jax.Array, a: jax.Array, b: jax.Array, precision: str = "float64") -> jax.Array:
    """(SSIM(A, F), SSIM(B, F)) -> (2,), in float64 or as shipped in float32.

    float64: 0..255 data, C1 = 1e-4, C2 = 9e-4 (the float32 computation's constants relative
    to its 0..65025 data). float32: the shipped arithmetic, data * 255 with C = (K * 255)^2.
    Both use torch's float32 taps (cast to the compute dtype, as ``win.type_as(X)`` does).
    """
    if precision == "float32":
        dtype, scale, c1, c2 = jnp.float32, 255.0, (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    else:
        dtype, scale, c1, c2 = jnp.float64, 1.0, 0.01**2, 0.03**2
    refs = jnp.stack([a, b]).astype(dtype) * scale  # (2, H, W)
    x = f.astype(dtype) * scale
    taps = IVIF_ZOO_SSIM_TAPS.astype(np.float64 if dtype == jnp.float64 else np.float32)
    return jnp.mean(shared.ssim_maps(refs, x, taps, c1, c2), axis=(1, 2))


def vif_taps(n: int, sigma: float) -> np.ndarray:
    """IVIF-ZOO's VIF window: samples at linspace(-(n+1)/2, (n-1)/2, n), normalised (n,)."""
    t = np.linspace((-n) // 2, n // 2, n)
    h = np.exp(-(t * t) / (2.0 * sigma * sigma))
    return h / h.sum()


VIF_TAPS = {n: vif_taps(n, n / 5.0) for n in shared.VIF_WINDOWS}


def metric_fns(ssim_precision: str = "float64") -> dict:
    """{name: (f, a, b) -> scalar} for this convention (gray (H, W) images)."""
    return {
        "EN": lambda f, a, b: entropy(f),
        "SD": lambda f, a, b: shared.standard_deviation(f),
        "SF": lambda f, a, b: shared.spatial_frequency(f),
        "AG": lambda f, a, b: shared.average_gradient(f),
        "EI": lambda f, a, b: shared.edge_intensity(f),
        "SCD": shared.scd,
        "SSIM": lambda f, a, b: jnp.sum(ssim_pair(f, a, b, ssim_precision)),
        "MI": lambda f, a, b: (
            (shared.mutual_information(f, a) + shared.mutual_information(f, b)) / math.log(2.0)
        ),
        "VIF": lambda f, a, b: jnp.sum(shared.vif_pair(f, a, b, VIF_TAPS, same_size=True)),
        "Qabf": shared.qabf,
    }


MIN_SIDE = {"SSIM": SSIM_MIN_SIDE}
