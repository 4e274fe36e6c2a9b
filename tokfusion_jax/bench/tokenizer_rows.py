"""Rows `encode` (TiTok in JAX) and `torch_encode` (the PyTorch reference, eager / compiled)."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax.bench.flops import lowered_flops, titok_config_encoder_flops, unrolled
from tokfusion_jax.bench.measure import measure_jax_row, random_images
from tokfusion_jax.bench.results import Row
from tokfusion_jax.bench.settings import Settings
from tokfusion_jax.bench.timing import PeakFlops, time_torch


def tokenizer_config(variant: str) -> Any:
    """`TiTokConfig` of an official variant name, or the tiny test config for "tiny"."""
    from tokfusion_jax.models import titok

    if variant == "tiny":
        return titok.TiTokConfig.tiny()
    return titok.TiTokConfig.variant(variant)


def encoder_param_count(params: Any) -> int:
    """Parameters the encode path reads: encoder, latent tokens and the quantizer codebook."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path).lower()
        used = "encoder" in name or "latent_token" in name or "quantiz" in name
        if used and "decoder" not in name and "pixel" not in name:
            total += int(np.prod(np.shape(leaf)))
    return total


DECODE_ONLY_PARAMS = ("decoder", "pixel_quantize", "pixel_decoder")


@functools.lru_cache(maxsize=2)
def _tokenizer(variant: str) -> Any:
    """A random-weight tokenizer holding only what encoding reads (encoder, latent tokens,
    codebook), as an inference deployment would: the decoders never reach the device."""
    from tokfusion_jax.models import titok

    config = tokenizer_config(variant)
    model = titok.TiTok(config)
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    init = functools.partial(model.init, method=titok.TiTok.encode)  # encode's params only
    with jax.default_device(jax.devices("cpu")[0]):  # no init temporaries on the device
        params = jax.jit(init)(jax.random.key(0), images)["params"]
    params = jax.device_put(params, jax.devices()[0])
    return titok.Tokenizer(model=model, params=params, config=config)


def bench_encode(variant: str, dtype: str, settings: Settings, peak: PeakFlops) -> Row:
    """TiTok encode (encoder + quantizer) in JAX with random weights, per image."""
    from tokfusion_jax.models import titok

    tok = _tokenizer(variant)
    config = tok.config
    size = config.image_size
    jitted = jax.jit(lambda tok, images: titok.encode(tok, images, dtype=jnp.dtype(dtype)))
    row = Row(
        name=f"encode {variant}",
        dtype=dtype,
        size=f"{size}x{size}",
        trainable_params=0,
        frozen_params=encoder_param_count(tok.params),
        hand_gflops_per_item=titok_config_encoder_flops(config) / 1e9,
    )

    def make_args(batch: int) -> tuple[Any, ...]:
        return tok, random_images(batch, size, size, 3)  # (B, S, S, 3)

    flat = unrolled(tok)
    flops = lambda b: lowered_flops(jitted, flat, make_args(b)[1])
    return measure_jax_row(
        row, jitted, make_args, settings.encode_batches, settings, peak(dtype)[0], flops=flops
    )


def _torch_encoder(variant: str, dtype: str, device: str) -> Any:
    """The PyTorch reference TiTok (encoder, latent tokens, quantizer only), random weights."""
    import torch

    from convert import titok_torch

    config = tokenizer_config(variant)
    with torch.device("meta"):
        model = titok_torch.TiTokTorch(config)
    for name in ("decoder", "pixel_decoder", "pixel_quantize"):
        if hasattr(model, name):
            delattr(model, name)  # encode never reads them; keeps memory and set-up small
    model = model.to_empty(device=device)
    titok_torch.init_random_(model, seed=0)
    model = model.to(getattr(torch, dtype)).eval()
    if hasattr(model, "quantize"):
        model.quantize.float()  # the quantizer runs in float32, as in the original
    return model, config


def bench_torch_encode(variant: str, dtype: str, settings: Settings, peak: PeakFlops) -> list[Row]:
    """The same encode in the PyTorch reference (NCHW): eager, and torch.compile if enabled."""
    import torch

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, config = _torch_encoder(variant, dtype, device)
    size = config.image_size
    hand = titok_config_encoder_flops(config)
    frozen = sum(p.numel() for p in model.parameters())
    modes = {"on": ["torch eager", "torch compile"], "off": ["torch eager"]}.get(
        settings.torch_compile, ["torch compile"]
    )
    rows = []
    for mode in modes:
        row = Row(
            name=f"encode {variant}",
            framework=mode,
            dtype=dtype,
            size=f"{size}x{size}",
            trainable_params=0,
            frozen_params=frozen,
            hand_gflops_per_item=hand / 1e9,
            note=f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads",
        )
        encode = model.encode if mode == "torch eager" else torch.compile(model.encode)
        try:
            for batch in sorted(settings.torch_batches):
                images = torch.rand(
                    batch, 3, size, size, device=device, dtype=getattr(torch, dtype)
                )

                def call(images: Any = images, encode: Any = encode) -> Any:
                    with torch.inference_mode():
                        return encode(images)

                if mode == "torch compile" and row.compile_s is None:
                    start = time.perf_counter()
                    call()
                    sync()
                    row.compile_s = time.perf_counter() - start
                repeats = settings.repeats if batch == 1 else settings.throughput_repeats
                timing = time_torch(
                    call,
                    sync,
                    # a new batch size can recompile more than once (static, then dynamic)
                    warmup=settings.warmup if mode == "torch eager" else max(settings.warmup, 3),
                    repeats=repeats,
                    budget_s=settings.budget_s or None,
                    min_repeats=settings.min_repeats,
                )
                if batch == 1:
                    row.latency_ms, row.latency_runs = 1e3 * timing.median_s, timing.runs
                row.throughput_by_batch[batch] = batch / timing.median_s
                if row.throughput_by_batch[batch] > (row.items_per_s or 0.0):
                    row.best_batch, row.items_per_s = batch, row.throughput_by_batch[batch]
                print(f"  {mode} {variant} {dtype} batch {batch}: {1e3 * timing.median_s:.1f} ms")
        except Exception as e:  # noqa: BLE001 - torch.compile is best effort
            if mode == "torch eager" or len(modes) == 1:
                raise
            row.note += " | failed: " + " ".join(f"{type(e).__name__}: {e}".split())[:200]
        if row.items_per_s:
            row.mfu = row.items_per_s * hand / peak(dtype)[0]
            row.note += " | MFU from the hand FLOP count"
        rows.append(row)
    return rows
