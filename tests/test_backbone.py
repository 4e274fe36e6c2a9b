"""Backbone blocks against a float64 PyTorch twin written from the CDDFuse reference notes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from twin_helpers import max_err, random_params, t64

from tokfusion_jax.models import backbone as bb

TOL = 1e-5
H, W = 37, 53  # odd sizes: every backbone block keeps the spatial size
DIM, HEADS = 8, 2


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
        m = bb.Conv2d(8, k, groups=groups, use_bias=bias, padding=padding)
        p = random_params(m, x)
        got = m.apply({"params": p}, x)
        assert got.shape == (2, H, W, 8)
        want = to_nhwc(conv(to_nchw(x), p, groups, padding))
        assert max_err(got, want) <= TOL, (groups, padding, k)


def test_layer_norm_matches_twin_and_computes_in_float32():
    x = rand((2, H, W, DIM), 2, scale=3.0) + 5.0
    m = bb.WithBiasLayerNorm()
    p = random_params(m, x)
    got = m.apply({"params": p}, x)
    want = to_nhwc(layer_norm(to_nchw(x), p))
    assert max_err(got, want) <= TOL
    got16 = bb.WithBiasLayerNorm(dtype=jnp.bfloat16).apply({"params": p}, x.astype(jnp.bfloat16))
    assert got16.dtype == jnp.bfloat16
    assert max_err(got16, want) < 5e-2


def test_transformer_block_matches_twin():
    x = rand((2, H, W, DIM), 3)
    m = bb.TransformerBlock(DIM, HEADS, 2.0)
    p = random_params(m, x)
    got = jax.jit(m.apply)({"params": p}, x)
    want = to_nhwc(transformer_block(to_nchw(x), p, HEADS))
    assert max_err(got, want) <= TOL


def test_base_feature_extraction_matches_twin():
    x = rand((2, H, W, DIM), 4)
    m = bb.BaseFeatureExtraction(DIM, HEADS)
    p = random_params(m, x)
    assert p["mlp"]["dwconv"]["kernel"].shape == (3, 3, 2, 2 * DIM)  # groups = dim
    assert p["attn"]["qkv2"]["kernel"].shape == (3, 3, 3 * DIM, 3 * DIM)  # dense
    got = jax.jit(m.apply)({"params": p}, x)
    want = to_nhwc(base_branch(to_nchw(x), p, HEADS))
    assert max_err(got, want) <= TOL


def test_detail_branch_matches_twin_and_inverts():
    x = rand((2, H, W, DIM), 5, scale=0.5)
    m = bb.DetailFeatureExtraction(DIM, 2)
    p = random_params(m, x)
    apply = jax.jit(m.apply)
    got = apply({"params": p}, x)
    want = to_nhwc(detail_branch(to_nchw(x), p, 2))
    assert max_err(got, want) <= TOL
    # Invertibility: the inverse of the float64 twin's output gives back the input.
    back = jax.jit(lambda p, y: m.apply({"params": p}, y, method=m.inverse))(p, got)
    assert max_err(got, x) > 0.1  # the map is far from the identity
    assert max_err(back, x) <= 1e-4 * max(1.0, float(np.abs(got).max()))


def test_encoder_and_decoder_match_twin():
    h, w = 13, 19  # the blocks are checked at 37 x 53 above; this checks the wiring
    img = np.random.default_rng(6).uniform(0, 1, (2, h, w, 1)).astype(np.float32)
    feat = rand((2, h, w, DIM), 7, scale=0.5)
    enc = bb.Encoder(DIM, HEADS, 2.0, blocks=1, detail_layers=1, patch_embed=True)
    pe = random_params(enc, img, feat)
    base, detail = jax.jit(enc.apply)({"params": pe}, img, feat)
    tb, td = encoder(to_nchw(img), to_nchw(feat), pe, HEADS, 1, 1)
    assert base.shape == detail.shape == (2, h, w, DIM)
    assert max_err(base, to_nhwc(tb)) <= TOL
    assert max_err(detail, to_nhwc(td)) <= TOL

    dec = bb.Decoder(DIM, HEADS, 2.0, blocks=1)
    pd = random_params(dec, base, detail, img)
    for residual in (img, None):
        out = jax.jit(dec.apply)({"params": pd}, base, detail, residual)
        res_t = None if residual is None else to_nchw(residual)
        want = decoder(to_nchw(base), to_nchw(detail), res_t, pd, HEADS, 1)
        assert out.shape == (2, h, w, 1) and out.dtype == jnp.float32
        assert max_err(out, to_nhwc(want)) <= TOL


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
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(wx), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gk), np.asarray(wk), atol=1e-4, rtol=1e-5)


def test_pointwise_conv_value_and_gradients_match_native():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 9, 7, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((1, 1, 6, 10)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((2, 9, 7, 10)), jnp.float32)
    got, (gx, gk) = _value_and_both_grads(bb.pointwise_conv, x, kernel, weights)
    want, (wx, wk) = _value_and_both_grads(
        lambda x, w: _native_conv(x, w, 1, "VALID"), x, kernel, weights
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(wx), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gk), np.asarray(wk), atol=1e-4, rtol=1e-5)
    # bfloat16 inputs: the weight gradient is accumulated in float32, returned in bfloat16.
    _, (gx16, gk16) = _value_and_both_grads(
        bb.pointwise_conv, x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), weights
    )
    assert gx16.dtype == gk16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gk16, np.float32), np.asarray(wk), atol=0.2, rtol=3e-2)
