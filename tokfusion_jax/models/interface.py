"""Selective Token Editing (STE) and the token-to-map interface pi(Z, image) -> F_hat.

STE (paper Eq. 8): Z_tilde = Z + M * Delta with a binary mask M (N, C) that is one at the
configured positions x channels, and a learnable Delta (N, C) initialised to zero. The gradient of
Delta is M * dL/dZ_tilde, so only the masked entries ever change. The probe uses the soft form
M = outer(position weights, channel mask) with Gumbel-softmax selector weights.

Token-to-map (paper §4.2, appendix B), exact choices:

1. lift: a linear layer C -> dim on every token (with bias)                  (B, N, dim)
2. token map: a linear layer over the token axis N -> S*S (with bias), the
   S*S outputs read row-major as an S x S grid (S = coarse_size = 32)         (B, S, S, dim)
3. refine: x + alpha * conv3x3(x) (conv with bias, alpha a learnable scalar)  (B, S, S, dim)
4. the coarse grid is taken to (H/8, W/8): at 256 x 256 it already is; otherwise it is resized
   with antialiased bilinear interpolation (jax.image.resize "linear", antialias=True).
5. three x2 stages to H/4, H/2, H. Each: bilinear x2 upsampling (half-pixel centres, edge
   clamp, the same as PyTorch's align_corners=False), then detail injection:
       d = GELU(conv_k(image at this scale)),   k = 7, 5, 3 for the three stages (with bias)
       x = x + conv1x1([x, d])                  (2 dim -> dim, with bias)
   The image at scale H/2^s is its 2^s x 2^s box average (an exact antialiased downsample; H
   and W must be divisible by 8). Without detail injection a stage is the upsampling alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax.errors import ConfigError
from tokfusion_jax.models.backbone import Conv2d, Dtype, torch_uniform

Array = jax.Array

DETAIL_KERNELS = (7, 5, 3)  # detail-injection conv sizes of the H/4, H/2 and H stages
NUM_STAGES = len(DETAIL_KERNELS)  # x2 stages: the coarse level is H / 2**NUM_STAGES
SIZE_MULTIPLE = 2**NUM_STAGES


# ----------------------------------------------------------------------------- STE


def hard_mask(
    num_tokens: int, token_dim: int, positions: Sequence[int], channels: Sequence[int]
) -> np.ndarray:
    """Binary STE mask (num_tokens, token_dim): 1 at positions x channels, 0 elsewhere."""
    for name, values, limit in (
        ("model.ste.positions", positions, num_tokens),
        ("model.ste.channels", channels, token_dim),
    ):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < limit:
                raise ConfigError(f"{name}: {v!r} is not an integer in [0, {limit})")
    mask = np.zeros((num_tokens, token_dim), np.float32)
    mask[np.ix_(list(positions), list(channels))] = 1.0
    return mask


def channel_mask(token_dim: int, channels: Sequence[int]) -> np.ndarray:
    """Binary channel mask (token_dim,) with ones at `channels`."""
    return hard_mask(1, token_dim, (0,), channels)[0]


def soft_mask(weights: Array, channels: Sequence[int] | Array, token_dim: int) -> Array:
    """Soft STE mask M = outer(position weights, channel mask) of shape (N, token_dim).

    weights: (N,) or (S, N) selector weights (e.g. Gumbel-softmax outputs of S slots); slots are
    summed, so S one-hot slots give the hard mask of their positions. channels: channel indices,
    or a (token_dim,) channel-mask array.
    """
    w = jnp.asarray(weights, jnp.float32)
    if w.ndim == 2:
        w = w.sum(axis=0)
    if w.ndim != 1:
        raise ValueError(f"soft_mask: weights must be (N,) or (S, N), got {w.shape}")
    if isinstance(channels, (jax.Array, np.ndarray)):
        cm = jnp.asarray(channels, jnp.float32)
        if cm.shape != (token_dim,):
            raise ValueError(f"soft_mask: channel mask must be ({token_dim},), got {cm.shape}")
    else:
        cm = jnp.asarray(channel_mask(token_dim, channels))
    return jnp.outer(w, cm)


def ste_apply(z: Array, delta: Array, mask: Array) -> Array:
    """Z_tilde = Z + M * Delta. z (B, N, C) or (N, C); delta, mask (N, C). float32 out."""
    return jnp.asarray(z, jnp.float32) + jnp.asarray(mask, jnp.float32) * delta.astype(jnp.float32)


class SelectiveTokenEdit(nn.Module):
    """Holds Delta (N, C), zero-initialised, and applies the fixed hard mask."""

    num_tokens: int
    token_dim: int
    positions: tuple[int, ...]
    channels: tuple[int, ...]

    @nn.compact
    def __call__(self, z: Array) -> Array:  # (B, N, C) -> (B, N, C) float32
        if z.shape[-2:] != (self.num_tokens, self.token_dim):
            raise ValueError(
                f"SelectiveTokenEdit: tokens {z.shape} do not match "
                f"(N, C) = ({self.num_tokens}, {self.token_dim})"
            )
        delta = self.param("delta", nn.initializers.zeros, (self.num_tokens, self.token_dim))
        mask = hard_mask(self.num_tokens, self.token_dim, self.positions, self.channels)
        return ste_apply(z, delta, mask)


# ----------------------------------------------------------------------------- token-to-map


def upsample2x(x: Array) -> Array:
    """Bilinear x2 upsampling of (B, H, W, C) -> (B, 2H, 2W, C), half-pixel centres, edge clamp."""

    def along(t: Array, axis: int) -> Array:
        n = t.shape[axis]
        prev = jnp.concatenate(
            [
                jax.lax.slice_in_dim(t, 0, 1, axis=axis),
                jax.lax.slice_in_dim(t, 0, n - 1, axis=axis),
            ],
            axis=axis,
        )
        nxt = jnp.concatenate(
            [
                jax.lax.slice_in_dim(t, 1, n, axis=axis),
                jax.lax.slice_in_dim(t, n - 1, n, axis=axis),
            ],
            axis=axis,
        )
        even = 0.25 * prev + 0.75 * t  # output 2j sits at source j - 1/4
        odd = 0.75 * t + 0.25 * nxt  # output 2j + 1 sits at source j + 1/4
        out = jnp.stack([even, odd], axis=axis + 1)
        shape = list(t.shape)
        shape[axis] = 2 * n
        return out.reshape(shape)

    return along(along(x, 1), 2)


def box_downsample(x: Array, factor: int) -> Array:
    """Averages factor x factor blocks: (B, H, W, C) -> (B, H/factor, W/factor, C)."""
    if factor == 1:
        return x
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class Linear(nn.Module):
    """Dense layer on the last axis with PyTorch's default initialisation."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_uniform(fan_in), (fan_in, self.features))
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", torch_uniform(fan_in), (self.features,)).astype(self.dtype)
        return y


class TokenToMap(nn.Module):
    """pi(Z, image): tokens (B, N, C) and the source image (B, H, W, 1) -> F_hat (B, H, W, dim).

    H and W must be divisible by 8 (callers pad and crop back).
    """

    dim: int = 64
    coarse_size: int = 32
    detail_injection: bool = True
    refine_scale_init: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array, image: Array) -> Array:
        b, h, w, _ = image.shape
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(
                f"TokenToMap: image size {h}x{w} is not divisible by {SIZE_MULTIPLE}; pad it first"
            )
        s = self.coarse_size
        t = Linear(self.dim, dtype=self.dtype, name="lift")(z)  # (B, N, dim)
        t = Linear(s * s, dtype=self.dtype, name="token_map")(
            jnp.swapaxes(t, 1, 2)
        )  # (B, dim, S*S)
        x = jnp.swapaxes(t, 1, 2).reshape(b, s, s, self.dim)  # (B, S, S, dim)
        alpha = self.param("refine_scale", nn.initializers.constant(self.refine_scale_init), ())
        refine = Conv2d(self.dim, 3, use_bias=True, dtype=self.dtype, name="refine")(x)
        x = x + alpha.astype(self.dtype) * refine
        coarse_hw = (h // SIZE_MULTIPLE, w // SIZE_MULTIPLE)
        if coarse_hw != (s, s):
            x = jax.image.resize(
                x.astype(jnp.float32), (b, *coarse_hw, self.dim), "linear", antialias=True
            ).astype(self.dtype)
        image = image.astype(jnp.float32)
        for stage, k in enumerate(DETAIL_KERNELS):
            x = upsample2x(x)  # (B, H / 2**(2 - stage), W / 2**(2 - stage), dim)
            if not self.detail_injection:
                continue
            src = box_downsample(image, 2 ** (NUM_STAGES - 1 - stage))
            d = Conv2d(self.dim, k, use_bias=True, dtype=self.dtype, name=f"detail_{stage}")(src)
            d = nn.gelu(d, approximate=False)
            x = x + Conv2d(self.dim, 1, use_bias=True, dtype=self.dtype, name=f"merge_{stage}")(
                jnp.concatenate([x, d], axis=-1)
            )
        return x
