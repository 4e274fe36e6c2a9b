"""grain pipelines: source -> shard -> shuffle -> repeat -> decode/Y/resize -> [crop/flip] -> batch.

    ds = make_pipeline(source, batch_size=8, image_size=(256, 256), seed=0)
    it = iter(ds)
    batch = next(it)       # {"vis": (B,H,W,1) f32, "ir": (B,H,W,1) f32, "name": (B,) str, ...}
    state = it.get_state() # store with the checkpoint; it.set_state(state) resumes exactly

The stream is a pure function of (source, seed, process index/count, options): shuffling and
random augmentation are keyed by the seed and the element index (grain `MapDataset`), so a
restored iterator continues with the very batches it would have produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain

from tokfusion_jax.data import transforms
from tokfusion_jax.errors import ConfigError


def make_pipeline(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    image_size: int | tuple[int, int] | None = (256, 256),
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    keep_color: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    token_cache: Any = None,
    worker_count: int = 0,
    crop_size: int = 0,
    flip: bool = False,
    min_size: int = 16,
    read_threads: int = 4,
) -> grain.IterDataset:
    """A batched grain dataset over `source` whose iterator has `get_state`/`set_state`.

    Args:
      source: a random-access sequence of records {"name", "vis", "ir"}
        (`tokfusion_jax.data.sources`, or a TFDS data source adapter).
      batch_size: examples per batch *for this process*.
      image_size: output (h, w) (an int means square); None or 0 keeps native sizes (then
        batch_size must be 1 unless all images share one size).
      seed: keys shuffling and augmentation.
      shuffle: reshuffle every epoch (the seed is folded with the epoch).
      num_epochs: passes over this process's shard; None repeats forever.
      drop_remainder: drop a final short batch.
      keep_color: add "vis_cbcr" and "ir_cbcr" (H, W, 2) to each batch.
      process_index, process_count: this process's shard (defaults: jax.process_index() and
        jax.process_count()); shard i holds elements i, i + count, ... of the source.
      token_cache: a `tokfusion_jax.data.cache.TokenCache`; adds "vis_tokens" and "ir_tokens"
        (B, N, C). Incompatible with random crops and flips (the tokens see the whole image).
      worker_count: grain worker processes (0 = decode in this process with threads).
      crop_size, flip: random crop side (0 = off) and random horizontal flip (off).
      min_size: smallest accepted image side.
      read_threads: decoding threads per process.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if token_cache is not None and (crop_size or flip):
        raise ConfigError(
            "token_cache cannot be combined with crop_size/flip: cached tokens describe the "
            "whole unflipped image"
        )
    decode = transforms.DecodePair(
        image_size=transforms.as_size(image_size),
        keep_color=keep_color,
        min_size=min_size,
        token_cache=token_cache,
    )
    return _build(
        source,
        decode,
        what="pairs",
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
        crop_size=crop_size,
        flip=flip,
        read_threads=read_threads,
    )


def make_image_pipeline(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    image_size: int | tuple[int, int] | None = (256, 256),
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    flip: bool = False,
    min_size: int = 16,
    read_threads: int = 4,
) -> grain.IterDataset:
    """A batched grain dataset of single images (tokenizer training), checkpointable.

    ``source`` holds records {"name", "image", "domain"} (`sources.image_sources`: both images
    of paired folders, single folders, TFDS splits). Batches are {"image": (B, H, W, 1) float32
    luma in [0, 1], "name": (B,) str, "domain": (B,) str}. The other arguments are those of
    `make_pipeline`.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    decode = transforms.DecodeImage(image_size=transforms.as_size(image_size), min_size=min_size)
    return _build(
        source,
        decode,
        what="images",
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
        crop_size=0,
        flip=flip,
        read_threads=read_threads,
    )


def decode_images(
    source: Sequence[dict[str, Any]],
    image_size: int | tuple[int, int],
    *,
    min_size: int = 16,
    threads: int = 4,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every image of ``source`` decoded once, as records {"name", "domain", "image" (H, W)}.

    For datasets that fit in memory (a 64x64 float32 luma is 16 KiB): `make_image_pipeline`
    then skips decoding and resizing, and yields the same batches as from ``source`` itself.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    decode = transforms.DecodeImage(image_size=transforms.as_size(image_size), min_size=min_size)

    def one(index: int) -> dict[str, Any]:
        out = decode.map(source[index])
        return {**out, "image": out["image"][..., 0]}

    with ThreadPoolExecutor(max(1, threads)) as pool:
        jobs = pool.map(one, range(len(source)))
        bar = tqdm(jobs, total=len(source), desc="decoding", unit="img", disable=not progress)
        return list(bar)


def _build(
    source: Sequence[dict[str, Any]],
    decode: grain.transforms.Map,
    *,
    what: str,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    drop_remainder: bool,
    process_index: int | None,
    process_count: int | None,
    worker_count: int,
    crop_size: int,
    flip: bool,
    read_threads: int,
) -> grain.IterDataset:
    """shard -> shuffle -> repeat -> ``decode`` -> [crop/flip] -> batch -> prefetch."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} not in [0, {process_count})")

    ds = grain.MapDataset.source(source)
    ds = ds[process_index::process_count]  # disjoint shards that cover the source
    if len(ds) == 0:
        raise ConfigError(
            f"process {process_index} of {process_count} gets no examples from a source of "
            f"{len(source)} {what}"
        )
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(decode)
    if crop_size or flip:
        ds = ds.random_map(transforms.RandomCropFlip(crop_size, flip), seed=seed)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=transforms.stack_batch)
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, read_threads))
    it_ds = ds.to_iter_dataset(read)
    if worker_count > 0:
        _ensure_absl_flags_parsed()  # grain workers read absl flags (unparsed in notebooks)
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it_ds


def _ensure_absl_flags_parsed() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def from_config(
    data: Any,
    *,
    root: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool | None = None,
    token_cache: Any = None,
) -> grain.IterDataset:
    """A pipeline from a `data_config()` section (`root` overrides `data.train_root/root`)."""
    from tokfusion_jax.data import patches, sources

    source = sources.from_preset(
        data.dataset, root or data.get("train_root") or data.root, data.allow_unpaired
    )
    source = patches.from_data_config(source, data)
    return make_pipeline(
        source,
        batch_size=data.batch_size,
        image_size=None if data.get("patch_size", 0) else (data.image_size or None),
        seed=data.seed,
        shuffle=data.shuffle if shuffle is None else shuffle,
        num_epochs=num_epochs,
        keep_color=data.keep_color,
        process_index=process_index,
        process_count=process_count,
        token_cache=token_cache,
        worker_count=data.worker_count,
        crop_size=data.get("crop_size", 0),
        flip=data.get("flip", False),
        min_size=data.get("min_size", 16),
    )
