"""Error bounds for comparing floating-point results, derived from the computation.

A tolerance printed by one machine does not hold on another: XLA picks different kernels (FMA
or not, vector width, summation order) on AVX2 and AVX-512 CPUs. The bounds here follow the
standard worst-case analysis (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1):
a result reached through a chain of ``n`` roundings (a length-``k`` sum or dot product counts
``k``) on values of size at most ``M`` is off by at most ``gamma_n * M`` with
``gamma_n = n u / (1 - n u)`` and ``u`` the unit roundoff. Any IEEE-754 CPU stays inside them,
whatever order it sums in. ``cond`` scales a bound by the amplification of the operations after
the roundings (an inverse, a division by a small norm) where that is not 1.

The tight checks are the float64 ones (``u = 2^-53``: a wrong formula, epsilon or padding shows
up there at once); the float32 bounds check that float32 execution does not go astray.
"""

from __future__ import annotations

import math

import numpy as np

U32 = float(np.finfo(np.float32).eps) / 2  # 2^-24, float32 unit roundoff
U64 = float(np.finfo(np.float64).eps) / 2  # 2^-53
U16 = 2.0**-8  # bfloat16 unit roundoff (8-bit significand)


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n roundings."""
    if n * u >= 1:
        raise ValueError(f"gamma_{n} is unbounded at u={u}")
    return n * u / (1 - n * u)


def rounding_bound(chain: int, magnitude: float, u: float = U32, cond: float = 1.0) -> float:
    """Worst-case absolute error of a result `chain` roundings deep on values <= `magnitude`."""
    return gamma(chain, u) * magnitude * cond


def activation_scale(*arrays, factor: float = 4.0) -> float:
    """`factor` x the largest |value| among the inputs and outputs of a composite module: the
    magnitude assumed for its intermediate values and sums of |terms|. With the fan-in-scaled
    random parameters of `twin_helpers.random_params` the activations stay within a few times
    the inputs and outputs; the linear-in-n chain bounds carry orders of magnitude of slack on
    top (rounding errors add up like a random walk, ~sqrt(n), in practice)."""
    return factor * max(float(np.abs(np.asarray(a)).max()) for a in arrays)


ELEMENTARY_ULPS = 4  # exp, tanh, erf, rsqrt: XLA's CPU approximations are within a few ulps


# Rounding chains of the backbone's pieces: how many roundings can reach one output value, a
# length-k reduction counting k.


def conv_chain(k: int, c_in_per_group: int) -> int:
    return k * k * c_in_per_group + 1  # the dot product, then the bias


def ln_chain(c: int) -> int:
    return 2 * c + 8  # mean, centre, square, mean, eps, rsqrt, scale, shift


def attention_chain(hw: int, c_head: int) -> int:
    return 2 * (hw + 2) + (c_head + 3) + c_head  # l2 norms and q k^T over H*W, softmax, @ v


def block_chain(dim: int, hw: int, heads: int, hidden: int) -> int:
    """A Restormer TransformerBlock: LN, MDTA (1x1, dw 3x3, attention, 1x1), LN, GDFN."""
    mdta = conv_chain(1, dim) + conv_chain(3, 1) + attention_chain(hw, dim // heads)
    gdfn = conv_chain(1, dim) + conv_chain(3, 1) + 6 + conv_chain(1, hidden)
    return 2 * ln_chain(dim) + mdta + conv_chain(1, dim) + gdfn + 2


def fusion_chain(dim: int, heads: int, hw: int, enc_blocks: int, dec_blocks: int) -> int:
    """The whole fusion model on given tokens: the token-to-map interface (~800 at dim 8:
    lift, token map, 3x3 refinement, three upsampling stages with detail and merge convs), the
    encoder's blocks, the base and detail branches and fuse layers (block-sized each), the
    decoder's blocks and heads."""
    interface = 1000 + 3 * 9 * 2 * dim
    blocks = enc_blocks + dec_blocks + 4  # + base branch, base fuse, detail branch, detail fuse
    return interface + blocks * block_chain(dim, hw, heads, 2 * dim) + 9 * dim + 100


def probable_bound(chain: int, magnitude: float, u: float = U32, lam: float = 7.0) -> float:
    """Higham & Mary's probabilistic bound (SIAM J. Sci. Comput. 41(5), 2019, Thm. 3.1).

    With independent, mean-zero rounding errors, a chain of n roundings exceeds
    ``lam sqrt(n) u`` times `magnitude` with probability below ``2 exp(-lam^2 / 2)`` per value
    (4.6e-11 at lam = 7). For deep networks, where the worst case (linear in n) would exceed
    the values themselves.
    """
    return (math.exp(lam * math.sqrt(chain) * u + chain * u * u / (1 - u)) - 1) * magnitude


def vit_block_chain(width: int, seq: int, heads: int, mlp_ratio: int = 4) -> int:
    """A pre-LN ViT block: LN, qkv, q k^T, softmax, @ v, projection, LN, MLP with GELU."""
    attention = (width + 1) + width // heads + (seq + 3) + seq + (width + 1)
    mlp = (width + 1) + ELEMENTARY_ULPS + (mlp_ratio * width + 1)
    return 2 * ln_chain(width) + attention + mlp + 2


def titok_encoder_chain(cfg) -> int:
    """TiTok's encoder on one image: patch embedding, the ViT over patches + latent tokens,
    the final LN and the 1x1 projection to the token size, then the l2 normalisation."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    seq = 1 + patches + cfg.num_tokens
    embed = 3 * cfg.patch_size**2 + 2
    vit = cfg.enc_depth * vit_block_chain(cfg.enc_width, seq, cfg.enc_heads, cfg.mlp_ratio)
    return embed + ln_chain(cfg.enc_width) + vit + ln_chain(cfg.enc_width) + cfg.enc_width + 1 + 40


def titok_decoder_chain(cfg) -> int:
    """TiTok's decoder: token embedding, the ViT over mask tokens + tokens, LN, the head; for
    the legacy family the softmax over the pixel codebook, the soft code lookup and the VQGAN
    pixel decoder (every level's 3x3 convs at the widest level's fan-in, with their
    GroupNorms: an over-count)."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    seq = 1 + patches + cfg.num_tokens
    vit = cfg.dec_depth * vit_block_chain(cfg.dec_width, seq, cfg.dec_heads, cfg.mlp_ratio)
    chain = (cfg.token_size + 1) + 2 * ln_chain(cfg.dec_width) + vit + 2 * (cfg.dec_width + 1)
    if cfg.is_legacy:
        widest = cfg.pixel_hidden * max(cfg.pixel_channel_mult)
        convs = len(cfg.pixel_channel_mult) * (2 * (cfg.pixel_num_res_blocks + 1) + 1) + 3
        chain += 2 * cfg.pixel_codebook_size + 3 + convs * (9 * widest + 1 + 2 * widest + 8)
    else:
        chain += 9 * cfg.dec_width + 1 + 3 * cfg.patch_size**2
    return chain


def decided_codes(z, codebook, use_l2_norm: bool, z_bound: float) -> np.ndarray:
    """Which tokens' nearest code no error of at most `z_bound` per entry of z can change.

    With l2 normalisation the choice is the largest cosine; such a change of z moves each
    cosine by at most 2 sqrt(C) z_bound / ||z||. Without it, the distance ||z - c||^2 moves by
    at most 2 sqrt(C) z_bound (||z|| + ||c||). A token is decided when its best and
    second-best scores are more than twice that apart (either side may move). (B, N) bool.
    """
    z = np.asarray(z, np.float64)
    cb = np.asarray(codebook, np.float64)
    c = z.shape[-1]
    if use_l2_norm:
        zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
        score = zn @ (cb / np.linalg.norm(cb, axis=-1, keepdims=True)).T
        slack = 2 * math.sqrt(c) * z_bound / np.linalg.norm(z, axis=-1)
    else:
        score = -((z[..., None, :] - cb) ** 2).sum(-1)
        cmax = np.linalg.norm(cb, axis=-1).max()
        slack = 2 * math.sqrt(c) * z_bound * (np.linalg.norm(z, axis=-1) + cmax)
    top2 = np.sort(score, axis=-1)[..., -2:]
    return (top2[..., 1] - top2[..., 0]) > 2 * slack


def nearest_codes(z, codebook, use_l2_norm: bool) -> np.ndarray:
    """The exact (float64) nearest code index of each token of z."""
    z = np.asarray(z, np.float64)
    cb = np.asarray(codebook, np.float64)
    if use_l2_norm:
        zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
        return (zn @ (cb / np.linalg.norm(cb, axis=-1, keepdims=True)).T).argmax(-1)
    return ((z[..., None, :] - cb) ** 2).sum(-1).argmin(-1)


ADAM_STEP = 3.2  # |Adam update| <= lr (1 - b1) / sqrt(1 - b2) = 3.16 lr at b1 = 0.9, b2 = 0.999


def assert_mostly_close(got, want, typical, worst, fraction: float = 0.99) -> None:
    """All of `got` within `worst` of `want`, and `fraction` of it within `typical`.

    For results after optimiser steps: Adam normalises each update, so where a gradient is
    within rounding of zero its sign (and a full lr-sized step) can differ between two equally
    valid float32 programs. Such entries are rare; the worst case bounds them, the typical
    bound (rounding carried through the steps) holds for the rest. A real discrepancy (a
    missing all-reduce, a wrong batch split) moves most entries.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = np.abs(got - want)
    typical = np.broadcast_to(np.asarray(typical, np.float64), diff.shape)
    assert np.all(diff <= worst), float(diff.max())
    close = float(np.mean(diff <= typical))
    assert close >= fraction, (close, float(diff.max()))


# float32 BT.601: each output is a rounded 3x3 row (coefficients stored in float32, 3 products,
# 2 sums, the offset: 7 roundings) on values with sum |m x| + 0.5 <= 1.5. The inverse's rows sum
# to at most 2.772 in absolute value (1 + 1.772 for B): it scales the forward's error by that
# and adds its own 7 roundings on values <= 2.772 * 1.5. Decoding 8 bits (x * float32(1/255):
# 2 roundings) comes first.
BT601_FORWARD = rounding_bound(9, 1.5)
BT601_INVERSE_GAIN = 2.772
BT601_ROUND_TRIP = BT601_INVERSE_GAIN * BT601_FORWARD + rounding_bound(7, BT601_INVERSE_GAIN * 1.5)
DECODE_8BIT = rounding_bound(2, 1.0)  # x * float32(1 / 255) against x / 255


def resize_bound(scale: float, magnitude: float = 1.0) -> float:
    """Separable antialiased bicubic resize by `scale` (> 1: downsampling) in float32: per axis
    2 ceil(2 scale) + 1 taps (Keys' support 2, widened by the scale), each a product and a sum,
    then the normalisation; the weights' sum of |w| is at most 1.25 (a = -0.5)."""
    taps = 2 * math.ceil(2 * max(scale, 1.0)) + 1
    return rounding_bound(2 * (2 * taps + 1), 1.25 * magnitude)


# The same metric on the same 8-bit images in two programs (other batch compositions), from
# the precision rules of tokfusion_jax.metrics: EN sums 256 float32 p log p terms (all of one
# sign, so relative to EN itself); SD's per-pixel maps are float32 (a few roundings each) with
# float64 sums; SSIM runs in float64 (window sums of 49-121 terms, a map of ~10 operations,
# E[x^2] - E[x]^2 cancellation of up to 255^2 / var, var >= 1 on 8-bit images).
METRIC_RTOL = {
    "EN": 2 * rounding_bound(256 + ELEMENTARY_ULPS + 2, 1.0),
    "SD": 2 * rounding_bound(ELEMENTARY_ULPS + 6, 1.0),
    "SSIM": 2 * rounding_bound(3 * 121 + 20, 255.0**2, U64),
}
