"""Medical image fusion on Harvard (MRI in the "vis" slot, CT/PET/SPECT in the "ir" slot).

Run (from the repository root)::

    python -m tokfusion_jax.train --config=configs/mif.py --workdir=runs/mif \
        --config.tokenizer.path=weights/titok_l32 --config.data.root=data/harvard_mri_ct

Variants by argument: ``configs/mif.py:ct`` (default), ``:pet``, ``:spect`` pick the Harvard
subset (train and test on the same subset, as the paper does); ``:tiny`` shrinks the model.
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
    """``arg``: "ct" (default), "pet", "spect" or "tiny"."""
    common = _common()
    c = common.base_config()
    subset = "ct" if arg in (None, "", "tiny") else arg
    if subset not in _SUBSETS:
        raise ValueError(
            f"configs/mif.py: unknown variant {arg!r} (expected 'ct', 'pet', 'spect' or 'tiny')"
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
    return c
