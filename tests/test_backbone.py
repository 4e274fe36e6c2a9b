"""Backbone blocks against a float64 PyTorch twin written from the CDDFuse reference notes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import (
    U16,
    U32,
    U64,
    activation_scale,
    attention_chain,
    block_chain,
    conv_chain,
    ln_chain,
    rounding_bound,
)
from twin_helpers import max_err, random_params, t64

from tokfusion_jax.models import backbone as bb

H, W = 37, 53  # odd sizes: every backbone block keeps the spatial size
DIM, HEADS = 8, 2

# Each module is checked twice against its float64 twin: run in float64 (bound with u = 2^-53:
# the formulas are exact) and in float32 (u = 2^-24), over the rounding chains of
# tests/tolerances.py. The magnitude bounds the sums of |terms| the module's reductions see.


def check_both_precisions(make, params, inputs, want, chain, magnitude):
    """float32 and float64 runs of `make(dtype)` against the float64 twin's `want`.

    `magnitude` bounds the sum of |terms| of the reductions (Higham's bound is relative to it).
    Returns the float32 output(s).
    """
    m32 = make(jnp.float32)
    got32 = jax.jit(lambda p, *a: m32.apply({"params": p}, *a))(params, *inputs)
    with jax.enable_x64(True):
        m64 = make(jnp.float64)
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
        x64 = [None if a is None else jnp.asarray(np.asarray(a), jnp.float64) for a in inputs]
        got64 = jax.jit(lambda p, *a: m64.apply({"params": p}, *a))(p64, *x64)
        assert all(g.dtype == jnp.float64 for g in jax.tree_util.tree_leaves(got64))
        err64 = max(max_err(g, w) for g, w in zip(_leaves(got64), _leaves(want), strict=True))
    err32 = max(max_err(g, w) for g, w in zip(_leaves(got32), _leaves(want), strict=True))
    assert err64 <= rounding_bound(chain, magnitude, U64), err64
    assert err32 <= rounding_bound(chain, magnitude, U32), err32
    return got32


def _leaves(tree):
    return tree if isinstance(tree, (tuple, list)) else [tree]


# ----------------------------------------------------------------------------- helpers


def rand(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def to_nchw(x):
    return t64(x).permute(0, 3, 1, 2)


def to_nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


def conv(x, p, groups=1, padding="zeros"):
    w = t64(p["kernel"]).permute(3, 2, 0, 1)  # (out, in/g, k, k)
    pad = w.shape[-1] // 2
    if padding == "reflect":
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        pad = 0
    bias = t64(p["bias"]) if "bias" in p else None
    return F.conv2d(x, w, bias, padding=pad, groups=groups)


def layer_norm(x, p):
    mu = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True, unbiased=False)
    w, b = t64(p["weight"]), t64(p["bias"])
    return (x - mu) / torch.sqrt(var + 1e-5) * w[None, :, None, None] + b[None, :, None, None]


def channel_attention(q, k, v, temperature, heads):
    b, c, h, w = q.shape
    q, k, v = (a.reshape(b, heads, c // heads, h * w) for a in (q, k, v))
    q = F.normalize(q, dim=-1, eps=1e-12)
    k = F.normalize(k, dim=-1, eps=1e-12)
    attn = (q @ k.transpose(-2, -1)) * t64(temperature).view(heads, 1, 1)
    return (attn.softmax(dim=-1) @ v).reshape(b, c, h, w)


def mdta(x, p, heads):
    qkv = conv(conv(x, p["qkv"]), p["qkv_dwconv"], groups=3 * x.shape[1])
    q, k, v = qkv.chunk(3, dim=1)
    return conv(channel_attention(q, k, v, p["temperature"], heads), p["project_out"])


def gated(h):
    x1, x2 = h.chunk(2, dim=1)
    return F.gelu(x1) * x2


def gdfn(x, p):
    h = conv(x, p["project_in"])
    h = conv(h, p["dwconv"], groups=h.shape[1])
    return conv(gated(h), p["project_out"])


def transformer_block(x, p, heads):
    x = x + mdta(layer_norm(x, p["norm1"]), p["attn"], heads)
    return x + gdfn(layer_norm(x, p["norm2"]), p["ffn"])


def base_branch(x, p, heads):
    a = p["attn"]
    y = layer_norm(x, p["norm1"])
    qkv = conv(conv(y, a["qkv1"]), a["qkv2"])
    q, k, v = qkv.chunk(3, dim=1)
    x = x + conv(channel_attention(q, k, v, a["scale"], heads), a["proj"])
    m = p["mlp"]
    y = conv(layer_norm(x, p["norm2"]), m["project_in"])
    y = conv(y, m["dwconv"], groups=x.shape[1])  # 2 channels per group
    return x + conv(gated(y), m["project_out"])


def irb(x, p):
    h = F.relu6(conv(x, p["expand"]))
    h = F.relu6(conv(h, p["dw"], groups=h.shape[1], padding="reflect"))
    return conv(h, p["project"])


def detail_node(z1, z2, p):
    z1, z2 = conv(torch.cat([z1, z2], 1), p["shuffle"]).chunk(2, dim=1)
    z2 = z2 + irb(z1, p["phi"])
    z1 = z1 * torch.exp(irb(z2, p["rho"])) + irb(z2, p["eta"])
    return z1, z2


def detail_branch(x, p, layers):
    z1, z2 = x.chunk(2, dim=1)
    for i in range(layers):
        z1, z2 = detail_node(z1, z2, p[f"nodes_{i}"])
    return torch.cat([z1, z2], 1)


def encoder(image, feat, p, heads, blocks, layers):
    x = conv(image, p["patch_embed"]) if "patch_embed" in p else 0
    if feat is not None:
        x = x + feat
    for i in range(blocks):
        x = transformer_block(x, p[f"level1_{i}"], heads)
    return base_branch(x, p["base"], heads), detail_branch(x, p["detail"], layers)


def decoder(base, detail, residual, p, heads, blocks):
    x = conv(torch.cat([base, detail], 1), p["reduce_channel"])
    for i in range(blocks):
        x = transformer_block(x, p[f"level2_{i}"], heads)
    x = conv(F.leaky_relu(conv(x, p["head_0"]), 0.01), p["head_1"])
    if residual is not None:
        x = x + residual
    return torch.sigmoid(x)


# ----------------------------------------------------------------------------- tests


def test_conv_groups_and_reflect_padding():
    x = rand((2, H, W, 8), 1)
    for groups, padding, k, bias in (
        (1, "zeros", 3, True),
        (4, "reflect", 3, False),
        (8, "zeros", 7, True),
    ):
        make = lambda dt, k=k, g=groups, b=bias, pad=padding: bb.Conv2d(  # noqa: E731
            8, k, groups=g, use_bias=b, padding=pad, dtype=dt
        )
        p = random_params(make(jnp.float32), x)
        want = to_nhwc(conv(to_nchw(x), p, groups, padding))
        abs_p = jax.tree_util.tree_map(np.abs, p)  # sum of |x w| + |b|: exactly the terms' size
        magnitude = np.abs(to_nhwc(conv(to_nchw(np.abs(x)), abs_p, groups, padding))).max()
        got = check_both_precisions(make, p, [x], want, conv_chain(k, 8 // groups), magnitude)
        assert got.shape == (2, H, W, 8)


@pytest.mark.parametrize("batch,heads", [(1, 2), (2, 4)])
def test_channel_attention_value_and_gradients_match_twin_in_float64(batch, heads):
    """The Gram-matrix form (one C x C product, the heads' block diagonal, v times a block-
    diagonal mix) against CDDFuse's per-head normalise-then-multiply, value and all four
    gradients, in float64. Each output passes through at most two chains of
    `attention_chain` roundings (forward and backward) on values bounded by the scale."""
    rng = np.random.default_rng(3)
    h, w, c = 7, 9, 4 * heads
    q, k, v, g = (rng.standard_normal((batch, h, w, c)) for _ in range(4))
    temperature = rng.uniform(0.5, 2.0, heads)

    def nchw(a):
        return t64(a).permute(0, 3, 1, 2).requires_grad_(True)

    tq, tk, tv, tt = nchw(q), nchw(k), nchw(v), t64(temperature).requires_grad_(True)
    want = channel_attention(tq, tk, tv, tt, heads)
    (want * nchw(g)).sum().backward()
    want_grads = [a.grad.permute(0, 2, 3, 1).numpy() for a in (tq, tk, tv)] + [tt.grad.numpy()]

    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (q, k, v, temperature)]
        fn = lambda q, k, v, t: bb.channel_attention(q, k, v, t, heads)  # noqa: E731
        got = fn(*args)
        loss = lambda *a: jnp.sum(fn(*a) * jnp.asarray(g))  # noqa: E731
        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
    chain = 2 * attention_chain(h * w, c // heads)
    want_np = want.detach().permute(0, 2, 3, 1).numpy()
    scale = activation_scale(q, k, v, want_np)
    assert max_err(got, want_np) <= rounding_bound(chain, scale, U64)
    for name, got_grad, want_grad in zip("qkvt", grads, want_grads, strict=True):
        bound = rounding_bound(chain, activation_scale(want_grad, g, scale), U64)
        assert max_err(got_grad, want_grad) <= bound, name


def test_layer_norm_matches_twin_and_computes_in_float32():
    x = rand((2, H, W, DIM), 2, scale=3.0) + 5.0
    make = lambda dt: bb.WithBiasLayerNorm(dtype=dt)  # noqa: E731
    p = random_params(make(jnp.float32), x)
    want = to_nhwc(layer_norm(to_nchw(x), p))
    # The centring subtracts values of size max|x|; the result is divided by the std: the
    # rounding of the statistics is amplified by max|x| / min(std) (the condition of LN).
    std = np.asarray(x, np.float64).std(-1).min()
    magnitude = np.abs(x).max() * np.abs(want).max() / std
    check_both_precisions(make, p, [x], want, ln_chain(DIM), magnitude)
    got16 = make(jnp.bfloat16).apply({"params": p}, x.astype(jnp.bfloat16))
    assert got16.dtype == jnp.bfloat16
    # bfloat16 in and out, float32 inside: two bfloat16 roundings (the input, the output) of
    # values of size max|x| and max|y|, propagated through the statistics as above.
    assert max_err(got16, want) <= 2 * (2.0**-8) * magnitude


def test_transformer_block_matches_twin():
    x = rand((2, H, W, DIM), 3)
    make = lambda dt: bb.TransformerBlock(DIM, HEADS, 2.0, dtype=dt)  # noqa: E731
    p = random_params(make(jnp.float32), x)
    want = to_nhwc(transformer_block(to_nchw(x), p, HEADS))
    chain = block_chain(DIM, H * W, HEADS, 2 * DIM)
    check_both_precisions(make, p, [x], want, chain, activation_scale(x, want))


def test_base_feature_extraction_matches_twin():
    x = rand((2, H, W, DIM), 4)
    make = lambda dt: bb.BaseFeatureExtraction(DIM, HEADS, dtype=dt)  # noqa: E731
    p = random_params(make(jnp.float32), x)
    assert p["mlp"]["dwconv"]["kernel"].shape == (3, 3, 2, 2 * DIM)  # groups = dim
    assert p["attn"]["qkv2"]["kernel"].shape == (3, 3, 3 * DIM, 3 * DIM)  # dense
    want = to_nhwc(base_branch(to_nchw(x), p, HEADS))
    attn = conv_chain(1, DIM) + conv_chain(3, 3 * DIM) + attention_chain(H * W, DIM // HEADS)
    mlp = conv_chain(1, DIM) + conv_chain(3, 2) + 6 + conv_chain(1, DIM)
    chain = 2 * ln_chain(DIM) + attn + conv_chain(1, DIM) + mlp + 2
    check_both_precisions(make, p, [x], want, chain, activation_scale(x, want))


def _inverse_amplification(make, params, y, x, delta=1e-6, trials=4):
    """How much the float64 inverse moves per unit of perturbation of its input (max norm):
    a finite-difference estimate of the inverse's condition, measured in float64 on the exact
    computation (not on any float32 kernel)."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        m = make(jnp.float64)
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
        inv = jax.jit(lambda p, v: m.apply({"params": p}, v, method=m.inverse))
        base = np.asarray(inv(p64, jnp.asarray(y)))
        worst = 0.0
        for _ in range(trials):
            d = rng.uniform(-delta, delta, y.shape)
            worst = max(worst, max_err(inv(p64, jnp.asarray(y + d)), base) / delta)
    return worst


def test_detail_branch_matches_twin_and_inverts():
    x = rand((2, H, W, DIM), 5, scale=0.5)
    make = lambda dt: bb.DetailFeatureExtraction(DIM, 2, dtype=dt)  # noqa: E731
    p = random_params(make(jnp.float32), x)
    want = to_nhwc(detail_branch(to_nchw(x), p, 2))
    irb = conv_chain(1, DIM // 2) + conv_chain(3, 1) + conv_chain(1, 2 * DIM) + 2
    node = conv_chain(1, DIM) + 3 * irb + 4  # shuffle 1x1, phi; rho and eta; exp, *, +
    got = check_both_precisions(make, p, [x], want, 2 * node, activation_scale(x, want))
    assert max_err(got, x) > 0.1  # the map is far from the identity
    # Invertibility, to first order: a rounding error d in the inverse's input (or in its own
    # steps) moves its output by at most amp * d, amp = the inverse's condition (the shuffle
    # convs' W^-1, exp(-rho)), estimated in float64 on the exact computation. The chain counts
    # the forward's roundings the inverse must undo plus its own (W^-1 costs DIM per node).
    amp = _inverse_amplification(make, p, want, x)
    chain = 2 * (node + DIM)
    magnitude = max(float(np.abs(x).max()), float(np.abs(want).max()))
    with jax.enable_x64(True):  # exactness: float64 rounding only
        m64 = make(jnp.float64)
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), p)
        inverse64 = jax.jit(lambda p, y: m64.apply({"params": p}, y, method=m64.inverse))
        back64 = inverse64(p64, jnp.asarray(want))
    assert max_err(back64, x) <= rounding_bound(chain, magnitude, U64, cond=amp)
    # float32 inverse(forward(x)): the same bound at u = 2^-24 (~3e-2 here, against ~1e-4
    # measured; a wrong inverse is off by O(max|x|) = O(1)).
    m32 = make(jnp.float32)
    back = jax.jit(lambda p, y: m32.apply({"params": p}, y, method=m32.inverse))(p, got)
    assert max_err(back, x) <= rounding_bound(chain, magnitude, U32, cond=amp)


def test_encoder_and_decoder_match_twin():
    h, w = 13, 19  # the blocks are checked at 37 x 53 above; this checks the wiring
    img = np.random.default_rng(6).uniform(0, 1, (2, h, w, 1)).astype(np.float32)
    feat = rand((2, h, w, DIM), 7, scale=0.5)
    make_enc = lambda dt: bb.Encoder(  # noqa: E731
        DIM, HEADS, 2.0, blocks=1, detail_layers=1, patch_embed=True, dtype=dt
    )
    pe = random_params(make_enc(jnp.float32), img, feat)
    tb, td = encoder(to_nchw(img), to_nchw(feat), pe, HEADS, 1, 1)
    want = [to_nhwc(tb), to_nhwc(td)]
    # patch embed, one block, then the base branch (a block-sized chain) or the detail branch
    chain = conv_chain(3, 1) + 2 * block_chain(DIM, h * w, HEADS, 2 * DIM) + 200
    base, detail = check_both_precisions(
        make_enc, pe, [img, feat], want, chain, activation_scale(img, feat, *want)
    )
    assert base.shape == detail.shape == (2, h, w, DIM)

    make_dec = lambda dt: bb.Decoder(DIM, HEADS, 2.0, blocks=1, dtype=dt)  # noqa: E731
    pd = random_params(make_dec(jnp.float32), base, detail, img)
    chain = conv_chain(1, 2 * DIM) + block_chain(DIM, h * w, HEADS, 2 * DIM) + conv_chain(3, DIM)
    chain += conv_chain(3, DIM // 2) + 4  # the two head convs, the residual and the sigmoid
    for residual in (img, None):
        res_t = None if residual is None else to_nchw(residual)
        want = to_nhwc(decoder(to_nchw(base), to_nchw(detail), res_t, pd, HEADS, 1))
        out = check_both_precisions(
            make_dec, pd, [base, detail, residual], want, chain, activation_scale(base, detail)
        )
        assert out.shape == (2, h, w, 1) and out.dtype == jnp.float32


def test_encoder_without_patch_embed_needs_features():
    enc = bb.Encoder(DIM, HEADS, 2.0, blocks=1, detail_layers=1, patch_embed=False)
    img = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ValueError, match="token-induced"):
        jax.eval_shape(enc.init, jax.random.key(0), img, None)
    shapes = jax.eval_shape(enc.init, jax.random.key(0), img, jnp.zeros((1, 8, 8, DIM)))
    assert "patch_embed" not in shapes["params"]


def _count(module, *args):
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def test_parameter_counts_match_cddfuse():
    img = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    feat = jax.ShapeDtypeStruct((1, 8, 8, 64), jnp.float32)
    assert _count(bb.TransformerBlock(64, 8), feat) == 45_256
    half = jax.ShapeDtypeStruct((1, 8, 8, 32), jnp.float32)
    assert _count(bb.DetailNode(64), half, half) == 18_176
    assert _count(bb.Encoder(), img) == 599_144
    assert _count(bb.Decoder(), feat, feat, img) == 207_936
    assert _count(bb.BaseFeatureExtraction(64, 8), feat) == 363_016
    assert _count(bb.DetailFeatureExtraction(64, 1), feat) == 18_176


def _native_conv(x, kernel, groups, pad):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )


def _abs_sums(x, kernel, weights, groups, pad):
    """The sums of |terms| of a conv's value and of both its gradients (maxima over outputs):
    the same conv and its transposes run on absolute values, in float64. Also the largest sum
    of |x| over a kernel tap's window and of |kernel| over a tap's inputs."""
    conv = lambda a, b: _native_conv(a, b, groups, pad)  # noqa: E731
    with jax.enable_x64(True):
        ax, ak, ag = (jnp.asarray(np.abs(np.asarray(a)), jnp.float64) for a in (x, kernel, weights))
        y_abs, vjp = jax.vjp(conv, ax, ak)
        gx_abs, gk_abs = vjp(ag)
        x_sum = jax.vjp(lambda b: conv(ax, b), ak)[1](jnp.ones_like(ag))[0]
        sums = [float(np.asarray(a).max()) for a in (y_abs, gx_abs, gk_abs, x_sum)]
    return (*sums, float(np.abs(np.asarray(kernel)).sum(axis=(0, 1)).max()))


def _conv_bounds(x, kernel, weights, groups, pad):
    """Bounds on |implementation A - implementation B| (both float32) for a conv's value and
    its two gradients: twice the float32 bound of each reduction (tests/tolerances.py), plus
    the effect of the cotangent tanh'(y) * weights differing by up to max|weights| * (value
    bound) between the two."""
    y_abs, gx_abs, gk_abs, x_sum, k_sum = _abs_sums(x, kernel, weights, groups, pad)
    k, cin_g, cout_g = kernel.shape[0], kernel.shape[2], kernel.shape[3] // groups
    n_gk = int(np.prod(weights.shape[:3]))  # the kernel gradient sums over batch x H x W
    value = 2 * rounding_bound(k * k * cin_g, y_abs)
    d_cotangent = float(np.abs(np.asarray(weights)).max()) * value
    gx = 2 * rounding_bound(k * k * cout_g + 4, gx_abs) + d_cotangent * k_sum
    gk = 2 * rounding_bound(n_gk + 4, gk_abs) + d_cotangent * x_sum
    return value, gx, gk


def _value_and_both_grads(conv_fn, x, kernel, weights):
    """conv output and d/dx, d/dkernel of a weighted sum (a cotangent that is not all ones)."""
    loss = lambda x, kernel: jnp.sum(jnp.tanh(conv_fn(x, kernel)) * weights)
    return conv_fn(x, kernel), jax.grad(loss, argnums=(0, 1))(x, kernel)


@pytest.mark.parametrize(
    "c_in,c_out,groups,k,pad",
    [
        (12, 12, 12, 3, ((1, 1), (1, 1))),  # depthwise
        (8, 8, 4, 3, ((1, 1), (1, 1))),  # 2 x 2 channels per group: elementwise path
        (6, 12, 3, 5, ((2, 2), (2, 2))),  # 2 x 4 per group: einsum path
        (4, 4, 4, 3, ((0, 2), (2, 0))),  # asymmetric padding
        (8, 8, 8, 3, "VALID"),
    ],
)
def test_grouped_conv_by_taps_value_and_gradients_match_native(c_in, c_out, groups, k, pad):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 7, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c_in // groups, c_out)), jnp.float32)
    out_shape = _native_conv(x, kernel, groups, pad).shape
    weights = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    got, (gx, gk) = _value_and_both_grads(
        lambda x, w: bb.grouped_conv_by_taps(x, w, groups, pad), x, kernel, weights
    )
    want, (wx, wk) = _value_and_both_grads(
        lambda x, w: _native_conv(x, w, groups, pad), x, kernel, weights
    )
    b_value, b_gx, b_gk = _conv_bounds(x, kernel, weights, groups, pad)
    assert max_err(got, want) <= b_value
    assert max_err(gx, wx) <= b_gx
    assert max_err(gk, wk) <= b_gk


@pytest.mark.parametrize(
    "c_in,c_out,k,pad",
    [
        (6, 10, 3, ((1, 1), (1, 1))),  # "same" zero padding (CDDFuse's qkv2 and head convs)
        (5, 3, 3, ((0, 2), (2, 0))),  # asymmetric padding
        (4, 7, 5, ((2, 2), (2, 2))),
        (6, 6, 3, "VALID"),  # after a reflect pad
    ],
)
def test_dense_conv_value_and_gradients_match_native(c_in, c_out, k, pad):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 9, 7, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c_in, c_out)), jnp.float32)
    out_shape = _native_conv(x, kernel, 1, pad).shape
    weights = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    got, (gx, gk) = _value_and_both_grads(lambda x, w: bb.dense_conv(x, w, pad), x, kernel, weights)
    want, (wx, wk) = _value_and_both_grads(
        lambda x, w: _native_conv(x, w, 1, pad), x, kernel, weights
    )
    assert got.shape == want.shape and gx.shape == x.shape and gk.shape == kernel.shape
    b_value, b_gx, b_gk = _conv_bounds(x, kernel, weights, 1, pad)
    assert max_err(got, want) <= b_value
    assert max_err(gx, wx) <= b_gx
    assert max_err(gk, wk) <= b_gk


def test_pointwise_conv_value_and_gradients_match_native():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 9, 7, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((1, 1, 6, 10)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((2, 9, 7, 10)), jnp.float32)
    got, (gx, gk) = _value_and_both_grads(bb.pointwise_conv, x, kernel, weights)
    want, (wx, wk) = _value_and_both_grads(
        lambda x, w: _native_conv(x, w, 1, "VALID"), x, kernel, weights
    )
    b_value, b_gx, b_gk = _conv_bounds(x, kernel, weights, 1, "VALID")
    assert max_err(got, want) <= b_value
    assert max_err(gx, wx) <= b_gx
    assert max_err(gk, wk) <= b_gk
    # bfloat16 inputs: the weight gradient is accumulated in float32, returned in bfloat16.
    _, (gx16, gk16) = _value_and_both_grads(
        bb.pointwise_conv, x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), weights
    )
    assert gx16.dtype == gk16.dtype == jnp.bfloat16
    # x and the kernel are rounded to bfloat16 (relative error <= 2^-8 each): the value moves by
    # <= 2 u16 sum|x w|, the cotangent by max|weights| times that; the products x g carry x's
    # rounding, the returned gradient one more rounding; then the float32 accumulation.
    y_abs, _, gk_abs, x_sum, _ = _abs_sums(x, kernel, weights, 1, "VALID")
    d_cotangent = float(np.abs(np.asarray(weights)).max()) * 2 * U16 * y_abs
    bound16 = 2 * U16 * gk_abs + d_cotangent * x_sum + rounding_bound(2 * 9 * 7 + 4, gk_abs)
    assert max_err(np.asarray(gk16, np.float32), wk) <= bound16
