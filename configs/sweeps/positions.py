"""Token-position ablation (paper Table 3): no editing, position 12 only, 18 only, 12 + 18.

    python -m tokfusion_jax.sweep --sweep=configs/sweeps/positions.py --workdir=runs/sweep_pos \
        --sweep.vars.m3fd_root=data/M3FD \
        --set=tokenizer.path=weights/titok_l32 --set=data.root=data/MSRS/train

Positions are TiTok-L-32's (paper §5.3); for another tokenizer pass ``:A,B`` (e.g.
``positions.py:18,60`` for B-64).
"""

from __future__ import annotations

import ml_collections

from tokfusion_jax.sweep import dataset, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: "A,B", the two positions (default "12,18")."""
    try:
        a, b = (int(x) for x in (arg or "12,18").split(","))
    except ValueError:
        raise ValueError(f"expected two comma-separated positions, got {arg!r}") from None
    c = ml_collections.ConfigDict()
    c.name = "Ablation on token manipulation positions (paper Table 3)"
    c.base = "ivif.py"
    c.overrides = (("model.use_tokens", True), ("model.ste.channels", (6, 7, 8)))
    c.variants = (
        variant("base", "Base (w/o manipulation)", {"model.use_ste": False}),
        variant(f"pos{a}", f"Pos. {a} only", {"model.use_ste": True, "model.ste.positions": (a,)}),
        variant(f"pos{b}", f"Pos. {b} only", {"model.use_ste": True, "model.ste.positions": (b,)}),
        variant(
            f"pos{a}_{b}",
            f"Pos. {a} + Pos. {b}",
            {"model.use_ste": True, "model.ste.positions": (a, b)},
        ),
    )
    c.vars = ml_collections.ConfigDict()
    c.vars.m3fd_root = ""
    c.eval = (dataset("M3FD", "m3fd", "@vars.m3fd_root"),)

    c.columns = ("EI", "SF", "AG", "SSIM")
    return c
