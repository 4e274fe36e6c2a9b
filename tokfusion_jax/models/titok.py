"""TiTok 1D image tokenizer in Flax linen: encoder, quantizer, decoder and MaskGIT pixel decoder.

The numerics follow the official PyTorch model exactly (see ``convert/titok_torch.py`` for the
checkpoint-compatible reference), including its two layout quirks:

* legacy checkpoints (L-32, B-64, S-128) project the encoder latents to tokens with a 1x1 conv
  applied after a row-major *reshape* (not a transpose) of ``(B, N, W)`` into ``(B, W, N)``, so
  token ``i`` mixes feature columns ``f = i (mod N)`` of every latent token (when N divides W,
  as in every official config);
* the pixel decoder's resnet blocks that change width return ``h + nin_shortcut(h)`` where ``h``
  is their second conv's output (the block input is not a skip connection).

Images are NHWC float in [0, 1]; tokens are ``(B, N, C)`` token-major. Parameters are float32;
``dtype`` is the compute dtype of matmuls and convolutions, while LayerNorm, GroupNorm, softmax
and the quantizer always run in float32.

Public API::

    tok = titok.load(path)                      # or titok.create(TiTokConfig.tiny(), seed=0)
    out = titok.encode(tok, images)             # EncodeOutput(quantized, continuous, indices)
    rec = titok.decode(tok, out.quantized)      # (B, H, W, 3), unclamped
    rec = titok.decode_indices(tok, out.indices)
    titok.save(tok, path)
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax.errors import CheckpointError, ConfigError

Array = jax.Array
DType = Any

FORMAT_NAME = "tokfusion_jax.titok"
FORMAT_VERSION = 1
METADATA_FILE = "tokenizer.json"
PARAMS_DIR = "params"
# The tokenizer that ships with the package: trained with `python -m tokfusion_jax.titok_train
# --config=configs/titok.py` on the fusion data (64x64 input, 32 tokens x 12 dims, VQ); see the
# README beside it.
PACKAGED_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "titok_fusion64"

LN_EPS = 1e-5  # LayerNorm epsilon of both ViTs
GN_EPS = 1e-6  # GroupNorm epsilon of the pixel decoder
GN_GROUPS = 32

# Width, depth and heads of the official ViT sizes (head dim 64, MLP ratio 4).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

# name: (encoder size, decoder size, tokens, token_size, codebook, l2, mode, legacy, pixel decoder)
_VARIANTS: dict[str, tuple[str, str, int, int, int, bool, str, bool, bool]] = {
    "l32": ("large", "large", 32, 12, 4096, True, "vq", True, True),
    "b64": ("base", "base", 64, 12, 4096, True, "vq", True, True),
    "s128": ("small", "small", 128, 12, 4096, True, "vq", True, True),
    "bl64_vq8k": ("base", "large", 64, 64, 8192, False, "vq", False, False),
    "bl128_vq8k": ("base", "large", 128, 64, 8192, False, "vq", False, False),
    "sl256_vq8k": ("small", "large", 256, 64, 8192, False, "vq", False, False),
    "ll32_vae_c16": ("large", "large", 32, 16, 0, False, "vae", False, False),
    "bl64_vae_c16": ("base", "large", 64, 16, 0, False, "vae", False, False),
    "bl128_vae_c16": ("base", "large", 128, 16, 0, False, "vae", False, False),
}
VARIANT_NAMES: tuple[str, ...] = tuple(_VARIANTS)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TiTokConfig:
    """Architecture of a TiTok tokenizer (every size the official code hard-codes is a field).

    ``token_size`` is the token dimension C that the quantizer and decoder see; in ``"vae"``
    mode the encoder emits ``2 * token_size`` channels (mean, log-variance). ``finetune_decoder``
    means the legacy two-stage model: a 1024-way proxy-code head followed by the MaskGIT pixel
    decoder (``pixel_*`` fields). ``scan_unroll`` is an execution knob (how many transformer
    blocks ``lax.scan`` unrolls), not part of the architecture.
    """

    image_size: int = 256
    patch_size: int = 16
    enc_width: int = 1024
    enc_depth: int = 24
    enc_heads: int = 16
    dec_width: int = 1024
    dec_depth: int = 24
    dec_heads: int = 16
    mlp_ratio: int = 4
    num_tokens: int = 32
    token_size: int = 12
    codebook_size: int = 4096
    use_l2_norm: bool = True
    quantize_mode: str = "vq"
    is_legacy: bool = True
    finetune_decoder: bool = True
    pixel_codebook_size: int = 1024
    pixel_z_channels: int = 256
    pixel_hidden: int = 128
    pixel_channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    pixel_num_res_blocks: int = 2
    scan_unroll: int = 1

    def __post_init__(self) -> None:
        set_field = functools.partial(object.__setattr__, self)
        set_field("pixel_channel_mult", tuple(int(m) for m in self.pixel_channel_mult))
        # Fields without effect on this architecture take fixed values, so that equal
        # architectures compare (and hash) equal.
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if not self.is_legacy:
            set_field("finetune_decoder", False)
            set_field("pixel_codebook_size", defaults["pixel_codebook_size"])
        if not self.has_pixel_decoder:
            for name in ("pixel_z_channels", "pixel_hidden", "pixel_channel_mult"):
                set_field(name, defaults[name])
            set_field("pixel_num_res_blocks", defaults["pixel_num_res_blocks"])
        if self.quantize_mode == "vae":
            set_field("codebook_size", 0)
            set_field("use_l2_norm", False)
        self.validate()

    # -- derived sizes ------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Patches per side, g = image_size / patch_size."""
        return self.image_size // self.patch_size

    @property
    def encoder_out_channels(self) -> int:
        """Channels of the encoder's 1x1 projection: C (vq) or 2C (vae: mean and log-variance)."""
        return 2 * self.token_size if self.quantize_mode == "vae" else self.token_size

    @property
    def has_pixel_decoder(self) -> bool:
        """Whether ``decode`` goes through the legacy proxy-code head and the pixel decoder."""
        return self.is_legacy and self.finetune_decoder

    def validate(self) -> None:
        """Raises `ConfigError` naming the first inconsistent field."""

        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"TiTokConfig.{field}={getattr(self, field)!r}: {why}")

        for field in ("image_size", "patch_size", "enc_width", "enc_depth", "enc_heads"):
            if int(getattr(self, field)) <= 0:
                raise bad(field, "must be positive")
        for field in ("dec_width", "dec_depth", "dec_heads", "num_tokens", "token_size"):
            if int(getattr(self, field)) <= 0:
                raise bad(field, "must be positive")
        if self.image_size % self.patch_size:
            raise bad("image_size", f"must be a multiple of patch_size={self.patch_size}")
        if self.enc_width % self.enc_heads:
            raise bad("enc_width", f"must be divisible by enc_heads={self.enc_heads}")
        if self.dec_width % self.dec_heads:
            raise bad("dec_width", f"must be divisible by dec_heads={self.dec_heads}")
        if self.quantize_mode not in ("vq", "vae"):
            raise bad("quantize_mode", "must be 'vq' or 'vae'")
        if self.quantize_mode == "vq" and self.codebook_size <= 0:
            raise bad("codebook_size", "must be positive in 'vq' mode")
        if self.scan_unroll <= 0:
            raise bad("scan_unroll", "must be positive")
        if self.has_pixel_decoder:
            if not self.pixel_channel_mult:
                raise bad("pixel_channel_mult", "must not be empty")
            upsampling = 2 ** (len(self.pixel_channel_mult) - 1)
            if upsampling != self.patch_size:
                raise bad(
                    "pixel_channel_mult",
                    f"{len(self.pixel_channel_mult)} levels upsample x{upsampling}, but "
                    f"patch_size={self.patch_size} needs 1 + log2(patch_size) levels",
                )
            for width in self.pixel_widths:
                if width % GN_GROUPS:
                    raise bad("pixel_hidden", f"pixel decoder width {width} not divisible by 32")

    @property
    def pixel_widths(self) -> tuple[int, ...]:
        """Channel width of each pixel-decoder resolution level (level 0 = full resolution)."""
        return tuple(self.pixel_hidden * m for m in self.pixel_channel_mult)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def variant(cls, name: str, **overrides: Any) -> TiTokConfig:
        """The architecture of an official tokenizer, e.g. ``TiTokConfig.variant("l32")``."""
        key = name.lower().removeprefix("titok_").removeprefix("tokenizer_titok_")
        key = key.removesuffix("_imagenet")
        if key not in _VARIANTS:
            raise ConfigError(f"unknown TiTok variant {name!r}; known: {', '.join(_VARIANTS)}")
        enc, dec, tokens, token_size, codebook, l2, mode, legacy, pixel = _VARIANTS[key]
        ew, ed, eh = VIT_SIZES[enc]
        dw, dd, dh = VIT_SIZES[dec]
        fields = dict(
            enc_width=ew,
            enc_depth=ed,
            enc_heads=eh,
            dec_width=dw,
            dec_depth=dd,
            dec_heads=dh,
            num_tokens=tokens,
            token_size=token_size,
            codebook_size=codebook,
            use_l2_norm=l2,
            quantize_mode=mode,
            is_legacy=legacy,
            finetune_decoder=pixel,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def tiny(cls, **overrides: Any) -> TiTokConfig:
        """A few-hundred-k-parameter legacy VQ tokenizer with pixel decoder, for tests and demos."""
        fields: dict[str, Any] = dict(
            image_size=32,
            patch_size=8,
            enc_width=64,
            enc_depth=2,
            enc_heads=2,
            dec_width=64,
            dec_depth=2,
            dec_heads=2,
            num_tokens=8,
            token_size=12,
            codebook_size=64,
            pixel_codebook_size=64,
            pixel_z_channels=32,
            pixel_hidden=32,
            pixel_channel_mult=(1, 1, 2, 2),
            pixel_num_res_blocks=1,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["pixel_channel_mult"] = list(self.pixel_channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TiTokConfig:
        """Inverse of `to_dict`; unknown keys raise `ConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown TiTok config keys {unknown}; known: {sorted(names)}")
        return cls(**dict(d))


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, use_fast_variance=False, name=name)


def _f32_norm(norm: nn.Module, x: Array) -> Array:
    """Applies a normalisation layer in float32 and returns the input's dtype."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def attention(q: Array, k: Array, v: Array) -> Array:
    """Softmax attention over heads-major (B, heads, L, D) inputs; softmax in float32.

    The same math as ``jax.nn.dot_product_attention``; the heads-major layout keeps both
    matmuls plain batched GEMMs, which is markedly faster on CPU.
    """
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # (B, heads, L, L)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm ViT block: x + MHA(LN(x)), then x + MLP(LN(x)); exact GELU, no dropout."""

    width: int
    heads: int
    mlp_dim: int
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, _: Any = None) -> tuple[Array, None]:
        # x: (B, L, W)
        b, length, width = x.shape
        head_dim = width // self.heads
        h = _f32_norm(_layer_norm("ln_1"), x)
        qkv = nn.Dense(3 * width, dtype=self.dtype, name="in_proj")(h)  # (B, L, 3W)
        qkv = qkv.reshape(b, length, 3, self.heads, head_dim).transpose(2, 0, 3, 1, 4)
        attn = attention(qkv[0], qkv[1], qkv[2])  # (B, heads, L, D)
        attn = attn.transpose(0, 2, 1, 3).reshape(b, length, width)
        x = x + nn.Dense(width, dtype=self.dtype, name="out_proj")(attn)
        h = _f32_norm(_layer_norm("ln_2"), x)
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="c_fc")(h)
        h = nn.gelu(h, approximate=False)
        x = x + nn.Dense(width, dtype=self.dtype, name="c_proj")(h)
        return x, None


class Transformer(nn.Module):
    """``depth`` residual blocks run with `nn.scan` (parameters stacked on a leading axis)."""

    width: int
    depth: int
    heads: int
    mlp_dim: int
    unroll: int = 1
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        blocks = nn.scan(
            ResidualAttentionBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.depth,
            unroll=min(self.unroll, self.depth),
        )
        x, _ = blocks(self.width, self.heads, self.mlp_dim, self.dtype, name="blocks")(x, None)
        return x


def _embedding(name: str, shape: tuple[int, ...], module: nn.Module) -> Array:
    scale = shape[-1] ** -0.5
    return module.param(name, nn.initializers.normal(scale), shape, jnp.float32)


class TiTokEncoder(nn.Module):
    """ViT over [class, g*g patches, N latent tokens] -> (B, N, encoder_out_channels)."""

    config: TiTokConfig
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, images: Array, latent_tokens: Array) -> Array:
        # images: (B, S, S, 3); latent_tokens: (N, W)
        cfg = self.config
        width, grid, n = cfg.enc_width, cfg.grid_size, cfg.num_tokens
        batch = images.shape[0]
        x = nn.Conv(
            width,
            (cfg.patch_size, cfg.patch_size),
            strides=cfg.patch_size,
            padding="VALID",
            dtype=self.dtype,
            name="patch_embed",
        )(images.astype(self.dtype))
        x = x.astype(jnp.float32)  # (B, g, g, W); the residual stream stays float32
        x = x.reshape(batch, grid * grid, width)  # patch p = row * g + col
        cls = _embedding("class_embedding", (1, width), self)
        pos = _embedding("positional_embedding", (grid * grid + 1, width), self)
        latent_pos = _embedding("latent_token_positional_embedding", (n, width), self)
        cls = jnp.broadcast_to(cls[None], (batch, 1, width))
        x = jnp.concatenate([cls, x], axis=1) + pos
        latents = jnp.broadcast_to((latent_tokens + latent_pos)[None], (batch, n, width))
        x = jnp.concatenate([x, latents], axis=1)  # (B, 1 + g*g + N, W)
        x = _f32_norm(_layer_norm("ln_pre"), x)
        x = Transformer(
            width,
            cfg.enc_depth,
            cfg.enc_heads,
            cfg.mlp_ratio * width,
            cfg.scan_unroll,
            self.dtype,
            name="transformer",
        )(x)
        h = _f32_norm(_layer_norm("ln_post"), x[:, -n:])  # (B, N, W)
        proj = nn.Dense(cfg.encoder_out_channels, dtype=self.dtype, name="conv_out")
        if cfg.is_legacy:
            # Official quirk: a row-major reshape (B, N, W) -> (B, W, N) feeds a 1x1 conv over
            # the W axis, so output token i reads the columns of all latent tokens at f = i mod N.
            h = h.reshape(batch, width, n).swapaxes(1, 2)  # (B, N, W) again, scrambled
        return proj(h)  # (B, N, C_out)


class TiTokDecoder(nn.Module):
    """ViT over [class, g*g mask tokens, N token embeddings] -> logits or RGB.

    Legacy: (B, g, g, pixel_codebook_size) proxy-code logits. Otherwise: (B, S, S, 3) RGB.
    """

    config: TiTokConfig
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        # tokens: (B, N, C)
        cfg = self.config
        width, grid, n = cfg.dec_width, cfg.grid_size, cfg.num_tokens
        batch = tokens.shape[0]
        z = nn.Dense(width, dtype=self.dtype, name="decoder_embed")(tokens)
        z = z.astype(jnp.float32) + _embedding(
            "latent_token_positional_embedding", (n, width), self
        )
        mask = self.param("mask_token", nn.initializers.normal(width**-0.5), (1, 1, width))
        cls = _embedding("class_embedding", (1, width), self)
        pos = _embedding("positional_embedding", (grid * grid + 1, width), self)
        x = jnp.concatenate([cls[None], jnp.broadcast_to(mask, (1, grid * grid, width))], axis=1)
        x = jnp.broadcast_to(x + pos[None], (batch, grid * grid + 1, width))
        x = jnp.concatenate([x, z], axis=1)  # (B, 1 + g*g + N, W)
        x = _f32_norm(_layer_norm("ln_pre"), x)
        x = Transformer(
            width,
            cfg.dec_depth,
            cfg.dec_heads,
            cfg.mlp_ratio * width,
            cfg.scan_unroll,
            self.dtype,
            name="transformer",
        )(x)
        x = _f32_norm(_layer_norm("ln_post"), x[:, 1 : 1 + grid * grid])
        x = x.reshape(batch, grid, grid, width)  # (B, g, g, W)
        if cfg.is_legacy:
            x = nn.Dense(2 * width, dtype=self.dtype, name="ffn_0")(x)
            x = jnp.tanh(x)
            return nn.Dense(cfg.pixel_codebook_size, dtype=self.dtype, name="ffn_2")(x)
        p = cfg.patch_size
        x = nn.Dense(p * p * 3, dtype=self.dtype, name="ffn_0")(x)  # (B, g, g, p*p*3)
        x = x.reshape(batch, grid, grid, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch, grid * p, grid * p, 3)  # depth-to-space, channel (p1, p2, c)
        return nn.Conv(3, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(x)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3 (no biases), with the nin quirk."""

    out_channels: int
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # x: (B, H, W, C_in) -> (B, H, W, C_out)
        gn = functools.partial(
            nn.GroupNorm, GN_GROUPS, epsilon=GN_EPS, dtype=jnp.float32, use_fast_variance=False
        )
        conv = functools.partial(nn.Conv, self.out_channels, use_bias=False, dtype=self.dtype)
        h = nn.silu(_f32_norm(gn(name="norm1"), x))
        h = conv((3, 3), padding=1, name="conv1")(h)
        h = nn.silu(_f32_norm(gn(name="norm2"), h))
        h = conv((3, 3), padding=1, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            # Official quirk: the shortcut is applied to h itself; the input is dropped.
            return h + conv((1, 1), name="nin_shortcut")(h)
        return x + h


def _upsample_nearest_2x(x: Array) -> Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


class PixelDecoder(nn.Module):
    """MaskGIT-VQGAN decoder: (B, g, g, z_channels) -> (B, g * 2**(levels-1), ..., 3)."""

    config: TiTokConfig
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg = self.config
        widths = cfg.pixel_widths
        conv3 = functools.partial(nn.Conv, kernel_size=(3, 3), padding=1, dtype=self.dtype)
        x = conv3(widths[-1], name="conv_in")(z.astype(self.dtype))
        for i in range(2):
            x = ResnetBlock(widths[-1], self.dtype, name=f"mid_{i}")(x)
        for level in reversed(range(len(widths))):
            for j in range(cfg.pixel_num_res_blocks):
                x = ResnetBlock(widths[level], self.dtype, name=f"up_{level}_block_{j}")(x)
            if level != 0:
                x = _upsample_nearest_2x(x)
                x = conv3(widths[level], name=f"up_{level}_upsample_conv")(x)
        gn = nn.GroupNorm(
            GN_GROUPS, epsilon=GN_EPS, dtype=jnp.float32, use_fast_variance=False, name="norm_out"
        )
        x = nn.silu(_f32_norm(gn, x))
        return conv3(3, name="conv_out")(x)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps) along the last axis (torch ``F.normalize``)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class EncodeOutput(NamedTuple):
    """What `encode` returns (all float32 / int32).

    quantized:  (B, N, C) what `decode` consumes. VQ: the (l2-normalised when use_l2_norm)
                codebook vectors, with a straight-through gradient to the encoder. VAE: the
                posterior mode (= mean), or a reparameterised sample when `encode` gets an rng.
    continuous: (B, N, C) encoder output before normalisation (VAE: the posterior mean).
    indices:    (B, N) int32 codebook indices (first minimum on ties); -1 in VAE mode.
    """

    quantized: Array
    continuous: Array
    indices: Array


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser (float32) with a straight-through gradient."""

    codebook_size: int
    token_size: int
    use_l2_norm: bool

    def setup(self) -> None:
        init = nn.initializers.uniform(2.0 / self.codebook_size)
        self.embedding = self.param("embedding", init, (self.codebook_size, self.token_size))

    def __call__(self, z: Array) -> tuple[Array, Array]:
        """z (B, N, C) -> (indices (B, N) int32, quantized (B, N, C) float32)."""
        z = z.astype(jnp.float32)
        codebook = self.embedding.astype(jnp.float32)  # (K, C)
        if self.use_l2_norm:
            z, codebook = l2_normalize(z), l2_normalize(codebook)
        dist = (
            jnp.sum(z**2, axis=-1, keepdims=True)
            + jnp.sum(codebook**2, axis=-1)
            - 2.0 * jnp.einsum("bnc,kc->bnk", z, codebook, precision=jax.lax.Precision.HIGHEST)
        )  # (B, N, K) squared distances
        indices = jnp.argmin(dist, axis=-1).astype(jnp.int32)  # first minimum on ties
        z_q = self.lookup(indices)
        return indices, z + jax.lax.stop_gradient(z_q - z)  # straight-through

    def lookup(self, indices: Array) -> Array:
        """Integer tokens (B, N) -> code vectors (B, N, C), l2-normalised if configured."""
        z_q = jnp.take(self.embedding.astype(jnp.float32), indices, axis=0)
        return l2_normalize(z_q) if self.use_l2_norm else z_q


class PixelCodebook(nn.Module):
    """The MaskGIT-VQGAN codebook, used softly: expected code vector under softmax(logits)."""

    num_codes: int
    channels: int

    @nn.compact
    def __call__(self, logits: Array) -> Array:
        # logits: (B, g, g, K) -> (B, g, g, z_channels)
        codebook = self.param(
            "embedding", nn.initializers.normal(1.0), (self.num_codes, self.channels)
        )
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.einsum("bhwk,kc->bhwc", probs, codebook, precision=jax.lax.Precision.HIGHEST)


class TiTok(nn.Module):
    """The whole tokenizer; `encode`, `decode` and `decode_indices` are its apply methods.

    Sub-trees of the params: ``latent_tokens``, ``encoder``, ``quantize`` (VQ),
    ``decoder``, ``pixel_quantize`` and ``pixel_decoder`` (legacy two-stage models). `encode`
    only touches the first three, so an encoder-only tree is enough for it.
    """

    config: TiTokConfig
    dtype: DType = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.latent_tokens = self.param(
            "latent_tokens",
            nn.initializers.normal(cfg.enc_width**-0.5),
            (cfg.num_tokens, cfg.enc_width),
        )
        self.encoder = TiTokEncoder(cfg, self.dtype)
        self.decoder = TiTokDecoder(cfg, self.dtype)
        if cfg.quantize_mode == "vq":
            self.quantize = VectorQuantizer(cfg.codebook_size, cfg.token_size, cfg.use_l2_norm)
        if cfg.has_pixel_decoder:
            self.pixel_quantize = PixelCodebook(cfg.pixel_codebook_size, cfg.pixel_z_channels)
            self.pixel_decoder = PixelDecoder(cfg, self.dtype)

    def __call__(self, images: Array) -> Array:
        """Full reconstruction (used to initialise every parameter)."""
        return self.decode(self.encode(images).quantized)

    def latents(self, images: Array) -> Array:
        """images (B, S, S, 3) in [0, 1] -> raw encoder output (B, N, C_out) float32.

        VQ: the latent before normalisation and quantisation; VAE: mean and log-variance
        concatenated over channels.
        """
        return self.encoder(images, self.latent_tokens).astype(jnp.float32)

    def encode(self, images: Array, rng: Array | None = None) -> EncodeOutput:
        """images (B, S, S, 3) in [0, 1] -> `EncodeOutput`."""
        cfg = self.config
        z = self.latents(images)  # (B, N, C_out)
        if cfg.quantize_mode == "vae":
            mean, logvar = z[..., : cfg.token_size], z[..., cfg.token_size :]
            sample = mean  # the posterior mode
            if rng is not None:
                std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
                sample = mean + std * jax.random.normal(rng, mean.shape, mean.dtype)
            return EncodeOutput(sample, mean, jnp.full(mean.shape[:2], -1, jnp.int32))
        indices, quantized = self.quantize(z)
        return EncodeOutput(quantized, z, indices)

    def decode(self, tokens: Array) -> Array:
        """tokens (B, N, C) -> images (B, S, S, 3) float32, unclamped (no re-quantisation)."""
        out = self.decoder(tokens)
        if not self.config.is_legacy:
            return out.astype(jnp.float32)
        if not self.config.has_pixel_decoder:
            raise ConfigError(
                "this legacy TiTok has no pixel decoder (finetune_decoder=False); it can only "
                "produce proxy-code logits (decode_logits)"
            )
        return self.pixel_decoder(self.pixel_quantize(out)).astype(jnp.float32)

    def decode_logits(self, tokens: Array) -> Array:
        """Legacy only: tokens (B, N, C) -> proxy-code logits (B, g, g, pixel_codebook_size)."""
        return self.decoder(tokens).astype(jnp.float32)

    def decode_indices(self, indices: Array) -> Array:
        """Integer tokens (B, N) -> images (B, S, S, 3)."""
        return self.decode(self.quantize.lookup(indices))


# --------------------------------------------------------------------------------------------
# Tokenizer: a pytree with the parameters as leaves
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Tokenizer:
    """A frozen TiTok: pass it to (or close over it in) jitted functions like any pytree."""

    model: TiTok = flax.struct.field(pytree_node=False)
    params: dict[str, Any]
    config: TiTokConfig = flax.struct.field(pytree_node=False)
    sha256: str = flax.struct.field(pytree_node=False, default="")

    @property
    def num_params(self) -> int:
        """Number of parameter scalars."""
        return param_count(self.params)


def param_count(params: Any) -> int:
    """Total number of scalars in a parameter tree."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def params_sha256(params: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and little-endian C-order bytes."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def abstract_params(config: TiTokConfig) -> Any:
    """Shapes and dtypes of the parameter tree, without allocating it."""
    model = TiTok(config)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    return variables["params"]


INIT_SCHEMES = ("fan_in", "titok")


def create(config: TiTokConfig, seed: int = 0, scheme: str = "fan_in") -> Tokenizer:
    """A tokenizer with random weights. Its sha256 is computed here.

    Weights are drawn leaf by leaf with NumPy (fast even for L-32; no XLA compile); norm scales
    are 1 and biases 0 in both schemes.

    * ``"fan_in"`` (tests, demos): kernels N(0, 1/fan_in), embeddings and codebooks
      N(0, 1/width), so that random tokens and images have unit scale.
    * ``"titok"`` (training from scratch, the official initialisation): kernels N(0, 0.02^2),
      class/positional/mask/latent embeddings N(0, 1/width), the VQ codebook U(-1/K, 1/K).
    """
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"init scheme {scheme!r}: expected one of {INIT_SCHEMES}")
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> Array:
        name, shape = str(path[-1].key), leaf.shape
        if name == "scale":
            return jnp.ones(shape, jnp.float32)
        if name == "bias":
            return jnp.zeros(shape, jnp.float32)
        if scheme == "titok" and name == "kernel":
            return jnp.asarray(0.02 * rng.standard_normal(shape, np.float32))
        if scheme == "titok" and str(path[0].key) == "quantize":
            k = shape[0]
            return jnp.asarray(rng.uniform(-1.0 / k, 1.0 / k, shape).astype(np.float32))
        fan_in = math.prod(shape[:3]) if (name == "kernel" and len(shape) == 4) else shape[-2]
        if name != "kernel":
            fan_in = shape[-1]
        return jnp.asarray(
            rng.standard_normal(shape, np.float32) / np.sqrt(fan_in, dtype=np.float32)
        )

    params = jax.tree_util.tree_map_with_path(draw, abstract_params(config))
    return Tokenizer(
        model=TiTok(config), params=params, config=config, sha256=params_sha256(params)
    )


def from_params(config: TiTokConfig, params: Any, sha256: str | None = None) -> Tokenizer:
    """Wraps an existing parameter tree (checked against the config's shapes)."""
    check_param_shapes(params, abstract_params(config), where="params")
    params = jax.tree_util.tree_map(jnp.asarray, params)
    sha = params_sha256(params) if sha256 is None else sha256
    return Tokenizer(model=TiTok(config), params=params, config=config, sha256=sha)


MAX_LISTED_PROBLEMS = 8  # a deeper or wider config mismatches hundreds of leaves


def check_param_shapes(params: Any, expected: Any, where: str) -> None:
    """Raises `CheckpointError` listing the missing, unexpected or mis-shaped leaves (the first
    `MAX_LISTED_PROBLEMS`, then how many more)."""
    got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in _flat(params)}
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in _flat(expected)}
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
    problems += [
        f"{k}: expected {want[k]}, found {got[k]}"
        for k in sorted(set(got) & set(want))
        if got[k] != want[k]
    ]
    if problems:
        shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        tail = f"; ... and {more} more" if more > 0 else ""
        raise CheckpointError(f"{where} does not match the TiTok config: {shown}{tail}")


def _flat(tree: Any) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


# --------------------------------------------------------------------------------------------
# Jitted entry points
# --------------------------------------------------------------------------------------------


def _model(tok: Tokenizer, dtype: DType) -> TiTok:
    return tok.model.clone(dtype=jnp.dtype(dtype))


def _check_images(tok: Tokenizer, images: Array) -> None:
    size = tok.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ConfigError(
            f"TiTok images must have shape (B, {size}, {size}, 3) float in [0, 1], got "
            f"{tuple(images.shape)}"
        )


@functools.partial(jax.jit, static_argnames=("dtype",))
def encode(
    tok: Tokenizer, images: Array, dtype: DType = jnp.float32, rng: Array | None = None
) -> EncodeOutput:
    """Tokenises images (B, S, S, 3) float in [0, 1] -> `EncodeOutput` (float32 / int32).

    ``dtype`` is the compute dtype (bfloat16 on accelerators); params stay float32. ``rng`` only
    matters in VAE mode, where it draws ``quantized`` from the posterior instead of its mode.
    Works inside other jitted functions with ``tok`` traced.
    """
    _check_images(tok, images)
    model = _model(tok, dtype)
    return model.apply({"params": tok.params}, images, rng, method=TiTok.encode)


def _check_tokens(tok: Tokenizer, tokens: Array) -> None:
    cfg = tok.config
    if tokens.ndim != 3 or tokens.shape[1:] != (cfg.num_tokens, cfg.token_size):
        raise ConfigError(
            f"TiTok tokens must have shape (B, {cfg.num_tokens}, {cfg.token_size}), got "
            f"{tuple(tokens.shape)}"
        )


@functools.partial(jax.jit, static_argnames=("dtype",))
def decode(tok: Tokenizer, quantized: Array, dtype: DType = jnp.float32) -> Array:
    """Tokens (B, N, C) -> images (B, S, S, 3) float32, unclamped."""
    _check_tokens(tok, quantized)
    return _model(tok, dtype).apply({"params": tok.params}, quantized, method=TiTok.decode)


@functools.partial(jax.jit, static_argnames=("dtype",))
def decode_logits(tok: Tokenizer, quantized: Array, dtype: DType = jnp.float32) -> Array:
    """Legacy tokenizers: tokens (B, N, C) -> proxy-code logits (B, g, g, pixel codebook)."""
    _check_tokens(tok, quantized)
    if not tok.config.is_legacy:
        raise ConfigError("decode_logits needs a legacy TiTok (is_legacy=True)")
    model = _model(tok, dtype)
    return model.apply({"params": tok.params}, quantized, method=TiTok.decode_logits)


@functools.partial(jax.jit, static_argnames=("dtype",))
def decode_indices(tok: Tokenizer, indices: Array, dtype: DType = jnp.float32) -> Array:
    """Integer tokens (B, N) -> images (B, S, S, 3) float32, unclamped (VQ tokenizers only)."""
    cfg = tok.config
    if cfg.quantize_mode != "vq":
        raise ConfigError("decode_indices needs a VQ TiTok; this one is quantize_mode='vae'")
    if indices.ndim != 2 or indices.shape[1] != cfg.num_tokens:
        raise ConfigError(f"indices must have shape (B, {cfg.num_tokens}), got {indices.shape}")
    model = _model(tok, dtype)
    return model.apply({"params": tok.params}, indices, method=TiTok.decode_indices)


# --------------------------------------------------------------------------------------------
# Save / load (orbax params + tokenizer.json), atomically
# --------------------------------------------------------------------------------------------


STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def save(
    tok: Tokenizer,
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    storage_dtype: str = "float32",
) -> Path:
    """Writes ``path/params`` (orbax) and ``path/tokenizer.json`` atomically; returns the path.

    ``metadata`` (e.g. the conversion source) is stored in tokenizer.json. An existing
    tokenizer directory at ``path`` is replaced only once the new one is complete; any other
    existing file or directory there is refused. ``storage_dtype`` "float16" or "bfloat16" stores
    the parameters at half size; `load` restores float32 (the recorded sha256 is that of the
    restored float32 values).
    """
    import orbax.checkpoint as ocp

    if storage_dtype not in STORAGE_DTYPES:
        raise ConfigError(f"storage_dtype={storage_dtype!r}: expected one of {STORAGE_DTYPES}")
    path = Path(path).absolute()
    check_save_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = tok.params
    sha = tok.sha256 or params_sha256(tok.params)
    if storage_dtype != "float32":
        dtype = jnp.dtype(storage_dtype)
        stored = jax.tree_util.tree_map(
            lambda x: np.asarray(jax.device_get(x)).astype(dtype), stored
        )
        sha = params_sha256(jax.tree_util.tree_map(lambda x: x.astype(np.float32), stored))
    record = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": tok.config.to_dict(),
        "params_sha256": sha,
        "param_count": param_count(tok.params),
        "storage_dtype": storage_dtype,
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **dict(metadata or {}),
    }
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, stored)
            ckptr.wait_until_finished()
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def check_save_path(path: str | os.PathLike) -> None:
    """`save` may write `path`: it is new, empty or an earlier tokenizer directory."""
    path = Path(path).absolute()
    if path.exists() and not (path.is_dir() and _is_tokenizer_dir_or_empty(path)):
        raise CheckpointError(f"{path} exists and is not a TiTok tokenizer directory; not touched")


def _is_tokenizer_dir_or_empty(path: Path) -> bool:
    return (path / METADATA_FILE).is_file() or not any(path.iterdir())


def _swap_in(new: Path, path: Path) -> None:
    """Moves directory ``new`` to ``path``; an existing ``path`` is removed only afterwards."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The tokenizer.json of a converted-checkpoint directory, validated."""
    meta_path = Path(path) / METADATA_FILE
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a converted TiTok checkpoint)")
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing (is {path} a converted TiTok checkpoint?)")
    try:
        record = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path}: 'format' is not {FORMAT_NAME!r}")
    if not isinstance(record.get("architecture"), dict):
        raise CheckpointError(f"{meta_path}: key 'architecture' missing or not an object")
    return record


def load(path: str | os.PathLike, sharding: Any = None) -> Tokenizer:
    """Reads a directory written by `save` or by ``python -m convert titok``.

    ``sharding``: None (default device), a `jax.sharding.Mesh` (replicated over it), one
    `jax.sharding.Sharding` for every leaf, or a pytree of shardings shaped like the params.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    record = read_metadata(path)
    try:
        config = TiTokConfig.from_dict(record["architecture"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / METADATA_FILE}: bad 'architecture' ({e})") from None
    abstract = abstract_params(config)
    shardings = _resolve_sharding(sharding, abstract)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing parameter directory")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = _stored_array_metadata(ckptr, params_dir)
            if stored is not None:  # name every wrong key before any array is read
                check_param_shapes(stored, abstract, where=str(params_dir))
            params = ckptr.restore(params_dir, target)
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types for a damaged directory
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({msg})") from None
    if stored is None:  # no metadata to check beforehand: check what was read
        check_param_shapes(params, abstract, where=str(params_dir))
    return Tokenizer(
        model=TiTok(config), params=params, config=config, sha256=record.get("params_sha256", "")
    )


def _stored_array_metadata(ckptr: Any, params_dir: Path) -> Any | None:
    """The tree of array metadata (each leaf has `.shape`) orbax recorded, or None if unreadable.

    Checking it first turns a config/checkpoint mismatch into one error naming the keys, instead
    of a failure in the middle of orbax's concurrent reads.
    """
    try:
        meta = ckptr.metadata(params_dir)
    except Exception:  # noqa: BLE001 - a damaged directory; `restore` reports it
        return None
    tree = getattr(meta, "item_metadata", meta)
    leaves = jax.tree_util.tree_leaves(tree)
    return tree if leaves and all(hasattr(leaf, "shape") for leaf in leaves) else None


def _resolve_sharding(sharding: Any, abstract: Any) -> Any:
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Mesh):
        sharding = jax.sharding.NamedSharding(sharding, jax.sharding.PartitionSpec())
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda _: sharding, abstract)
    return sharding
