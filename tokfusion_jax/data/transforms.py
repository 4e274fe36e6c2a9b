"""Per-pair transforms of the grain pipelines, and the tokenizer's input preprocessing.

Resizing is bicubic (Keys, a = -0.5) with antialiasing when reducing, computed in float32 by
PIL's "F" mode: it equals `jax.image.resize(..., "bicubic", antialias=True)` to ~1e-6, so the
host pipeline and the jitted `token_input` preprocess identically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from tokfusion_jax.data import io as imio
from tokfusion_jax.data import sources
from tokfusion_jax.errors import DataError

# Identifies the tokenizer-input preprocessing; the token cache records it.
TOKEN_PREPROCESSING = "y-bt601|bicubic-antialias|clip01|gray-to-rgb"


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic antialiased resize of float32 (H, W) or (H, W, C) to `size` = (h, w)."""
    if image.shape[:2] == tuple(size):
        return image
    if image.ndim == 3:
        return np.stack([resize(image[..., c], size) for c in range(image.shape[-1])], axis=-1)
    pil = Image.fromarray(np.ascontiguousarray(image, np.float32), mode="F")
    return np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BICUBIC), np.float32)


def token_input_np(y: np.ndarray, size: int) -> np.ndarray:
    """Host twin of `token_input`: luma (H, W) -> tokenizer input (size, size, 3) in [0, 1]."""
    r = np.clip(resize(y.astype(np.float32), (size, size)), 0.0, 1.0)
    return np.repeat(r[..., None], 3, axis=-1)


def token_input(images: Any, size: int) -> Any:
    """Tokenizer input from gray images: (B, H, W, 1) -> (B, size, size, 3), jit-friendly.

    Bicubic antialiased resize to the tokenizer's image size, clipped to [0, 1] (bicubic
    overshoots), the gray channel replicated to RGB. The token cache uses the same steps.
    """
    import jax
    import jax.numpy as jnp

    b, h, w, _ = images.shape
    x = images.astype(jnp.float32)
    if (h, w) != (size, size):
        x = jax.image.resize(x, (b, size, size, 1), method="bicubic", antialias=True)
    return jnp.repeat(jnp.clip(x, 0.0, 1.0), 3, axis=-1)


def as_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """256 -> (256, 256); (h, w) stays; None or 0 -> None (native size)."""
    if image_size is None or image_size == 0:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = (int(v) for v in image_size)
    return (h, w)


@dataclasses.dataclass(frozen=True)
class DecodePair(grain.transforms.Map):
    """record {"name", "vis", "ir"} -> {"name", "vis" (H,W,1), "ir" (H,W,1), ...} float32.

    Decodes both images, checks their sizes, takes the BT.601 luma, resizes to `image_size`
    (None keeps the native size; a resize is clipped to [0, 1]) and, with `keep_color`, adds
    each image's chroma ("vis_cbcr", "ir_cbcr": (H, W, 2); 0.5 for gray images). With a
    `token_cache`, adds the cached tokens of both images ("vis_tokens", "ir_tokens": (N, C)).
    A record with "patch": (top, left, size) (`patches.GridPatchSource`) gives that crop of the
    native-size pair (`image_size` must then be None).
    """

    image_size: tuple[int, int] | None = (256, 256)
    keep_color: bool = False
    min_size: int = 16
    token_cache: Any = None  # tokfusion_jax.data.cache.TokenCache

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        name = str(record["name"])
        out: dict[str, Any] = {"name": name}
        patch = record.get("patch")
        if patch is not None and self.image_size is not None:
            raise DataError(f"{name}: grid patches are cut from native-size images (image_size)")
        encoded, hw = {}, {}
        for slot in ("vis", "ir"):
            ref = record[slot]
            label = imio.describe(ref, f"{name} ({slot})")
            encoded[slot] = (imio.read_bytes(ref, label), label)
            hw[slot] = imio.image_size(encoded[slot][0], label)  # header only
            if self.token_cache is not None:
                out[f"{slot}_tokens"] = self.token_cache.lookup_bytes(*encoded[slot])
        sources.check_pair_sizes(
            record["vis"],
            record["ir"],
            hw["vis"],
            hw["ir"],
            self.min_size,
            name=name if isinstance(record["vis"], bytes) else None,
        )
        for slot, (data, label) in encoded.items():
            if self.keep_color:
                y, cbcr = imio.split_luma(imio.decode_image(data, label))
                if self.image_size is not None:
                    y = resize(y, self.image_size)
                    cbcr = np.clip(resize(cbcr, self.image_size), 0.0, 1.0)
                out[f"{slot}_cbcr"] = cbcr  # (H, W, 2)
            else:
                y = imio.decode_luma(data, label, self.image_size)  # fused decode+luma+resize
            if self.image_size is not None:
                y = np.clip(y, 0.0, 1.0)  # bicubic overshoots
            if patch is not None:
                y, out = _crop(y, patch), _crop_cbcr(out, slot, patch)
            out[slot] = y[..., None]  # (H, W, 1)
        return out


def _crop(x: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    top, left, size = patch
    return np.ascontiguousarray(x[top : top + size, left : left + size])


def _crop_cbcr(out: dict[str, Any], slot: str, patch: tuple[int, int, int]) -> dict[str, Any]:
    key = f"{slot}_cbcr"
    if key in out:
        out[key] = _crop(out[key], patch)
    return out


@dataclasses.dataclass(frozen=True)
class DecodeImage(grain.transforms.Map):
    """record {"name", "image", "domain"} -> {"name", "domain", "image" (H, W, 1) float32}.

    The BT.601 luma resized to `image_size` (bicubic, antialiased, clipped to [0, 1]): the
    gray image the fusion model hands the tokenizer (it replicates it to RGB).
    """

    image_size: tuple[int, int] | None = (256, 256)
    min_size: int = 16

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        name = str(record["name"])
        ref = record["image"]
        domain = str(record.get("domain", "image"))
        if isinstance(ref, np.ndarray):  # decoded already (`pipeline.decode_images`)
            return {"name": name, "domain": domain, "image": ref[..., None]}
        label = imio.describe(ref, name)
        data = imio.read_bytes(ref, label)
        h, w = imio.image_size(data, label)
        if min(h, w) < self.min_size:
            raise DataError(
                f"{label}: image {w}x{h} is smaller than the minimum size "
                f"{self.min_size}x{self.min_size}"
            )
        y = imio.decode_luma(data, label, self.image_size)
        if self.image_size is not None:
            y = np.clip(y, 0.0, 1.0)  # bicubic overshoots
        return {"name": name, "domain": domain, "image": y[..., None]}


@dataclasses.dataclass(frozen=True)
class RandomCropFlip(grain.transforms.RandomMap):
    """The same random crop (side `crop_size`, 0 = none) and horizontal flip for every image of
    an element (both images of a pair, or the one of a single-image element)."""

    crop_size: int = 0
    flip: bool = False

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        h, w = element["vis" if "vis" in element else "image"].shape[:2]
        top = left = 0
        ch, cw = h, w
        if self.crop_size:
            if self.crop_size > min(h, w):
                raise DataError(
                    f"{element['name']}: crop_size {self.crop_size} exceeds the image size {w}x{h}"
                )
            ch = cw = self.crop_size
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
        do_flip = self.flip and bool(rng.integers(0, 2))
        out = dict(element)
        for key, value in element.items():
            if isinstance(value, np.ndarray) and value.ndim == 3 and not key.endswith("_tokens"):
                v = value[top : top + ch, left : left + cw]
                out[key] = np.ascontiguousarray(v[:, ::-1] if do_flip else v)
        return out


def stack_batch(elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stacks examples into a batch: arrays gain a leading B axis, names become (B,) str."""
    first = elements[0]
    batch: dict[str, np.ndarray] = {}
    for key in first:
        values = [e[key] for e in elements]
        if key in ("name", "domain"):
            batch[key] = np.asarray(values, dtype=str)
            continue
        shapes = {v.shape for v in values}
        if len(shapes) > 1:
            sizes = ", ".join(f"{e['name']} {e[key].shape[1]}x{e[key].shape[0]}" for e in elements)
            raise DataError(
                f"cannot batch images of different sizes ({sizes}); set image_size to resize "
                "them, or use batch_size=1 for native sizes"
            )
        batch[key] = np.stack(values)
    return batch
