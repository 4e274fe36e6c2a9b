"""Image decoding with one-line errors: 8/16-bit, gray, gray-as-RGB, RGB, RGBA and palette.

Every loader returns float32 in [0, 1]: (H, W) for single-channel files, (H, W, 3) for colour
files (gray stored as RGB stays (H, W, 3); its luma equals the gray value). Alpha is dropped
(the pixels are not composited). Problems with a file raise `DataError` naming the file: missing,
empty, unreadable, corrupt, unsupported, float pixels that are NaN, Inf or outside [0, 1], and
(with `min_size`) sides below the minimum. `save_png` refuses to write non-finite pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from tokfusion_jax import color
from tokfusion_jax.errors import DataError, NonFiniteError

PathLike = Union[str, "os.PathLike[str]"]
ImageRef = Union[str, "os.PathLike[str]", bytes]  # a file path, or the encoded file's bytes

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Files that commonly sit beside images in dataset folders; they are skipped silently.
IGNORED_EXTENSIONS = (
    ".txt", ".md", ".json", ".csv", ".tsv", ".xml", ".yaml", ".yml", ".ini", ".db", ".html",
)  # fmt: skip
_PIL_FORMATS = {"PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF"}
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
# Smallest accepted image side (config.data.min_size's default; what `fuse` and `evaluate`
# accept): SSIM's 11x11 window must fit, rounded up to the model's size multiple of 8.
MIN_IMAGE_SIZE = 16


def is_image_file(name: str) -> bool:
    """Whether a file name has a supported image extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in SUPPORTED_EXTENSIONS


def is_ignored_file(name: str) -> bool:
    """Hidden files and text/metadata files that dataset folders often carry."""
    base = os.path.basename(name)
    return (
        base.startswith(".")
        or base.lower() == "thumbs.db"
        or os.path.splitext(base)[1].lower() in IGNORED_EXTENSIONS
    )


def describe(ref: ImageRef, name: str | None = None) -> str:
    """A label for error messages: the path, or `name` for in-memory bytes."""
    if isinstance(ref, bytes):
        return name or f"<{len(ref)} bytes>"
    return os.fspath(ref)


def read_bytes(ref: ImageRef, name: str | None = None) -> bytes:
    """The encoded bytes of an image reference; a missing or empty file is a `DataError`."""
    if isinstance(ref, bytes):
        data = ref
    else:
        path = os.fspath(ref)
        ext = os.path.splitext(path)[1].lower()
        if ext not in SUPPORTED_EXTENSIONS:
            raise DataError(
                f"{path}: unsupported image format {ext or '(no extension)'!r}; "
                f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
            )
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read image file ({e.strerror or e})") from None
    if not data:
        raise DataError(f"{describe(ref, name)}: zero-byte image file")
    return data


def sha256_of(ref: ImageRef) -> str:
    """Hex sha256 of an image's encoded bytes (the token cache key)."""
    return hashlib.sha256(read_bytes(ref)).hexdigest()


def _open(data: bytes, label: str) -> Image.Image:
    """Opens and fully decodes encoded bytes, mapping every PIL failure to a `DataError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            im.load()
    except UnidentifiedImageError:
        raise DataError(
            f"{label}: not a readable image (corrupt file or unsupported format)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{label}: corrupt or truncated image ({e})") from None
    if fmt not in _PIL_FORMATS:
        raise DataError(f"{label}: unsupported image format {fmt}; supported: PNG, JPEG, BMP, TIFF")
    return im


def _to_float(im: Image.Image, label: str) -> np.ndarray:
    """A decoded PIL image -> float32 [0, 1], (H, W) or (H, W, 3)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        return (np.asarray(im).astype(np.float32) / 65535.0).astype(np.float32)
    if mode == "I":  # 16-bit gray decoded into int32 by some plug-ins
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"{label}: unsupported 32-bit integer image (values beyond 16 bits)")
        return (a.astype(np.float32) / 65535.0).astype(np.float32)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        check_finite(a, label)
        if a.size and (a.min() < 0.0 or a.max() > 1.0):
            raise DataError(f"{label}: unsupported float image with values outside [0, 1]")
        return np.ascontiguousarray(a)
    if mode not in _EIGHT_BIT_MODES:
        raise DataError(f"{label}: unsupported pixel mode {mode!r}")
    if mode in ("1", "LA", "La"):
        im = im.convert("L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA")
    elif mode in ("CMYK", "YCbCr"):
        im = im.convert("RGB")
    a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., :3]  # drop alpha / padding
    return a.astype(np.float32) * np.float32(1.0 / 255.0)


def check_finite(pixels: np.ndarray, label: str) -> None:
    """Raises `DataError` naming `label` and the first bad pixel when `pixels` hold NaN or Inf."""
    bad = ~np.isfinite(pixels)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0][:2])
        raise DataError(
            f"{label}: {int(bad.sum())} non-finite pixel value(s) (NaN or Inf), the first at "
            f"(row, column) {where}"
        )


def check_image_size(hw: tuple[int, int], label: str, min_size: int) -> None:
    """Raises `DataError` when the smaller side of an (H, W) image is below `min_size`."""
    if min(hw) < min_size:
        raise DataError(
            f"{label}: image {hw[1]}x{hw[0]} is smaller than the minimum size {min_size}x{min_size}"
        )


def load_image(ref: ImageRef, name: str | None = None, *, min_size: int = 0) -> np.ndarray:
    """Decodes a path or encoded bytes to float32 in [0, 1]: (H, W) gray or (H, W, 3) colour.

    Raises `DataError` naming the file for a missing, zero-byte, corrupt, truncated or
    unsupported image, for non-finite or out-of-range float pixels and for a side shorter than
    `min_size`.
    """
    label = describe(ref, name)
    image = decode_image(read_bytes(ref, name), label)
    check_image_size(image.shape[:2], label, min_size)
    return image


def decode_image(data: bytes, label: str) -> np.ndarray:
    """Decodes encoded bytes (see `load_image`); `label` names the file in errors."""
    if not data:
        raise DataError(f"{label}: zero-byte image file")
    return _to_float(_open(data, label), label)


def decode_luma(data: bytes, label: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Luma (h, w) float32 in [0, 1] of encoded bytes, optionally resized to `size` = (h, w).

    The fast path of the pipelines: 8-bit images are converted to BT.601 luma and resized
    (bicubic, antialiased) by PIL in float32 ("F" mode), without full-size NumPy copies; the
    result equals `to_luma(decode_image(...))` followed by `transforms.resize` to ~1e-6. Other
    bit depths take the NumPy route.
    """
    if not data:
        raise DataError(f"{label}: zero-byte image file")
    im = _open(data, label)
    if im.mode not in _EIGHT_BIT_MODES:
        y = to_luma(_to_float(im, label))
        if size is None or y.shape == tuple(size):
            return y
        im_f = Image.fromarray(np.ascontiguousarray(y), mode="F")
        return np.asarray(im_f.resize((size[1], size[0]), Image.Resampling.BICUBIC), np.float32)
    if im.mode in ("YCbCr", "PA", "P"):
        im = im.convert("RGB")  # palette / YCbCr: luma of the displayed colours
    f = im.convert("F")  # BT.601 luma, 0..255 (gray modes pass their value)
    if size is not None and (f.height, f.width) != tuple(size):
        f = f.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(f, np.float32) * np.float32(1.0 / 255.0)


def image_size(ref: ImageRef, name: str | None = None) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    label = describe(ref, name)
    if isinstance(ref, bytes):
        source: Any = io.BytesIO(read_bytes(ref, name))
    else:
        path = os.fspath(ref)
        ext = os.path.splitext(path)[1].lower()
        if ext not in SUPPORTED_EXTENSIONS or not os.path.isfile(path) or not os.path.getsize(path):
            read_bytes(ref, name)  # raises the unsupported / missing / zero-byte error
        source = path
    try:
        with Image.open(source) as im:
            w, h = im.size
            fmt = im.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise DataError(
            f"{label}: not a readable image (corrupt file or unsupported format)"
        ) from None
    if fmt not in _PIL_FORMATS:
        raise DataError(f"{label}: unsupported image format {fmt}; supported: PNG, JPEG, BMP, TIFF")
    return h, w


def split_luma(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) or (H, W, 3) float -> Y (H, W) and CbCr (H, W, 2); gray images get CbCr = 0.5."""
    if image.ndim == 2:
        return image, np.full(image.shape + (2,), 0.5, np.float32)
    ycc = color.rgb_to_ycbcr(image)
    return np.ascontiguousarray(ycc[..., 0]), np.ascontiguousarray(ycc[..., 1:])


def to_luma(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) float -> Y (H, W) (BT.601 luma; gray passes through)."""
    if image.ndim == 2:
        return image
    return color.rgb_to_y(image)[..., 0]


def save_png(path: PathLike, image: np.ndarray) -> None:
    """Writes float [0, 1] (H, W), (H, W, 1) or (H, W, 3) as an 8-bit PNG, atomically.

    Non-finite pixels are never written: `NonFiniteError` naming the file, nothing touched.
    """
    a = np.asarray(image, np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    path = os.fspath(path)
    bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
    if bad:
        raise NonFiniteError(
            f"{path}: not written, the image has {bad} non-finite value(s) (NaN or Inf)"
        )
    u8 = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        Image.fromarray(u8).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
