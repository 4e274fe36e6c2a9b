"""Fuse image pairs with a trained export: one pair or two folders, any size, batched.

    python -m tokfusion_jax.fuse --workdir=RUN --vis=vis.png --ir=ir.png --out=fused.png
    python -m tokfusion_jax.fuse --workdir=RUN --vis_dir=VIS --ir_dir=IR --out_dir=OUT

Pairs are matched by file stem. The network fuses the luma (BT.601 Y) of the two images at their
native size; the output is saved the way the reference implementations save it: min-max
stretched to [0, 1] and rounded to 8 bits. When the visible image has colour (or, for medical
pairs, the functional image does: `--color_from=ir`), its Cb/Cr are put back on the fused luma
(`--nocolor` saves gray). Same-size pairs are fused in batches of `--batch_size`. Existing outputs
are never overwritten without `--overwrite` (folders: they are skipped and counted), and no output
may be one of the inputs, even with `--overwrite`. Every pair is checked (readable, same size, at
least 16 pixels a side) before the first is fused; a non-finite model output is never saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from tokfusion_jax import color, paths
from tokfusion_jax.data import io as imio
from tokfusion_jax.data.sources import check_pair_sizes, list_images, natural_key
from tokfusion_jax.errors import ArgumentParser, DataError, NonFiniteError, TokFusionError, cli_main

FuseFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (B,H,W) vis, ir in [0,1] -> (B,H,W)


@dataclasses.dataclass(frozen=True)
class PairPaths:
    """One pair to fuse and where its output goes."""

    name: str
    vis: str
    ir: str
    out: str


@dataclasses.dataclass
class LoadedPair:
    """Decoded luma planes (H, W) in [0, 1] and the chroma to restore, if any (H, W, 2)."""

    vis_y: np.ndarray
    ir_y: np.ndarray
    cbcr: np.ndarray | None


def stretch_to_unit(x: np.ndarray) -> np.ndarray:
    """Min-max stretch of one image to [0, 1] (the references' saving); constant images clip."""
    x = np.asarray(x, np.float32)
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 1e-12:
        return np.clip(x, 0.0, 1.0)
    return (x - lo) / (hi - lo)


def to_uint8(x01: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 by round(x * 255), clipped."""
    return np.round(np.clip(np.asarray(x01, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def finish_fused(y: np.ndarray, cbcr: np.ndarray | None, stretch: bool = True) -> np.ndarray:
    """Fused luma (H, W) in [0, 1] -> the image to save: (H, W) gray or (H, W, 3) RGB in [0, 1]."""
    y = stretch_to_unit(y) if stretch else np.clip(np.asarray(y, np.float32), 0.0, 1.0)
    if cbcr is None:
        return y
    return np.asarray(color.merge_y_cbcr(y[..., None], cbcr), np.float32)


def load_pair(
    vis: str,
    ir: str,
    color_from: str = "vis",
    keep_color: bool = True,
    min_size: int = imio.MIN_IMAGE_SIZE,
) -> LoadedPair:
    """Decodes a pair (errors name the file); sizes must agree and be at least `min_size`."""
    vis_img = imio.load_image(vis, min_size=min_size)
    ir_img = imio.load_image(ir, min_size=min_size)
    if vis_img.shape[:2] != ir_img.shape[:2]:
        (hv, wv), (hi, wi) = vis_img.shape[:2], ir_img.shape[:2]
        raise DataError(
            f"pair sizes differ: {vis} is {wv}x{hv}, {ir} is {wi}x{hi} (width x height)"
        )
    vis_y, vis_cbcr = imio.split_luma(vis_img)
    ir_y, ir_cbcr = imio.split_luma(ir_img)
    source_img, source_cbcr = (vis_img, vis_cbcr) if color_from == "vis" else (ir_img, ir_cbcr)
    has_color = source_img.ndim == 3 and not color.is_gray(source_img)
    return LoadedPair(vis_y, ir_y, source_cbcr if (keep_color and has_color) else None)


def group_same_size(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by image size, in chunks of at most `batch_size` (order kept within)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(sizes):
        by_size.setdefault(tuple(hw), []).append(i)
    chunks = []
    for idx in by_size.values():
        chunks += [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]
    return chunks


def fuse_padded(
    fuse_fn: FuseFn, vis: np.ndarray, ir: np.ndarray, labels: Sequence[str] | None = None
) -> np.ndarray:
    """Calls `fuse_fn` on a batch padded (by repeating its last pair) to a power of two.

    (B, H, W) -> (B, H, W). Partial batches then reuse a few compiled shapes instead of one
    compile per leftover count. A non-finite output raises `NonFiniteError` naming the pair
    (`labels`, one per pair), so that it is never saved or scored.
    """
    n = vis.shape[0]
    padded = 1 << (n - 1).bit_length()
    if padded != n:
        vis = np.concatenate([vis, np.repeat(vis[-1:], padded - n, axis=0)])
        ir = np.concatenate([ir, np.repeat(ir[-1:], padded - n, axis=0)])
    fused = np.asarray(fuse_fn(vis, ir)).reshape(vis.shape)[:n]
    finite = np.isfinite(fused).reshape(n, -1).all(axis=1)
    if not finite.all():
        bad = [labels[i] if labels else f"pair {i} of the batch" for i in np.flatnonzero(~finite)]
        more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
        raise NonFiniteError(
            f"{bad[0]}: the model's output is not finite (NaN or Inf){more}; nothing was "
            "saved for it (check the export's weights)"
        )
    return fused


def _list_images(folder: str, what: str) -> dict[str, str]:
    """Stem -> path of the images in `folder` (pairing rules of `sources.list_images`)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: {what} folder not found")
    return {stem: os.path.join(folder, name) for stem, name in list_images(folder).items()}


def pair_folders(vis_dir: str, ir_dir: str, out_dir: str) -> list[PairPaths]:
    """Pairs two folders by stem; a file without a partner is a `DataError` naming it."""
    vis, ir = _list_images(vis_dir, "visible"), _list_images(ir_dir, "infrared")
    unpaired = [vis[s] for s in vis if s not in ir] + [ir[s] for s in ir if s not in vis]
    if unpaired:
        more = f" (and {len(unpaired) - 1} more)" if len(unpaired) > 1 else ""
        raise DataError(f"{unpaired[0]}: no partner with the same name in the other folder{more}")
    if not vis:
        raise DataError(f"{vis_dir}: no images to fuse")
    return [
        PairPaths(s, vis[s], ir[s], os.path.join(out_dir, s + ".png"))
        for s in sorted(vis, key=natural_key)
    ]


def fuse_pairs(
    fuse_fn: FuseFn,
    pairs: Sequence[PairPaths],
    *,
    batch_size: int = 8,
    keep_color: bool = True,
    color_from: str = "vis",
    overwrite: bool = False,
    progress: bool = True,
    min_size: int = imio.MIN_IMAGE_SIZE,
) -> dict[str, int]:
    """Fuses and saves `pairs`, same-size pairs batched. Returns {"fused": n, "skipped": n}.

    Before fusing anything: no output may be an input, every pair's header must be readable,
    its sizes equal and at least `min_size`.
    """
    paths.check_roles(
        inputs=[(f"pair {p.name}", f) for p in pairs for f in (p.vis, p.ir)],
        outputs=[(f"output of pair {p.name}", p.out) for p in pairs],
    )
    todo = [p for p in pairs if overwrite or not os.path.exists(p.out)]
    skipped = len(pairs) - len(todo)
    sizes = []
    for p in todo:
        if os.path.isdir(p.out):
            raise DataError(f"{p.out}: output of pair {p.name} is a folder")
        hw_vis, hw_ir = imio.image_size(p.vis), imio.image_size(p.ir)
        sizes.append(check_pair_sizes(p.vis, p.ir, hw_vis, hw_ir, min_size))
    bar = tqdm(total=len(todo), desc="fuse", unit="pair", disable=not progress)
    for chunk in group_same_size(sizes, batch_size):
        loaded = [
            load_pair(todo[i].vis, todo[i].ir, color_from, keep_color, min_size) for i in chunk
        ]
        vis = np.stack([lp.vis_y for lp in loaded])  # (B, H, W)
        ir = np.stack([lp.ir_y for lp in loaded])
        fused = fuse_padded(fuse_fn, vis, ir, [f"{todo[i].vis} + {todo[i].ir}" for i in chunk])
        for i, lp, y in zip(chunk, loaded, fused, strict=True):
            out = todo[i].out
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            imio.save_png(out, finish_fused(y, lp.cbcr))
        bar.update(len(chunk))
    bar.close()
    return {"fused": len(todo), "skipped": skipped}


def export_fuse_fn(workdir: str, tokenizer: str | None = None) -> FuseFn:
    """The export's `fuse` as a (B, H, W) -> (B, H, W) function (CheckpointError if missing)."""
    from tokfusion_jax import export

    exp = export.load_export(workdir, tokenizer_path=tokenizer)

    def fuse(vis: np.ndarray, ir: np.ndarray) -> np.ndarray:
        return exp.fuse(vis, ir)[..., 0]

    return fuse


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tokfusion_jax.fuse", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir or its export/ folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: as recorded)")
    p.add_argument("--vis", help="visible (or MRI) image of one pair")
    p.add_argument("--ir", help="infrared (or CT/PET/SPECT) image of one pair")
    p.add_argument("--out", help="output PNG for one pair")
    p.add_argument("--vis_dir", help="folder of visible images (paired with --ir_dir by stem)")
    p.add_argument("--ir_dir", help="folder of infrared images")
    p.add_argument("--out_dir", help="output folder (<stem>.png per pair)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument(
        "--color",
        dest="color",
        action="store_true",
        default=True,
        help="restore Cb/Cr from the colour source (the default)",
    )
    p.add_argument("--nocolor", dest="color", action="store_false", help="save gray")

    p.add_argument(
        "--color_from",
        choices=("vis", "ir"),
        default="vis",
        help="which image carries colour: vis (IVIF) or ir (PET/SPECT)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no_progress", action="store_true")
    return p


def _check_args(args: argparse.Namespace) -> list[PairPaths]:
    single = [args.vis, args.ir, args.out]
    folders = [args.vis_dir, args.ir_dir, args.out_dir]
    if any(single) and any(folders):
        raise TokFusionError("give either --vis/--ir/--out or --vis_dir/--ir_dir/--out_dir")
    if args.batch_size < 1:
        raise TokFusionError(f"--batch_size={args.batch_size}: expected >= 1")
    if any(single):
        if not all(single):
            raise TokFusionError("one pair needs all of --vis, --ir and --out")
        for flag, path in (("--vis", args.vis), ("--ir", args.ir)):
            if os.path.isdir(path):
                raise DataError(f"{path} ({flag}) is a folder; for folders use --vis_dir/--ir_dir")
            if not os.path.isfile(path):
                raise DataError(f"{path}: file not found")
        paths.check_roles([("--vis", args.vis), ("--ir", args.ir)], [("--out", args.out)])
        if os.path.splitext(args.out)[1].lower() != ".png":
            raise DataError(f"{args.out} (--out): fused images are saved as PNG; name a .png file")
        paths.check_output_file(args.out, "--out", overwrite=args.overwrite)
        name = os.path.splitext(os.path.basename(args.out))[0]
        return [PairPaths(name, args.vis, args.ir, args.out)]
    if not all(folders):
        raise TokFusionError("folders need all of --vis_dir, --ir_dir and --out_dir")
    if paths.same_path(args.vis_dir, args.ir_dir):
        raise DataError(f"--vis_dir and --ir_dir are the same folder ({args.vis_dir})")
    paths.check_roles(
        [("--vis_dir", args.vis_dir), ("--ir_dir", args.ir_dir)], [("--out_dir", args.out_dir)]
    )
    paths.check_output_folder(args.out_dir, "--out_dir")
    return pair_folders(args.vis_dir, args.ir_dir, args.out_dir)


@cli_main
def main(argv: Iterable[str] | None = None) -> dict[str, int]:
    """CLI entry point; returns the counts it printed."""
    args = _parser().parse_args(None if argv is None else list(argv))
    pairs = _check_args(args)
    fuse_fn = export_fuse_fn(args.workdir, args.tokenizer)
    counts = fuse_pairs(
        fuse_fn,
        pairs,
        batch_size=args.batch_size,
        keep_color=args.color,
        color_from=args.color_from,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    where = args.out or args.out_dir
    note = f", {counts['skipped']} existing output(s) kept" if counts["skipped"] else ""
    print(f"fused {counts['fused']} pair(s) into {where}{note}", file=sys.stderr)
    return counts


if __name__ == "__main__":
    main()
