"""Settings of the Selective Token Editing probe (paper §4.1, §5.4, appendix C).

The probe CLI carries these defaults built in; this file documents them and is the place to
start a custom setting from. Run on a trained workdir (its export is loaded, frozen)::

    python -m tokfusion_jax.probe --workdir=runs/ivif --slots=1,2,3,4 \
        --config.steps=300 --config.weights.ssim=2.0

Variants by argument: ``configs/probe.py`` (the default) and ``configs/probe.py:tiny`` (a
seconds-scale probe for tests and smoke runs). Every key is documented in
`tokfusion_jax.probe.default_config`.
"""

from __future__ import annotations

import ml_collections

from tokfusion_jax import probe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: None/"" (the default probe) or "tiny"."""
    c = probe.default_config()
    if arg in (None, ""):
        return c
    if arg == "tiny":
        c.steps = 40
        c.slots = (1, 2)
        c.channel_batches = 2
        return c
    raise ValueError(f"configs/probe.py: unknown variant {arg!r} (expected '' or 'tiny')")
