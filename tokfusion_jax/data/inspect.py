"""Summarises a paired dataset and writes a grid of sample pairs.

    python -m tokfusion_jax.data.inspect --dataset=roadscene --root=data/roadscene_test
    python -m tokfusion_jax.data.inspect --dataset=bundle --root=data/MSRS/test --grid=msrs.png

Prints the pair count, the image sizes, pixel modes and file formats of each modality after
checking every pair (headers; float images are decoded to find NaN/Inf pixels), and with
--grid=FILE.png writes a PNG grid of sample pairs (one row per pair: visible/MRI image in colour,
then the infrared or functional image). Without --grid nothing is written.
"""

from __future__ import annotations

import collections
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from tokfusion_jax import paths
from tokfusion_jax.data import io as imio
from tokfusion_jax.data import sources
from tokfusion_jax.errors import ArgumentParser, ConfigError, cli_main

# Pixel modes whose values can be NaN/Inf or out of range: decoded in full to be checked.
_FLOAT_MODES = ("F", "I")


def header(ref: imio.ImageRef, label: str) -> tuple[int, int, str, str]:
    """(height, width, PIL mode, format) from the file header; float images are decoded and
    checked (`DataError` on NaN, Inf or values outside [0, 1])."""
    h, w = imio.image_size(ref, label)
    with Image.open(io.BytesIO(imio.read_bytes(ref, label))) as im:
        mode, fmt = im.mode, str(im.format)
    if mode in _FLOAT_MODES:
        imio.load_image(ref, label)
    return h, w, mode, fmt


def summarize(source: sources.PairedSource, min_size: int = 16) -> list[str]:
    """Report lines: counts, sizes, modes and formats per modality; checks every pair."""
    lines = [
        f"{source.name}: {len(source)} pairs ({source.modalities[0]} + {source.modalities[1]})"
    ]
    sizes: collections.Counter[str] = collections.Counter()
    heights, widths = [], []
    per_slot = {slot: (collections.Counter(), collections.Counter()) for slot in ("vis", "ir")}
    for rec in source:
        hw = {}
        for slot in ("vis", "ir"):
            h, w, mode, fmt = header(rec[slot], imio.describe(rec[slot], rec["name"]))
            hw[slot] = (h, w)
            per_slot[slot][0][mode] += 1
            per_slot[slot][1][fmt] += 1
        sources.check_pair_sizes(rec["vis"], rec["ir"], hw["vis"], hw["ir"], min_size, rec["name"])
        sizes[f"{hw['vis'][1]}x{hw['vis'][0]}"] += 1
        heights.append(hw["vis"][0])
        widths.append(hw["vis"][1])
    common = ", ".join(f"{s} ({n})" for s, n in sizes.most_common(5))
    more = f", ... {len(sizes)} distinct" if len(sizes) > 5 else ""
    lines.append(f"  sizes (width x height): {common}{more}")
    lines.append(
        f"  width {min(widths)}-{max(widths)}, height {min(heights)}-{max(heights)}, "
        f"{sum(h * w for h, w in zip(heights, widths, strict=True)) / len(widths) / 1e6:.2f} MP "
        "per image on average"
    )
    for slot, modality in zip(("vis", "ir"), source.modalities, strict=True):
        modes, fmts = per_slot[slot]
        lines.append(
            f"  {modality:>5}: modes {dict(modes)}, formats {dict(fmts)}, "
            f"folder {source.dirs[0 if slot == 'vis' else 1]}"
        )
    return lines


def sample_grid(source: sources.PairedSource, rows: int = 4, height: int = 160) -> np.ndarray:
    """(rows * height, W, 3) float grid of evenly spaced pairs: [vis in colour | ir]."""
    picks = np.linspace(0, len(source) - 1, min(rows, len(source))).round().astype(int)
    strips = []
    for i in picks:
        rec = source[int(i)]
        tiles = []
        for slot in ("vis", "ir"):
            img = imio.load_image(rec[slot], rec["name"])
            img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img
            h, w = img.shape[:2]
            pil = Image.fromarray(np.round(img * 255).astype(np.uint8))
            tiles.append(np.asarray(pil.resize((max(1, round(w * height / h)), height))) / 255.0)
        strips.append(np.concatenate(tiles, axis=1))
    width = max(s.shape[1] for s in strips)
    return np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0))) for s in strips])


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: prints the summary; writes the grid only with ``--grid``."""
    parser = ArgumentParser(
        prog="python -m tokfusion_jax.data.inspect",
        description="Summarise a paired image-fusion dataset.",
    )
    parser.add_argument("--dataset", default="bundle", help=f"preset: {', '.join(sources.PRESETS)}")
    parser.add_argument("--root", default="", help="dataset folder (or manifest file)")
    parser.add_argument("--grid", default="", help="write a PNG grid of sample pairs here")
    parser.add_argument("--rows", type=int, default=4, help="pairs in the grid")
    parser.add_argument("--min_size", type=int, default=16, help="smallest accepted side")
    parser.add_argument("--allow_unpaired", action="store_true")
    args = parser.parse_args(argv)
    if args.rows < 1:
        raise ConfigError(f"--rows={args.rows}: expected >= 1")
    source = sources.from_preset(args.dataset, args.root, args.allow_unpaired)
    if args.grid:  # checked before the (possibly long) summary
        if os.path.splitext(args.grid)[1].lower() != ".png":
            raise ConfigError(f"{args.grid} (--grid): the grid is a PNG; name a .png file")
        images = [rec[slot] for rec in source for slot in ("vis", "ir")]
        paths.check_roles(paths.labelled("dataset image", images), [("--grid", args.grid)])
        paths.check_output_file(args.grid, "--grid", overwrite=True)
    for line in summarize(source, args.min_size):
        print(line)
    if not args.grid:
        print("  (no sample grid written; pass --grid=FILE.png for one)")
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
    imio.save_png(args.grid, sample_grid(source, args.rows))
    print(f"  sample grid ({min(args.rows, len(source))} pairs): {os.path.abspath(args.grid)}")


if __name__ == "__main__":
    main()
