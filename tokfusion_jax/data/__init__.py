"""Paired-image sources, colour handling, grain pipelines and the token cache.

    from tokfusion_jax.data import sources, pipeline, color, cache

`sources` (paired folders, presets, manifests), `io` (image decoding), `transforms` (decode,
luma, resize, crop/flip, batching), `pipeline` (grain pipelines), `cache` (token cache and its
CLI), `config` (the default `config.data`), `inspect` (dataset summary CLI) and
`tfds_builders` (optional TFDS builders). `color` is `tokfusion_jax.color`, re-exported.
"""

from tokfusion_jax import color

__all__ = ["color"]
