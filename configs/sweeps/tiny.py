"""A 2-variant seconds-scale sweep (STE on / off) on the packaged samples: tests and smoke runs.

python -m tokfusion_jax.sweep --sweep=configs/sweeps/tiny.py --workdir=/tmp/sweep_tiny
"""

from __future__ import annotations

import ml_collections

from tokfusion_jax.sweep import dataset, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: "" (STE on / off) or "seeds" (two training seeds)."""
    c = ml_collections.ConfigDict()
    c.name = "tiny sweep (packaged samples, random tiny tokenizer)"
    c.base = "ivif.py:demo"
    c.overrides = (
        ("model.dim", 8),
        ("model.enc_blocks", 0),  # no transformer blocks: the sweep machinery is under test,
        ("model.dec_blocks", 0),  # and every graph compiles in a fraction of the time
        ("data.image_size", 32),
        ("tokenizer.path", ""),  # the demo's packaged tokenizer is replaced by a random tiny one
        ("tokenizer.random_tiny", True),
        ("tokenizer.random_tiny_image_size", 32),
        ("model.tokens.input_size", 32),
        ("model.coarse_size", 4),
        ("data.batch_size", 4),
        ("val.batch_size", 4),
        ("train.steps_per_epoch", 1),
        ("train.stage1_epochs", 1),
        ("train.stage2_epochs", 1),
        ("train.log_every_steps", 1),
        ("train.checkpoint_every_steps", 1),
        ("train.image_every_steps", 1000),
        ("train.async_checkpoints", False),
        ("train.demo_report", False),
        ("val.dataset", ""),
    )
    if arg in (None, ""):
        c.variants = (
            variant("ste", "with STE", {"model.use_ste": True}),
            variant("no_ste", "w/o STE", {"model.use_ste": False}),
        )
    elif arg == "seeds":  # two variants with one compiled graph (fast with a compilation cache)
        c.variants = (
            variant("seed0", "seed 0", {"train.seed": 0}),
            variant("seed1", "seed 1", {"train.seed": 1}),
        )
    else:
        raise ValueError(f"unknown variant {arg!r} (expected '' or 'seeds')")
    c.eval = (dataset("samples", "samples", "", max_pairs=1),)

    c.columns = ("EN", "SD", "SCD", "SSIM", "EI", "SF", "AG")
    c.vars = ml_collections.ConfigDict()
    return c
