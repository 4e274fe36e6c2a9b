"""Token cache: the frozen tokenizer's tokens of every image, computed once.

    python -m tokfusion_jax.data.cache --config=configs/ivif.py --out=data/token_cache \\
        --config.tokenizer.path=weights/titok_l32 --config.data.root=data/MSRS/train
    python -m tokfusion_jax.data.cache --dataset=msrs --root=data/MSRS/train \\
        --tokenizer=weights/titok_l32 --out=data/token_cache

The tokens are a pure function of (image bytes, tokenizer, preprocessing): the image's luma,
resized (bicubic, antialiased) to the tokenizer's image size, clipped to [0, 1] and replicated
to RGB (`transforms.token_input`, the same steps as `TokFusion.tokens`). Layout of DIR:

    meta.json                 tokenizer sha256, token shape, preprocessing id, format version
    index.json                image label (absolute path, or "name (slot)") -> image sha256
    tokens/ab/<sha256>.npz    quantized (N, C) f32, continuous (N, C) f32, indices (N,) int32

Every file is written to a temporary name and renamed, so an interrupted run leaves only whole
entries and the next run resumes where it stopped. A cache built with another tokenizer or
preprocessing, and an image whose bytes changed, are refused with a `DataError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tokfusion_jax import paths
from tokfusion_jax.data import io as imio
from tokfusion_jax.data import transforms
from tokfusion_jax.errors import ConfigError, DataError

CACHE_FORMAT = 1
META_FILE = "meta.json"
INDEX_FILE = "index.json"
TOKEN_SOURCES = ("quantized", "continuous", "normalized")
_TMP_PREFIX = ".tmp-"


def _atomic_write(path: str, payload: bytes) -> None:
    """Writes `payload` to `path` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _index_key(label: str) -> str:
    """Index key of an image label: absolute path for files, the label itself for bytes."""
    return os.path.abspath(label) if os.path.isfile(label) else label


def _l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norm = np.sqrt(np.sum(np.square(x, dtype=np.float32), axis=-1, keepdims=True))
    return (x / np.maximum(norm, eps)).astype(np.float32)


class TokenCache:
    """Read access to a token cache built for one tokenizer.

    Args:
      directory: the cache folder.
      tokenizer_sha256: `Tokenizer.sha256` of the tokenizer in use; a cache built with another
        one is refused.
      source: which tokens `lookup` returns: "quantized" (default), "continuous" or
        "normalized" (the l2-normalised continuous latent), as `model.tokens.source`.
    """

    def __init__(self, directory: str, tokenizer_sha256: str, *, source: str = "quantized"):
        self.directory = os.fspath(directory)
        if source not in TOKEN_SOURCES:
            raise ConfigError(f"token source {source!r} not in {', '.join(TOKEN_SOURCES)}")
        self.source = source
        self.tokenizer_sha256 = tokenizer_sha256
        self.meta = read_meta(self.directory)
        check_meta(self.directory, self.meta, tokenizer_sha256)
        self.token_shape = tuple(self.meta["token_shape"])  # (N, C)

    def entry_path(self, image_sha256: str) -> str:
        return entry_path(self.directory, image_sha256)

    def __contains__(self, image_sha256: str) -> bool:
        return os.path.isfile(self.entry_path(image_sha256))

    def load_entry(self, image_sha256: str, label: str) -> dict[str, np.ndarray]:
        """All arrays cached for an image; a `DataError` names the image when absent/stale."""
        path = self.entry_path(image_sha256)
        if not os.path.isfile(path):
            raise DataError(self._missing_message(image_sha256, label))
        try:
            with np.load(path) as npz:
                entry = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: corrupt token cache entry for {label} ({e})") from None
        shape = entry["quantized"].shape if "quantized" in entry else None
        if shape != self.token_shape:
            raise DataError(f"{path}: token shape {shape} != {self.token_shape} in {META_FILE}")
        return entry

    def lookup(self, image_sha256: str, label: str) -> np.ndarray:
        """Tokens (N, C) float32 of the image with this sha256 (`label` names it in errors)."""
        entry = self.load_entry(image_sha256, label)
        if self.source == "normalized":
            return _l2_normalize(entry["continuous"])
        return entry[self.source].astype(np.float32)

    def lookup_bytes(self, data: bytes, label: str) -> np.ndarray:
        """Tokens (N, C) of an image given its encoded bytes."""
        return self.lookup(hashlib.sha256(data).hexdigest(), label)

    def _missing_message(self, image_sha256: str, label: str) -> str:
        index = read_index(self.directory)
        old = index.get(_index_key(label))
        if old is not None and old != image_sha256:
            why = (
                f"the image changed since the cache was built (sha256 {image_sha256[:12]}..., "
                f"cached {old[:12]}...); the cache is stale"
            )
        else:
            why = f"no tokens cached for this image (sha256 {image_sha256[:12]}...)"
        rebuild = f"python -m tokfusion_jax.data.cache --out={self.directory}"
        return f"{label}: {why}; rebuild with {rebuild}"


def entry_path(directory: str, image_sha256: str) -> str:
    return os.path.join(directory, "tokens", image_sha256[:2], f"{image_sha256}.npz")


def read_meta(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, META_FILE)
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: token cache folder not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"{directory}: not a token cache ({META_FILE} missing); build it with "
            "python -m tokfusion_jax.data.cache"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable token cache metadata ({e})") from None


def check_meta(directory: str, meta: dict[str, Any], tokenizer_sha256: str) -> None:
    """Refuses a cache of another format, tokenizer or preprocessing."""
    if meta.get("format") != CACHE_FORMAT:
        raise DataError(
            f"{directory}: token cache format {meta.get('format')!r}, expected {CACHE_FORMAT}"
        )
    cached = meta.get("tokenizer_sha256", "")
    if cached != tokenizer_sha256:
        raise DataError(
            f"{directory}: token cache built with tokenizer sha256 {cached[:12]}..., but the "
            f"tokenizer in use has {tokenizer_sha256[:12]}...; the cache is stale for it, "
            "rebuild it into another folder"
        )
    if meta.get("preprocessing") != transforms.TOKEN_PREPROCESSING:
        raise DataError(
            f"{directory}: token cache preprocessing {meta.get('preprocessing')!r} differs from "
            f"{transforms.TOKEN_PREPROCESSING!r}; rebuild it"
        )


def read_index(directory: str) -> dict[str, str]:
    try:
        with open(os.path.join(directory, INDEX_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@dataclasses.dataclass
class BuildStats:
    """What `build_cache` did: distinct images seen, newly encoded, already cached."""

    images: int = 0
    encoded: int = 0
    reused: int = 0


def _image_refs(sources: Iterable[Sequence[dict[str, Any]]]) -> list[tuple[str, imio.ImageRef]]:
    """(label, ref) of every image of every source, both slots."""
    refs = []
    for source in sources:
        for record in source:
            for slot in ("vis", "ir"):
                ref = record[slot]
                refs.append((imio.describe(ref, f"{record['name']} ({slot})"), ref))
    return refs


def build_cache(
    directory: str,
    tokenizer: Any,
    sources: Iterable[Sequence[dict[str, Any]]],
    *,
    batch_size: int = 32,
    dtype: Any = "float32",
    min_size: int = 0,
    progress: bool = True,
) -> BuildStats:
    """Encodes every image of `sources` not yet in the cache at `directory`.

    The batch is sharded over all local devices (a 1D `data` mesh), the tokenizer replicated.
    Creates the folder and its metadata on first use; refuses a folder built for another
    tokenizer. Safe to interrupt and rerun: finished entries are kept and skipped.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from tqdm import tqdm

    from tokfusion_jax.models import titok

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    size = int(tokenizer.config.image_size)
    token_shape = [int(tokenizer.config.num_tokens), int(tokenizer.config.token_size)]
    _prepare_folder(directory, tokenizer.sha256, size, token_shape)

    index = read_index(directory)
    todo: dict[str, tuple[str, imio.ImageRef]] = {}  # sha -> (label, ref)
    stats = BuildStats()
    seen: set[str] = set()
    for label, ref in tqdm(_image_refs(sources), desc="hashing", disable=not progress):
        sha = imio.sha256_of(ref)
        index[_index_key(label)] = sha
        if sha in seen:
            continue
        seen.add(sha)
        if os.path.isfile(entry_path(directory, sha)):
            stats.reused += 1
        else:
            todo[sha] = (label, ref)
    stats.images = len(seen)
    _atomic_write(os.path.join(directory, INDEX_FILE), json.dumps(index, indent=0).encode())

    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    tok = jax.device_put(tokenizer, NamedSharding(mesh, PartitionSpec()))
    step = -(-batch_size // len(devices)) * len(devices)  # a multiple of the device count
    items = list(todo.items())
    bar = tqdm(total=len(items), desc="encoding", unit="img", disable=not progress)
    for start in range(0, len(items), step):
        chunk = items[start : start + step]
        images = [_token_input(ref, label, size, min_size) for _, (label, ref) in chunk]
        images += [images[-1]] * (step - len(chunk))  # pad to a full, evenly sharded batch
        x = jax.device_put(np.stack(images), data_sharding)  # (step, S, S, 3)
        out = titok.encode(tok, x, dtype=jnp.dtype(dtype))
        quantized, continuous, indices = jax.device_get(
            (out.quantized, out.continuous, out.indices)
        )
        for i, (sha, _) in enumerate(chunk):
            buf = io.BytesIO()
            np.savez(
                buf,
                quantized=np.asarray(quantized[i], np.float32),
                continuous=np.asarray(continuous[i], np.float32),
                indices=np.asarray(indices[i], np.int32),
            )
            path = entry_path(directory, sha)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _atomic_write(path, buf.getvalue())
        stats.encoded += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return stats


def _token_input(ref: imio.ImageRef, label: str, size: int, min_size: int) -> np.ndarray:
    """Tokenizer input (S, S, 3) of one image file."""
    image = imio.load_image(ref, label, min_size=min_size)
    return transforms.token_input_np(imio.to_luma(image), size)


def _prepare_folder(directory: str, tokenizer_sha256: str, size: int, shape: list[int]) -> None:
    """Creates the cache folder and meta.json, or checks that an existing one matches."""
    meta = {
        "format": CACHE_FORMAT,
        "tokenizer_sha256": tokenizer_sha256,
        "tokenizer_image_size": size,
        "token_shape": shape,
        "preprocessing": transforms.TOKEN_PREPROCESSING,
    }
    if not tokenizer_sha256:
        raise ConfigError("the tokenizer has no sha256; load it with titok.load or titok.create")
    if os.path.exists(os.path.join(directory, META_FILE)):
        old = read_meta(directory)
        check_meta(directory, old, tokenizer_sha256)
        if old.get("token_shape") != shape:
            raise DataError(f"{directory}: cached token shape {old.get('token_shape')} != {shape}")
        return
    if os.path.isdir(directory) and any(
        not n.startswith(_TMP_PREFIX) for n in os.listdir(directory)
    ):
        raise DataError(f"{directory}: folder exists, is not empty and is not a token cache")
    os.makedirs(os.path.join(directory, "tokens"), exist_ok=True)
    _atomic_write(os.path.join(directory, META_FILE), json.dumps(meta, indent=1).encode())


# ----------------------------------------------------------------------------------- CLI


def _sources_from_config(config: Any, allow_unpaired: bool) -> list[Any]:
    from tokfusion_jax.data import sources

    data = config.data
    roots = []
    train_root = data.get("train_root") or data.get("root")
    if train_root:
        roots.append((data.dataset, train_root))
    val = config.get("val")
    if data.get("val_root"):  # the validation folder has its own preset (config.val.dataset)
        val_dataset = (val.get("dataset") if val is not None else "") or data.dataset
        roots.append((val_dataset, data.val_root))
    if val is not None and val.get("dataset") and val.get("root"):
        roots.append((val.dataset, val.root))
    if not roots and data.dataset == "samples":
        roots.append(("samples", ""))
    if not roots:
        raise ConfigError("config.data.root (or train_root / val_root) is not set")
    return [sources.from_preset(name, root, allow_unpaired) for name, root in roots]


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from tokfusion_jax.data import sources
    from tokfusion_jax.models import titok

    FLAGS = flags.FLAGS
    config = FLAGS.config
    tokenizer_path = FLAGS.tokenizer or (config.tokenizer.path if config is not None else "")
    if not tokenizer_path:
        raise ConfigError("no tokenizer: pass --tokenizer=DIR or set config.tokenizer.path")
    if not FLAGS.out:
        raise ConfigError("--out=DIR is required")
    paths.check_output_folder(FLAGS.out, "--out")
    if FLAGS.batch_size < 1:
        raise ConfigError(f"--batch_size={FLAGS.batch_size}: expected >= 1")
    allow_unpaired = FLAGS.allow_unpaired or bool(
        config is not None and config.data.get("allow_unpaired")
    )
    if FLAGS.root:
        srcs = [sources.from_preset(FLAGS.dataset, r, allow_unpaired) for r in FLAGS.root]
    elif config is not None:
        srcs = _sources_from_config(config, allow_unpaired)
    elif FLAGS.dataset == "samples":
        srcs = [sources.from_preset("samples", "")]
    else:
        raise ConfigError("pass --config=FILE, or --dataset and --root")
    tok = titok.load(tokenizer_path)
    min_size = int(config.data.get("min_size", 0)) if config is not None else FLAGS.min_size
    stats = build_cache(
        FLAGS.out, tok, srcs, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype, min_size=min_size
    )
    print(
        f"token cache {FLAGS.out}: {stats.images} images, {stats.encoded} encoded, "
        f"{stats.reused} already cached (tokenizer {tok.sha256[:12]}...)"
    )


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "training config file (uses config.data)")
    flags.DEFINE_string("out", "", "cache folder to create or resume")
    flags.DEFINE_string("dataset", "bundle", "dataset preset (without --config)")
    flags.DEFINE_multi_string("root", [], "dataset root(s) (without --config); repeatable")
    flags.DEFINE_string("tokenizer", "", "converted TiTok folder (overrides config.tokenizer.path)")
    flags.DEFINE_integer("batch_size", 32, "images per encode call (over all devices)")
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16", "float16"], "compute dtype of the tokenizer"
    )
    flags.DEFINE_integer("min_size", 16, "smallest accepted image side (without --config)")
    flags.DEFINE_bool("allow_unpaired", False, "skip files present in one modality folder only")


if __name__ == "__main__":
    from tokfusion_jax.errors import run_absl

    _define_flags()
    run_absl(main)
