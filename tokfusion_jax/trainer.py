"""Two-stage training: state, the pure sharded train step, and the loop.

Usable from notebooks: ``trainer.train_and_evaluate(config, workdir)``. The CLI
(``python -m tokfusion_jax.train``) only parses flags and calls it.

Stage I trains the token interface, encoder and decoder to reconstruct each modality; at
``stage1_epochs`` the fusion layers are added (with fresh optimiser states whose schedules start
there) and stage II trains everything on the fusion loss. The frozen tokenizer is a separate
pytree (``frozen``): no gradient, no optimiser state, never donated, never checkpointed.

The train state is a dict ``{"params", "opt_state", "step", "nonfinite_step"}``.
``nonfinite_step`` is -1 while every loss and gradient has been finite; the first step that is not
records itself there and from then on the step leaves parameters and optimiser state untouched.
The host reads it only when it fetches metrics (every ``log_every_steps``) and before every
checkpoint, so the loop never waits on the device otherwise. That guard, the run logger, the stop
signals and resuming with the data iterator are shared with the tokenizer trainer
(`tokfusion_jax.loop`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokfusion_jax import checkpointing, chunking, compile_options, loop, losses, optim
from tokfusion_jax import sharding as shd
from tokfusion_jax.errors import CheckpointError, ConfigError, DataError
from tokfusion_jax.models import config as model_config
from tokfusion_jax.models import titok
from tokfusion_jax.models.fusion import TokFusion

PyTree = Any
State = dict[str, Any]
SAMPLES = "samples"  # dataset preset of the pairs packaged with tokfusion_jax (root "" = IVIF)


# ----------------------------------------------------------------------------------------------
# Configuration checks
# ----------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Refuses out-of-range values before anything runs (ConfigError naming the key)."""

    def need(cond: bool, key: str, value: Any, expected: str) -> None:
        if not cond:
            raise ConfigError(f"config.{key}={value!r}: expected {expected}")

    o, t, d = config.optim, config.train, config.data
    need(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "a positive learning rate")
    need(o.min_lr >= 0, "optim.min_lr", o.min_lr, ">= 0")
    need(0 < o.decay_factor <= 1, "optim.decay_factor", o.decay_factor, "in (0, 1]")
    need(o.decay_every_epochs >= 1, "optim.decay_every_epochs", o.decay_every_epochs, ">= 1")
    need(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, ">= 0 (0 = no clipping)")
    need(0 <= o.b1 < 1, "optim.b1", o.b1, "in [0, 1)")
    need(0 <= o.b2 < 1, "optim.b2", o.b2, "in [0, 1)")
    need(o.eps > 0, "optim.eps", o.eps, "> 0")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    need(t.stage1_epochs >= 0, "train.stage1_epochs", t.stage1_epochs, ">= 0")
    need(t.stage2_epochs >= 0, "train.stage2_epochs", t.stage2_epochs, ">= 0")
    need(
        t.stage1_epochs + t.stage2_epochs > 0,
        "train.stage2_epochs",
        t.stage2_epochs,
        "> 0 when stage1_epochs is 0",
    )
    need(t.steps_per_epoch >= 0, "train.steps_per_epoch", t.steps_per_epoch, ">= 0")
    need(t.get("chunk_size", 0) >= 0, "train.chunk_size", t.get("chunk_size"), ">= 0 (0 = auto)")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        need(t[key] >= 1, f"train.{key}", t[key], ">= 1")
    need(d.batch_size >= 1, "data.batch_size", d.batch_size, ">= 1")
    need(d.image_size >= 8, "data.image_size", d.image_size, ">= 8")
    patch = int(d.get("patch_size", 0))
    need(patch == 0 or patch >= 8, "data.patch_size", patch, "0 (off) or >= 8")
    if patch:
        need(d.patch_stride >= 1, "data.patch_stride", d.patch_stride, ">= 1")
        need(
            0 <= d.patch_min_contrast < 1,
            "data.patch_min_contrast",
            d.patch_min_contrast,
            "in [0, 1) (0 = no filter)",
        )
    need(config.val.batch_size >= 1, "val.batch_size", config.val.batch_size, ">= 1")
    tok = config.tokenizer
    if config.model.use_tokens and not tok.path and not tok.random_tiny:
        raise ConfigError(
            "config.tokenizer.path is not set: convert a TiTok checkpoint (python -m convert "
            "titok ...) and pass --config.tokenizer.path=DIR (or set tokenizer.random_tiny=True "
            "for a random-weight demo tokenizer)"
        )
    if tok.path and not pathlib.Path(tok.path).expanduser().is_dir():
        raise ConfigError(f"config.tokenizer.path={tok.path}: no such directory")
    train_root = d.train_root or d.root
    if not train_root and d.dataset != SAMPLES:
        raise ConfigError(
            f"config.data.root is not set: point it at the {d.dataset or 'training'} folder "
            "(--config.data.root=DIR)"
        )
    for key, value in (
        ("data.train_root" if d.train_root else "data.root", train_root),
        ("data.val_root", d.val_root),
    ):
        if value and not pathlib.Path(value).expanduser().exists():
            raise ConfigError(f"config.{key}={value}: no such file or directory")
    if d.token_cache and not pathlib.Path(d.token_cache).expanduser().is_dir():
        raise ConfigError(f"config.data.token_cache={d.token_cache}: no such directory")
    if d.get("patch_size", 0) and d.token_cache:
        raise ConfigError(
            "config.data.patch_size cannot be combined with data.token_cache: cached tokens "
            "describe whole images"
        )
    init_from = init_from_path(config)
    if init_from and not pathlib.Path(init_from).expanduser().exists():
        raise ConfigError(f"config.train.init_from={init_from}: no such file or directory")


def init_from_path(config: ml_collections.ConfigDict) -> str:
    """``config.train.init_from``, or the older top-level ``config.init_from`` (same meaning)."""
    new, old = str(config.train.get("init_from", "") or ""), str(config.get("init_from", "") or "")
    if new and old and new != old:
        raise ConfigError(
            f"config.train.init_from={new} and config.init_from={old} disagree; set only "
            "train.init_from"
        )
    return new or old


# ----------------------------------------------------------------------------------------------
# The pure train step
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Everything static a train step closes over (hashable by identity for jit)."""

    model: TokFusion
    optimizer: optim.ModuleOptimizer
    loss_weights: Mapping[str, float]
    stage: int
    use_token_cache: bool
    use_tokens: bool
    # The network runs `chunk_size` samples per device at a time (`chunking`); 0 = the whole
    # per-device batch. `batch_shards`: how many devices the batch is split over.
    chunk_size: int = 0
    batch_shards: int = 1


def _tokens(ctx: StepContext, frozen: Any, batch: Mapping[str, jax.Array]):
    """(z_vis, z_ir): cached tokens, the frozen tokenizer's output, or None (no-token ablation)."""
    if not ctx.use_tokens:
        return None, None
    if ctx.use_token_cache:
        return batch["vis_tokens"], batch["ir_tokens"]
    return ctx.model.tokens(frozen, batch["vis"]), ctx.model.tokens(frozen, batch["ir"])


def network_outputs(ctx: StepContext, params: PyTree, z_vis, z_ir, vis, ir):
    """The model's part of one stage, sample by sample independent.

    Stage I: ((rec_vis, feats_vis), (rec_ir, feats_ir)); stage II: (fused, feats).
    """
    if ctx.stage == 1:
        return (
            ctx.model.reconstruct(params, z_vis, vis, modality="vis"),
            ctx.model.reconstruct(params, z_ir, ir, modality="ir"),
        )
    return ctx.model.fuse(params, z_vis, z_ir, vis, ir)


def compute_loss(
    ctx: StepContext,
    params: PyTree,
    frozen: Any,
    batch: Mapping[str, jax.Array],
    chunked: bool = True,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array]]:
    """Loss of one stage; returns (loss, (terms, output image (B, H, W, 1))).

    With `chunked` and ``ctx.chunk_size`` > 0 the network runs in chunks (`chunking`); the
    losses always see the whole batch (L_decomp's correlations average over it).
    """
    vis, ir = batch["vis"], batch["ir"]  # (B, H, W, 1) float32 in [0, 1]
    z_vis, z_ir = _tokens(ctx, frozen, batch)
    network = functools.partial(network_outputs, ctx, params)
    inputs = (z_vis, z_ir, vis, ir)
    if chunked and ctx.chunk_size:
        outputs = chunking.map_in_chunks(network, inputs, ctx.batch_shards, ctx.chunk_size)
    else:
        outputs = network(*inputs)
    if ctx.stage == 1:
        (rec_vis, feats_vis), (rec_ir, feats_ir) = outputs
        loss, terms = losses.stage1_loss(
            vis, ir, rec_vis, rec_ir, feats_vis, feats_ir, ctx.loss_weights
        )
        output = rec_vis
    else:
        fused, feats = outputs
        loss, terms = losses.stage2_loss(vis, ir, fused, feats, ctx.loss_weights)
        output = fused
    return loss.astype(jnp.float32), (terms, output.astype(jnp.float32))


def train_step(
    state: State, frozen: Any, batch: Mapping[str, jax.Array], rng: jax.Array, *, ctx: StepContext
) -> tuple[State, dict[str, jax.Array]]:
    """One optimisation step of ``ctx.stage``; pure, jit-able, state donated by the caller.

    ``rng`` is the run's base key; this step's key is ``fold_in(rng, step)`` (the model is
    deterministic today, the key is threaded for stochastic extensions).
    """
    step = state["step"]
    _ = jax.random.fold_in(rng, step)

    def loss_fn(params):
        loss, (terms, _) = compute_loss(ctx, params, frozen, batch)
        return loss, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, new_opt = ctx.optimizer.update(grads, state["opt_state"], state["params"])
    new_params = jax.tree_util.tree_map(
        lambda p, u: p + u.astype(p.dtype), state["params"], updates
    )

    new_state = loop.guarded_state(state, {"params": new_params, "opt_state": new_opt}, loss, grads)
    metrics = {"loss": loss, **{k: v.astype(jnp.float32) for k, v in terms.items()}}
    for name, norm in optim.global_norms(grads).items():
        metrics[f"grad_norm/{name}"] = norm
    for name, lr in ctx.optimizer.learning_rates(state["opt_state"]).items():
        metrics[f"lr/{name}"] = lr
    return new_state, metrics


def eval_outputs(
    params: PyTree, frozen: Any, batch: Mapping[str, jax.Array], *, ctx: StepContext
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Loss terms and the output images of a batch (no gradient): (terms, (B, H, W, 1)).
    The whole batch at once: without a backward pass there is little to stream."""
    loss, (terms, output) = compute_loss(ctx, params, frozen, batch, chunked=False)
    return {"loss": loss, **terms}, output


def compile_train_step(ctx: StepContext, mesh: jax.sharding.Mesh, frozen_shardings: Any):
    """``train_step`` jitted over the mesh (`loop.jit_train_step`)."""
    return loop.jit_train_step(functools.partial(train_step, ctx=ctx), mesh, frozen_shardings)


# ----------------------------------------------------------------------------------------------
# State construction
# ----------------------------------------------------------------------------------------------


def stage_params(model: TokFusion, rng: jax.Array, stage: int, image_size: tuple[int, int]):
    """Fresh trainable tree for ``stage`` (stage 2 = stage 1 extended, as at the switch)."""
    params = model.init(rng, stage=1, image_size=image_size)
    if stage == 2:
        params = model.extend_to_stage2(params, jax.random.fold_in(rng, 2))
    return params


def new_state(params: PyTree, optimizer: optim.ModuleOptimizer, step: int = 0) -> State:
    """A train state at ``step`` with fresh optimiser states."""
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.asarray(step, jnp.int32),
        "nonfinite_step": jnp.asarray(-1, jnp.int32),
    }


def to_stage2(
    state: State, model: TokFusion, optimizer: optim.ModuleOptimizer, rng: jax.Array, fuse_init=None
) -> State:
    """The stage switch: keep every trained module and its optimiser state, add the fuse layers."""
    params = model.extend_to_stage2(state["params"], jax.random.fold_in(rng, 2))
    if fuse_init:  # --config.train.init_from gave trained fuse layers
        pending = {k: params[k] for k in fuse_init if k in params}
        taken, _ = checkpointing.merge_params(pending, fuse_init)
        params = {**params, **taken}
    opt_state = optimizer.extend(state["opt_state"], params)
    return {**state, "params": params, "opt_state": opt_state}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _sources():
    from tokfusion_jax.data import sources

    return sources


def _pipeline():
    from tokfusion_jax.data import pipeline

    return pipeline


def open_source(dataset: str, root: str, allow_unpaired: bool = False):
    """A paired source from a preset name and a folder (DataError on a bad folder)."""
    root = str(pathlib.Path(root).expanduser()) if root else ""
    return _sources().from_preset(dataset, root, allow_unpaired)


def _token_cache(config: ml_collections.ConfigDict, tok: titok.Tokenizer | None):
    if not config.data.token_cache or tok is None:
        return None
    from tokfusion_jax.data import cache

    return cache.TokenCache(
        str(pathlib.Path(config.data.token_cache).expanduser()),
        tok.sha256,
        source=str(config.model.tokens.source),
    )


def train_iterator(config, source, tok, image_size: int):
    """This process's training batches (an endless, checkpointable iterator)."""
    d = config.data
    ds = _pipeline().make_pipeline(
        source,
        batch_size=d.batch_size // jax.process_count(),
        image_size=None if d.get("patch_size", 0) else (image_size, image_size),
        seed=int(d.seed),
        shuffle=bool(d.shuffle),
        num_epochs=None,
        drop_remainder=True,
        keep_color=False,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        token_cache=_token_cache(config, tok),
        worker_count=int(d.worker_count),
        crop_size=int(d.get("crop_size", 0)),
        flip=bool(d.get("flip", False)),
        min_size=int(d.get("min_size", 16)),
    )
    return iter(ds)


def val_batches(config, source, image_size: int) -> list[dict[str, np.ndarray]]:
    """The validation pairs (every process reads all of them), as padded host batches."""
    ds = _pipeline().make_pipeline(
        source,
        batch_size=config.val.batch_size,
        image_size=(image_size, image_size),
        seed=0,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        process_index=0,  # every process reads every validation pair
        process_count=1,
        min_size=int(config.data.get("min_size", 16)),
    )
    out, count = [], 0
    limit = int(config.val.max_pairs) or None
    for batch in ds:
        batch = {k: np.asarray(v) for k, v in batch.items()}
        if limit is not None:
            take = min(len(batch["vis"]), limit - count)
            batch = {k: v[:take] for k, v in batch.items()}
        count += len(batch["vis"])
        out.append(batch)
        if limit is not None and count >= limit:
            break
    return out


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What `train_and_evaluate` returns."""

    state: State
    step: int
    stage: int
    interrupted: bool
    workdir: pathlib.Path
    export_dir: pathlib.Path | None = None
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def random_tiny_tokenizer_config(
    image_size: int, num_tokens: int, token_dim: int
) -> titok.TiTokConfig:
    """The demo/test tokenizer: one transformer block per side, no pixel decoder."""
    return titok.TiTokConfig.tiny(
        image_size=image_size,
        patch_size=8 if image_size % 8 == 0 else image_size,
        num_tokens=num_tokens,
        token_size=token_dim,
        enc_width=32,
        enc_depth=1,
        dec_width=32,
        dec_depth=1,
        is_legacy=False,
        finetune_decoder=False,
    )


def resolve_tokenizer(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, sharding: Any = None
) -> tuple[titok.Tokenizer | None, str]:
    """The frozen tokenizer and the path it lives at (the random tiny one is saved in workdir).

    A model without tokens (``model.use_tokens=False``) needs none: (None, "").
    """
    cfg = config.tokenizer
    if not config.model.use_tokens:
        return None, ""
    if cfg.path:
        path = pathlib.Path(cfg.path).expanduser().absolute()
        return titok.load(path, sharding=sharding), str(path)
    path = workdir / "tokenizer"
    if (path / "tokenizer.json").exists():
        return titok.load(path, sharding=sharding), str(path)
    shape = model_config.token_shape_or_default(config.model.tokens)
    tiny = random_tiny_tokenizer_config(
        int(cfg.random_tiny_image_size), shape["num_tokens"], shape["token_dim"]
    )
    tok = titok.create(tiny, seed=int(config.train.seed))
    if jax.process_index() == 0:
        titok.save(tok, path, metadata={"source": "random weights (demo/test tokenizer)"})
    _sync("tokenizer-saved")
    print(
        f"NOTE: using a tiny tokenizer with RANDOM weights (no pretrained weights ship with the "
        f"package), saved to {path}",
        flush=True,
    )
    return titok.load(path, sharding=sharding), str(path)


def _sync(name: str) -> None:
    shd.host_barrier(name)


def _resolve_token_shape(
    config: ml_collections.ConfigDict, tok: titok.Tokenizer | None, path: str
) -> None:
    """config.model.tokens from the tokenizer (pinned keys must agree), in place."""
    tokens = config.model.tokens
    if config.model.use_tokens and tok is not None:
        model_config.resolve_token_shape(tokens, tok.config, f"the tokenizer at {path}")
    else:  # the no-token ablation never reads tokens: any shape builds it
        tokens.update(model_config.token_shape_or_default(tokens))


_host_scalars = loop.host_scalars  # averaged per-step metrics


def _meta(
    config, step: int, stage: int, epoch: int, tok_path: str, tok: titok.Tokenizer | None
) -> dict:
    tokenizer = None if tok is None else {"path": tok_path, "sha256": tok.sha256}
    return loop.run_meta(config, step, stage=stage, epoch=epoch, tokenizer=tokenizer)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, devices: list | None = None
) -> TrainResult:
    """Runs (or resumes) both training stages; returns the final state.

    ``devices``: restrict the mesh to these devices (tests); default all global devices.
    """
    config, workdir, mesh = loop.start_run(config, workdir, validate_config, devices)
    image_size = int(config.data.image_size)
    if jax.default_backend() == "cpu" and config.model.dtype != "float32":
        logging.warning("compute dtype %s on CPU is slow; float32 is advised", config.model.dtype)

    _sync("before-tokenizer")
    # Loaded straight onto the (global) mesh, replicated: every process restores its own copy.
    tok, tok_path = resolve_tokenizer(config, workdir, sharding=shd.replicated(mesh))
    _resolve_token_shape(config, tok, tok_path)
    use_cache = bool(config.data.token_cache) and tok is not None
    frozen = None if use_cache else tok
    frozen_shardings = None
    if frozen is not None:
        frozen_shardings = shd.fsdp_sharding(mesh, frozen)
        frozen = jax.device_put(frozen, frozen_shardings)
    rep = shd.replicated(mesh)

    train_root = config.data.train_root or config.data.root
    source = open_source(config.data.dataset, train_root, bool(config.data.allow_unpaired))
    if config.data.get("patch_size", 0):
        from tokfusion_jax.data import patches

        source = patches.from_data_config(source, config.data, progress=jax.process_index() == 0)
        _log0(f"training on {source.describe()}")
        train_size = int(config.data.patch_size)  # the parameters do not depend on it
    else:
        train_size = image_size
    n_pairs = len(source)
    global_bs = int(config.data.batch_size)
    steps_per_epoch = int(config.train.steps_per_epoch) or n_pairs // global_bs
    if n_pairs < global_bs:  # also with train.steps_per_epoch set: no batch would ever be full
        raise DataError(
            f"{train_root or 'the packaged samples'}: {n_pairs} pairs is fewer than one batch of "
            f"config.data.batch_size={global_bs}"
        )
    stage1_steps = int(config.train.stage1_epochs) * steps_per_epoch
    total_steps = stage1_steps + int(config.train.stage2_epochs) * steps_per_epoch

    crop = int(config.data.get("patch_size", 0)) or image_size  # the training crop
    chunk_size = int(config.train.get("chunk_size", 0)) or chunking.auto_chunk_size(
        chunking.widest_activation_bytes(config.model, crop, crop), jax.default_backend()
    )

    model = TokFusion(config.model)
    optimizer = optim.ModuleOptimizer(config.optim, steps_per_epoch)
    weights = config.loss.to_dict()
    base_key = jax.random.key(int(config.train.seed))
    init_key, step_key = jax.random.split(base_key)

    def ctx_for(stage: int) -> StepContext:
        return StepContext(
            model=model,
            optimizer=optimizer,
            loss_weights=weights,
            stage=stage,
            use_token_cache=use_cache,
            use_tokens=bool(config.model.use_tokens),
            chunk_size=chunk_size,
            batch_shards=mesh.size,
        )

    ckpt = checkpointing.Checkpointer(
        workdir / "checkpoints",
        keep=int(config.train.keep_checkpoints),
        use_async=bool(config.train.async_checkpoints),
    )
    it = train_iterator(config, source, tok, image_size)

    def abstract_state(stage: int) -> State:
        shapes = jax.eval_shape(
            lambda: new_state(
                stage_params(model, init_key, stage, (train_size, train_size)), optimizer
            )
        )
        return jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes
        )

    fuse_init = None
    resumed = loop.restore_latest(
        ckpt,
        lambda meta: abstract_state(int(meta["stage"])),
        it,
        check_meta=lambda meta: _check_resume_compatible(meta, tok, workdir),
    )
    if resumed is not None:
        state, meta = resumed
        stage, latest = int(meta["stage"]), int(meta["step"])
        _log0(f"resuming from {ckpt.step_path(latest)} (step {latest}, stage {stage})")
        if stage == 1 and init_from_path(config):  # its fuse layers still wait for the switch
            _, fuse_init = load_init_params(
                init_from_path(config), abstract_state(1)["params"], log=False
            )
    else:
        stage = 1 if stage1_steps > 0 else 2
        params = stage_params(model, init_key, stage, (train_size, train_size))
        if init_from_path(config):
            stage2 = jax.eval_shape(
                lambda: stage_params(model, init_key, 2, (train_size, train_size))
            )
            params, fuse_init = load_init_params(init_from_path(config), params, stage2)
        state = _initial_state(model, optimizer, params, rep)

    step = int(jax.device_get(state["step"]))
    if stage == 1 and step >= stage1_steps:
        state = _switch(state, model, optimizer, init_key, fuse_init, rep)
        stage = 2

    val_source = None
    if config.val.dataset and (config.data.val_root or config.val.dataset == SAMPLES):
        val_source = open_source(config.val.dataset, config.data.val_root)
    val_data = val_batches(config, val_source, image_size) if val_source is not None else []

    # Validation computes tokens with the tokenizer (validation pairs need not be in the cache).
    eval_frozen = tok if use_cache else frozen
    eval_frozen_shardings = rep if use_cache else frozen_shardings
    step_fns: dict[int, Any] = {}
    eval_fns: dict[int, Any] = {}

    def step_fn(s: int):
        if s not in step_fns:
            step_fns[s] = compile_train_step(ctx_for(s), mesh, frozen_shardings)
        return step_fns[s]

    def eval_fn(s: int):
        if s not in eval_fns:
            eval_ctx = dataclasses.replace(ctx_for(s), use_token_cache=False)
            eval_fns[s] = jax.jit(
                functools.partial(eval_outputs, ctx=eval_ctx),
                in_shardings=(rep, eval_frozen_shardings, rep),
                out_shardings=rep,
                compiler_options=compile_options.compiler_options(),
            )
        return eval_fns[s]

    logger = loop.RunLogger(workdir, total_steps, step)
    nan_from_step = int(config.train.debug_nan_step)  # testing aid (loop.poison_batch)
    pending: list[dict[str, jax.Array]] = []
    last_metrics: dict[str, float] = {}
    log_every = int(config.train.log_every_steps)
    ckpt_every = int(config.train.checkpoint_every_steps)
    val_every = int(config.val.every_steps)
    image_every = int(config.train.image_every_steps)
    throughput = loop.Throughput(step)
    interrupted = False

    def epoch_of(s: int) -> int:
        return s // steps_per_epoch

    def stage_of(s: int) -> int:
        return 1 if s < stage1_steps else 2

    watch = loop.NonFiniteWatch(log_every, context=lambda s: f"stage {stage_of(s)}, ")

    def check_finite(at_step: int) -> None:
        watch.check(state["nonfinite_step"], at_step, ckpt)

    def save(at_step: int) -> None:
        check_finite(at_step)
        meta = _meta(config, at_step, stage, epoch_of(at_step), tok_path, tok)
        ckpt.save(at_step, state, meta, it.get_state())

    def validate(at_step: int) -> None:
        if not val_data:
            return
        record = run_validation(
            eval_fn(stage), state["params"], eval_frozen, val_data, rep, stage, model, tok
        )
        logger.scalars(at_step, {f"val/{k}": v for k, v in record.items()} | {"stage": stage})

    def images(at_step: int) -> None:
        if not val_data or not logger.active:
            return
        b = val_data[0]
        batch = jax.device_put({k: v for k, v in b.items() if k in ("vis", "ir")}, rep)
        _, out = eval_fn(stage)(state["params"], eval_frozen, batch)
        tag = "val/vis_ir_fused" if stage == 2 else "val/vis_ir_reconstructed_vis"
        logger.images(at_step, tag, [b["vis"], b["ir"], np.asarray(jax.device_get(out))])

    def log_train(at_step: int) -> None:
        nonlocal last_metrics
        check_finite(at_step)
        scalars = loop.host_scalars(pending)
        pending.clear()
        rate = throughput.rate(at_step)
        last_metrics = scalars
        epoch = epoch_of(at_step - 1)
        record = {"stage": stage, "epoch": epoch, "steps_per_sec": rate}
        logger.scalars(at_step, record | {f"train/{k}": v for k, v in scalars.items()})
        shown = {k: f"{v:.4g}" for k, v in scalars.items() if "/" not in k}
        logger.progress(at_step, {"epoch": epoch, "stage": stage, **shown})

    try:
        with loop.StopRequest() as stop:
            while step < total_steps:
                if stage == 1 and step >= stage1_steps:
                    if pending:  # stage-I steps since the last log line
                        log_train(step)
                    save(step)  # the last stage-I state, before the switch
                    state = _switch(state, model, optimizer, init_key, fuse_init, rep)
                    stage = 2
                batch = loop.poison_batch(next(it), step, nan_from_step)
                watch.record(step, batch)
                device_batch = shd.global_batch(batch, mesh)
                state, metrics = step_fn(stage)(state, frozen, device_batch, step_key)
                pending.append(metrics)
                step += 1

                if step % log_every == 0 or step == total_steps:
                    log_train(step)
                if image_every and step % image_every == 0:
                    images(step)
                end_of_epoch = step % steps_per_epoch == 0
                if (val_every > 0 and step % val_every == 0) or (val_every == 0 and end_of_epoch):
                    validate(step)
                if step % ckpt_every == 0:
                    save(step)
                if stop.requested:
                    save(step)
                    ckpt.wait()
                    interrupted = True
                    _log0(loop.stopped_message(stop.signal, step, ckpt.step_path(step)))
                    break
            if not interrupted:
                save(step)
                if val_every == -1:
                    validate(step)
        ckpt.wait()
    finally:
        logger.close()
        with contextlib.suppress(Exception):
            ckpt.close()

    export_dir = None
    if not interrupted and config.train.export and stage == 2:
        from tokfusion_jax import export

        export_dir = export.save_export(workdir, config, state["params"], tok, tok_path)
        _log0(f"inference export written to {export_dir}")
    return TrainResult(
        state=state,
        step=step,
        stage=stage,
        interrupted=interrupted,
        workdir=workdir,
        export_dir=export_dir,
        last_metrics=last_metrics,
    )


def _switch(state, model, optimizer, init_key, fuse_init, rep) -> State:
    """The stage switch, run eagerly (the model draws fresh fuse layers on the host)."""
    return jax.device_put(to_stage2(state, model, optimizer, init_key, fuse_init), rep)


def _initial_state(model, optimizer, params, rep) -> State:
    """Device-resident fresh state (optimiser init in one small jit)."""
    build = jax.jit(functools.partial(new_state, optimizer=optimizer), out_shardings=rep)
    return build(jax.device_put(params, rep))


def run_validation(
    eval_jit, params, frozen, val_data, rep, stage: int, model: TokFusion, tok
) -> dict[str, float]:
    """Mean losses over the validation pairs, plus fusion metrics when available (stage II)."""
    sums: dict[str, float] = collections.defaultdict(float)
    count = 0
    metric_sums: dict[str, float] = collections.defaultdict(float)
    metric_count = 0
    compute = _metrics_compute() if stage == 2 else None
    for b in val_data:
        n = len(b["vis"])
        padded = {k: _pad_to(b[k], int(val_data[0]["vis"].shape[0])) for k in ("vis", "ir")}
        terms, out = eval_jit(params, frozen, jax.device_put(padded, rep))
        terms = jax.device_get(terms)
        for k, v in terms.items():
            sums[k] += float(v) * n
        count += n
        if compute is not None:  # metrics take 0..255 gray images, infrared first
            fused = np.asarray(jax.device_get(out))[:n, ..., 0] * 255.0
            values = compute(fused, b["ir"][..., 0] * 255.0, b["vis"][..., 0] * 255.0)
            for k, v in values.items():
                v = np.asarray(v, np.float64)
                finite = v[np.isfinite(v)]
                if finite.size:
                    metric_sums[k] += float(finite.sum())
            metric_count += n
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out.update({f"metric/{k}": v / max(metric_count, 1) for k, v in metric_sums.items()})
    return out


def _metrics_compute():
    try:
        from tokfusion_jax import metrics
    except ImportError:
        return None
    return getattr(metrics, "compute", None)


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) == n:
        return x
    pad = np.repeat(x[-1:], n - len(x), axis=0)
    return np.concatenate([x, pad], axis=0)


def load_init_params(
    source: str, params: PyTree, stage2_params: PyTree | None = None, log: bool = True
) -> tuple[PyTree, dict | None]:
    """Takes into ``params`` what another run or export has a counterpart for.

    ``source``: a workdir, its ``checkpoints/`` or ``export/``, or an export made by
    ``python -m convert cddfuse``. Every leaf found at the same path with the same shape is
    copied bit for bit; the rest stays freshly initialised (e.g. the token interface and STE when
    starting TokFusion from CDDFuse, and CDDFuse's ``encoder/patch_embed`` is unused when
    ``encoder_input="replace"``). One log block says what was taken, what stays fresh and what
    was not used. A leaf with another shape is a `CheckpointError`, and so is a source that has
    nothing for this model.

    ``stage2_params`` (the stage-II tree, abstract is fine) lets the fuse layers a stage-I tree
    lacks be checked now; they are returned separately and taken at the stage switch. Returns
    (params, the source's modules that ``params`` lacks, or None); ``log=False`` is quiet.
    """
    loaded = checkpointing.restore_params(source)
    try:
        merged, report = checkpointing.merge_params(params, loaded)
        pending = {k: v for k, v in loaded.items() if k not in params}
        later = None
        if stage2_params is not None:
            later_target = {k: stage2_params[k] for k in pending if k in stage2_params}
            _, later = checkpointing.merge_params(later_target, pending)
    except CheckpointError as e:
        raise CheckpointError(f"init_from={source}: {e}") from None
    if not report.taken and not (later and later.taken):
        raise CheckpointError(
            f"init_from={source}: nothing in it fits config.model (its modules: "
            f"{', '.join(sorted(loaded))})"
        )
    lines = [f"init_from: parameters from {source}", *("  " + x for x in report.lines())]
    if later is not None and later.taken:
        lines += ["  at the stage-II switch, " + x for x in later.lines() if x.startswith("taken")]
    if log:
        _log0("\n".join(lines))
    return merged, (pending or None)


def _check_resume_compatible(meta: Mapping[str, Any], tok: titok.Tokenizer | None, workdir) -> None:
    recorded = (meta.get("tokenizer") or {}).get("sha256", "")
    if tok is not None and recorded and tok.sha256 and recorded != tok.sha256:
        raise CheckpointError(
            f"{workdir}/checkpoints was trained with tokenizer sha256 {recorded[:12]}..., but "
            f"config.tokenizer gives {tok.sha256[:12]}...; use a fresh --workdir"
        )


_log0 = loop.log0
