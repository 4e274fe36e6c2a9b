"""Medical image fusion on Harvard (MRI in the "vis" slot, CT/PET/SPECT in the "ir" slot).

Run (from the repository root)::

    python -m tokfusion_jax.train --config=configs/mif.py --workdir=runs/mif \
        --config.tokenizer.path=weights/titok_l32 --config.data.root=data/harvard_mri_ct

Variants by argument: ``configs/mif.py:ct`` (default), ``:pet``, ``:spect`` pick the Harvard
subset (train and test on the same subset, as the paper does); ``:tiny`` shrinks the model;
``:cddfuse`` (or ``:cddfuse_pet``, ``:cddfuse_spect``) is CDDFuse's train.py recipe on that
subset (`common.apply_cddfuse_recipe`, residual = the MRI image), the baseline row.

CDDFuse publishes no medical training script: its test_MIF.py runs CDDFuse_MIF.pth with no
decoder residual and CDDFuse_IVF.pth with MRI + CT/PET/SPECT (``python -m convert cddfuse --task
mif [--residual sum]`` reproduces either). Its 128-pixel grid with stride 200 cuts one patch (the
top-left corner) from each 256 x 256 scan; ``--config.data.patch_stride=128`` covers a scan with
four.
"""

from __future__ import annotations

import pathlib

import ml_collections

from tokfusion_jax import configlib

_SUBSETS = {"ct": "harvard_ct", "pet": "harvard_pet", "spect": "harvard_spect"}


def _common():
    """configs/common.py next to this file (config files are loaded by path)."""
    return configlib.load_module(pathlib.Path(__file__).with_name("common.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: "ct" (default), "pet", "spect", "tiny", or "cddfuse[_pet|_spect]"."""
    common = _common()
    c = common.base_config()
    cddfuse = bool(arg) and arg.startswith("cddfuse")
    if cddfuse:
        arg = arg.removeprefix("cddfuse").removeprefix("_") or "ct"
    subset = "ct" if arg in (None, "", "tiny") else arg
    if subset not in _SUBSETS:
        raise ValueError(
            f"configs/mif.py: unknown variant {arg!r} (expected 'ct', 'pet', 'spect', 'tiny' or "
            "'cddfuse[_pet|_spect]')"
        )
    c.data.dataset = _SUBSETS[subset]
    c.data.root = common.UNSET  # e.g. data/harvard_mri_ct
    c.val.dataset = _SUBSETS[subset]
    # Validate on the training folder by default (the paper trains and tests on Harvard).
    c.data.val_root = c.data.get_ref("root")
    # The medical recipe adds both sources as the decoder's residual (CDDFuse's MIF test path).
    c.model.residual = "sum"
    if arg == "tiny":
        common.shrink_to_tiny(c)
    if cddfuse:
        common.apply_cddfuse_recipe(c)
    return c
