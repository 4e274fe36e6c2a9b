"""Rows `fuse` (TokFusion inference) and `train` (stage I and II steps, tokens inside or cached)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tokfusion_jax import chunking, compile_options
from tokfusion_jax.bench.flops import lowered_flops, titok_config_encoder_flops, unrolled
from tokfusion_jax.bench.measure import measure_jax_row, random_images
from tokfusion_jax.bench.results import Row
from tokfusion_jax.bench.settings import Settings
from tokfusion_jax.bench.timing import PeakFlops, count_params
from tokfusion_jax.bench.tokenizer_rows import _tokenizer, encoder_param_count, tokenizer_config


def fusion_model_config(variant: str, dtype: str, tiny: bool) -> Any:
    """The paper's model section (dim 64, L-32 tokens), sized to the tokenizer `variant`."""
    from tokfusion_jax.models.config import model_config

    tconf = tokenizer_config(variant)
    cfg = model_config()
    cfg.tokens.num_tokens = tconf.num_tokens
    cfg.tokens.token_dim = tconf.token_size
    cfg.tokens.input_size = tconf.image_size
    cfg.dtype = dtype
    if tiny:
        cfg.dim, cfg.heads = 8, 2
        cfg.enc_blocks = cfg.dec_blocks = cfg.detail_layers = cfg.fuse_detail_layers = 1
        cfg.coarse_size = max(tconf.image_size // 8, 4)
        cfg.ste.positions = (1, tconf.num_tokens - 1)
    return cfg


def bench_fuse(size: tuple[int, int], dtype: str, settings: Settings, peak: PeakFlops) -> Row:
    """`TokFusion.fuse_images` (tokens of both images + the 2D path), per pair, stage-II params."""
    from tokfusion_jax.models.fusion import TokFusion

    variant = settings.fuse_variant
    model = TokFusion(fusion_model_config(variant, dtype, settings.tiny))
    tok = _tokenizer(variant)
    height, width = size
    m = 8
    params = model.init(jax.random.key(0), stage=2, image_size=(-(-height // m) * m,) * 2)
    jitted = jax.jit(model.fuse_images, compiler_options=compile_options.compiler_options())
    row = Row(
        name=f"fuse {variant}",
        dtype=dtype,
        size=f"{height}x{width}",
        trainable_params=count_params(params),
        frozen_params=encoder_param_count(tok.params),
        hand_gflops_per_item=2 * titok_config_encoder_flops(tok.config) / 1e9,
        note="hand = the two tokenizer encodes only",
    )

    def make_args(batch: int, tok: Any = tok) -> tuple[Any, ...]:
        vis = random_images(batch, height, width, 1, seed=1)  # (B, H, W, 1)
        ir = random_images(batch, height, width, 1, seed=2)
        return params, tok, vis, ir

    flops = lambda b: lowered_flops(jitted, *make_args(b, unrolled(tok)))
    return measure_jax_row(
        row, jitted, make_args, settings.fuse_batches, settings, peak(dtype)[0], flops=flops
    )


class TrainStepProgram(NamedTuple):
    """A jitted `trainer.train_step` (state donated) and a maker of its arguments."""

    jitted: Any
    # make_args(batch, frozen=tokenizer) -> (state, frozen, data, rng); fresh state each call.
    make_args: Callable[..., tuple[Any, ...]]
    params: Any  # the stage's initial trainable parameters
    tokenizer: Any  # None with cached tokens


def auto_chunk_size(model: Any, height: int, width: int) -> int:
    """The trainer's `train.chunk_size=0` choice for a model config or spec at (H, W) crops."""
    sample = chunking.widest_activation_bytes(model, height, width)
    return chunking.auto_chunk_size(sample, jax.default_backend())


def train_step_program(
    variant: str, dtype: str, tiny: bool, stage: int, cached: bool, size: tuple[int, int]
) -> TrainStepProgram:
    """The paper recipe's train step of `stage` on random (H, W) = `size` gray pairs, with the
    tokens cached (random unit vectors) or computed by a random-weight tokenizer in the step."""
    from tokfusion_jax import optim, trainer
    from tokfusion_jax.losses import loss_weights_config
    from tokfusion_jax.models.fusion import TokFusion

    cfg = fusion_model_config(variant, dtype, tiny)
    model = TokFusion(cfg)
    optimizer = optim.ModuleOptimizer(optim.optim_config(), 100)
    ctx = trainer.StepContext(
        model=model,
        optimizer=optimizer,
        loss_weights=loss_weights_config().to_dict(),
        stage=stage,
        use_token_cache=cached,
        use_tokens=True,
        chunk_size=auto_chunk_size(cfg, *size),
    )
    jitted = jax.jit(  # as trainer.compile_train_step builds it (without the mesh)
        functools.partial(trainer.train_step, ctx=ctx),
        donate_argnums=(0,),
        compiler_options=compile_options.compiler_options(),
    )
    tok = None if cached else _tokenizer(variant)
    height, width = size
    n, c = cfg.tokens.num_tokens, cfg.tokens.token_dim
    params = trainer.stage_params(model, jax.random.key(0), stage, size)

    def make_args(batch: int, frozen: Any = tok) -> tuple[Any, ...]:
        state = trainer.new_state(jax.tree_util.tree_map(jnp.copy, params), optimizer)
        data = {
            "vis": random_images(batch, height, width, 1, seed=1),  # (B, H, W, 1)
            "ir": random_images(batch, height, width, 1, seed=2),
        }
        if cached:
            for i, key in enumerate(("vis_tokens", "ir_tokens")):
                z = jax.random.normal(jax.random.key(10 + i), (batch, n, c))  # (B, N, C)
                data[key] = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
        return state, frozen, data, jax.random.key(1)

    return TrainStepProgram(jitted, make_args, params, tok)


def bench_train(stage: int, cached: bool, settings: Settings, peak: PeakFlops) -> Row:
    """`trainer.train_step` of `stage` (donated state), tokens cached or from the tokenizer."""
    dtype = settings.train_dtype
    jitted, make_args, params, tok = train_step_program(
        settings.train_variant, dtype, settings.tiny, stage, cached, settings.train_size
    )
    height, width = settings.train_size
    row = Row(
        name=f"train stage {stage} {'cached' if cached else 'tokenizer'}",
        dtype=dtype,
        size=f"{height}x{width}",
        trainable_params=count_params(params),
        frozen_params=0 if tok is None else encoder_param_count(tok.params),
        hand_gflops_per_item=None
        if tok is None
        else 2 * titok_config_encoder_flops(tok.config) / 1e9,
        note="" if tok is None else "hand = the two tokenizer encodes only",
    )

    def flops(batch: int) -> float | None:
        return lowered_flops(jitted, *make_args(batch, None if tok is None else unrolled(tok)))

    return measure_jax_row(
        row,
        jitted,
        make_args,
        settings.train_batches,
        settings,
        peak(dtype)[0],
        stateful=True,
        flops=flops,
    )


def plain_2d_model(tiny: bool = False) -> Any:
    """The plain-2D model with CDDFuse's test-time settings (no tokens, residual = vis)."""
    from tokfusion_jax.models.config import model_config
    from tokfusion_jax.models.fusion import TokFusion

    cfg = model_config()
    cfg.use_tokens = False
    cfg.residual = "vis"
    if tiny:
        cfg.dim, cfg.heads = 8, 2
        cfg.enc_blocks = cfg.dec_blocks = cfg.detail_layers = cfg.fuse_detail_layers = 1
    return TokFusion(cfg)


def cddfuse_train_step_program(height: int, width: int, tiny: bool = False) -> TrainStepProgram:
    """The stage-II train step of the plain-2D model with CDDFuse's phase-II loss
    (L_fusion + 2 L_decomp: `loss.rec = 0`) on random (H, W) gray pairs, no tokens."""
    from tokfusion_jax import optim, trainer
    from tokfusion_jax.losses import loss_weights_config

    model = plain_2d_model(tiny)
    weights = loss_weights_config()
    weights.rec = 0.0
    optimizer = optim.ModuleOptimizer(optim.optim_config(), 100)
    ctx = trainer.StepContext(
        model=model,
        optimizer=optimizer,
        loss_weights=weights.to_dict(),
        stage=2,
        use_token_cache=False,
        use_tokens=False,
        chunk_size=auto_chunk_size(model.spec, height, width),
    )
    jitted = jax.jit(
        functools.partial(trainer.train_step, ctx=ctx),
        donate_argnums=(0,),
        compiler_options=compile_options.compiler_options(),
    )
    params = trainer.stage_params(model, jax.random.key(0), 2, (height, width))

    def make_args(batch: int, frozen: Any = None) -> tuple[Any, ...]:
        state = trainer.new_state(jax.tree_util.tree_map(jnp.copy, params), optimizer)
        data = {
            "vis": random_images(batch, height, width, 1, seed=1),  # (B, H, W, 1)
            "ir": random_images(batch, height, width, 1, seed=2),
        }
        return state, None, data, jax.random.key(1)

    return TrainStepProgram(jitted, make_args, params, None)
