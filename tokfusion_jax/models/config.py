"""Default configuration of the fusion model (the ``config.model`` section of configs/*.py).

Every key is documented where it is set. `model_config()` returns a fresh, unlocked ConfigDict;
`tokfusion_jax.models.fusion.TokFusion` validates it (`ConfigError` naming the key on bad values).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from tokfusion_jax.errors import ConfigError

RESIDUAL_MODES = ("sum", "vis", "none")
TOKEN_SOURCES = ("quantized", "continuous", "normalized")
DTYPES = ("float32", "bfloat16", "float16")


def model_config() -> ml_collections.ConfigDict:
    """Returns the paper's model setting (TiTok-L-32 tokens, CDDFuse-sized backbone, dim 64)."""
    c = ml_collections.ConfigDict()
    # Channel width of every 2D feature map (token-induced map, encoder, decoder, fuse layers).
    c.dim = 64
    # Attention heads of every Restormer block and of the base (lite transformer) branch; must
    # divide `dim`.
    c.heads = 8
    # GDFN hidden expansion of the Restormer TransformerBlocks (hidden = dim * ffn_expansion).
    c.ffn_expansion = 2
    # TransformerBlocks in the shared encoder (CDDFuse encoder_level1) and in the decoder
    # (CDDFuse encoder_level2).
    c.enc_blocks = 4
    c.dec_blocks = 4
    # DetailNodes (INN layers) in the encoder's detail branch and in the stage-II DetailFuse layer.
    c.detail_layers = 3
    c.fuse_detail_layers = 1
    # False: the no-token ablation, the plain 2D path (3x3 patch_embed conv on the image feeds
    # the encoder; no STE, no token-to-map interface). It is CDDFuse's network only with
    # residual="vis" as well (cddfuse_model_config below); with "sum" its output differs.
    c.use_tokens = True
    # False: no Selective Token Editing (Z goes unedited into the token-to-map interface).
    c.use_ste = True
    # False: the token-to-map interface upsamples without merging the source image's detail
    # features (pure bilinear x2 stages).
    c.use_detail_injection = True
    # True: one encoder serves both modalities (CDDFuse, and the paper's 1.3 M budget);
    # False: one encoder per modality (params["encoder"] = {"vis": ..., "ir": ...}).
    c.share_encoder = True
    # Residual added inside the decoder's sigmoid in stage II: "sum" = vis + ir (paper Eq. 12),
    # "vis" = the visible image only (CDDFuse's IVIF recipe), "none" = no residual. In stage I
    # ("reconstruct") "sum" and "vis" both add the reconstructed modality's own image.
    c.residual = "sum"
    # How the token-induced map F_hat enters the shared encoder. "replace": F_hat replaces
    # CDDFuse's patch_embed output (the encoder sees only F_hat; the image reaches it through the
    # interface's detail injection). "add": patch_embed(image) + F_hat.
    c.encoder_input = "replace"

    # Selective Token Editing: Z_tilde = Z + M * Delta, M = positions x channels (binary).
    c.ste = ml_collections.ConfigDict()
    c.ste.positions = (12, 18)  # token indices edited (found by the probe for TiTok-L-32)
    c.ste.channels = (6, 7, 8)  # token channels edited at those positions
    c.ste.shared = True  # one Delta for both modalities; False: "delta_vis" and "delta_ir"

    # The frozen tokenizer's tokens as the fusion model sees them.
    c.tokens = ml_collections.ConfigDict()
    # "quantized": the unit-norm codebook vectors TiTok.encode returns; "continuous": the raw
    # encoder latent; "normalized": the latent l2-normalised over channels.
    c.tokens.source = "quantized"
    # The token shape. Training configs leave these unset (None): they come from the tokenizer
    # (`resolve_token_shape`); a value set here pins it, and the tokenizer must then agree.
    c.tokens.num_tokens = 32  # N (TiTok-L-32: 32)
    c.tokens.token_dim = 12  # C (TiTok-L-32: 12)
    c.tokens.input_size = 256  # side of the square image the tokenizer sees (its image_size)

    # Token-to-map interface.
    c.coarse_size = 32  # the linear map over tokens gives a coarse_size x coarse_size map
    c.refine_scale_init = 0.1  # initial value of the learnable scale of the coarse 3x3 refinement

    # Compute dtype of every apply ("float32" | "bfloat16" | "float16"); params stay float32,
    # LayerNorm statistics and softmax run in float32.
    c.dtype = "float32"
    # Rematerialise the backbone blocks (recompute their activations in the backward pass):
    # same parameters and results, much less activation memory in training, more compute.
    c.remat = False
    return c


def cddfuse_model_config(residual: str = "vis") -> ml_collections.ConfigDict:
    """The plain 2D CDDFuse network: exactly the official net.py with its default sizes.

    No tokens, no STE, no token-to-map interface; patch_embed on the image feeds one shared
    encoder (dim 64, 8 heads, 4 + 4 Restormer blocks, 3 INN nodes; 1 in the DetailFuse layer),
    1,188,272 parameters. ``residual`` is the image added inside the decoder's sigmoid at test
    time: "vis" for CDDFuse's infrared-visible scripts (test_IVF.py, train.py), "sum" for its
    IVF weights on medical pairs and "none" for its MIF weights (test_MIF.py).
    """
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual: expected one of {RESIDUAL_MODES}, got {residual!r}")
    c = model_config()
    c.use_tokens = False
    c.use_ste = False
    c.share_encoder = True
    c.residual = residual
    return c


# model.tokens key -> the TiTokConfig field that fixes it.
TOKEN_SHAPE_FIELDS = {
    "num_tokens": "num_tokens",
    "token_dim": "token_size",
    "input_size": "image_size",
}


def unset_token_shape(tokens: ml_collections.ConfigDict) -> None:
    """Leaves the token shape to the tokenizer: each key becomes an int placeholder (None)."""
    for key in TOKEN_SHAPE_FIELDS:
        tokens[key] = ml_collections.config_dict.placeholder(int)


def resolve_token_shape(
    tokens: ml_collections.ConfigDict, tokenizer_config: Any, where: str = "the tokenizer"
) -> dict[str, int]:
    """Fills the unset (None) token-shape keys of ``model.tokens`` from the tokenizer, in place.

    Keys the config pins must agree with the tokenizer: every disagreement is reported in one
    `ConfigError`. Returns the resolved {key: value}.
    """
    want = {key: int(getattr(tokenizer_config, field)) for key, field in TOKEN_SHAPE_FIELDS.items()}
    pinned = {k: tokens.get(k) for k in TOKEN_SHAPE_FIELDS if tokens.get(k) is not None}
    wrong = [f"{k}={v} (tokenizer: {want[k]})" for k, v in pinned.items() if int(v) != want[k]]
    if wrong:
        raise ConfigError(
            f"config.model.tokens does not match {where}: {', '.join(wrong)}; set the tokenizer's "
            "values, or leave these keys unset (as configs/ivif.py and configs/mif.py do) to take "
            "them from the tokenizer, and re-probe the STE positions (python -m "
            "tokfusion_jax.probe) for a new tokenizer"
        )
    for key, value in want.items():
        tokens[key] = value
    return want


def token_shape_or_default(tokens: Mapping[str, Any]) -> dict[str, int]:
    """The token shape of ``model.tokens`` with unset keys at the paper's TiTok-L-32 values."""
    default = model_config().tokens
    return {
        k: int(tokens.get(k) if tokens.get(k) is not None else default[k])
        for k in TOKEN_SHAPE_FIELDS
    }
