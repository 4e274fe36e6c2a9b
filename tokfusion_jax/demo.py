"""The demo's final report: fuse the validation (sample) pairs, write PNGs, print a metrics table.

Called by ``python -m tokfusion_jax.train --config=configs/ivif.py:demo`` after training, and
usable on its own: ``python -m tokfusion_jax.demo --workdir=runs/demo``. The model is compared
with two training-free baselines, average fusion (vis + ir) / 2 and max fusion max(vis, ir).
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Sequence

import ml_collections
import numpy as np

from tokfusion_jax import paths
from tokfusion_jax.errors import ConfigError, cli_main

TABLE_METRICS = ("EN", "SD", "SF", "AG", "SCD", "SSIM", "VIF", "Qabf")


def baselines(vis: np.ndarray, ir: np.ndarray) -> dict[str, np.ndarray]:
    """Training-free fusions of gray (H, W) images in [0, 1]."""
    return {"average": 0.5 * (vis + ir), "max": np.maximum(vis, ir)}


def format_table(rows: dict[str, dict[str, float]], metrics: Sequence[str]) -> str:
    """A fixed-width text table: one row per method, one column per metric."""
    width = max(len(m) for m in rows) + 2
    head = "method".ljust(width) + "".join(f"{m:>9}" for m in metrics)
    lines = [head, "-" * len(head)]
    for method, values in rows.items():
        cells = "".join(f"{values.get(m, float('nan')):>9.3f}" for m in metrics)
        lines.append(method.ljust(width) + cells)
    return "\n".join(lines)


def report(
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict | None = None,
    out_dir: str | os.PathLike | None = None,
    max_pairs: int = 0,
) -> str:
    """Fuses the validation pairs at their native size with the run's export; prints the table.

    Returns the table. Fused images are written to ``out_dir`` (default ``<workdir>/fused``);
    colour visible images get their chroma back (Y fused, CbCr from the visible image).
    """
    from tokfusion_jax import color, export, metrics, trainer
    from tokfusion_jax.data import io as imio
    from tokfusion_jax.data import pipeline

    workdir = pathlib.Path(workdir).absolute()
    fusion = export.load_export(workdir)
    config = config or fusion.config
    dataset = config.val.dataset or config.data.dataset
    root = config.data.val_root or (config.data.train_root or config.data.root)
    source = trainer.open_source(dataset, root)
    ds = pipeline.make_pipeline(
        source,
        batch_size=1,
        image_size=None,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        keep_color=True,
        process_index=0,
        process_count=1,
    )
    out_dir = pathlib.Path(out_dir) if out_dir else workdir / "fused"
    paths.check_roles(
        inputs=[("validation images", d) for d in source.dirs], outputs=[("--out", out_dir)]
    )
    paths.check_output_folder(out_dir, "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    per_method: dict[str, list[dict[str, float]]] = {
        "TokFusion (ours)": [],
        "average": [],
        "max": [],
    }
    names = [m for m in TABLE_METRICS if m in metrics.METRIC_NAMES]
    count = 0
    for batch in ds:
        vis, ir = np.asarray(batch["vis"])[0, ..., 0], np.asarray(batch["ir"])[0, ..., 0]
        name = str(np.asarray(batch["name"])[0])
        fused = fusion.fuse(vis, ir)[0, ..., 0]  # (H, W) in [0, 1]
        cbcr = np.asarray(batch["vis_cbcr"])[0]
        has_color = float(np.abs(cbcr - 0.5).max()) > 1e-3
        image = color.merge_y_cbcr(fused[..., None], cbcr) if has_color else fused
        imio.save_png(out_dir / f"{pathlib.Path(name).stem}.png", image)
        candidates = {"TokFusion (ours)": fused, **baselines(vis, ir)}
        for method, img in candidates.items():
            values = metrics.compute(img * 255.0, ir * 255.0, vis * 255.0, names=names)
            per_method[method].append({k: float(v) for k, v in values.items()})
        count += 1
        if max_pairs and count >= max_pairs:
            break
    if count == 0:
        raise ConfigError(f"{root or 'the packaged samples'}: no pairs to fuse for the report")
    rows = {
        method: {m: float(np.nanmean([r[m] for r in records])) for m in names}
        for method, records in per_method.items()
    }
    table = format_table(rows, names)
    tok_note = ""
    if config.tokenizer.random_tiny and not config.tokenizer.path:
        tok_note = (
            "\nNOTE: the tokenizer here has RANDOM weights, so these numbers show the pipeline "
            "works, not the paper's quality (the packaged trained tokenizer: configs/ivif.py:demo)."
        )
    text = (
        f"\nFusion metrics on {count} pair(s) ({dataset}), mean per image "
        f"(higher is better):\n{table}\n\n"
        f"{tokenizer_report(fusion.tokenizer, dataset, root, max_pairs)}\n\n"
        f"Fused images written to {out_dir}{tok_note}\n"
    )
    print(text, flush=True)
    return text


def tokenizer_report(tokenizer, dataset: str, root: str, max_pairs: int = 0) -> str:
    """Lines giving the frozen tokenizer's reconstruction PSNR / SSIM on the pairs' images."""
    from tokfusion_jax import evaluate

    spec = evaluate.DatasetSpec(dataset, dataset, root)
    _, domains = evaluate.tokenizer_study(
        tokenizer, [spec], limit=max_pairs or None, progress=False
    )
    size = tokenizer.config.image_size
    lines = [f"Tokenizer reconstruction at {size}x{size} (PSNR on 0..255, SSIM), mean per image:"]
    for domain, d in domains.items():
        lines.append(
            f"  {domain:<9} PSNR {d['PSNR']:6.2f} dB   SSIM {d['SSIM']:.4f}   ({d['n']} images)"
        )
    return "\n".join(lines)


@cli_main
def _main(argv: Sequence[str]) -> None:
    from tokfusion_jax.errors import ArgumentParser

    parser = ArgumentParser(prog="python -m tokfusion_jax.demo", description=__doc__)
    parser.add_argument("--workdir", required=True, help="a finished training run")
    parser.add_argument("--out", default=None, help="where to write fused PNGs")
    parser.add_argument("--max_pairs", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_pairs < 0:
        raise ConfigError(f"--max_pairs={args.max_pairs}: expected >= 0 (0 = every pair)")
    report(args.workdir, out_dir=args.out, max_pairs=args.max_pairs)


if __name__ == "__main__":
    _main(sys.argv[1:])
