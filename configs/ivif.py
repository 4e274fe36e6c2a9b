"""Infrared-visible fusion: train on MSRS, validate on RoadScene (the paper's IVIF setting).

Run (from the repository root)::

    python -m tokfusion_jax.train --config=configs/ivif.py --workdir=runs/ivif \
        --config.tokenizer.path=weights/titok_l32 \
        --config.data.root=data/MSRS/train --config.data.val_root=data/roadscene_val

Variants by argument:

* ``configs/ivif.py:demo`` -- the sample pairs shipped in the package and the small trained
  tokenizer packaged with it (64x64 input, 32 tokens x 12 dims, with the STE mask its probe
  found); both stages in a few minutes on a CPU (``make demo``).
* ``configs/ivif.py:tiny`` -- the real setting shrunk to a seconds-scale model (smoke tests).
* ``configs/ivif.py:cddfuse`` -- CDDFuse's own recipe (`common.apply_cddfuse_recipe`): the
  plain 2D network trained on 128 x 128 grid patches of MSRS exactly as its train.py does, the
  baseline row of the ablation table. It needs no tokenizer::

      python -m tokfusion_jax.train --config=configs/ivif.py:cddfuse --workdir=runs/cddfuse \
          --config.data.root=data/msrs/train --config.data.val_root=data/roadscene/val
* ``configs/ivif.py:quick`` -- the ``tiny`` model with the packaged trained tokenizer (the
  notebooks' quick mode).
"""

from __future__ import annotations

import pathlib

import ml_collections

from tokfusion_jax import configlib


def _common():
    """configs/common.py next to this file (config files are loaded by path)."""
    return configlib.load_module(pathlib.Path(__file__).with_name("common.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: None/"" (the paper's run), "demo", "tiny", "quick" or "cddfuse"."""
    common = _common()
    c = common.base_config()
    c.data.dataset = "msrs"
    c.data.root = common.UNSET  # the MSRS train folder (ir/ and vi/ or vis/)
    c.val.dataset = "roadscene"
    c.data.val_root = common.UNSET  # the RoadScene validation folder; UNSET = no validation
    c.model.residual = "sum"  # I_ref = I_vis + I_ir (paper Eq. 12)

    if arg in (None, ""):
        return c
    if arg in ("tiny", "quick"):
        common.shrink_to_tiny(c)
        if arg == "quick":
            common.use_packaged_tokenizer(c)
        return c
    if arg == "cddfuse":
        common.apply_cddfuse_recipe(c)
        return c
    if arg == "demo":
        common.shrink_to_tiny(c, image_size=64)
        common.use_packaged_tokenizer(c)
        c.data.dataset = "samples"  # the pairs in tokfusion_jax/assets/samples
        c.data.root = common.UNSET  # UNSET = the packaged infrared-visible samples
        c.val.dataset = "samples"  # validation and the final report fuse the same pairs
        c.val.every_steps = -1
        c.model.dim = 16
        c.model.heads = 2
        c.data.batch_size = 4
        c.val.batch_size = 4
        c.optim.lr = 1e-3  # a short run needs a larger step than the paper's 1e-4
        # 200 steps over the 4 sample pairs: 80 reconstruction + 120 fusion steps.
        c.train.steps_per_epoch = 20
        c.train.stage1_epochs = 4
        c.train.stage2_epochs = 6
        c.optim.decay_every_epochs = 4
        c.train.log_every_steps = 10
        c.train.image_every_steps = 100
        c.train.checkpoint_every_steps = 100
        c.train.async_checkpoints = True
        c.train.demo_report = True  # fuse the samples and print the metrics table at the end
        return c
    raise ValueError(
        f"configs/ivif.py: unknown variant {arg!r} (expected '', 'demo', 'tiny', 'quick' or "
        "'cddfuse')"
    )
