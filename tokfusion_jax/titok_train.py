"""Train a TiTok tokenizer end to end on pixels, or fine-tune a converted one, in JAX.

    python -m tokfusion_jax.titok_train --config=configs/titok.py --workdir=runs/titok \
        --config.data.train=msrs=DATA/msrs/train,roadscene=DATA/roadscene/val \
        --config.data.val=tno=DATA/tno/test

    # fine-tune a converted TiTok-L-32's decoder on the fusion data
    python -m tokfusion_jax.titok_train --config=configs/titok.py:finetune --workdir=runs/l32_ft \
        --config.init_from=weights/titok_l32 --config.data.train=...

The model sees what the fusion model hands it: the BT.601 luma resized to its image size
(bicubic, antialiased, clipped) and replicated to RGB. The loss is a weighted sum of L1, L2 and
SSIM reconstruction terms on the 0..1 image plus, in VQ mode, the quantizer's commitment and
codebook terms (on the l2-normalised vectors when the codebook is) or, in VAE mode, the KL term
(`tokfusion_jax.codebook`). VQ runs track each code's usage and re-seed dead codes with encoder
vectors of the batch. AdamW with warm-up and cosine decay, an EMA of the weights, and the
machinery of the fusion trainer (`tokfusion_jax.loop`: exact resume with the data iterator,
SIGTERM save, NaN stop, metrics.jsonl, TensorBoard with reconstruction grids, progress bar).

Output: ``<workdir>/tokenizer``, a directory `titok.load` reads (so ``train``, ``fuse``,
``probe``, the token cache and ``evaluate tokenizer`` use it unchanged), whose tokenizer.json
records the training config. ``--config.init_from`` (fine-tuning) starts from a converted
tokenizer; ``train.trainable`` says which of its top-level modules train ("all", "decoder" or
a comma list), the others stay frozen: no gradient, no optimiser state, not checkpointed (the
checkpoints record the init tokenizer's sha256 instead).

The train state is ``{"params", "opt_state", "ema", "usage", "step", "nonfinite_step"}``:
``params`` holds the trainable modules only, ``ema`` their moving average (empty without EMA),
``usage`` the codebook usage EMA (K,) (empty in VAE mode).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tokfusion_jax import checkpointing, codebook, loop, losses, optim
from tokfusion_jax import sharding as shd
from tokfusion_jax.data import pipeline
from tokfusion_jax.errors import CheckpointError, ConfigError, DataError
from tokfusion_jax.models import titok

PyTree = Any
State = dict[str, Any]
UNSET = ""

# Named groups of TiTok's top-level modules for `train.trainable`.
TRAINABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "decoder": ("decoder", "pixel_quantize", "pixel_decoder"),
    "encoder": ("latent_tokens", "encoder", "quantize"),
}
DOMAINS = ("infrared", "visible", "medical", "image")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def model_config(arch: titok.TiTokConfig | None = None) -> ml_collections.ConfigDict:
    """The ``config.model`` section: every `titok.TiTokConfig` field, plus the compute dtype."""
    arch = arch or titok.TiTokConfig()
    c = ml_collections.ConfigDict(arch.to_dict())
    c.pixel_channel_mult = tuple(c.pixel_channel_mult)
    c.dtype = "float32"  # compute dtype of matmuls/convs ("bfloat16" on TPU/GPU); params float32
    return c


def default_config() -> ml_collections.ConfigDict:
    """Every setting of the tokenizer trainer, documented where it is set."""
    c = ml_collections.ConfigDict()
    # Architecture (ignored with init_from: the converted tokenizer's own is used).
    c.model = model_config()
    # A tokenizer directory (python -m convert titok, or a titok_train output) to fine-tune;
    # UNSET = train from scratch (the official initialisation, titok.create(scheme="titok")).
    c.init_from = UNSET

    c.data = ml_collections.ConfigDict()
    # Training images, comma-separated PRESET=ROOT specs (tokfusion_jax.data.sources
    # .image_sources): a paired preset gives both images of every pair (msrs=DIR,
    # roadscene=DIR, harvard_pet=DIR, bundle=DIR, manifest=FILE, samples=), folder=DIR every
    # image of one folder, tfds=NAME/SPLIT a prepared TFDS split (ImageNet on a pod).
    c.data.train = UNSET
    c.data.val = UNSET  # held-out images for validation, same syntax; UNSET = no validation
    c.data.tfds_data_dir = ""  # TFDS data_dir of tfds= specs ("" = TFDS's default)
    c.data.batch_size = 32  # global batch over all devices and processes
    c.data.shuffle = True
    c.data.seed = 0  # shuffling and flips
    c.data.flip = True  # random horizontal flips
    c.data.worker_count = 0  # grain worker processes; 0 = decode in the main process
    c.data.min_size = 16  # smallest accepted image side
    c.data.allow_unpaired = False  # paired presets: skip files present in one folder only
    # Decode and resize every training image once and keep it in memory (small datasets:
    # 16 KiB per 64x64 image); same batches, no per-step decoding.
    c.data.in_memory = False

    c.loss = ml_collections.ConfigDict()
    # Reconstruction terms on the 0..1 image: mean absolute and squared error of the RGB
    # reconstruction against the gray input replicated to RGB, and the SSIM loss
    # (1 - SSIM) / 2 of its gray version (the RGB mean, as evaluated) against the input.
    c.loss.l1 = 0.0
    c.loss.l2 = 1.0
    c.loss.ssim = 0.0
    c.loss.quantizer = 1.0  # VQ: weight of commitment + codebook terms
    c.loss.commitment_cost = 0.25  # VQ: beta of the commitment term
    c.loss.kl = 1e-6  # VAE: weight of the KL term

    # VQ codebook maintenance.
    c.codebook = ml_collections.ConfigDict()
    c.codebook.usage_decay = 0.99  # EMA decay of each code's share of the assignments
    # A code is dead when its usage EMA is below dead_threshold / K (K = codebook size).
    c.codebook.dead_threshold = 0.03
    c.codebook.restart_every = 200  # check for dead codes every N steps (0 = never restart)
    c.codebook.restart_after = 200  # no restarts before this step (the usage EMA settles)
    # VQ warm-up: the first N steps decode the normalised encoder vectors (no quantisation);
    # at step N every code is seeded with an encoder vector of that batch. From scratch this
    # keeps the codebook from collapsing onto a few image-independent codes (0 = off).
    c.codebook.warmup_steps = 0

    c.optim = optim.adamw_config()
    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.999  # EMA of the weights (0 = off)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100_000
    c.train.seed = 0  # init and the per-step rng (fold_in(step))
    # Which top-level modules train: "all", "decoder" (decoder + pixel decoder and its
    # codebook), "encoder" (latent tokens, encoder, codebook) or a comma list of modules.
    c.train.trainable = "all"
    c.train.log_every_steps = 50
    c.train.image_every_steps = 1000  # TensorBoard grid of inputs / reconstructions (0 = off)
    c.train.checkpoint_every_steps = 1000
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.debug_nan_step = -1  # testing aid: NaN batches from this step on

    c.val = ml_collections.ConfigDict()
    c.val.every_steps = 1000  # 0 = only at the end
    c.val.batch_size = 32
    c.val.max_images = 256  # at most this many held-out images per pass (0 = all)

    c.export = ml_collections.ConfigDict()
    c.export.weights = "ema"  # "ema" or "raw" weights in <workdir>/tokenizer
    c.export.dtype = "float32"  # storage dtype: float32, float16 or bfloat16 (loads as float32)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1  # > 1 splits the frozen modules' parameters (fine-tuning big tokenizers)
    return c


def architecture(config: ml_collections.ConfigDict) -> titok.TiTokConfig:
    """The `TiTokConfig` of ``config.model`` (ConfigError naming the key on a bad value)."""
    fields = {f.name for f in dataclasses.fields(titok.TiTokConfig)}
    values = {k: v for k, v in config.model.to_dict().items() if k in fields}
    try:
        return titok.TiTokConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"config.model: {str(e).removeprefix('TiTokConfig.')}") from None


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Refuses out-of-range values before anything runs (ConfigError naming the key)."""

    def need(cond: bool, key: str, value: Any, expected: str) -> None:
        if not cond:
            raise ConfigError(f"config.{key}={value!r}: expected {expected}")

    o, t, d, w, cb = config.optim, config.train, config.data, config.loss, config.codebook
    need(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "a positive learning rate")
    need(0 <= o.end_lr <= o.lr, "optim.end_lr", o.end_lr, f"in [0, optim.lr={o.lr}]")
    need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    need(0 <= o.b1 < 1, "optim.b1", o.b1, "in [0, 1)")
    need(0 <= o.b2 < 1, "optim.b2", o.b2, "in [0, 1)")
    need(o.eps > 0, "optim.eps", o.eps, "> 0")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    need(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, ">= 0 (0 = no clipping)")
    need(t.steps >= 1, "train.steps", t.steps, ">= 1")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        need(t[key] >= 1, f"train.{key}", t[key], ">= 1")
    need(t.image_every_steps >= 0, "train.image_every_steps", t.image_every_steps, ">= 0")
    need(d.batch_size >= 1, "data.batch_size", d.batch_size, ">= 1")
    need(config.val.batch_size >= 1, "val.batch_size", config.val.batch_size, ">= 1")
    need(config.val.every_steps >= 0, "val.every_steps", config.val.every_steps, ">= 0")
    need(config.val.max_images >= 0, "val.max_images", config.val.max_images, ">= 0")
    for key in ("l1", "l2", "ssim", "quantizer", "commitment_cost", "kl"):
        need(w[key] >= 0, f"loss.{key}", w[key], ">= 0")
    need(w.l1 + w.l2 + w.ssim > 0, "loss.l2", w.l2, "> 0 when loss.l1 and loss.ssim are 0")
    need(0 <= cb.usage_decay < 1, "codebook.usage_decay", cb.usage_decay, "in [0, 1)")
    need(0 <= cb.dead_threshold < 1, "codebook.dead_threshold", cb.dead_threshold, "in [0, 1)")
    need(cb.restart_every >= 0, "codebook.restart_every", cb.restart_every, ">= 0")
    need(cb.restart_after >= 0, "codebook.restart_after", cb.restart_after, ">= 0")
    need(cb.warmup_steps >= 0, "codebook.warmup_steps", cb.warmup_steps, ">= 0")
    need(0 <= config.ema.decay < 1, "ema.decay", config.ema.decay, "in [0, 1) (0 = off)")
    e = config.export
    need(e.weights in ("ema", "raw"), "export.weights", e.weights, "'ema' or 'raw'")
    need(e.dtype in titok.STORAGE_DTYPES, "export.dtype", e.dtype, f"one of {titok.STORAGE_DTYPES}")
    need(
        config.model.dtype in ("float32", "bfloat16", "float16"),
        "model.dtype",
        config.model.dtype,
        "float32, bfloat16 or float16",
    )
    if not d.train:
        raise ConfigError(
            "config.data.train is not set: give the training images as PRESET=ROOT specs, e.g. "
            "--config.data.train=msrs=data/msrs/train,roadscene=data/roadscene/val"
        )
    if config.init_from:
        path = pathlib.Path(config.init_from).expanduser()
        if not path.is_dir():
            raise ConfigError(f"config.init_from={config.init_from}: no such directory")
    else:
        architecture(config)


def trainable_modules(spec: str, params: Mapping[str, Any]) -> tuple[str, ...]:
    """The top-level modules ``train.trainable`` names, among those ``params`` has."""
    spec = str(spec).strip()
    if spec == "all":
        return tuple(params)
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        group = TRAINABLE_GROUPS.get(item, (item,))
        if item not in TRAINABLE_GROUPS and item not in params:
            raise ConfigError(
                f"config.train.trainable={spec!r}: {item!r} is neither a group "
                f"({', '.join(['all', *TRAINABLE_GROUPS])}) nor a module of this tokenizer "
                f"({', '.join(params)})"
            )
        names += [n for n in group if n in params and n not in names]
    if not names:
        raise ConfigError(f"config.train.trainable={spec!r}: selects no module of this tokenizer")
    return tuple(n for n in params if n in names)


def split_params(params: Mapping[str, Any], names: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen): the top-level modules in ``names``, and the others."""
    trainable = {k: v for k, v in params.items() if k in names}
    frozen = {k: v for k, v in params.items() if k not in names}
    return trainable, frozen


# ----------------------------------------------------------------------------------------------
# The pure train step
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Everything static a train step closes over (hashable by identity for jit)."""

    arch: titok.TiTokConfig
    optimizer: optax.GradientTransformation
    schedule: Any
    loss_weights: Mapping[str, float]
    codebook: Mapping[str, float]
    ema_decay: float
    train_codebook: bool  # the quantizer's codebook is trainable (restarts allowed)
    dtype: str = "float32"

    @property
    def model(self) -> titok.TiTok:
        return titok.TiTok(self.arch, jnp.dtype(self.dtype))

    @property
    def is_vq(self) -> bool:
        return self.arch.quantize_mode == "vq"


def forward(
    ctx: StepContext,
    params: PyTree,
    images: jax.Array,
    rng: jax.Array | None,
    continuous: jax.Array | bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstruction (B, S, S, 3) of gray images (B, S, S, 1) and the bottleneck's terms.

    ``rng`` draws the VAE posterior sample (None: its mean). ``continuous`` (VQ, a traced bool
    is fine): decode the (normalised) encoder vectors instead of their codes, the VQ warm-up.
    Aux: VQ -- "commitment", "codebook", "indices" (B, N), "latents" (B*N, C) the raw encoder
    vectors; VAE -- "kl".
    """
    model, variables = ctx.model, {"params": params}
    rgb = jnp.repeat(images.astype(jnp.float32), 3, axis=-1)  # (B, S, S, 3)
    z = model.apply(variables, rgb, method=titok.TiTok.latents)  # (B, N, C_out)
    aux: dict[str, jax.Array] = {}
    if ctx.is_vq:
        indices, tokens = model.apply(variables, z, method=lambda m, x: m.quantize(x))
        z_q = model.apply(variables, indices, method=lambda m, i: m.quantize.lookup(i))
        zn = titok.l2_normalize(z) if ctx.arch.use_l2_norm else z
        tokens = jnp.where(continuous, zn, tokens)
        aux.update(codebook.vq_terms(zn, z_q, float(ctx.loss_weights["commitment_cost"])))
        aux["indices"] = indices
        aux["latents"] = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]))
    else:
        c = ctx.arch.token_size
        mean, logvar = z[..., :c], jnp.clip(z[..., c:], -30.0, 20.0)
        tokens = mean
        if rng is not None:
            tokens = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        aux["kl"] = codebook.kl_term(mean, logvar)
    rec = model.apply(variables, tokens, method=titok.TiTok.decode)  # (B, S, S, 3) float32
    return rec, aux


def compute_loss(
    ctx: StepContext,
    trainable: PyTree,
    frozen: PyTree,
    images: jax.Array,
    rng: jax.Array,
    continuous: jax.Array | bool = False,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, jax.Array]]]:
    """(loss, (terms, aux)) of a batch of gray images (B, S, S, 1).

    ``continuous``: the VQ warm-up (no quantisation, no quantizer terms).
    """
    w = ctx.loss_weights
    rec, aux = forward(ctx, {**frozen, **trainable}, images, rng, continuous)  # (B, S, S, 3)
    images = images.astype(jnp.float32)  # (B, S, S, 1)
    target = jnp.repeat(images, 3, axis=-1)
    terms: dict[str, jax.Array] = {}
    loss = jnp.float32(0.0)
    for name, weight, fn in (
        ("l1", w["l1"], lambda: losses.l1(target, rec)),
        ("l2", w["l2"], lambda: losses.mse(target, rec)),
        # SSIM of the gray reconstruction (the RGB mean), the image the evaluation scores.
        ("ssim", w["ssim"], lambda: losses.ssim_loss(images, rec.mean(-1, keepdims=True))),
    ):
        if weight > 0:
            terms[name] = fn()
            loss = loss + weight * terms[name]
    if ctx.is_vq:
        terms["commitment"], terms["codebook"] = aux["commitment"], aux["codebook"]
        quantizer = w["quantizer"] * (aux["commitment"] + aux["codebook"])
        loss = loss + jnp.where(continuous, 0.0, quantizer)
    else:
        terms["kl"] = aux["kl"]
        loss = loss + w["kl"] * aux["kl"]
    return loss, (terms, aux)


def train_step(
    state: State,
    frozen: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    ctx: StepContext,
) -> tuple[State, dict[str, jax.Array]]:
    """One optimisation step; pure, jit-able, state donated by the caller.

    ``rng`` is the run's base key; this step's key is ``fold_in(rng, step)`` (VAE sampling and
    the order in which dead codes take the batch's encoder vectors).
    """
    step = state["step"]
    sample_key, restart_key = jax.random.split(jax.random.fold_in(rng, step))
    warmup = int(ctx.codebook["warmup_steps"]) if ctx.is_vq else 0
    in_warmup = step < warmup

    def loss_fn(params):
        images = batch["image"]
        loss, (terms, aux) = compute_loss(ctx, params, frozen, images, sample_key, in_warmup)
        return loss, (terms, aux)

    (loss, (terms, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = ctx.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **terms}
    metrics["grad_norm"] = optax.global_norm(grads).astype(jnp.float32)
    metrics["lr"] = ctx.schedule(step)

    usage, restarted = state["usage"], None
    if ctx.is_vq:
        cb = ctx.codebook
        counts = codebook.code_counts(aux["indices"], ctx.arch.codebook_size)
        usage = codebook.update_usage(usage, counts, float(cb["usage_decay"]))
        stats = codebook.usage_stats(counts, usage, float(cb["dead_threshold"]))
        metrics.update({f"codebook/{k}": v for k, v in stats.items()})
        every = int(cb["restart_every"])
        if ctx.train_codebook and (every > 0 or warmup > 0):
            due = jnp.asarray(False)
            if every > 0:
                due = ((step + 1) % every == 0) & (step + 1 >= int(cb["restart_after"]))
            restarted = codebook.dead_codes(usage, float(cb["dead_threshold"])) & due & ~in_warmup
            # The end of the VQ warm-up seeds every code with this batch's encoder vectors.
            restarted = restarted | ((step + 1 == warmup) & jnp.ones_like(restarted))
            embedding, usage = codebook.restart_dead_codes(
                params["quantize"]["embedding"], usage, aux["latents"], restarted, restart_key
            )
            params = {**params, "quantize": {**params["quantize"], "embedding": embedding}}
            metrics["codebook/restarted"] = jnp.sum(restarted.astype(jnp.float32))

    ema = state["ema"]
    if ctx.ema_decay > 0:
        ema = optim.ema_update(ema, params, optim.ema_decay(step, ctx.ema_decay))
        if restarted is not None:  # restarted codes enter the average as they are
            rows = jnp.where(
                restarted[:, None], params["quantize"]["embedding"], ema["quantize"]["embedding"]
            )
            ema = {**ema, "quantize": {**ema["quantize"], "embedding": rows}}

    updated = {"params": params, "opt_state": opt_state, "ema": ema, "usage": usage}
    new_state = loop.guarded_state(state, updated, loss, grads)
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def new_state(
    params: PyTree, optimizer: optax.GradientTransformation, arch: titok.TiTokConfig, ema: bool
) -> State:
    """A fresh train state for the trainable ``params``."""
    k = arch.codebook_size
    vq = arch.quantize_mode == "vq"
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "ema": jax.tree_util.tree_map(jnp.array, params) if ema else {},
        "usage": jnp.full((k,), 1.0 / k, jnp.float32) if vq else {},
        "step": jnp.asarray(0, jnp.int32),
        "nonfinite_step": jnp.asarray(-1, jnp.int32),
    }


def compile_train_step(ctx: StepContext, mesh: jax.sharding.Mesh, frozen_shardings: Any):
    """``train_step`` jitted over the mesh (`loop.jit_train_step`)."""
    return loop.jit_train_step(functools.partial(train_step, ctx=ctx), mesh, frozen_shardings)


@functools.partial(jax.jit, static_argnames=("arch",))
def reconstruct(params: PyTree, images: jax.Array, *, arch: titok.TiTokConfig) -> jax.Array:
    """Gray reconstructions (B, S, S) in [0, 1] of gray images (B, S, S, 1), as evaluated.

    The exported tokenizer's path: `titok.encode` (VAE: the posterior mean) and `titok.decode`,
    clipped to [0, 1] and averaged over RGB.
    """
    tok = titok.Tokenizer(model=titok.TiTok(arch), params=params, config=arch)
    rgb = jnp.repeat(images.astype(jnp.float32), 3, axis=-1)
    rec = titok.decode(tok, titok.encode(tok, rgb).quantized)
    return jnp.clip(rec, 0.0, 1.0).mean(axis=-1)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def open_images(config: ml_collections.ConfigDict, specs: str) -> Any:
    """The images of comma-separated PRESET=ROOT specs (`sources.image_sources`)."""
    from tokfusion_jax.data import sources

    return sources.image_sources(
        specs,
        allow_unpaired=bool(config.data.allow_unpaired),
        tfds_data_dir=str(config.data.tfds_data_dir),
    )


def train_iterator(config: ml_collections.ConfigDict, source: Any, image_size: int):
    """This process's training batches (an endless, checkpointable iterator)."""
    d = config.data
    ds = pipeline.make_image_pipeline(
        source,
        batch_size=int(d.batch_size) // jax.process_count(),
        image_size=(image_size, image_size),
        seed=int(d.seed),
        shuffle=bool(d.shuffle),
        num_epochs=None,
        drop_remainder=True,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=int(d.worker_count),
        flip=bool(d.flip),
        min_size=int(d.min_size),
    )
    return iter(ds)


def val_batches(config: ml_collections.ConfigDict, source: Any, image_size: int) -> list[dict]:
    """The held-out images (every process reads all of them) as host batches, in order."""
    ds = pipeline.make_image_pipeline(
        source,
        batch_size=int(config.val.batch_size),
        image_size=(image_size, image_size),
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        process_index=0,
        process_count=1,
        min_size=int(config.data.min_size),
    )
    out, count, limit = [], 0, int(config.val.max_images) or None
    for batch in ds:
        batch = {k: np.asarray(v) for k, v in batch.items()}
        if limit is not None:
            batch = {k: v[: limit - count] for k, v in batch.items()}
        count += len(batch["image"])
        out.append(batch)
        if limit is not None and count >= limit:
            break
    return out


def validate(params: PyTree, arch: titok.TiTokConfig, batches: list[dict], rep: Any) -> dict:
    """MSE, PSNR (0..255 scale) and SSIM of the held-out images, per domain and overall.

    Scored like ``python -m tokfusion_jax.evaluate tokenizer`` (paper Table 11).
    """
    from tokfusion_jax.evaluate import reconstruction_scores

    scores: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    size = int(batches[0]["image"].shape[0])
    for b in batches:
        n = len(b["image"])
        images = np.concatenate([b["image"], np.repeat(b["image"][-1:], size - n, axis=0)])
        rec = reconstruct(params, jax.device_put(images, rep), arch=arch)
        rec = np.asarray(jax.device_get(rec))  # (B, S, S)
        for i in range(n):
            s = reconstruction_scores(b["image"][i, ..., 0], rec[i])
            scores[str(b["domain"][i])].append(s)
            scores["all"].append(s)
    return {
        f"{metric}/{domain}": float(np.mean([s[metric] for s in rows]))
        for domain, rows in scores.items()
        for metric in ("MSE", "PSNR", "SSIM")
    }


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What `train` returns."""

    state: State
    step: int
    interrupted: bool
    workdir: pathlib.Path
    tokenizer_dir: pathlib.Path | None = None
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    last_validation: dict[str, float] = dataclasses.field(default_factory=dict)


def initial_tokenizer(config: ml_collections.ConfigDict, sharding: Any) -> titok.Tokenizer:
    """The converted tokenizer of ``init_from``, or random weights for ``config.model``."""
    if config.init_from:
        return titok.load(pathlib.Path(config.init_from).expanduser(), sharding=sharding)
    tok = titok.create(architecture(config), seed=int(config.train.seed), scheme="titok")
    return dataclasses.replace(tok, params=jax.device_put(tok.params, sharding))


def _check_resume_compatible(meta: Mapping[str, Any], init_sha: str, workdir) -> None:
    recorded = meta.get("init", {}).get("sha256", "")
    if recorded != init_sha:
        raise CheckpointError(
            f"{workdir}/checkpoints was started from a tokenizer with sha256 "
            f"{(recorded or 'none')[:12]}..., but config.init_from gives "
            f"{(init_sha or 'none')[:12]}...; use a fresh --workdir"
        )


def train(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, devices: list | None = None
) -> TrainResult:
    """Runs (or resumes) tokenizer training; writes ``<workdir>/tokenizer`` at the end.

    ``devices``: restrict the mesh to these devices (tests); default all global devices.
    """
    config, workdir, mesh = loop.start_run(config, workdir, validate_config, devices)
    rep = shd.replicated(mesh)

    init = initial_tokenizer(config, rep)
    arch = init.config
    init_sha = init.sha256 if config.init_from else ""
    names = trainable_modules(config.train.trainable, init.params)
    trainable, frozen = split_params(init.params, names)
    frozen_shardings = shd.fsdp_sharding(mesh, frozen)
    frozen = jax.device_put(frozen, frozen_shardings)
    image_size = int(arch.image_size)

    source = open_images(config, config.data.train)
    if config.data.in_memory:
        min_size, verbose = int(config.data.min_size), jax.process_index() == 0
        source = pipeline.decode_images(source, image_size, min_size=min_size, progress=verbose)
    if len(source) < int(config.data.batch_size):
        raise DataError(
            f"config.data.train: {len(source)} images is fewer than one batch of "
            f"config.data.batch_size={config.data.batch_size}"
        )
    total_steps = int(config.train.steps)
    optimizer, schedule = optim.adamw(config.optim, total_steps)
    use_ema = float(config.ema.decay) > 0
    ctx = StepContext(
        arch=arch,
        optimizer=optimizer,
        schedule=schedule,
        loss_weights=config.loss.to_dict(),
        codebook=config.codebook.to_dict(),
        ema_decay=float(config.ema.decay),
        train_codebook="quantize" in names,
        dtype=str(config.model.dtype),
    )
    base_key = jax.random.key(int(config.train.seed))

    ckpt = checkpointing.Checkpointer(
        workdir / "checkpoints",
        keep=int(config.train.keep_checkpoints),
        use_async=bool(config.train.async_checkpoints),
    )
    it = train_iterator(config, source, image_size)

    def abstract_state(meta: Mapping[str, Any]) -> State:
        del meta
        shapes = jax.eval_shape(lambda: new_state(trainable, optimizer, arch, use_ema))
        return jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes
        )

    resumed = loop.restore_latest(
        ckpt,
        abstract_state,
        it,
        check_meta=lambda meta: _check_resume_compatible(meta, init_sha, workdir),
    )
    if resumed is not None:
        state, meta = resumed
        loop.log0(f"resuming from {ckpt.step_path(int(meta['step']))} (step {meta['step']})")
    else:
        build = jax.jit(
            functools.partial(new_state, optimizer=optimizer, arch=arch, ema=use_ema),
            out_shardings=rep,
        )
        state = build(trainable)
        loop.log0(
            f"training {', '.join(names)} ({titok.param_count(trainable):,} parameters"
            + (f"; frozen: {', '.join(frozen)}" if frozen else "")
            + f") on {len(source)} images"
        )
    step = int(jax.device_get(state["step"]))

    val_source = open_images(config, config.data.val) if config.data.val else None
    val_data = val_batches(config, val_source, image_size) if val_source is not None else []
    step_fn = compile_train_step(ctx, mesh, frozen_shardings)

    def export_params() -> PyTree:
        chosen = state["ema"] if use_ema and config.export.weights == "ema" else state["params"]
        return {**frozen, **chosen}

    logger = loop.RunLogger(workdir, total_steps, step)
    pending: list[dict[str, jax.Array]] = []
    last_metrics: dict[str, float] = {}
    last_val: dict[str, float] = {}
    log_every = int(config.train.log_every_steps)
    ckpt_every = int(config.train.checkpoint_every_steps)
    val_every = int(config.val.every_steps)
    image_every = int(config.train.image_every_steps)
    throughput = loop.Throughput(step)
    watch = loop.NonFiniteWatch(log_every)
    nan_from_step = int(config.train.debug_nan_step)  # testing aid (loop.poison_batch)
    interrupted = False

    def save(at_step: int) -> None:
        watch.check(state["nonfinite_step"], at_step, ckpt)
        meta = loop.run_meta(
            config,
            at_step,
            init={"path": str(config.init_from), "sha256": init_sha},
            trainable=list(names),
        )
        ckpt.save(at_step, state, meta, it.get_state())

    def run_validation(at_step: int) -> None:
        nonlocal last_val
        if not val_data:
            return
        last_val = validate(export_params(), arch, val_data, rep)
        logger.scalars(at_step, {f"val/{k}": v for k, v in last_val.items()})

    def images(at_step: int) -> None:
        if not val_data or not logger.active:
            return
        b = val_data[0]["image"][:8]
        rec = reconstruct(export_params(), jax.device_put(b, rep), arch=arch)
        logger.images(
            at_step, "val/input_reconstruction", [b, np.asarray(jax.device_get(rec))[..., None]]
        )

    def log_train(at_step: int) -> None:
        nonlocal last_metrics
        watch.check(state["nonfinite_step"], at_step, ckpt)
        scalars = loop.host_scalars(pending)
        pending.clear()
        last_metrics = scalars
        rate = throughput.rate(at_step)
        record = {"steps_per_sec": rate} | {f"train/{k}": v for k, v in scalars.items()}
        logger.scalars(at_step, record)
        shown = {k: f"{v:.4g}" for k, v in scalars.items() if k in ("loss", "l1", "l2")}
        if "codebook/perplexity" in scalars:
            shown["ppl"] = f"{scalars['codebook/perplexity']:.1f}"
        logger.progress(at_step, shown)

    try:
        with loop.StopRequest() as stop:
            while step < total_steps:
                batch = loop.poison_batch(next(it), step, nan_from_step)
                watch.record(step, batch)
                state, metrics = step_fn(state, frozen, shd.global_batch(batch, mesh), base_key)
                pending.append(metrics)
                step += 1
                if step % log_every == 0 or step == total_steps:
                    log_train(step)
                if image_every and step % image_every == 0:
                    images(step)
                if val_every and step % val_every == 0 and step < total_steps:
                    run_validation(step)
                if step % ckpt_every == 0:
                    save(step)
                if stop.requested:
                    save(step)
                    ckpt.wait()
                    interrupted = True
                    loop.log0(loop.stopped_message(stop.signal, step, ckpt.step_path(step)))
                    break
            if not interrupted:
                if pending:
                    log_train(step)
                save(step)
                run_validation(step)
        ckpt.wait()
    finally:
        logger.close()
        with contextlib.suppress(Exception):
            ckpt.close()

    tokenizer_dir = None
    if not interrupted:
        tokenizer_dir = export_tokenizer(
            workdir / "tokenizer", arch, export_params(), config, step, names, init_sha, last_val
        )
        loop.log0(f"tokenizer written to {tokenizer_dir}")
    return TrainResult(
        state=state,
        step=step,
        interrupted=interrupted,
        workdir=workdir,
        tokenizer_dir=tokenizer_dir,
        last_metrics=last_metrics,
        last_validation=last_val,
    )


def export_tokenizer(
    path: pathlib.Path,
    arch: titok.TiTokConfig,
    params: PyTree,
    config: ml_collections.ConfigDict,
    step: int,
    trainable: Sequence[str],
    init_sha: str,
    validation: Mapping[str, float],
) -> pathlib.Path:
    """Writes the trained tokenizer (process 0) with its training record in tokenizer.json."""
    import json

    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    tok = titok.from_params(arch, host)
    record = {
        "source": "trained with tokfusion_jax.titok_train",
        "training": {
            "step": step,
            "trainable": list(trainable),
            "init_from": {"path": str(config.init_from), "sha256": init_sha} if init_sha else None,
            "weights": str(config.export.weights) if float(config.ema.decay) > 0 else "raw",
            "validation": dict(validation),
            "config": json.loads(config.to_json_best_effort()),
        },
    }
    if jax.process_index() == 0:
        titok.save(tok, path, metadata=record, storage_dtype=str(config.export.dtype))
    shd.host_barrier("tokenizer-exported")
    return path


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: ``python -m tokfusion_jax.titok_train --config=... --workdir=...``.

    Flags are defined here, not at import, so that the library stays importable beside the
    fusion trainer's CLI.
    """
    from absl import flags, logging
    from ml_collections import config_flags

    from tokfusion_jax import paths
    from tokfusion_jax.errors import run_absl

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Tokenizer training config, e.g. configs/titok.py.", lock_config=True
    )
    workdir_flag = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, tokenizer).")

    def run(args: Sequence[str]) -> None:
        if len(args) > 1:
            raise ConfigError(f"unexpected positional arguments: {' '.join(args[1:])}")
        if config_flag.value is None:
            raise ConfigError("--config is required, e.g. --config=configs/titok.py")
        if not workdir_flag.value:
            raise ConfigError("--workdir is required, e.g. --workdir=runs/titok")
        paths.check_output_folder(workdir_flag.value, "--workdir")
        if not flags.FLAGS["verbosity"].present:  # keep library INFO logs (orbax) quiet
            logging.set_verbosity(logging.WARNING)
        train(config_flag.value, workdir_flag.value)

    run_absl(run, list(sys.argv if argv is None else argv))


if __name__ == "__main__":
    main()
