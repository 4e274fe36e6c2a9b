"""The full model against its no-STE and no-token (plain 2D, CDDFuse-style) ablations, scored on
the three infrared-visible test sets of paper Table 1.

    python -m tokfusion_jax.sweep --sweep=configs/sweeps/baselines.py --workdir=runs/sweep_base \
        --sweep.vars.m3fd_root=data/M3FD --sweep.vars.roadscene_root=data/roadscene_test \
        --sweep.vars.tno_root=data/TNO \
        --set=tokenizer.path=weights/titok_l32 --set=data.root=data/MSRS/train
"""

from __future__ import annotations

import ml_collections

from tokfusion_jax.sweep import dataset, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg`` is unused."""
    del arg
    c = ml_collections.ConfigDict()
    c.name = "STE and token ablations (paper Table 1 columns)"
    c.base = "ivif.py"
    c.overrides = ()
    c.variants = (
        variant("full", "Ours (tokens + STE)", {"model.use_tokens": True, "model.use_ste": True}),
        variant("no_ste", "w/o STE", {"model.use_tokens": True, "model.use_ste": False}),
        variant("no_tokens", "w/o tokens (plain 2D)", {"model.use_tokens": False}),
    )
    c.vars = ml_collections.ConfigDict()
    c.vars.m3fd_root = ""
    c.vars.roadscene_root = ""
    c.vars.tno_root = ""
    c.eval = (
        dataset("M3FD", "m3fd", "@vars.m3fd_root"),
        dataset("RoadScene", "roadscene", "@vars.roadscene_root"),
        dataset("TNO", "tno", "@vars.tno_root"),
    )

    c.columns = ("EN", "SD", "SCD", "SSIM", "EI", "SF", "AG")
    return c
