"""FLOP counts: the hand count of the TiTok encoder and XLA's count of a lowered program."""

from __future__ import annotations

import dataclasses
from typing import Any

from tokfusion_jax.bench.timing import _cost_entry

# 2 FLOPs per multiply-add; matmuls and convs only in the hand counts.


def titok_encoder_flops(
    width: int, depth: int, num_tokens: int, image_size: int, patch_size: int, token_size: int
) -> float:
    """FLOPs of one TiTok encoder forward pass on one image (matmuls only, 2 per MAC).

    Sequence L = 1 + (image_size / patch_size)^2 + num_tokens. Per block: qkv (3 W^2), out
    projection (W^2) and MLP (2 * 4 W^2) per position, plus scores and values (2 L^2 W).
    Patch embedding: P * (3 p^2) * W; the output 1x1 projection: N * W * C.
    TiTok-L-32 at 256x256 gives 183.2 GFLOPs.
    """
    patches = (image_size // patch_size) ** 2
    seq = 1 + patches + num_tokens
    linear = depth * seq * 12 * width * width
    attention = depth * 2 * seq * seq * width
    patch_embed = patches * 3 * patch_size * patch_size * width
    projection = num_tokens * width * token_size
    return 2.0 * (linear + attention + patch_embed + projection)


def titok_config_encoder_flops(config: Any) -> float:
    """`titok_encoder_flops` for a `TiTokConfig` (its encoder output width is token_size, or
    2 * token_size for the VAE variants)."""
    out = config.token_size * (2 if getattr(config, "quantize_mode", "vq") == "vae" else 1)
    return titok_encoder_flops(
        config.enc_width,
        config.enc_depth,
        config.num_tokens,
        config.image_size,
        config.patch_size,
        out,
    )


def unrolled(tok: Any) -> Any:
    """The same tokenizer with its transformer loops fully unrolled.

    XLA's cost analysis counts a while loop's body once, so FLOPs are read from a lowering of the
    unrolled model (same parameters, same arithmetic); what is timed keeps the configured unroll.
    """
    from tokfusion_jax.models import titok

    depth = max(tok.config.enc_depth, tok.config.dec_depth)
    config = dataclasses.replace(tok.config, scan_unroll=depth)
    return dataclasses.replace(tok, config=config, model=titok.TiTok(config))


def lowered_flops(jitted: Any, *args: Any) -> float | None:
    """FLOPs per call from the cost analysis of the lowered (not yet optimised) program."""
    try:
        cost = _cost_entry(jitted.lower(*args).cost_analysis())
    except Exception:  # noqa: BLE001 - cost analysis is best effort on some backends
        return None
    return float(cost["flops"]) if "flops" in cost else None
