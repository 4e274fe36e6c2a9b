"""PyTorch -> Flax weight conversion (TiTok, CDDFuse) and PyTorch twins of the originals."""
