"""Default data section of a training config (`config.data`)."""

from __future__ import annotations

import ml_collections

from tokfusion_jax.data.io import MIN_IMAGE_SIZE


def data_config() -> ml_collections.ConfigDict:
    """The data settings every training config starts from; see each key's comment."""
    c = ml_collections.ConfigDict()
    # Preset naming the folder layout (tokfusion_jax.data.sources.PRESETS): msrs, roadscene,
    # tno, m3fd, harvard_ct, harvard_pet, harvard_spect, bundle, manifest (a TSV file as root)
    # or samples (the pairs packaged with tokfusion_jax; root "" = the infrared-visible ones).
    c.dataset = "bundle"
    c.root = ""  # the folder holding both modality folders (or the manifest file)
    # Optional split roots with the same layout; "" = use `root` for training / no validation.
    c.train_root = ""
    c.val_root = ""
    c.image_size = 256  # every image is resized (bicubic, antialiased) to this square; 0 = native
    c.batch_size = 8  # global batch over all devices and processes
    c.shuffle = True
    c.seed = 0  # shuffling (and random crops / flips, when enabled)
    c.worker_count = 0  # grain worker processes; 0 = decode in the main process (threads)
    c.keep_color = False  # also emit vis_cbcr / ir_cbcr (chroma for restoring colour)
    c.token_cache = ""  # folder built by `python -m tokfusion_jax.data.cache`; "" = no cache
    c.allow_unpaired = False  # skip (with a warning) files present in only one modality folder
    c.min_size = MIN_IMAGE_SIZE  # smallest accepted image side in pixels (16)
    # Augmentation, off by default (the paper uses none): random crop side (0 = off) and
    # random horizontal flip, applied identically to both images of a pair.
    c.crop_size = 0
    c.flip = False
    return c
