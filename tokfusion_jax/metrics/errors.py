"""The metrics' input error."""

from __future__ import annotations

from tokfusion_jax.errors import TokFusionError


class MetricInputError(TokFusionError, ValueError):
    """Images, names or options given to the metrics are wrong (shape, size, type, name)."""
