"""STE masks and the token-to-map interface against NumPy / float64 PyTorch twins."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import ELEMENTARY_ULPS, activation_scale, rounding_bound
from twin_helpers import max_err, random_params, t64

from tokfusion_jax.errors import ConfigError
from tokfusion_jax.models import interface as itf

# ----------------------------------------------------------------------------- STE


def test_hard_mask_marks_positions_times_channels():
    m = itf.hard_mask(32, 12, (12, 18), (6, 7, 8))
    want = np.zeros((32, 12))
    for p in (12, 18):
        for c in (6, 7, 8):
            want[p, c] = 1.0
    np.testing.assert_array_equal(m, want)
    assert m.dtype == np.float32


@pytest.mark.parametrize(
    "positions, channels, key",
    [((12, 32), (6,), "model.ste.positions"), ((1,), (-1,), "model.ste.channels")],
)
def test_hard_mask_rejects_out_of_range(positions, channels, key):
    with pytest.raises(ConfigError, match=key):
        itf.hard_mask(32, 12, positions, channels)


def test_soft_mask_is_outer_product_and_one_hot_slots_give_hard_mask():
    n, c = 32, 12
    slots = np.zeros((2, n), np.float32)
    slots[0, 12] = slots[1, 18] = 1.0
    np.testing.assert_array_equal(
        itf.soft_mask(slots, (6, 7, 8), c), itf.hard_mask(n, c, (12, 18), (6, 7, 8))
    )
    w = np.random.default_rng(0).dirichlet(np.ones(n), size=3).astype(np.float32)  # (S, N)
    cm = np.zeros(c, np.float32)
    cm[[1, 4]] = 1.0
    want = np.outer(w.astype(np.float64).sum(0), cm)
    # a sum of 3 slot weights (each <= 1) times 0 or 1: 3 roundings on values <= 3
    assert max_err(itf.soft_mask(w, jnp.asarray(cm), c), want) <= rounding_bound(3, 3.0)
    # one slot: products with 0 and 1 are exact in float32
    assert max_err(itf.soft_mask(w[0], (1, 4), c), np.outer(w[0], cm)) == 0.0


def test_ste_gradient_reaches_only_masked_entries():
    n, c = 8, 5
    ste = itf.SelectiveTokenEdit(n, c, (1, 6), (0, 3))
    z = np.random.default_rng(1).standard_normal((3, n, c)).astype(np.float32)
    params = ste.init(jax.random.key(0), z)["params"]
    np.testing.assert_array_equal(params["delta"], np.zeros((n, c)))
    np.testing.assert_array_equal(ste.apply({"params": params}, z), z)  # zero-init: identity
    weights = np.random.default_rng(2).standard_normal((3, n, c)).astype(np.float32)

    def loss(p):
        return jnp.sum(weights * jnp.tanh(ste.apply({"params": p}, z)))

    delta = jnp.asarray(np.random.default_rng(3).standard_normal((n, c)), jnp.float32)
    g = jax.grad(loss)({"delta": delta})["delta"]
    mask = itf.hard_mask(n, c, (1, 6), (0, 3))
    zt = z + mask * np.asarray(delta)
    want = mask * (weights * (1 - np.tanh(zt.astype(np.float64)) ** 2)).sum(0)
    # z + delta, tanh (a few ulps), 1 - t^2 (2), * weights, the sum over the batch of 3
    chain = 1 + ELEMENTARY_ULPS + 2 + 1 + 3
    assert max_err(g, want) <= rounding_bound(chain, 3 * float(np.abs(weights).max()))
    assert np.all(np.asarray(g)[mask == 0] == 0) and np.all(np.asarray(g)[mask == 1] != 0)
    with pytest.raises(ValueError, match="do not match"):
        ste.apply({"params": params}, z[:, :, :4])


# ----------------------------------------------------------------------------- resampling


def test_upsample2x_matches_torch_bilinear():
    x = np.random.default_rng(4).standard_normal((2, 5, 7, 3)).astype(np.float32)
    got = itf.upsample2x(jnp.asarray(x))
    want = F.interpolate(
        t64(x).permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False
    )
    assert got.shape == (2, 10, 14, 3)
    # separable bilinear: per axis two products and a sum, on values <= max|x|
    assert max_err(got, want.permute(0, 2, 3, 1).numpy()) <= rounding_bound(6, np.abs(x).max())


def test_box_downsample_is_block_mean():
    x = np.random.default_rng(5).standard_normal((1, 8, 12, 2))
    want = x.reshape(1, 2, 4, 3, 4, 2).mean(axis=(2, 4))
    got = itf.box_downsample(jnp.asarray(x, jnp.float32), 4)
    # x rounded to float32, a 16-term sum, the division: 18 roundings on values <= max|x|
    assert max_err(got, want) <= rounding_bound(18, np.abs(x).max())


# ----------------------------------------------------------------------------- token-to-map


def conv(x, p):
    w = t64(p["kernel"]).permute(3, 2, 0, 1)
    return F.conv2d(x, w, t64(p["bias"]), padding=w.shape[-1] // 2)


def token_to_map_twin(z, image, p, coarse, inject):
    """pi(Z, image) in float64 torch, NCHW, from the documented design."""
    b, h, w, _ = image.shape
    t = t64(z) @ t64(p["lift"]["kernel"]) + t64(p["lift"]["bias"])  # (B, N, dim)
    t = t.transpose(1, 2) @ t64(p["token_map"]["kernel"]) + t64(p["token_map"]["bias"])
    x = t.reshape(b, -1, coarse, coarse)  # (B, dim, S, S), row-major grid
    x = x + float(p["refine_scale"]) * conv(x, p["refine"])
    if (h // 8, w // 8) != (coarse, coarse):
        x = F.interpolate(
            x, size=(h // 8, w // 8), mode="bilinear", align_corners=False, antialias=True
        )
    img = t64(image).permute(0, 3, 1, 2)
    for stage in range(3):
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if inject:
            src = F.avg_pool2d(img, 2 ** (2 - stage)) if stage < 2 else img
            d = F.gelu(conv(src, p[f"detail_{stage}"]))
            x = x + conv(torch.cat([x, d], 1), p[f"merge_{stage}"])
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "h, w, coarse, inject",
    [(40, 40, 5, True), (48, 56, 4, True), (24, 40, 4, False)],
)
def test_token_to_map_matches_twin(h, w, coarse, inject):
    n, c, dim = 6, 5, 8
    rng = np.random.default_rng(h + w)
    z = rng.standard_normal((2, n, c)).astype(np.float32)
    image = rng.uniform(0, 1, (2, h, w, 1)).astype(np.float32)
    m = itf.TokenToMap(dim, coarse, inject)
    p = random_params(m, z, image)
    assert p["lift"]["kernel"].shape == (c, dim) and p["token_map"]["kernel"].shape == (
        n,
        coarse**2,
    )
    assert ("detail_0" in p) == inject
    got = jax.jit(m.apply)({"params": p}, z, image)
    assert got.shape == (2, h, w, dim)
    want = token_to_map_twin(z, image, p, coarse, inject)
    # lift (c + 1), token map (n + 1), 3x3 refinement over dim (+ the scale), a resize, then per
    # stage: x2 upsampling, the k x k detail conv on the image (+ GELU) and the 3x3 merge over
    # 2 dim channels
    stages = sum(6 + k * k + 1 + ELEMENTARY_ULPS + 9 * 2 * dim + 2 for k in (7, 5, 3))
    chain = (c + 1) + (n + 1) + (9 * dim + 3) + 6 + (stages if inject else 18)
    assert max_err(got, want) <= rounding_bound(chain, activation_scale(z, image, want))


def test_token_to_map_detail_kernels_and_size_check():
    z = jnp.zeros((1, 4, 3))
    image = jnp.zeros((1, 16, 16, 1))
    shapes = jax.eval_shape(itf.TokenToMap(8, 2).init, jax.random.key(0), z, image)["params"]
    assert [shapes[f"detail_{i}"]["kernel"].shape[0] for i in range(3)] == [7, 5, 3]
    assert shapes["refine_scale"].shape == ()
    with pytest.raises(ValueError, match="not divisible by 8"):
        jax.eval_shape(itf.TokenToMap(8, 2).init, jax.random.key(0), z, jnp.zeros((1, 20, 16, 1)))
