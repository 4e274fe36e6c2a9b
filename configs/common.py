"""Settings shared by every training config (the paper's setting, section 5.1 and appendix B).

Not a config file by itself: `configs/ivif.py` and `configs/mif.py` build on `base_config()`.
Every key is documented where it is set; command-line overrides look like
``--config.optim.lr=3e-4``. Unknown keys and values of the wrong type are refused when the flags
are parsed; out-of-range values are refused by `tokfusion_jax.trainer.validate_config` before
anything runs.
"""

from __future__ import annotations

import pathlib

import ml_collections

from tokfusion_jax.data.config import data_config
from tokfusion_jax.losses import loss_weights_config
from tokfusion_jax.models.config import cddfuse_model_config, model_config, unset_token_shape
from tokfusion_jax.optim import optim_config

# Placeholder meaning "not set": the run refuses to start until it is given.
UNSET = ""


def base_config() -> ml_collections.ConfigDict:
    """The paper's two-stage recipe; dataset and tokenizer paths are left to the task config."""
    c = ml_collections.ConfigDict()

    # Frozen tokenizer: a converted TiTok checkpoint directory (python -m convert ...). The paper
    # uses TiTok-L-32 (32 tokens x 12 dims). Required unless `random_tiny` is set.
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = UNSET
    # True: create a tiny tokenizer with RANDOM weights (titok.create) and save it in
    # <workdir>/tokenizer. Only for demos and tests: its tokens carry no pretrained meaning.
    c.tokenizer.random_tiny = False
    c.tokenizer.random_tiny_image_size = 64  # image side of that random tokenizer

    c.model = model_config()
    # The token shape (model.tokens.num_tokens / token_dim / input_size) comes from the tokenizer;
    # a value set in a config or on the command line pins it (a mismatch stops the run).
    unset_token_shape(c.model.tokens)
    # Mixed precision: bfloat16 compute, float32 parameters, losses and metrics.
    c.model.dtype = "bfloat16"

    c.data = data_config()
    c.data.image_size = 256  # every image is resized to 256x256 (appendix B.3)
    c.data.batch_size = 8  # global batch over all devices and processes

    # Validation pass on config.data.val_root (fusion metrics, plus losses); no validation when
    # that root is empty.
    c.val = ml_collections.ConfigDict()
    # Preset of the validation folder config.data.val_root (tokfusion_jax.data.sources).
    c.val.dataset = UNSET
    c.val.batch_size = 8
    c.val.max_pairs = 50  # at most this many pairs per validation pass (0 = all)
    c.val.every_steps = 0  # 0 = at the end of every epoch; -1 = only at the end of training

    c.loss = loss_weights_config()

    # Adam per top-level module (CDDFuse builds one optimiser per module), each with its own
    # gradient clipping and StepLR schedule; the fusion layers' schedule starts at stage II.
    # Keys: lr, b1, b2, eps, weight_decay, clip_norm, decay_every_epochs, decay_factor, min_lr.
    c.optim = optim_config()

    c.train = ml_collections.ConfigDict()
    c.train.stage1_epochs = 40  # reconstruction warm-up
    c.train.stage2_epochs = 80  # fusion training
    # Steps per epoch; 0 = one pass over the training set (len(dataset) // batch_size).
    c.train.steps_per_epoch = 0
    c.train.seed = 0  # parameter init and the per-step rng (fold_in(step))
    # Samples per device that go through the network together in a train step (the losses see
    # the whole batch; results equal up to float rounding). 0 = auto: on CPU as many as keep the
    # widest activation in the last-level cache (1-2 at 128x128: the step at batch 4 runs ~1.6x
    # faster; each chunk adds to the compile time), the whole per-device batch on GPU/TPU.
    c.train.chunk_size = 0
    c.train.log_every_steps = 50  # metrics fetched from the device, metrics.jsonl, progress bar
    c.train.image_every_steps = 1000  # TensorBoard grid of vis / ir / fused validation images
    c.train.checkpoint_every_steps = 1000
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.export = True  # write the inference export at the end
    # Fuse the validation pairs at the end and print a metrics table against average / max
    # fusion (the demo's report).
    c.train.demo_report = False
    # Testing aid: make the loss NaN from this step on (-1 = never).
    c.train.debug_nan_step = -1
    # Start a new run from other weights: a run's workdir, checkpoints/ or export/, or an export
    # of CDDFuse's published weights (python -m convert cddfuse). Whatever has a counterpart in
    # this model is taken (bit for bit), the rest stays freshly initialised; the run logs which.
    c.train.init_from = UNSET

    # Device mesh: data x fsdp must equal the device count; -1 = all remaining devices. fsdp > 1
    # splits the frozen tokenizer's parameters (only used when tokens are not cached).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1

    # Older name of train.init_from, still accepted (set one of the two).
    c.init_from = UNSET
    return c


def apply_cddfuse_recipe(c: ml_collections.ConfigDict) -> None:
    """CDDFuse's own training recipe, in place: the baseline row (0 slots) of the ablations.

    From its train.py and dataprocessing.py: the plain 2D network (no tokens, no STE; 1,188,272
    parameters) with the visible image as the decoder's residual; 128 x 128 patches of the
    native-size pairs on a stride-200 grid, minus low-contrast ones, batch 8, shuffled, no
    augmentation; 40 reconstruction + 80 fusion epochs; one Adam (lr 1e-4) per module, each
    clipped to norm 0.01, StepLR 20 epochs / 0.5 (the fuse layers' from stage II); its loss
    weights, without the paper's lambda_r term; float32 (it trains without mixed precision).
    """
    c.model = cddfuse_model_config("vis")
    c.model.dtype = "float32"
    c.data.patch_size = 128
    c.data.patch_stride = 200
    c.data.patch_min_contrast = 0.1
    c.data.batch_size = 8
    c.data.shuffle = True
    c.data.crop_size = 0
    c.data.flip = False
    c.train.stage1_epochs = 40
    c.train.stage2_epochs = 80
    c.optim = optim_config()
    c.loss = loss_weights_config()
    c.loss.rec = 0.0  # CDDFuse computes the fused SSIM + MSE terms but never adds them


def use_packaged_tokenizer(c: ml_collections.ConfigDict) -> None:
    """Points a config at the tokenizer packaged with tokfusion_jax (in place).

    It is a small TiTok trained on the fusion data (64x64 input, 32 tokens x 12 dims;
    tokfusion_jax/assets/titok_fusion64/README.md), with the STE mask its probe found
    (configs/ste/titok_fusion64.json).
    """
    from tokfusion_jax import probe
    from tokfusion_jax.models import titok

    c.tokenizer.path = str(titok.PACKAGED_TOKENIZER)
    c.tokenizer.random_tiny = False
    c.model.tokens.num_tokens = 32
    c.model.tokens.token_dim = 12
    c.model.tokens.input_size = 64
    snippet = pathlib.Path(__file__).with_name("ste") / "titok_fusion64.json"
    c.model.ste = probe.load_ste_snippet(snippet, num_tokens=32, token_dim=12)


def shrink_to_tiny(c: ml_collections.ConfigDict, image_size: int = 32) -> None:
    """Shrinks a config in place to a seconds-scale model (tests, smoke runs), float32 on CPU."""
    c.tokenizer.random_tiny = True
    c.tokenizer.random_tiny_image_size = image_size
    c.model.dim = 8
    c.model.heads = 2
    c.model.enc_blocks = 1
    c.model.dec_blocks = 1
    c.model.detail_layers = 1
    c.model.fuse_detail_layers = 1
    c.model.coarse_size = max(image_size // 8, 4)
    # The random tiny tokenizer is built from this shape: 32 tokens x 12 dims at image_size.
    c.model.tokens.num_tokens = 32
    c.model.tokens.token_dim = 12
    c.model.tokens.input_size = image_size
    c.model.dtype = "float32"
    c.data.image_size = image_size
    c.data.batch_size = 8
    c.val.batch_size = 8
    c.val.max_pairs = 8
    c.train.stage1_epochs = 2
    c.train.stage2_epochs = 2
    c.train.steps_per_epoch = 2
    c.train.log_every_steps = 2
    c.train.image_every_steps = 4
    c.train.checkpoint_every_steps = 4
    c.train.async_checkpoints = False
