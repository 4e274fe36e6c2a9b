"""Tokenizer training: a small TiTok trained from scratch on the fusion data, or a fine-tune.

Run (from the repository root; DATA = the image bundle)::

    python -m tokfusion_jax.titok_train --config=configs/titok.py --workdir=runs/titok_fusion64 \
        --config.data.train=msrs=DATA/msrs/train_from_official_test,msrs=DATA/msrs/train,\
roadscene=DATA/roadscene/val,harvard_pet=DATA/harvard_mri_pet/test,\
harvard_spect=DATA/harvard_mri_spect/test \
        --config.data.val=msrs=DATA/msrs/test,tno=DATA/tno/test,roadscene=DATA/roadscene/test,\
harvard_ct=DATA/harvard_mri_ct/test

Variants by argument:

* ``configs/titok.py`` -- the packaged tokenizer's recipe (``tokfusion_jax/assets/titok_fusion64``):
  64x64 input, 8x8 patches, 32 tokens x 12 dims, l2-normalised VQ codebook of 1024 codes, a
  width-64 ViT with 4 encoder and 4 decoder blocks (0.45 M parameters).
* ``configs/titok.py:vae`` -- the same model with a VAE bottleneck (continuous tokens).
* ``configs/titok.py:finetune`` -- fine-tune a converted tokenizer on a target domain
  (``--config.init_from=weights/titok_l32``): the decoder (with the pixel decoder) only, at a
  small learning rate; ``--config.train.trainable=all`` trains everything.
* ``configs/titok.py:tiny`` -- a seconds-scale model on 32x32 images (tests, smoke runs).
"""

from __future__ import annotations

import ml_collections

from tokfusion_jax import titok_train
from tokfusion_jax.models import titok

# The packaged tokenizer's architecture.
FUSION64 = titok.TiTokConfig(
    image_size=64,
    patch_size=8,
    enc_width=64,
    enc_depth=4,
    enc_heads=4,
    dec_width=64,
    dec_depth=4,
    dec_heads=4,
    num_tokens=32,
    token_size=12,
    codebook_size=1024,
    use_l2_norm=True,
    quantize_mode="vq",
    is_legacy=False,
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: None/"" (the packaged tokenizer's recipe), "vae", "finetune" or "tiny"."""
    c = titok_train.default_config()
    c.model = titok_train.model_config(FUSION64)
    c.data.batch_size = 32
    c.data.in_memory = True  # about 900 images: decode them once
    c.loss.l1 = 1.0
    c.loss.l2 = 1.0
    c.loss.ssim = 0.2
    c.optim.lr = 1e-3
    c.optim.end_lr = 1e-5
    c.optim.warmup_steps = 300
    c.optim.weight_decay = 1e-4
    c.codebook.warmup_steps = 500  # decode continuous vectors first, then seed the codebook
    c.train.steps = 6_000
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 250
    c.val.every_steps = 1000
    c.val.max_images = 0  # every held-out image
    c.export.dtype = "float16"  # half-size storage; loads as float32

    if arg in (None, ""):
        return c
    if arg == "vae":
        c.model = titok_train.model_config(
            titok.TiTokConfig(**{**FUSION64.to_dict(), "quantize_mode": "vae"})
        )
        return c
    if arg == "finetune":
        c.init_from = ""  # required: the converted tokenizer, e.g. weights/titok_l32
        c.train.trainable = "decoder"
        c.optim.lr = 1e-5
        c.optim.end_lr = 1e-6
        c.optim.warmup_steps = 200
        c.train.steps = 5_000
        c.codebook.warmup_steps = 0  # the converted codebook is kept
        c.loss.ssim = 0.0
        c.export.dtype = "float32"
        return c
    if arg == "tiny":
        c.model = titok_train.model_config(
            titok.TiTokConfig(
                image_size=32,
                patch_size=8,
                enc_width=32,
                enc_depth=1,
                enc_heads=2,
                dec_width=32,
                dec_depth=1,
                dec_heads=2,
                num_tokens=8,
                token_size=12,
                codebook_size=64,
                is_legacy=False,
            )
        )
        c.data.batch_size = 8
        c.val.batch_size = 8
        c.optim.warmup_steps = 2
        c.train.steps = 8
        c.train.log_every_steps = 2
        c.train.image_every_steps = 4
        c.train.checkpoint_every_steps = 4
        c.train.async_checkpoints = False
        c.val.every_steps = 4
        c.codebook.restart_every = 4
        c.codebook.restart_after = 4
        c.codebook.warmup_steps = 0
        c.export.dtype = "float32"
        return c
    raise ValueError(
        f"configs/titok.py: unknown variant {arg!r} (expected '', 'vae', 'finetune' or 'tiny')"
    )
