"""Paired-image sources, colour handling, grain pipelines and the token cache."""
