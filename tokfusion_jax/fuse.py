"""Fuse image pairs with a trained export: one pair or two folders, any size, batched.

    python -m tokfusion_jax.fuse --workdir=RUN --vis=vis.png --ir=ir.png --out=fused.png
    python -m tokfusion_jax.fuse --workdir=RUN --vis_dir=VIS --ir_dir=IR --out_dir=OUT

Pairs are matched by file stem. The network fuses the luma (BT.601 Y) of the two images at their
native size; the output is finished and saved as the export's source method does it at test time
(recorded in its export.json): trained TokFusion exports and converted CDDFuse checkpoints
(``python -m convert cddfuse``) are min-max stretched to [0, 1] per image, as CDDFuse's test
scripts do, and rounded to 8 bits; CDDFuse exports also get the luma rounded to 8 bits first, as
its OpenCV reader gives it. When the visible image has colour (or, for medical pairs, the
functional image does: `--color_from=ir`), its Cb/Cr are put back on the fused luma (`--nocolor`
saves gray). Existing outputs are never overwritten without `--overwrite` (folders: they are
skipped and counted), and no output may be one of the inputs, even with `--overwrite`. Every pair
is checked (readable, same size, at least 16 pixels a side) before the first is fused; a
non-finite model output is never saved.

Batches: same-size pairs are fused together, at most `--batch_size` (default 8) at a time, and
only as many as fit in memory: for each image size the batch is chosen from the free memory
(CPU: /proc/meminfo `MemAvailable` and the cgroup limit; GPU: the device's free bytes) and the
need XLA's memory analysis gives for the compiled fuse at batch 1 and 2 (`tokfusion_jax.memory`).
If a batch still runs out of memory, it is split in halves and retried, down to one pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from tokfusion_jax import color, memory, paths
from tokfusion_jax.data import io as imio
from tokfusion_jax.data.sources import check_pair_sizes, list_images, natural_key
from tokfusion_jax.errors import ArgumentParser, DataError, NonFiniteError, TokFusionError, cli_main

FuseFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (B,H,W) vis, ir in [0,1] -> (B,H,W)
BatchPlanner = Callable[[int, int, int], int]  # (H, W, upper bound) -> batch size to use


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
    """Fused luma (H, W) in [0, 1] -> the image to save: (H, W) gray or (H, W, 3) RGB in [0, 1].

    ``stretch``: min-max stretch the luma first (the "minmax" postprocess); else clip it.
    """
    y = stretch_to_unit(y) if stretch else np.clip(np.asarray(y, np.float32), 0.0, 1.0)
    if cbcr is None:
        return y
    return np.asarray(color.merge_y_cbcr(y[..., None], cbcr), np.float32)


def load_pair(
    vis: str,
    ir: str,
    color_from: str = "vis",
    keep_color: bool = True,
    round_luma: bool = False,
    min_size: int = imio.MIN_IMAGE_SIZE,
) -> LoadedPair:
    """Decodes a pair (errors name the file); sizes must agree and be at least `min_size`.

    ``round_luma``: the luma planes are rounded to 8 bits as CDDFuse's OpenCV reader gives them
    (`color.gray_u8_opencv`); the chroma is kept unrounded.
    """
    vis_img = imio.load_image(vis, min_size=min_size)
    ir_img = imio.load_image(ir, min_size=min_size)
    if vis_img.shape[:2] != ir_img.shape[:2]:
        (hv, wv), (hi, wi) = vis_img.shape[:2], ir_img.shape[:2]
        raise DataError(
            f"pair sizes differ: {vis} is {wv}x{hv}, {ir} is {wi}x{hi} (width x height)"
        )
    vis_y, vis_cbcr = imio.split_luma(vis_img)
    ir_y, ir_cbcr = imio.split_luma(ir_img)
    if round_luma:
        vis_y, ir_y = _rounded_luma(vis_img), _rounded_luma(ir_img)
    source_img, source_cbcr = (vis_img, vis_cbcr) if color_from == "vis" else (ir_img, ir_cbcr)
    has_color = source_img.ndim == 3 and not color.is_gray(source_img)
    return LoadedPair(vis_y, ir_y, source_cbcr if (keep_color and has_color) else None)


def _rounded_luma(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) floats in [0, 1] -> 8-bit luma / 255 (H, W) float32."""
    levels = np.round(np.asarray(image, np.float32) * 255.0)  # the 8-bit values of the file
    gray = levels if levels.ndim == 2 else color.gray_u8_opencv(levels).astype(np.float32)
    return gray / np.float32(255.0)


def group_by_size(sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """{(H, W): the indices of the images of that size}, in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(sizes):
        groups.setdefault(tuple(hw), []).append(i)
    return groups


def group_same_size(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by image size, in chunks of at most `batch_size` (order kept within)."""
    chunks = []
    for idx in group_by_size(sizes).values():
        chunks += [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]
    return chunks


def fuse_padded(
    fuse_fn: FuseFn,
    vis: np.ndarray,
    ir: np.ndarray,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
) -> np.ndarray:
    """Calls `fuse_fn` on a batch padded (by repeating its last pair) to a power of two, never
    above `limit` (the planned batch size; default: no limit).

    (B, H, W) -> (B, H, W). Partial batches then reuse a few compiled shapes instead of one
    compile per leftover count. A non-finite output raises `NonFiniteError` naming the pair
    (`labels`, one per pair), so that it is never saved or scored.
    """
    n = vis.shape[0]
    padded = 1 << (n - 1).bit_length()
    if limit is not None:
        padded = max(n, min(padded, limit))
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
    stretch: bool = True,
    round_luma: bool = False,
    min_size: int = imio.MIN_IMAGE_SIZE,
    plan_batch: BatchPlanner | None = None,
) -> dict[str, int]:
    """Fuses and saves `pairs`, same-size pairs batched. Returns {"fused": n, "skipped": n}.

    Before fusing anything: no output may be an input, every pair's header must be readable,
    its sizes equal and at least `min_size`. ``stretch`` and ``round_luma``: the test-time
    convention (`ExportFuser`; see `load_pair` and `finish_fused`). `batch_size` bounds every
    batch; `plan_batch(H, W, bound)` (if given) lowers it per image size, e.g. to what fits in
    memory (`memory_planner`). A batch that runs out of memory is retried in halves; one pair
    that does not fit is a `DataError`.
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
    for (h, w), group in group_by_size(sizes).items():
        batch = batch_size
        if plan_batch is not None and min(batch_size, len(group)) > 1:
            batch = plan_batch(h, w, min(batch_size, len(group)))
        start = 0
        while start < len(group):
            chunk = group[start : start + batch]
            loaded = [
                load_pair(todo[i].vis, todo[i].ir, color_from, keep_color, round_luma, min_size)
                for i in chunk
            ]
            vis = np.stack([lp.vis_y for lp in loaded])  # (B, H, W)
            ir = np.stack([lp.ir_y for lp in loaded])
            labels = [f"{todo[i].vis} + {todo[i].ir}" for i in chunk]
            try:
                fused = fuse_padded(fuse_fn, vis, ir, labels, limit=batch)
            except TokFusionError:
                raise
            except Exception as e:
                if not memory.is_out_of_memory(e):
                    raise
                if len(chunk) == 1:
                    raise DataError(
                        f"{todo[chunk[0]].vis}: out of memory fusing one {w}x{h} pair "
                        f"({' '.join(str(e).split())[:160]})"
                    ) from None
                called = max(len(chunk), min(1 << (len(chunk) - 1).bit_length(), batch))
                batch = max(1, called // 2)  # this chunk and the rest of its size, halved
                bar.write(f"fuse: out of memory at batch {called}, retrying in batches of {batch}")
                continue
            for i, lp, y in zip(chunk, loaded, fused, strict=True):
                out = todo[i].out
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
                imio.save_png(out, finish_fused(y, lp.cbcr, stretch))
            bar.update(len(chunk))
            start += len(chunk)
    bar.close()
    return {"fused": len(todo), "skipped": skipped}


@dataclasses.dataclass(frozen=True)
class ExportFuser:
    """An export's batch fusion, (B, H, W) vis, ir -> (B, H, W), with its test-time convention
    and its memory planner (`memory_planner`; None: no planning)."""

    fn: FuseFn
    stretch: bool = True  # export.json "postprocess": "minmax"
    round_luma: bool = False  # export.json "input_luma": "uint8"
    plan_batch: BatchPlanner | None = None

    def __call__(self, vis: np.ndarray, ir: np.ndarray) -> np.ndarray:
        return self.fn(vis, ir)


def export_fuser(workdir: str, tokenizer: str | None = None) -> ExportFuser:
    """Loads the export at ``workdir`` (CheckpointError if missing) as an `ExportFuser`."""
    from tokfusion_jax import export

    exp = export.load_export(workdir, tokenizer_path=tokenizer)

    def fuse(vis: np.ndarray, ir: np.ndarray) -> np.ndarray:
        return exp.fuse(vis, ir)[..., 0]

    return ExportFuser(
        fuse,
        stretch=exp.postprocess == "minmax",
        round_luma=exp.input_luma == "uint8",
        plan_batch=memory_planner(exp.memory_model),
    )


def memory_planner(
    memory_model: Callable[[int, int], memory.MemoryModel | None],
    free_bytes: Callable[[], int | None] = memory.free_bytes,
) -> BatchPlanner:
    """A `BatchPlanner`: the largest batch up to the bound whose need (`memory_model(H, W)`, in
    bytes beyond the resident weights) fits in the free memory (`memory.choose_batch`)."""

    def plan(height: int, width: int, upper: int) -> int:
        need, free = memory_model(height, width), free_bytes()
        batch = memory.choose_batch(free, need, upper)
        if batch < upper and need is not None and free is not None:
            print(
                f"fuse: {width}x{height} pairs in batches of {batch} (not {upper}): each call "
                f"needs {need.need(batch) / memory.GIB:.2f} GiB, {free / memory.GIB:.2f} GiB free",
                file=sys.stderr,
            )
        return batch

    return plan


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m tokfusion_jax.fuse",
        description=__doc__.split("\n\n")[0],
        epilog="Post-processing follows the export's source method (export.json): TokFusion "
        "exports and converted CDDFuse checkpoints are min-max stretched per image, as CDDFuse's "
        "test scripts do; CDDFuse exports also read the luma rounded to 8 bits, like its OpenCV "
        "reader.",
    )
    p.add_argument(
        "--workdir",
        required=True,
        help="training workdir or its export/ folder, or an export made by `python -m convert "
        "cddfuse`",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: as recorded)")
    p.add_argument("--vis", help="visible (or MRI) image of one pair")
    p.add_argument("--ir", help="infrared (or CT/PET/SPECT) image of one pair")
    p.add_argument("--out", help="output PNG for one pair")
    p.add_argument("--vis_dir", help="folder of visible images (paired with --ir_dir by stem)")
    p.add_argument("--ir_dir", help="folder of infrared images")
    p.add_argument("--out_dir", help="output folder (<stem>.png per pair)")
    p.add_argument(
        "--batch_size",
        type=int,
        default=8,
        help="most same-size pairs per call (default 8); lowered per image size to what fits in "
        "the free memory, and halved on an out-of-memory error",
    )
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
    fuser = export_fuser(args.workdir, args.tokenizer)
    counts = fuse_pairs(
        fuser,
        pairs,
        batch_size=args.batch_size,
        plan_batch=fuser.plan_batch,
        keep_color=args.color,
        color_from=args.color_from,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        stretch=fuser.stretch,
        round_luma=fuser.round_luma,
    )
    where = args.out or args.out_dir
    note = f", {counts['skipped']} existing output(s) kept" if counts["skipped"] else ""
    print(f"fused {counts['fused']} pair(s) into {where}{note}", file=sys.stderr)
    return counts


if __name__ == "__main__":
    main()
