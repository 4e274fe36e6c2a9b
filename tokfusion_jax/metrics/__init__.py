"""Image-fusion quality metrics in JAX, reproducing four published evaluators number for number.

``compute(fused, a, b, names, convention)`` is the front door (A = infrared, B = visible,
F = fused, 0..255). Seventeen metric names; each convention defines the ones its reference
computes (``convention_metrics``) and raises `MetricInputError` for the others:

==========  ================================================================================
EN          entropy of F's 256-level histogram, bits
SD          standard deviation of F (population)
SF          spatial frequency of F
AG          average gradient of F (``gradient`` differences)
EI          edge intensity of F: mean Sobel magnitude
MI          MI(A, F) + MI(B, F) from 256 x 256 joint histograms
SSIM        SSIM(A, F) + SSIM(B, F) (tang: their mean)
Qabf        Xydeas-Petrovic gradient-based fusion quality
VIF         multi-scale pixel-domain VIF, vifp(A, F) + vifp(B, F)
SCD         sum of the correlations of differences, corr(F - B, A) + corr(F - A, B)
CC          mean correlation of F with A and B
PSNR        peak signal-to-noise ratio of F against the sources (each reference's own formula)
MSE         mean squared error of F against the sources (tang: on the 0..1 scale)
RMSE        VIFB's "RMSE", the mean of sqrt(sum (X - F)^2) / (H W) over the sources
CE          cross entropy (KL divergence of the histograms), mean over the sources, bits
Qcb         Chen-Blum human-perception quality
Qcv         Chen-Varshney human-perception distortion (lower is better)
==========  ================================================================================

Conventions (module docstrings give every detail):

``ivif_zoo`` (default; the paper reports these)  RollingPlain/IVIF_ZOO ``Metric/*.py``.
``cddfuse``   the CDDFuse / EMMA / DDFM ``utils/Evaluator.py``.
``vifb``      xingchenzhang/VIFB ``metrics/*.m``; scores colour images per channel.
``tang``      Linfeng-Tang/Evaluation-for-Image-Fusion ``analysis_Reference.m`` (SeAFusion,
              PIAFusion, SwinFusion and later papers).

Inputs are 8-bit images: floats are rounded and clipped to uint8 first, as the references
evaluate 8-bit files. Gray (H, W) or batches (B, H, W); ``vifb`` also takes colour (H, W, 3) /
(B, H, W, 3) arrays, each of fused, a and b gray or colour on its own.

Precision: everything runs inside a scoped ``jax.enable_x64`` (never the global flag). Maps
that are exact integers for 8-bit inputs are float32 with float64 sums; MI, VIF, SSIM and the
MATLAB conventions' cancellation-prone maps are float64. ``ssim_precision="float32"``
reproduces the Python evaluators' float32 SSIM arithmetic.

Everything is jit-compiled and batched over same-size images (vmapped on accelerators, a
`lax.map` loop on CPU, where it is about twice as fast per image).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax.metrics import cddfuse, ivif_zoo, ops, tang, vifb
from tokfusion_jax.metrics.differentiable import (
    differentiable,
    differentiable_ag,
    differentiable_ei,
    differentiable_sf,
    differentiable_ssim,
    ssim,
)
from tokfusion_jax.metrics.errors import MetricInputError
from tokfusion_jax.metrics.ops import filter_maps
from tokfusion_jax.metrics.shared import qabf, scd, standard_deviation

__all__ = [
    "CONVENTIONS",
    "COLOR_CONVENTIONS",
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "PAPER_METRICS",
    "MetricInputError",
    "check_names",
    "compute",
    "convention_metrics",
    "differentiable",
    "differentiable_ag",
    "differentiable_ei",
    "differentiable_sf",
    "differentiable_ssim",
    "filter_maps",
    "ops",
    "qabf",
    "scd",
    "ssim",
    "standard_deviation",
    "to_uint8_gray",
]

METRIC_NAMES: tuple[str, ...] = (
    "EN", "SD", "SF", "AG", "EI", "SCD", "SSIM", "MI", "VIF", "Qabf",
    "CC", "PSNR", "MSE", "RMSE", "CE", "Qcb", "Qcv",
)  # fmt: skip
PAPER_METRICS: tuple[str, ...] = ("EN", "SD", "SCD", "EI", "SF", "AG", "SSIM")
CONVENTIONS: tuple[str, ...] = ("ivif_zoo", "cddfuse", "vifb", "tang")
COLOR_CONVENTIONS: tuple[str, ...] = ("vifb",)  # references that score colour images as stored
HIGHER_IS_BETTER: dict[str, bool] = {
    name: name not in ("MSE", "RMSE", "CE", "Qcv") for name in METRIC_NAMES
}
_MODULES: dict[str, ModuleType] = {
    "ivif_zoo": ivif_zoo,
    "cddfuse": cddfuse,
    "vifb": vifb,
    "tang": tang,
}
_PRECISIONS = ("float64", "float32")


def _check_convention(convention: str) -> ModuleType:
    if convention not in _MODULES:
        raise MetricInputError(f"convention={convention!r}: expected one of {CONVENTIONS}")
    return _MODULES[convention]


def convention_metrics(convention: str) -> tuple[str, ...]:
    """The metric names `convention` defines, in `METRIC_NAMES` order."""
    defined = _check_convention(convention).metric_fns()
    return tuple(n for n in METRIC_NAMES if n in defined)


def check_names(names: Sequence[str], convention: str) -> tuple[str, ...]:
    """`names` as a tuple, or `MetricInputError` naming the unknown / undefined ones."""
    names = tuple(names)
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise MetricInputError(f"unknown metric(s) {unknown}: expected some of {METRIC_NAMES}")
    defined = convention_metrics(convention)
    missing = [n for n in names if n not in defined]
    if missing:
        raise MetricInputError(
            f"convention {convention!r} does not define {missing}; it defines {defined}"
        )
    if not names:
        raise MetricInputError("no metric names given")
    return names


def _metric_fns(
    names: tuple[str, ...], convention: str, ssim_precision: str
) -> dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]]:
    table = _MODULES[convention].metric_fns(ssim_precision)
    return {name: table[name] for name in names}


@functools.partial(jax.jit, static_argnames=("names", "convention", "ssim_precision", "sequential"))
def _compute_batch(
    fused: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    names: tuple[str, ...],
    convention: str,
    ssim_precision: str,
    sequential: bool,
) -> dict[str, jax.Array]:
    """uint8 (B, H, W) triplets ((B, H, W, C) for colour conventions) -> {name: (B,)}.

    `sequential` loops over the batch with `lax.map` (CPU: the working set of one image stays
    in cache, about 2x faster per image than `vmap`); otherwise the batch is vmapped.
    """
    fns = _metric_fns(names, convention, ssim_precision)

    def one(triplet):
        f, x, y = triplet
        return {name: jnp.asarray(fn(f, x, y), jnp.float64) for name, fn in fns.items()}

    if sequential:
        return jax.lax.map(one, (fused, a, b))
    return jax.vmap(lambda f, x, y: one((f, x, y)))(fused, a, b)


def to_uint8_gray(x: np.ndarray | jax.Array, what: str = "image") -> np.ndarray:
    """Round and clip a 0..255 image or batch (any shape) to uint8."""
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise MetricInputError(f"{what}: expected a uint8 or float 0..255 array, got {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise MetricInputError(f"{what}: contains NaN or Inf")
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def _as_batch(x: np.ndarray, what: str, color: bool, convention: str) -> tuple[np.ndarray, bool]:
    """-> ((B, H, W) gray, or (B, H, W, C) for colour conventions, single-image flag)."""
    colour_image = x.ndim in (3, 4) and x.shape[-1] == 3
    if not color:
        if x.ndim == 4 or colour_image:
            raise MetricInputError(
                f"{what}: shape {x.shape} looks like colour, but convention {convention!r} scores "
                f"gray images (B, H, W) / (H, W); colour is scored by {COLOR_CONVENTIONS}"
            )
        if x.ndim not in (2, 3):
            raise MetricInputError(f"{what}: expected gray (H, W) or (B, H, W), got {x.shape}")
        return (x[None] if x.ndim == 2 else x), x.ndim == 2
    if x.ndim == 2:
        return x[None, ..., None], True
    if x.ndim == 3:
        return (x[None] if colour_image else x[..., None]), colour_image
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return x, False
    raise MetricInputError(
        f"{what}: expected (H, W), (H, W, 3), (B, H, W) or (B, H, W, 3), got {x.shape}"
    )


def compute(
    fused: np.ndarray | jax.Array,
    a: np.ndarray | jax.Array,
    b: np.ndarray | jax.Array,
    names: Sequence[str] | None = None,
    convention: str = "ivif_zoo",
    ssim_precision: str = "float64",
) -> dict[str, float | np.ndarray]:
    """Fusion metrics of `fused` against sources `a` (infrared) and `b` (visible).

    Args:
      fused, a, b: images on the 0..255 scale, uint8 or float (rounded and clipped to uint8),
        gray (H, W) or (B, H, W) of one size; for colour conventions (`vifb`) each may also be
        colour (H, W, 3) / (B, H, W, 3).
      names: metrics to compute (default: every metric of the convention).
      convention: one of `CONVENTIONS` ("ivif_zoo" default); see the module docstring.
      ssim_precision: "float64" (default) or "float32" (the Python evaluators' float32 SSIM
        arithmetic; the MATLAB conventions are double throughout).

    Returns:
      {name: float} for single images, {name: np.ndarray (B,)} float64 for batches.
    """
    _check_convention(convention)
    if ssim_precision not in _PRECISIONS:
        raise MetricInputError(f"ssim_precision={ssim_precision!r}: expected float64 or float32")
    names = check_names(convention_metrics(convention) if names is None else names, convention)
    color = convention in COLOR_CONVENTIONS
    batches = [
        _as_batch(to_uint8_gray(x, w), w, color, convention)
        for x, w in ((fused, "fused"), (a, "a"), (b, "b"))
    ]
    (f8, single), (a8, _), (b8, _) = batches
    shapes = [x.shape[:3] for x, _ in batches]
    if len(set(shapes)) != 1 or len({s for _, s in batches}) != 1:
        raise MetricInputError(
            f"shape mismatch: fused {f8.shape}, a {a8.shape}, b {b8.shape} (expected one "
            "batch and image size)"
        )
    h, w = f8.shape[1:3]
    min_sides = _MODULES[convention].MIN_SIDE
    min_side = max([2] + [min_sides.get(n, 2) for n in names])
    if min(h, w) < min_side:
        raise MetricInputError(
            f"images of size {h}x{w} are too small: {names} need both sides >= {min_side}"
        )
    with jax.enable_x64(True):
        out = _compute_batch(
            jnp.asarray(f8),
            jnp.asarray(a8),
            jnp.asarray(b8),
            names=names,
            convention=convention,
            ssim_precision=ssim_precision,
            sequential=jax.default_backend() == "cpu",
        )
        values = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    if single:
        return {k: float(v[0]) for k, v in values.items()}
    return values
