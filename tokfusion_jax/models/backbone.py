"""CDDFuse-style base/detail backbone in flax linen (NHWC).

Blocks (every convolution has stride 1 and keeps the spatial size):

* `Conv2d`: PyTorch-initialised convolution with groups, optional bias, zero or reflect padding.
* `WithBiasLayerNorm`: per-pixel LayerNorm over channels (eps 1e-5, biased variance, float32).
* `MDTA`, `GDFN`, `TransformerBlock`: the Restormer block (channel "transposed" attention).
* `BaseFeatureExtraction`: the lite-transformer base branch (dense 3x3 qkv, grouped Mlp).
* `InvertedResidualBlock`, `DetailNode`, `DetailFeatureExtraction`: the INN detail branch, with
  an exact `inverse`.
* `Encoder`: [patch_embed] -> TransformerBlocks -> (base, detail) in parallel.
  `remat=True` (Encoder, Decoder) recomputes each block's activations in the backward pass.
* `Decoder`: concat -> 1x1 reduce -> TransformerBlocks -> 3x3, LeakyReLU, 3x3 -> + residual ->
  sigmoid.

Parameters are float32; `dtype` is the compute dtype. LayerNorm statistics, the l2
normalisation of q/k and the softmax run in float32. Biases are exactly where CDDFuse has them
(only the DetailNode's 1x1 "shuffle" conv has one in the backbone). Initialisation follows
PyTorch's defaults: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

LN_EPS = 1e-5
L2_EPS = 1e-12


def torch_uniform(fan_in: int) -> nn.initializers.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for conv/linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# Elementwise form of a per-tap group product when a group has at most this many
# input x output channels (depthwise: 1, CDDFuse's groups=dim Mlp: 4); an einsum otherwise.
_ELEMENTWISE_GROUP_SIZE = 4


def _tap_product(window: Array, taps: Array) -> Array:
    """One kernel tap of a grouped conv: (B, H, W, G, ci) x (ci, G, co) -> (B, H, W, G, co)."""
    ci, _, co = taps.shape
    if ci * co > _ELEMENTWISE_GROUP_SIZE:
        return jnp.einsum("bhwgc,cgo->bhwgo", window, taps)
    return sum(window[..., c : c + 1] * taps[c] for c in range(ci))  # broadcasts over co


def _tap_kernel_grad(window: Array, grad: Array) -> Array:
    """d(loss)/d(tap): (B, H, W, G, ci), (B, H, W, G, co) -> (ci, G, co), float32 accumulation."""
    ci, co = window.shape[-1], grad.shape[-1]
    if ci * co > _ELEMENTWISE_GROUP_SIZE:
        return jnp.einsum("bhwgc,bhwgo->cgo", window, grad, preferred_element_type=jnp.float32)
    groups = window.shape[-2]
    w2 = window.reshape(-1, groups, ci).astype(jnp.float32)  # (N, G, ci)
    g2 = grad.reshape(-1, groups, co).astype(jnp.float32)  # (N, G, co)
    per_pair = [[jnp.sum(w2[:, :, c] * g2[:, :, o], axis=0) for o in range(co)] for c in range(ci)]
    return jnp.stack([jnp.stack(row, axis=-1) for row in per_pair])  # (ci, G, co)


def _valid_grouped_conv_fwd_only(xp: Array, taps: Array) -> Array:
    """VALID grouped conv as a sum over taps.

    xp (B, Hp, Wp, G, ci), taps (k, k, ci, G, co) -> (B, Hp - k + 1, Wp - k + 1, G, co).
    """
    k = taps.shape[0]
    h, w = xp.shape[1] - k + 1, xp.shape[2] - k + 1
    y = None
    for i in range(k):
        for j in range(k):
            term = _tap_product(xp[:, i : i + h, j : j + w], taps[i, j])
            y = term if y is None else y + term
    return y


@jax.custom_vjp
def _valid_grouped_conv(xp: Array, taps: Array) -> Array:
    return _valid_grouped_conv_fwd_only(xp, taps)


def _valid_grouped_conv_fwd(xp: Array, taps: Array) -> tuple[Array, tuple[Array, Array]]:
    return _valid_grouped_conv_fwd_only(xp, taps), (xp, taps)


def _valid_grouped_conv_bwd(res: tuple[Array, Array], grad: Array) -> tuple[Array, Array]:
    """Both cotangents without XLA:CPU's generic convolution-gradient loops.

    d/dxp: the same tap sum over the (k - 1)-padded output gradient with the spatially flipped
    kernel whose ci and co axes are swapped. d/dtaps: one reduction per tap, run as a `lax.map`
    over the k*k offsets (XLA:CPU runs k*k sibling reductions of shifted windows ~6x slower).
    """
    xp, taps = res
    k = taps.shape[0]
    h, w = grad.shape[1], grad.shape[2]
    grad_padded = jnp.pad(grad, ((0, 0), (k - 1, k - 1), (k - 1, k - 1), (0, 0), (0, 0)))
    flipped = jnp.flip(taps, axis=(0, 1)).transpose(0, 1, 4, 3, 2)  # (k, k, co, G, ci)
    d_xp = _valid_grouped_conv_fwd_only(grad_padded, flipped).astype(xp.dtype)

    offsets = jnp.array([(i, j) for i in range(k) for j in range(k)], jnp.int32)  # (k*k, 2)

    b, hp, wp, groups, ci = xp.shape
    xp_flat = xp.reshape(b, hp, wp, groups * ci)  # 4D slices stay on XLA:CPU's fast path

    def one_tap(offset: Array) -> Array:  # -> (ci, G, co)
        window = jax.lax.dynamic_slice(
            xp_flat, (0, offset[0], offset[1], 0), (b, h, w, groups * ci)
        )
        return _tap_kernel_grad(window.reshape(b, h, w, groups, ci), grad)

    d_taps = jax.lax.map(one_tap, offsets).reshape(taps.shape).astype(taps.dtype)
    return d_xp, d_taps


_valid_grouped_conv.defvjp(_valid_grouped_conv_fwd, _valid_grouped_conv_bwd)


def grouped_conv_by_taps(x: Array, kernel: Array, groups: int, padding: Any) -> Array:
    """Grouped stride-1 convolution as a sum over the k*k kernel taps, with a custom gradient.

    Same result as `lax.conv_general_dilated(..., feature_group_count=groups)` (up to the order
    of the float additions). XLA:CPU lowers grouped and depthwise convolutions, and above all
    their gradients, to slow generic loops (benchmarks/NOTES.md has the measurements);
    accelerators keep the native convolution. Reverse-mode differentiable only.
    x (B, H, W, C_in), kernel (k, k, C_in / groups, C_out) -> (B, H, W, C_out).
    """
    k = kernel.shape[0]
    if padding != "VALID":
        (top, bottom), (left, right) = padding
        x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    b, hp, wp, c_in = x.shape
    per_group_in, c_out = kernel.shape[2], kernel.shape[3]
    xp = x.reshape(b, hp, wp, groups, per_group_in)
    taps = kernel.reshape(k, k, per_group_in, groups, c_out // groups)  # group-major output
    y = _valid_grouped_conv(xp, taps)  # (B, H, W, G, co)
    return y.reshape(b, hp - k + 1, wp - k + 1, c_out)


def _dense_conv_fwd_only(x: Array, kernel: Array, padding: Any) -> Array:
    """Stride-1 dense convolution: (B, H, W, C_in), (k, k, C_in, C_out) -> (B, H', W', C_out)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_conv(x: Array, kernel: Array, padding: Any) -> Array:
    return _dense_conv_fwd_only(x, kernel, padding)


def _dense_conv_fwd(x: Array, kernel: Array, padding: Any) -> tuple[Array, tuple[Array, Array]]:
    return _dense_conv_fwd_only(x, kernel, padding), (x, kernel)


def _dense_conv_bwd(padding: Any, res: tuple[Array, Array], grad: Array) -> tuple[Array, Array]:
    """Both cotangents of a stride-1 dense convolution, the kernel's as k*k row-major GEMMs.

    d/dx: the native convolution of the output gradient with the spatially flipped kernel (its
    C_in and C_out swapped), padded by k - 1 - pad on each side. d/dkernel: for each tap (i, j),
    window(i, j)^T @ grad over the flattened pixels of the zero-padded input. XLA:CPU runs its
    own kernel-gradient convolution several times slower than these GEMMs (benchmarks/NOTES.md).
    """
    x, kernel = res
    k = kernel.shape[0]
    (top, bottom), (left, right) = padding
    flipped = jnp.flip(kernel, axis=(0, 1)).transpose(0, 1, 3, 2)  # (k, k, C_out, C_in)
    grad_padding = ((k - 1 - top, k - 1 - bottom), (k - 1 - left, k - 1 - right))
    d_x = _dense_conv_fwd_only(grad, flipped, grad_padding).astype(x.dtype)

    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    b, h, w, c_out = grad.shape
    g2 = grad.reshape(-1, c_out)  # (N, C_out)
    taps = [
        jax.lax.dot_general(
            xp[:, i : i + h, j : j + w].reshape(-1, x.shape[-1]),  # (N, C_in)
            g2,
            (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        for i in range(k)
        for j in range(k)
    ]
    d_kernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    return d_x, d_kernel


_dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


def dense_conv(x: Array, kernel: Array, padding: Any) -> Array:
    """Stride-1 dense k x k convolution with explicit ((top, bottom), (left, right)) padding.

    Same values as `lax.conv_general_dilated`; on CPU its gradient comes from `_dense_conv_bwd`.
    x (B, H, W, C_in), kernel (k, k, C_in, C_out) -> (B, H', W', C_out).
    Reverse-mode differentiable only.
    """
    if padding == "VALID":
        padding = ((0, 0), (0, 0))
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _dense_conv(x, kernel, padding)


@jax.custom_vjp
def _matmul_last_axis(x: Array, w: Array) -> Array:
    """(..., C_in) @ (C_in, C_out) -> (..., C_out)."""
    return jnp.einsum("...c,cd->...d", x, w)


def _matmul_last_axis_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return _matmul_last_axis(x, w), (x, w)


def _matmul_last_axis_bwd(res: tuple[Array, Array], grad: Array) -> tuple[Array, Array]:
    """Both cotangents as row-major GEMMs over the flattened pixels.

    Left to autodiff, XLA:CPU transposes the output gradient and runs the weight gradient off
    its fast GEMM path (~5x slower than these two dots; benchmarks/NOTES.md).
    """
    x, w = res
    x2, g2 = x.reshape(-1, w.shape[0]), grad.reshape(-1, w.shape[1])  # (N, C_in), (N, C_out)
    d_w = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    d_x = jax.lax.dot_general(g2, w, (((1,), (1,)), ((), ())))  # (N, C_in)
    return d_x.reshape(x.shape).astype(x.dtype), d_w.astype(w.dtype)


_matmul_last_axis.defvjp(_matmul_last_axis_fwd, _matmul_last_axis_bwd)


def pointwise_conv(x: Array, kernel: Array) -> Array:
    """1x1 convolution as a matmul: (B, H, W, C_in), (1, 1, C_in, C_out) -> (B, H, W, C_out).

    Identical to the 1x1 `conv_general_dilated`. Reverse-mode differentiable only.
    """
    return _matmul_last_axis(x, kernel[0, 0])


class Conv2d(nn.Module):
    """k x k convolution, stride 1, 'same' output size. Kernel (k, k, C_in / groups, features)."""

    features: int
    kernel_size: int = 1
    groups: int = 1
    use_bias: bool = False
    padding: str = "zeros"  # "zeros" | "reflect"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, C_in) -> (B, H, W, features)
        c_in = x.shape[-1]
        k = self.kernel_size
        if c_in % self.groups or self.features % self.groups:
            raise ValueError(f"Conv2d: {c_in} -> {self.features} not divisible by {self.groups}")
        fan_in = c_in // self.groups * k * k
        kernel = self.param(
            "kernel", torch_uniform(fan_in), (k, k, c_in // self.groups, self.features)
        )
        pad = k // 2
        if self.padding == "reflect" and pad:
            x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
            padding = "VALID"
        elif self.padding in ("zeros", "reflect"):
            padding = ((pad, pad), (pad, pad))
        else:
            raise ValueError(f"Conv2d: unknown padding {self.padding!r}")
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if k == 1 and self.groups == 1:
            y = pointwise_conv(x, kernel)
        elif self.groups > 1 and jax.default_backend() == "cpu":
            y = grouped_conv_by_taps(x, kernel, self.groups, padding)
        elif self.groups == 1 and jax.default_backend() == "cpu":
            y = dense_conv(x, kernel, padding)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(1, 1),
                padding=padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
            )
        if self.use_bias:
            bias = self.param("bias", torch_uniform(fan_in), (self.features,))
            y = y + bias.astype(self.dtype)
        return y


def stats_dtype(dtype: Dtype) -> Any:
    """Where statistics, normalisations and softmax run: float32, or float64 for a float64 model
    (half-precision compute still gets float32 statistics)."""
    return jnp.promote_types(dtype, jnp.float32)


class WithBiasLayerNorm(nn.Module):
    """Restormer 'WithBias' LayerNorm over the channel axis, computed in float32."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, C)
        c = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        x32 = x.astype(stats_dtype(self.dtype))
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.mean((x32 - mean) ** 2, axis=-1, keepdims=True)  # biased
        y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS) * weight + bias
        return y.astype(self.dtype)


def channel_attention(q: Array, k: Array, v: Array, temperature: Array, heads: int) -> Array:
    """Transposed (channel-to-channel) attention per head, as MDTA computes it.

    q, k, v: (B, H, W, C) with C = heads * c; temperature: (heads,). The logits are the cosine
    similarities of q's and k's channels over the pixels (each l2 norm floored at eps 1e-12),
    times the head's temperature; the softmax runs over the last axis of (B, heads, c, c).
    Statistics, logits and softmax are float32. Returns (B, H, W, C) in v's dtype.

    Computed without moving the pixel axis: the Gram matrix of all C channels (its diagonal
    head blocks are the per-head logits), then v times the block-diagonal matrix of the heads'
    attention. Both are row-major GEMMs over the pixels; the per-head form would transpose q, k,
    v and the output to (B, heads, c, H*W), and XLA fuses those transposes into the producers
    (the depthwise tap sums), which then run strided. Dividing the Gram matrix by the outer
    product of the norms equals normalising q and k first (CDDFuse's order).
    """
    b, h, w, c = q.shape
    d = c // heads
    dtype = v.dtype
    acc = stats_dtype(dtype)
    q2, k2, v2 = (t.reshape(b, h * w, c) for t in (q, k, v))  # (B, N, C)

    def l2_norm(t: Array) -> Array:  # (B, N, C) -> (B, heads, d), floored at eps
        t = t.astype(acc)
        return jnp.maximum(jnp.sqrt(jnp.sum(t * t, axis=1)), L2_EPS).reshape(b, heads, d)

    gram = jnp.einsum("bnc,bne->bce", q2, k2, preferred_element_type=acc)  # (B, C, C)
    blocks = gram.reshape(b, heads, d, heads, d)
    per_head = jnp.diagonal(blocks, axis1=1, axis2=3).transpose(0, 3, 1, 2)  # (B, heads, d, d)
    cosine = per_head / (l2_norm(q2)[..., :, None] * l2_norm(k2)[..., None, :])
    logits = cosine * temperature.astype(acc)[None, :, None, None]
    attn = jax.nn.softmax(logits, axis=-1).astype(dtype)  # (B, heads, d_out, d_in)
    # mix[b, h*d + i, g*d + o] = attn[b, h, o, i] if g == h else 0: (B, C, C)
    eye = jnp.eye(heads, dtype=dtype)
    mix = jnp.einsum("bhoi,hg->bhigo", attn, eye).reshape(b, c, c)
    out = jnp.einsum("bni,bio->bno", v2, mix)  # (B, N, C)
    return out.reshape(b, h, w, c)


class MDTA(nn.Module):
    """Multi-Dconv-head transposed attention: 1x1 qkv, depthwise 3x3, channel attention, 1x1."""

    dim: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, dim)
        temperature = self.param("temperature", nn.initializers.ones, (self.heads,))
        qkv = Conv2d(3 * self.dim, 1, dtype=self.dtype, name="qkv")(x)
        qkv = Conv2d(3 * self.dim, 3, groups=3 * self.dim, dtype=self.dtype, name="qkv_dwconv")(qkv)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = channel_attention(q, k, v, temperature, self.heads)
        return Conv2d(self.dim, 1, dtype=self.dtype, name="project_out")(out)


def gated_gelu(x: Array) -> Array:
    """Splits channels into halves (x1, x2) and returns GELU(x1) * x2 with the exact (erf) GELU."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return nn.gelu(x1, approximate=False) * x2


class GDFN(nn.Module):
    """Gated-Dconv feed-forward: 1x1 (dim -> 2h), depthwise 3x3, GELU gate, 1x1 (h -> dim)."""

    dim: int
    expansion: float = 2.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, dim)
        hidden = int(self.dim * self.expansion)
        x = Conv2d(2 * hidden, 1, dtype=self.dtype, name="project_in")(x)
        x = Conv2d(2 * hidden, 3, groups=2 * hidden, dtype=self.dtype, name="dwconv")(x)
        return Conv2d(self.dim, 1, dtype=self.dtype, name="project_out")(gated_gelu(x))


class TransformerBlock(nn.Module):
    """Restormer block: x + MDTA(LN(x)), then x + GDFN(LN(x))."""

    dim: int
    heads: int
    expansion: float = 2.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, dim)
        x = x.astype(self.dtype)
        x = x + MDTA(self.dim, self.heads, self.dtype, name="attn")(
            WithBiasLayerNorm(self.dtype, name="norm1")(x)
        )
        return x + GDFN(self.dim, self.expansion, self.dtype, name="ffn")(
            WithBiasLayerNorm(self.dtype, name="norm2")(x)
        )


class AttentionBase(nn.Module):
    """Base-branch attention: 1x1 qkv, *dense* 3x3 conv, channel attention, 1x1 projection."""

    dim: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, dim)
        scale = self.param("scale", nn.initializers.ones, (self.heads,))
        qkv = Conv2d(3 * self.dim, 1, dtype=self.dtype, name="qkv1")(x)
        qkv = Conv2d(3 * self.dim, 3, dtype=self.dtype, name="qkv2")(qkv)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = channel_attention(q, k, v, scale, self.heads)
        return Conv2d(self.dim, 1, dtype=self.dtype, name="proj")(out)


class GroupedMlp(nn.Module):
    """Base-branch Mlp (expansion 1): 1x1 (dim -> 2 dim), 3x3 with groups=dim, gate, 1x1."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, dim)
        hidden = self.dim
        x = Conv2d(2 * hidden, 1, dtype=self.dtype, name="project_in")(x)
        x = Conv2d(2 * hidden, 3, groups=hidden, dtype=self.dtype, name="dwconv")(x)
        return Conv2d(self.dim, 1, dtype=self.dtype, name="project_out")(gated_gelu(x))


class BaseFeatureExtraction(nn.Module):
    """Lite-transformer base branch: x + AttentionBase(LN(x)), then x + GroupedMlp(LN(x))."""

    dim: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, dim)
        x = x.astype(self.dtype)
        x = x + AttentionBase(self.dim, self.heads, self.dtype, name="attn")(
            WithBiasLayerNorm(self.dtype, name="norm1")(x)
        )
        return x + GroupedMlp(self.dim, self.dtype, name="mlp")(
            WithBiasLayerNorm(self.dtype, name="norm2")(x)
        )


class InvertedResidualBlock(nn.Module):
    """1x1 (c -> 2c), ReLU6, reflect-padded depthwise 3x3, ReLU6, 1x1 (2c -> c); no bias."""

    features: int
    expand_ratio: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, c_in) -> (B, H, W, features)
        hidden = x.shape[-1] * self.expand_ratio
        x = jax.nn.relu6(Conv2d(hidden, 1, dtype=self.dtype, name="expand")(x))
        x = Conv2d(hidden, 3, groups=hidden, padding="reflect", dtype=self.dtype, name="dw")(x)
        return Conv2d(self.features, 1, dtype=self.dtype, name="project")(jax.nn.relu6(x))


class DetailNode(nn.Module):
    """One affine-coupling INN layer on the halves (z1, z2), each (B, H, W, dim / 2).

    forward: (z1, z2) <- split(shuffle(concat(z1, z2))); z2 += phi(z1);
             z1 <- z1 * exp(rho(z2)) + eta(z2)   (with the updated z2).
    `inverse` undoes it exactly (up to float rounding).
    """

    dim: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        half = self.dim // 2
        self.shuffle = Conv2d(self.dim, 1, use_bias=True, dtype=self.dtype)
        self.phi = InvertedResidualBlock(half, dtype=self.dtype)
        self.rho = InvertedResidualBlock(half, dtype=self.dtype)
        self.eta = InvertedResidualBlock(half, dtype=self.dtype)

    def __call__(self, z1: Array, z2: Array) -> tuple[Array, Array]:
        z1, z2 = jnp.split(self.shuffle(jnp.concatenate([z1, z2], axis=-1)), 2, axis=-1)
        z2 = z2 + self.phi(z1)
        z1 = z1 * jnp.exp(self.rho(z2)) + self.eta(z2)
        return z1, z2

    def inverse(self, z1: Array, z2: Array) -> tuple[Array, Array]:
        """Inverts `__call__`: returns the (z1, z2) that produced the given outputs."""
        z1 = (z1 - self.eta(z2)) * jnp.exp(-self.rho(z2))
        z2 = z2 - self.phi(z1)
        acc = stats_dtype(self.dtype)
        y = jnp.concatenate([z1, z2], axis=-1).astype(acc)
        # The shuffle conv is y = x W + b with W (dim, dim): x = (y - b) W^-1.
        params = self.shuffle.variables["params"]
        w = params["kernel"][0, 0].astype(acc)  # (dim_in, dim_out)
        x = (y - params["bias"]) @ jnp.linalg.inv(w)
        z1, z2 = jnp.split(x.astype(self.dtype), 2, axis=-1)
        return z1, z2


class DetailFeatureExtraction(nn.Module):
    """INN detail branch: split channels in halves, `num_layers` DetailNodes, concat."""

    dim: int
    num_layers: int = 3
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.nodes = [DetailNode(self.dim, self.dtype) for _ in range(self.num_layers)]

    def __call__(self, x: Array) -> Array:  # (B, H, W, dim)
        z1, z2 = jnp.split(x.astype(self.dtype), 2, axis=-1)
        for node in self.nodes:
            z1, z2 = node(z1, z2)
        return jnp.concatenate([z1, z2], axis=-1)

    def inverse(self, y: Array) -> Array:
        """Inverts `__call__` (B, H, W, dim) -> (B, H, W, dim)."""
        z1, z2 = jnp.split(y.astype(self.dtype), 2, axis=-1)
        for node in reversed(self.nodes):
            z1, z2 = node.inverse(z1, z2)
        return jnp.concatenate([z1, z2], axis=-1)


def maybe_remat(cls: type[nn.Module], remat: bool) -> type[nn.Module]:
    """`cls`, or its rematerialised form (activations recomputed in the backward pass).

    The parameter tree is the same either way; remat trades compute for activation memory.
    """
    return nn.remat(cls) if remat else cls


class Encoder(nn.Module):
    """Shared encoder: features -> `blocks` TransformerBlocks -> (base, detail) in parallel.

    With `patch_embed`, a 3x3 conv (1 -> dim, no bias) embeds the image; `features` (the
    token-induced map) is then added to it when given. Without it, `features` is the input.
    """

    dim: int = 64
    heads: int = 8
    expansion: float = 2.0
    blocks: int = 4
    detail_layers: int = 3
    patch_embed: bool = True
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, image: Array, features: Array | None = None) -> tuple[Array, Array]:
        """image (B, H, W, 1), features (B, H, W, dim) or None -> base, detail (B, H, W, dim)."""
        if self.patch_embed:
            x = Conv2d(self.dim, 3, dtype=self.dtype, name="patch_embed")(image)
            if features is not None:
                x = x + features.astype(self.dtype)
        elif features is None:
            raise ValueError("Encoder without patch_embed needs the token-induced features")
        else:
            x = features.astype(self.dtype)
        block, base_cls, detail_cls = (
            maybe_remat(c, self.remat)
            for c in (TransformerBlock, BaseFeatureExtraction, DetailFeatureExtraction)
        )
        for i in range(self.blocks):
            x = block(self.dim, self.heads, self.expansion, self.dtype, name=f"level1_{i}")(x)
        base = base_cls(self.dim, self.heads, self.dtype, name="base")(x)
        detail = detail_cls(self.dim, self.detail_layers, self.dtype, name="detail")(x)
        return base, detail


class Decoder(nn.Module):
    """Residual decoder: sigmoid(head(blocks(reduce([base, detail]))) + residual), float32 out."""

    dim: int = 64
    heads: int = 8
    expansion: float = 2.0
    blocks: int = 4
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, base: Array, detail: Array, residual: Array | None = None) -> Array:
        """base, detail (B, H, W, dim); residual (B, H, W, 1) or None -> image (B, H, W, 1)."""
        x = jnp.concatenate([base.astype(self.dtype), detail.astype(self.dtype)], axis=-1)
        x = Conv2d(self.dim, 1, dtype=self.dtype, name="reduce_channel")(x)
        block = maybe_remat(TransformerBlock, self.remat)
        for i in range(self.blocks):
            x = block(self.dim, self.heads, self.expansion, self.dtype, name=f"level2_{i}")(x)
        x = Conv2d(self.dim // 2, 3, dtype=self.dtype, name="head_0")(x)
        x = nn.leaky_relu(x, negative_slope=0.01)
        out = stats_dtype(self.dtype)  # float32 (float64 for a float64 model)
        x = Conv2d(1, 3, dtype=self.dtype, name="head_1")(x).astype(out)
        if residual is not None:
            x = x + residual.astype(out)
        return jax.nn.sigmoid(x)
