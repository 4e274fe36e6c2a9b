"""TokFusion: frozen-tokenizer tokens -> STE -> token-to-map -> CDDFuse-style backbone.

Public API (contract):
    model = TokFusion(cfg_model)
    params = model.init(rng, stage=1 | 2, image_size=(H, W))
    params2 = model.extend_to_stage2(params, rng)
    Z = model.tokens(tokenizer, image)                      # (B, N, C), stop_gradient
    rec, feats = model.reconstruct(params, Z, image, modality="vis" | "ir")
    fused, feats = model.fuse(params, Z_vis, Z_ir, vis, ir)
    fused = model.fuse_images(params, tokenizer, vis, ir)
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

Array = jax.Array
Params = dict[str, Any]


class TokFusion:
    """The trainable fusion model; holds no parameters itself (see module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict) -> None:
        self.cfg = cfg

    def init(self, rng: Array, stage: int = 1, image_size: tuple[int, int] = (256, 256)) -> Params:
        """Returns the trainable tree for `stage`."""
        raise NotImplementedError

    def extend_to_stage2(self, params: Params, rng: Array) -> Params:
        """Adds freshly initialised fuse layers to a stage-I tree."""
        raise NotImplementedError

    def tokens(self, tokenizer: Any, image: Array) -> Array:
        """Frozen tokens of gray images (B, H, W, 1) -> (B, N, C)."""
        raise NotImplementedError

    def reconstruct(
        self, params: Params, z: Array | None, image: Array, modality: str = "vis"
    ) -> tuple[Array, dict[str, Array]]:
        """Stage I: (rec (B, H, W, 1), {"base", "detail"})."""
        raise NotImplementedError

    def fuse(
        self, params: Params, z_vis: Array | None, z_ir: Array | None, vis: Array, ir: Array
    ) -> tuple[Array, dict[str, Array]]:
        """Stage II: (fused (B, H, W, 1), {"base_vis", "detail_vis", "base_ir", "detail_ir"})."""
        raise NotImplementedError

    def fuse_images(self, params: Params, tokenizer: Any, vis: Array, ir: Array) -> Array:
        """Fuses pairs of any size (B, H, W, 1) -> (B, H, W, 1)."""
        raise NotImplementedError
