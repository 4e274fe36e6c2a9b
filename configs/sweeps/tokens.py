"""Token-count ablation (paper Table 4): TiTok S-128, B-64 and L-32 tokenizers.

Convert the three official checkpoints (``python -m convert ...``), then::

    python -m tokfusion_jax.sweep --sweep=configs/sweeps/tokens.py --workdir=runs/sweep_tokens \
        --sweep.vars.s128=weights/titok_s128 --sweep.vars.b64=weights/titok_b64 \
        --sweep.vars.l32=weights/titok_l32 --sweep.vars.m3fd_root=data/M3FD \
        --set=data.root=data/MSRS/train

STE positions are the paper's (Table 4: sharp / blur positions 69 / 20, 18 / 60, 12 / 18; see
configs/ste/); re-probe each tokenizer for your own data.
"""

from __future__ import annotations

import ml_collections

from tokfusion_jax.sweep import dataset, variant

TOKENIZERS = (("s128", 128, (20, 69)), ("b64", 64, (18, 60)), ("l32", 32, (12, 18)))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg`` is unused."""
    del arg
    c = ml_collections.ConfigDict()
    c.name = "Ablation on the number of latent tokens (paper Table 4)"
    c.base = "ivif.py"
    c.overrides = (("model.use_tokens", True), ("model.use_ste", True))
    c.variants = tuple(
        variant(
            name,
            f"{n} tokens (positions {pos[0]}, {pos[1]})",
            {
                "tokenizer.path": f"@vars.{name}",
                "model.tokens.num_tokens": n,
                "model.tokens.token_dim": 12,
                "model.ste.positions": pos,
                "model.ste.channels": (6, 7, 8),
            },
        )
        for name, n, pos in TOKENIZERS
    )
    c.vars = ml_collections.ConfigDict()
    c.vars.s128 = ""  # converted TiTok-S-128 directory
    c.vars.b64 = ""  # converted TiTok-B-64 directory
    c.vars.l32 = ""  # converted TiTok-L-32 directory
    c.vars.m3fd_root = ""
    c.eval = (dataset("M3FD", "m3fd", "@vars.m3fd_root"),)

    c.columns = ("EI", "SF", "AG", "SSIM")
    return c
