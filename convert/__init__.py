"""PyTorch -> Flax weight conversion and the PyTorch TiTok reference."""
