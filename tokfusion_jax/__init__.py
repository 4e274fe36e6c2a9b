"""tokfusion_jax: multimodal image fusion with a frozen 1D tokenizer, in JAX/Flax."""

__version__ = "0.1.0"
