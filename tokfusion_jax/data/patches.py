"""CDDFuse's training patches: square crops on a regular grid, minus the low-contrast ones.

CDDFuse (its dataprocessing.py) cuts 128 x 128 patches out of every native-size training pair
with stride 200: top-left corners at rows 0, 200, ... <= H - 128 and columns 0, 200, ... <=
W - 128, row-major (a 480 x 640 MSRS pair gives 6). A patch pair is dropped when *either*
modality's patch is low-contrast, ``(P90 - P10) / P90 < 0.1`` over its luma in [0, 1] (NumPy's
linear percentiles). A patch whose P90 is 0 gives 0 / 0 = NaN, which is not below the threshold:
CDDFuse keeps such all-black patches, and so does this module. Each kept patch pair is one
training example; an epoch is one pass over all of them.

    source = GridPatchSource(sources.from_preset("msrs", root), size=128, stride=200)
    source[i]   # the pair's record plus "patch": (top, left, size); DecodePair crops it

`from_data_config` wraps a source when ``config.data.patch_size`` is set.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from tokfusion_jax.errors import ConfigError, DataError

LOW_CONTRAST_PERCENTILES = (10, 90)


def grid_corners(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (row-major) of the ``size`` patches on a ``stride`` grid that fit."""
    rows = range(0, height - size + 1, stride)
    cols = range(0, width - size + 1, stride)
    return [(top, left) for top in rows for left in cols]


def is_low_contrast(patch: np.ndarray, threshold: float = 0.1) -> bool:
    """CDDFuse's filter: (P90 - P10) / P90 < threshold (NaN for an all-zero patch: False)."""
    lo, hi = np.percentile(patch, LOW_CONTRAST_PERCENTILES)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (hi - lo) / hi
    return bool(ratio < threshold)


def pair_patches(
    vis: np.ndarray, ir: np.ndarray, size: int, stride: int, min_contrast: float
) -> list[tuple[int, int]]:
    """Corners of the grid patches of one pair (luma (H, W) each) that pass the filter."""
    kept = []
    for top, left in grid_corners(*vis.shape[:2], size, stride):
        window = (slice(top, top + size), slice(left, left + size))
        if min_contrast > 0 and (
            is_low_contrast(vis[window], min_contrast) or is_low_contrast(ir[window], min_contrast)
        ):
            continue
        kept.append((top, left))
    return kept


class GridPatchSource(Sequence):
    """A paired source whose examples are the kept grid patches of every pair.

    The pairs are decoded once here (luma at native size, ``threads`` in parallel) to apply the
    filter; examples are the pair's record with ``"patch": (top, left, size)`` and the name
    ``"<pair>@<top>,<left>"``. Other attributes (``color_from``, ``is_medical``...) are the
    wrapped source's.
    """

    def __init__(
        self,
        source: Sequence[dict[str, Any]],
        size: int,
        stride: int,
        min_contrast: float = 0.1,
        *,
        threads: int = 4,
        progress: bool = True,
    ) -> None:
        if size < 1 or stride < 1:
            raise ConfigError(f"patches: size {size} and stride {stride} must be >= 1")
        self.source, self.size, self.stride, self.min_contrast = source, size, stride, min_contrast
        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            per_pair = list(
                tqdm(
                    pool.map(self._scan, range(len(source))),
                    total=len(source),
                    desc=f"patches {size}/{stride}",
                    unit="pair",
                    disable=not progress,
                )
            )
        self.index = [
            (i, top, left) for i, (_, corners) in enumerate(per_pair) for top, left in corners
        ]
        self.num_grid_patches = sum(len(grid_corners(h, w, size, stride)) for (h, w), _ in per_pair)
        if not self.index:
            raise DataError(
                f"no {size}x{size} patch survives the low-contrast filter (< {min_contrast}) in "
                f"{len(source)} pairs"
            )

    def _decode(self, i: int) -> dict[str, Any]:
        from tokfusion_jax.data.transforms import DecodePair

        return DecodePair(image_size=None, min_size=1).map(self.source[i])

    def _scan(self, i: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """(luma shape, kept corners) of pair ``i``."""
        pair = self._decode(i)
        vis, ir = pair["vis"][..., 0], pair["ir"][..., 0]
        if min(vis.shape) < self.size:
            raise DataError(
                f"{pair['name']}: {vis.shape[1]}x{vis.shape[0]} is smaller than the "
                f"{self.size}x{self.size} training patches (data.patch_size)"
            )
        return vis.shape, pair_patches(vis, ir, self.size, self.stride, self.min_contrast)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, top, left = self.index[k]
        record = dict(self.source[i])
        record["name"] = f"{record['name']}@{top},{left}"
        record["patch"] = (top, left, self.size)
        return record

    def __getattr__(self, name: str) -> Any:
        if name == "source":  # not set yet (during __init__ errors)
            raise AttributeError(name)
        return getattr(self.source, name)

    def describe(self) -> str:
        """One line: how many patches were kept out of how many pairs."""
        return (
            f"{len(self)} of {self.num_grid_patches} {self.size}x{self.size} grid patches "
            f"(stride {self.stride}, low-contrast < {self.min_contrast} dropped) from "
            f"{len(self.source)} pairs"
        )


def from_data_config(source: Sequence[dict[str, Any]], data: Any, **kwargs: Any) -> Any:
    """``source``, or its `GridPatchSource` when ``data.patch_size`` is set."""
    size = int(data.get("patch_size", 0) or 0)
    if not size:
        return source
    return GridPatchSource(
        source,
        size,
        int(data.get("patch_stride", size)),
        float(data.get("patch_min_contrast", 0.1)),
        **kwargs,
    )
