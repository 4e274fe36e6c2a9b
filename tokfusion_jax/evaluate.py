"""Benchmark evaluator: fusion metrics of methods x datasets as a Table-1 style table.

    python -m tokfusion_jax.evaluate --dataset=tno --root=DATA/tno/test \\
        --dataset=roadscene --root=DATA/roadscene/test \\
        --method=ours=runs/ivif --method=cddfuse=published/cddfuse --out=eval/

Methods: `--method=NAME=PATH` (repeatable), where PATH is a training workdir / export (the pairs
are fused by the model, same-size pairs batched) or a folder of already-fused images (one file
per pair, matched by stem, either directly in PATH or in PATH/<dataset>/); plus the built-in
baselines `--baselines=average,max` (pixel-wise mean rounded half up, pixel-wise max).

Datasets: `--dataset=PRESET --root=DIR` pairs (repeatable, or comma lists of equal length); the
presets of `tokfusion_jax.data.sources.from_preset` (tno, roadscene, msrs, m3fd, harvard_ct,
harvard_pet, harvard_spect, bundle, manifest). A dataset may be labelled `LABEL:PRESET`.

Metrics: `--metrics=EN,SD,...` or `all` (every metric of the convention; default: those of the
paper's EN, SD, SCD, EI, SF, AG, SSIM that the convention defines), in
`--convention=ivif_zoo|cddfuse|vifb|tang` (default ivif_zoo; see `tokfusion_jax.metrics`). Images
are read the way the convention's reference reads them: 8-bit gray by PIL 'L' (ivif_zoo), by
OpenCV's float32 BT.601 and rounding (cddfuse), by MATLAB's rgb2gray (tang); as stored, gray or
colour, for vifb (scored per channel). Exports fuse and finish as their source method does at
test time (export.json): TokFusion exports and converted CDDFuse checkpoints (`python -m convert
cddfuse`) are min-max stretched per image, as CDDFuse's test scripts do, then rounded to 8 bits;
CDDFuse exports are also fed the luma rounded to 8 bits, as its OpenCV reader gives it. Under vifb
with `--color` the colour-restored output is scored, as it is saved.

Output: the Markdown table on stdout (best per column in bold, second underlined when there are
three or more methods); with `--out=DIR` also table.md, per_image.csv, results.json and, with
`--save_fused`, the fused images (gray, or colour restored from Cb/Cr with `--color`).

Tokenizer reconstruction study (paper Table 11):

    python -m tokfusion_jax.evaluate tokenizer --tokenizer=DIR --data=tno=DATA/tno/test,...

encodes and decodes every image of the datasets with the frozen tokenizer (the luma replicated to
RGB at the tokenizer's resolution, as the fusion model feeds it) and reports, per domain
(infrared, visible, medical), MSE and PSNR on the 0..255 scale (PSNR = 10 log10(255^2 / MSE),
MSE averaged over pixels and images, PSNR averaged over images) and SSIM (Gaussian 11 / 1.5,
valid, L = 255; Wang et al.).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from tokfusion_jax import color, metrics, paths
from tokfusion_jax import fuse as fuselib
from tokfusion_jax.data import io as imio
from tokfusion_jax.data import sources
from tokfusion_jax.errors import ArgumentParser, DataError, TokFusionError, cli_main

BASELINES = ("average", "max")
METRIC_CHUNK = 16  # largest metric batch; batches are padded to powers of two up to this


# --------------------------------------------------------------------------------------------
# Reading images as the references do
# --------------------------------------------------------------------------------------------


_GRAY_MODES = ("L", "1", "P", "LA", "PA")


def _decode_u8(ref: imio.ImageRef, keep: bool) -> np.ndarray:
    """An 8-bit image file as uint8: (H, W) for gray files, else (H, W, 3) RGB (alpha dropped);
    `keep` False converts with PIL 'L' instead of returning RGB."""
    data = imio.read_bytes(ref)
    label = imio.describe(ref)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("I;16", "I;16L", "I;16B", "I", "F"):
                raise DataError(f"{label}: 16-bit or float images are not 8-bit sources")
            if im.mode in _GRAY_MODES or not keep:
                return np.asarray(im.convert("L"), np.uint8)
            return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{label}: not a readable image ({e})") from None


def read_image(ref: imio.ImageRef, convention: str = "ivif_zoo") -> np.ndarray:
    """An image file as the convention's reference sees it: uint8 (H, W), or (H, W, 3) for
    colour files under conventions that score colour (vifb: MATLAB ``imread``, as stored)."""
    if convention in metrics.COLOR_CONVENTIONS:
        return _decode_u8(ref, keep=True)
    return read_gray_u8(ref, convention)


def read_gray_u8(ref: imio.ImageRef, convention: str = "ivif_zoo") -> np.ndarray:
    """An image file as 8-bit gray (H, W) uint8, converted the way the convention's code does.

    `ivif_zoo`: PIL ``convert('L')`` (fixed-point BT.601). `cddfuse`: OpenCV's float32
    0.299 R + 0.587 G + 0.114 B, then ``np.round``. `tang` (and `vifb`'s gray paths): MATLAB
    ``rgb2gray`` of uint8 (its exact coefficients in double, rounded half away from zero).
    Identical for gray files.
    """
    x = _decode_u8(ref, keep=convention != "ivif_zoo")
    if x.ndim == 2:
        return x
    if convention in ("tang", "vifb"):
        c = np.asarray(metrics.ops.MATLAB_GRAY_COEFFS)
        y = x[..., 0] * c[0] + x[..., 1] * c[1] + x[..., 2] * c[2]  # float64
        return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)
    return color.gray_u8_opencv(x.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Method:
    """A row of the table: a built-in baseline, a trained export or a folder of fused images."""

    name: str
    kind: str  # "baseline" | "export" | "folder"
    path: str = ""
    fuse_fn: fuselib.ExportFuser | None = None

    def folder_for(self, dataset: str) -> str:
        sub = os.path.join(self.path, dataset)
        return sub if os.path.isdir(sub) else self.path


def baseline_fuse(kind: str, vis: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """Average (rounded half up, (v + i + 1) // 2) or max of two uint8 images -> uint8.

    A gray image beside a colour one is repeated over the three channels (colour output).
    """
    if vis.ndim != ir.ndim:
        vis, ir = (x if x.ndim == 3 else np.repeat(x[..., None], 3, axis=-1) for x in (vis, ir))
    if kind == "average":
        return ((vis.astype(np.uint16) + ir + 1) // 2).astype(np.uint8)
    if kind == "max":
        return np.maximum(vis, ir)
    raise TokFusionError(f"unknown baseline {kind!r}; expected one of {', '.join(BASELINES)}")


def parse_method(spec: str, tokenizer: str | None = None) -> Method:
    """`NAME=PATH` -> a Method (export if PATH holds one, else a folder of fused images)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise TokFusionError(f"--method={spec!r}: expected NAME=PATH")
    if not os.path.exists(path):
        raise DataError(f"{path}: method {name!r} path not found")
    from tokfusion_jax import export

    try:
        export.find_export(path)
    except TokFusionError:
        if not os.path.isdir(path):
            raise DataError(f"{path}: method {name!r} is neither an export nor a folder") from None
        return Method(name, "folder", path)
    return Method(name, "export", path, fuselib.export_fuser(path, tokenizer))


def find_fused_file(folder: str, stem: str) -> str:
    """The fused image for `stem` in `folder` (any supported extension)."""
    for ext in imio.SUPPORTED_EXTENSIONS + tuple(e.upper() for e in imio.SUPPORTED_EXTENSIONS):
        path = os.path.join(folder, stem + ext)
        if os.path.isfile(path):
            return path
    raise DataError(f"{os.path.join(folder, stem)}.*: fused image missing for pair {stem!r}")


def read_fused(folder: str, stem: str, shape: tuple[int, ...], convention: str) -> np.ndarray:
    """A method's fused image for `stem` as the convention reads it; its size must match."""
    path = find_fused_file(folder, stem)
    fused = read_image(path, convention)
    if fused.shape[:2] != tuple(shape[:2]):
        raise DataError(
            f"{path}: fused image is {fused.shape[1]}x{fused.shape[0]}, but the pair "
            f"{stem!r} is {shape[1]}x{shape[0]} (width x height)"
        )
    return fused


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    label: str
    preset: str
    root: str


def parse_datasets(datasets: Sequence[str], roots: Sequence[str]) -> list[DatasetSpec]:
    """`--dataset` / `--root` values (repeatable or comma lists) -> specs.

    A dataset may be `PRESET`, `LABEL:PRESET`, or carry its root inline as `PRESET=ROOT`.
    """
    names = [d for item in datasets for d in item.split(",") if d]
    root_list = [r for item in roots for r in item.split(",") if r]
    inline = [n for n in names if "=" in n]
    if inline and len(inline) != len(names):
        raise TokFusionError("give every dataset as PRESET=ROOT, or none (then use --root)")
    if not inline and len(root_list) != len(names):
        raise TokFusionError(
            f"{len(names)} dataset(s) but {len(root_list)} --root value(s); give one root each"
        )
    specs = []
    for i, n in enumerate(names):
        n, _, root = n.partition("=") if inline else (n, "", root_list[i])
        label, _, preset = n.rpartition(":")
        preset = preset or label
        label = label or preset
        if preset not in sources.PRESETS:
            raise TokFusionError(
                f"unknown dataset preset {preset!r}; expected one of {', '.join(sources.PRESETS)}"
            )
        specs.append(DatasetSpec(label, preset, root))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise TokFusionError(f"dataset labels repeat ({labels}); name them LABEL:PRESET")
    if not specs:
        raise TokFusionError("no dataset given (--dataset=PRESET --root=DIR)")
    return specs


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


_Triplet = tuple[Any, np.ndarray, np.ndarray, np.ndarray]  # (key, fused, a, b), uint8 (H, W)


class _MetricBuffer:
    """Collects (key, fused, a, b) uint8 triplets by size and scores them in padded batches."""

    def __init__(self, names: tuple[str, ...], convention: str) -> None:
        self.names, self.convention = names, convention
        self.pending: dict[tuple[int, ...], list[_Triplet]] = {}
        self.results: dict[Any, dict[str, float]] = {}

    def add(self, key: Any, f: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        if not (f.shape[:2] == a.shape[:2] == b.shape[:2]):
            raise DataError(
                f"{key}: fused {f.shape} and sources {a.shape}/{b.shape} differ in size"
            )
        shapes = (f.shape, a.shape, b.shape)  # gray and colour images batch apart
        bucket = self.pending.setdefault(shapes, [])
        bucket.append((key, f, a, b))
        if len(bucket) >= METRIC_CHUNK:
            self._flush(shapes)

    def _flush(self, shape: tuple[tuple[int, ...], ...]) -> None:
        items = self.pending.pop(shape, [])
        if not items:
            return
        n = len(items)
        padded = 1 << (n - 1).bit_length()  # next power of two: few distinct batch shapes
        stack = [
            np.stack([it[k] for it in items] + [items[-1][k]] * (padded - n)) for k in (1, 2, 3)
        ]
        values = metrics.compute(*stack, names=self.names, convention=self.convention)
        for i, it in enumerate(items):
            self.results[it[0]] = {name: float(values[name][i]) for name in self.names}

    def finish(self, desc: str = "metrics", progress: bool = True) -> dict[Any, dict[str, float]]:
        """Scores what is left (one batch per image size, with a progress bar)."""
        for shape in tqdm(list(self.pending), desc=desc, unit="size", disable=not progress):
            self._flush(shape)
        return self.results


class _DecodedPairs:
    """The pairs of one batch, decoded on first use once per luma rounding (`fuse.load_pair`)."""

    def __init__(self, records: Sequence[dict[str, Any]], color_from: str, keep_color: bool):
        self.records, self.color_from, self.keep_color = records, color_from, keep_color
        self._by_rounding: dict[bool, list[fuselib.LoadedPair]] = {}

    def get(self, round_luma: bool = False) -> list[fuselib.LoadedPair]:
        if round_luma not in self._by_rounding:
            self._by_rounding[round_luma] = [
                fuselib.load_pair(r["vis"], r["ir"], self.color_from, self.keep_color, round_luma)
                for r in self.records
            ]
        return self._by_rounding[round_luma]


def evaluate(
    methods: Sequence[Method],
    datasets: Sequence[DatasetSpec],
    *,
    names: Sequence[str] = metrics.PAPER_METRICS,
    convention: str = "ivif_zoo",
    batch_size: int = 8,
    limit: int | None = None,
    save_dir: str | None = None,
    keep_color: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Scores every method on every dataset -> per-image rows {method, dataset, name, metric...}.

    With `save_dir`, fused images of baselines and exports go to save_dir/<method>/<dataset>/.
    """
    names = tuple(names)
    rows: list[dict[str, Any]] = []
    for spec in datasets:
        source = sources.from_preset(spec.preset, spec.root)
        records = list(source)[:limit] if limit else list(source)
        color_from = source.color_from
        buffer = _MetricBuffer(names, convention)
        if save_dir:  # saved fused images must not land in a folder this run reads
            folders = [m for m in methods if m.kind == "folder"]
            paths.check_roles(
                inputs=[(f"dataset {spec.label}", d) for d in source.dirs]
                + [(f"method {m.name}", m.folder_for(spec.label)) for m in folders],
                outputs=[
                    (f"fused images of {m.name}", os.path.join(save_dir, m.name, spec.label))
                    for m in methods
                    if m.kind != "folder"
                ],
            )
        sizes = []
        for rec in records:
            hv, hi = imio.image_size(rec["vis"]), imio.image_size(rec["ir"])
            sizes.append(
                sources.check_pair_sizes(rec["vis"], rec["ir"], hv, hi, imio.MIN_IMAGE_SIZE)
            )
        bar = tqdm(
            total=len(records), desc=f"evaluate {spec.label}", unit="pair", disable=not progress
        )
        for chunk in fuselib.group_same_size(sizes, batch_size):
            recs = [records[i] for i in chunk]
            vis8 = [read_image(r["vis"], convention) for r in recs]
            ir8 = [read_image(r["ir"], convention) for r in recs]
            pairs = _DecodedPairs(recs, color_from, keep_color)
            loaded = pairs.get() if (save_dir and keep_color) else None
            for m in methods:
                if m.kind == "folder":
                    folder = m.folder_for(spec.label)
                    fused8 = [read_fused(folder, r["name"], v.shape, convention) for r, v in
                              zip(recs, vis8, strict=True)]  # fmt: skip
                    out_imgs = None
                elif m.kind == "baseline":
                    fused8 = [baseline_fuse(m.name, v, i) for v, i in zip(vis8, ir8, strict=True)]
                    out_imgs = [f.astype(np.float32) / 255.0 for f in fused8]
                else:
                    assert m.fuse_fn is not None
                    inputs = pairs.get(m.fuse_fn.round_luma)
                    y = fuselib.fuse_padded(
                        m.fuse_fn,
                        np.stack([lp.vis_y for lp in inputs]),
                        np.stack([lp.ir_y for lp in inputs]),
                        [f"{m.name} on {r['vis']} + {r['ir']}" for r in recs],
                    )
                    finish = fuselib.stretch_to_unit if m.fuse_fn.stretch else _clip01
                    out_imgs = [finish(yi) for yi in np.asarray(y)]
                    fused8 = [fuselib.to_uint8(o) for o in out_imgs]
                    if convention in metrics.COLOR_CONVENTIONS and keep_color:
                        fused8 = [  # scored as saved: colour restored from Cb/Cr
                            fuselib.to_uint8(fuselib.finish_fused(o, lp.cbcr, stretch=False))
                            for o, lp in zip(out_imgs, inputs, strict=True)
                        ]
                for r, f8, v8, i8 in zip(recs, fused8, vis8, ir8, strict=True):
                    buffer.add((m.name, r["name"]), f8, i8, v8)  # metrics: a = ir, b = vis
                if save_dir and out_imgs is not None:
                    folder = os.path.join(save_dir, m.name, spec.label)
                    os.makedirs(folder, exist_ok=True)
                    for k, (r, o) in enumerate(zip(recs, out_imgs, strict=True)):
                        cbcr = loaded[k].cbcr if (loaded and keep_color) else None
                        img = fuselib.finish_fused(o, cbcr, stretch=False)
                        imio.save_png(os.path.join(folder, r["name"] + ".png"), img)
            bar.update(len(chunk))
        bar.close()
        results = buffer.finish(f"metrics {spec.label}", progress)
        for m in methods:
            for r in records:
                rows.append(
                    {
                        "method": m.name,
                        "dataset": spec.label,
                        "name": r["name"],
                        **results[(m.name, r["name"])],
                    }
                )
    return rows


def _clip01(y: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(y, np.float32), 0.0, 1.0)


def summarize(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Means over images: {method: {dataset: {metric: mean, "n": count, "nan": {metric: k}}}}."""
    out: dict[str, Any] = {}
    for row in rows:
        out.setdefault(row["method"], {}).setdefault(row["dataset"], []).append(row)
    summary: dict[str, Any] = {}
    for method, per_ds in out.items():
        summary[method] = {}
        for ds, items in per_ds.items():
            entry: dict[str, Any] = {"n": len(items)}
            nan_counts = {}
            for name in names:
                vals = np.array([it[name] for it in items], np.float64)
                entry[name] = float(np.mean(vals))  # NaN propagates, as in the references
                if np.isnan(vals).any():
                    nan_counts[name] = int(np.isnan(vals).sum())
            if nan_counts:
                entry["nan"] = nan_counts
            summary[method][ds] = entry
    return summary


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "nan"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def markdown_table(summary: dict[str, Any], datasets: Sequence[str], names: Sequence[str]) -> str:
    """Methods x (dataset, metric) Markdown table; best bold, second underlined (>= 3 methods)."""
    methods = list(summary)
    header = ["Method"] + [f"{ds} {n}" for ds in datasets for n in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cells = {m: [] for m in methods}
    for ds in datasets:
        for n in names:
            col = {m: summary[m][ds][n] for m in methods}
            finite = sorted(
                (v for v in col.values() if not math.isnan(v)), reverse=metrics.HIGHER_IS_BETTER[n]
            )
            best = finite[0] if finite else None
            second = next((v for v in finite if v != best), None) if len(methods) >= 3 else None
            for m in methods:
                text = _fmt(col[m])
                if best is not None and col[m] == best:
                    text = f"**{text}**"
                elif second is not None and col[m] == second:
                    text = f"<u>{text}</u>"
                cells[m].append(text)
    for m in methods:
        lines.append("| " + " | ".join([m] + cells[m]) + " |")
    return "\n".join(lines)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_outputs(
    out_dir: str,
    rows: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    table: str,
    names: Sequence[str],
    settings: dict[str, Any],
) -> None:
    """table.md, per_image.csv and results.json in `out_dir`, each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, "table.md"), table + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["method", "dataset", "name", *names])
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(os.path.join(out_dir, "per_image.csv"), buf.getvalue())
    payload = {"settings": settings, "summary": summary, "per_image": list(rows)}
    _write_atomic(os.path.join(out_dir, "results.json"), json.dumps(payload, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# Tokenizer reconstruction study (Table 11)
# --------------------------------------------------------------------------------------------


def tokenizer_domains(source: sources.PairedSource) -> tuple[str, str]:
    """(domain of the vis slot, domain of the ir slot): medical pairs are medical on both sides."""
    return sources.pair_domains(source)


def reconstruction_scores(original: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    """MSE, PSNR (0..255 scale) and SSIM (Wang et al., L = 255) of gray (H, W) images in [0, 1]."""
    x = np.asarray(original, np.float64) * 255.0
    y = np.asarray(recon, np.float64) * 255.0
    mse = float(np.mean((x - y) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    ssim = float(metrics.ssim(x, y, data_range=255.0))
    return {"MSE": mse, "PSNR": psnr, "SSIM": ssim}


def tokenizer_study(
    tokenizer_dir: Any,
    datasets: Sequence[DatasetSpec],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Per-image reconstruction scores and per-domain means {domain: {MSE, PSNR, SSIM, n}}.

    ``tokenizer_dir``: a tokenizer folder, or a loaded `titok.Tokenizer`.
    """
    import jax.numpy as jnp

    from tokfusion_jax.data import transforms
    from tokfusion_jax.models import titok

    tok = tokenizer_dir if isinstance(tokenizer_dir, titok.Tokenizer) else titok.load(tokenizer_dir)
    size = int(tok.config.image_size)
    items: list[tuple[str, str, str, imio.ImageRef]] = []
    for spec in datasets:
        source = sources.from_preset(spec.preset, spec.root)
        recs = list(source)[:limit] if limit else list(source)
        dom_vis, dom_ir = tokenizer_domains(source)
        for r in recs:
            items.append((dom_vis, spec.label, r["name"] + ":vis", r["vis"]))
            items.append((dom_ir, spec.label, r["name"] + ":ir", r["ir"]))
    rows = []
    bar = tqdm(total=len(items), desc="tokenizer", unit="img", disable=not progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs = [
            transforms.token_input_np(imio.to_luma(imio.load_image(it[3])), size) for it in chunk
        ]  # (S, S, 3) each: luma resized, clipped, replicated
        gray = [x[..., 0] for x in inputs]
        batch = np.stack(inputs)  # (B, S, S, 3)
        n = len(chunk)
        if n < batch_size:  # one compiled shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
        enc = titok.encode(tok, jnp.asarray(batch))
        rec = np.asarray(titok.decode(tok, enc.quantized))[:n]
        rec_gray = np.clip(rec, 0.0, 1.0).mean(axis=-1)
        for it, g, rg in zip(chunk, gray, rec_gray, strict=True):
            rows.append(
                {"domain": it[0], "dataset": it[1], "name": it[2], **reconstruction_scores(g, rg)}
            )
        bar.update(n)
    bar.close()
    domains: dict[str, dict[str, float]] = {}
    for dom in ("infrared", "medical", "visible"):
        sel = [r for r in rows if r["domain"] == dom]
        if sel:
            domains[dom] = {k: float(np.mean([r[k] for r in sel])) for k in ("MSE", "PSNR", "SSIM")}
            domains[dom]["n"] = len(sel)
    return rows, domains


def tokenizer_table(domains: dict[str, dict[str, float]]) -> str:
    lines = ["| Domain | MSE ↓ | PSNR ↑ | SSIM ↑ | images |", "|---|---|---|---|---|"]
    for dom, d in domains.items():
        lines.append(f"| {dom} | {d['MSE']:.4f} | {d['PSNR']:.4f} | {d['SSIM']:.4f} | {d['n']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _split(values: Iterable[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _table_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m tokfusion_jax.evaluate",
        description="Fusion metrics as a Table-1 style table.",
        epilog="Exports are post-processed as their source method does at test time "
        "(export.json): TokFusion exports and converted CDDFuse checkpoints are min-max stretched "
        "per image, as CDDFuse's test scripts do; CDDFuse exports also read the luma rounded to "
        "8 bits, like its OpenCV reader.",
    )
    p.add_argument("--dataset", action="append", default=[], help="PRESET or LABEL:PRESET")
    p.add_argument("--root", action="append", default=[], help="dataset folder, one per dataset")
    p.add_argument(
        "--method",
        action="append",
        default=[],
        help="NAME=PATH: a training workdir, an export (e.g. from `python -m convert cddfuse`) "
        "or a folder of fused images",
    )
    p.add_argument("--baselines", default="average,max", help="comma list of average,max or ''")
    p.add_argument("--convention", default="ivif_zoo", choices=metrics.CONVENTIONS)
    p.add_argument(
        "--metrics",
        default="paper",
        help="comma list, 'all' (the convention's) or 'paper' (the paper's that it defines)",
    )
    p.add_argument("--out", default=None, help="folder for table.md, per_image.csv, results.json")
    p.add_argument("--save_fused", action="store_true", help="also save fused images under --out")
    p.add_argument("--color", action="store_true", help="saved images: restore Cb/Cr")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for exports")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N pairs per dataset")
    p.add_argument("--no_progress", action="store_true")
    return p


def _tokenizer_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m tokfusion_jax.evaluate tokenizer",
        description="Tokenizer reconstruction study (Table 11).",
    )
    p.add_argument("--tokenizer", required=True, help="converted tokenizer folder")
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="PRESET=ROOT (repeatable or comma list), e.g. tno=DATA/tno/test",
    )
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N pairs per dataset")
    p.add_argument("--out", default=None, help="folder for tokenizer.md / tokenizer.json")
    p.add_argument("--no_progress", action="store_true")
    return p


def metric_names(spec: str, convention: str) -> tuple[str, ...]:
    """--metrics value -> names: 'all', 'paper' (default) or a comma list, checked against the
    convention (an undefined name is an error naming it)."""
    defined = metrics.convention_metrics(convention)
    if spec == "all":
        return defined
    if spec == "paper":
        return tuple(n for n in metrics.PAPER_METRICS if n in defined)
    try:
        return metrics.check_names(_split([spec]), convention)
    except metrics.MetricInputError as e:
        raise TokFusionError(f"--metrics={spec!r}: {e}") from None


def _check_counts(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise TokFusionError(f"--batch_size={args.batch_size}: expected >= 1")
    if args.limit is not None and args.limit < 1:
        raise TokFusionError(f"--limit={args.limit}: expected >= 1 (omit it for every pair)")


def run_table(argv: Sequence[str]) -> str:
    args = _table_parser().parse_args(list(argv))
    _check_counts(args)
    if args.out:
        paths.check_output_folder(args.out, "--out")
    specs = parse_datasets(args.dataset, args.root)
    names = metric_names(args.metrics, args.convention)
    methods = [Method(b, "baseline") for b in _split([args.baselines])]
    for m in methods:
        if m.name not in BASELINES:
            raise TokFusionError(f"--baselines: unknown {m.name!r}; expected {BASELINES}")
    methods += [parse_method(s, args.tokenizer) for s in args.method]
    if len({m.name for m in methods}) != len(methods):
        raise TokFusionError(f"method names repeat: {[m.name for m in methods]}")
    if not methods:
        raise TokFusionError("nothing to evaluate: give --method and/or --baselines")
    if args.save_fused and not args.out:
        raise TokFusionError("--save_fused needs --out")
    start = time.perf_counter()
    rows = evaluate(
        methods,
        specs,
        names=names,
        convention=args.convention,
        batch_size=args.batch_size,
        limit=args.limit,
        save_dir=os.path.join(args.out, "fused") if args.save_fused else None,
        keep_color=args.color,
        progress=not args.no_progress,
    )
    summary = summarize(rows, names)
    table = markdown_table(summary, [s.label for s in specs], names)
    elapsed = time.perf_counter() - start
    print(table)
    print(
        f"\n({len(rows)} scored fused images, convention {args.convention}, {elapsed:.1f} s)",
        file=sys.stderr,
    )
    if args.out:
        settings = {
            "convention": args.convention,
            "metrics": list(names),
            "datasets": [dataclasses.asdict(s) for s in specs],
            "methods": [{"name": m.name, "kind": m.kind, "path": m.path} for m in methods],
            "seconds": elapsed,
        }
        write_outputs(args.out, rows, summary, table, names, settings)
    return table


def run_tokenizer(argv: Sequence[str]) -> str:
    args = _tokenizer_parser().parse_args(list(argv))
    _check_counts(args)
    specs = parse_datasets(args.data, [])
    if args.out:
        paths.check_output_folder(args.out, "--out")
    rows, domains = tokenizer_study(
        args.tokenizer,
        specs,
        batch_size=args.batch_size,
        limit=args.limit,
        progress=not args.no_progress,
    )
    table = tokenizer_table(domains)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        _write_atomic(os.path.join(args.out, "tokenizer.md"), table + "\n")
        payload = {"domains": domains, "per_image": rows}
        _write_atomic(os.path.join(args.out, "tokenizer.json"), json.dumps(payload, indent=1))
    return table


@cli_main
def main(argv: Sequence[str] | None = None) -> str:
    """CLI entry point: the table (default) or `tokenizer` subcommand; returns the table text."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tokenizer":
        return run_tokenizer(argv[1:])
    return run_table(argv)


if __name__ == "__main__":
    main()
