"""Bad inputs through every CLI: one ``error:`` line naming the file or key, exit 2, nothing lost.

The first part holds the defects found by trying the CLIs as a new user would (each of these
failed before the shared validation layer); the table after it holds the cases a careful user
would try next, for every CLI.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import jax
import numpy as np
import pytest
from cli_helpers import call, error_line
from PIL import Image

from tokfusion_jax import evaluate, fuse, trainer
from tokfusion_jax.data import inspect as inspect_cli
from tokfusion_jax.data import io as imio
from tokfusion_jax.data import pipeline, sources
from tokfusion_jax.errors import DataError, NonFiniteError

SIZE = 32  # the tiny export's training size: one compiled fusion shape for the whole file


def _png(path: pathlib.Path, seed: int, shape=(SIZE, SIZE)) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _float_tiff(path: pathlib.Path, nan_at=(3, 5), shape=(SIZE, SIZE)) -> pathlib.Path:
    """A float32 ("F" mode) TIFF in [0, 1] with one NaN pixel."""
    a = np.random.default_rng(1).uniform(size=shape).astype(np.float32)
    a[nan_at] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode="F").save(path)
    return path


@pytest.fixture()
def pairs(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """bundle layout: vis/ and ir/ with two 32x32 pairs (a, b)."""
    for i, name in enumerate("ab"):
        _png(tmp_path / "data" / "vis" / f"{name}.png", i)
        _png(tmp_path / "data" / "ir" / f"{name}.png", 10 + i)
    return tmp_path / "data" / "vis", tmp_path / "data" / "ir"


def _fuse_dirs(workdir, vis, ir, out, *extra):
    return [f"--workdir={workdir}", f"--vis_dir={vis}", f"--ir_dir={ir}", f"--out_dir={out}",
            "--no_progress", *extra]  # fmt: skip


# ------------------------------------------------------------------ 1. no silent garbage


def test_a_nan_pixel_is_refused_by_name_wherever_an_image_is_read(tmp_path, pairs):
    bad = _float_tiff(tmp_path / "nan.tif")
    with pytest.raises(DataError, match=r"nan\.tif: 1 non-finite pixel.*\(3, 5\)"):
        imio.load_image(bad)
    with pytest.raises(DataError, match=r"nan\.tif: 1 non-finite"):
        imio.decode_luma(bad.read_bytes(), str(bad), (16, 16))  # the training pipeline's path
    vis, ir = pairs
    (vis / "a.png").unlink()
    _float_tiff(vis / "a.tif")
    decode = pipeline.transforms.DecodePair(image_size=(SIZE, SIZE))
    rec = next(r for r in sources.from_preset("bundle", vis.parent) if r["name"] == "a")
    with pytest.raises(DataError, match=r"a\.tif"):
        decode.map(rec)


def test_inspect_refuses_a_nan_float_tiff(tmp_path, pairs, capsys):
    vis, _ = pairs
    (vis / "b.png").unlink()
    _float_tiff(vis / "b.tif")
    result = call(inspect_cli.main, ["--dataset=bundle", f"--root={vis.parent}"], capsys)
    error_line(result, vis / "b.tif", "non-finite")
    assert "RuntimeWarning" not in result.err


def test_fuse_refuses_a_nan_float_tiff_and_writes_nothing(tiny_export, tmp_path, pairs, capsys):
    vis, ir = pairs
    (ir / "a.png").unlink()
    _float_tiff(ir / "a.tif")
    out = tmp_path / "fused"
    error_line(call(fuse.main, _fuse_dirs(tiny_export, vis, ir, out), capsys), ir / "a.tif")
    assert not out.exists() or not list(out.iterdir())


def test_a_non_finite_model_output_is_never_written(tmp_path, pairs):
    vis, ir = pairs
    plan = fuse.pair_folders(str(vis), str(ir), str(tmp_path / "out"))
    nan_model = lambda v, i: np.full(v.shape, np.nan, np.float32)  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"a\.png .*not finite"):
        fuse.fuse_pairs(nan_model, plan, progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # evaluate: an export method whose output is NaN is neither scored nor saved
    method = evaluate.Method("nan", "export", str(tmp_path), nan_model)
    spec = evaluate.DatasetSpec("d", "bundle", str(vis.parent))
    with pytest.raises(NonFiniteError, match="nan on"):
        evaluate.evaluate([method], [spec], save_dir=str(tmp_path / "saved"), progress=False)
    assert not list((tmp_path / "saved").rglob("*.png"))
    # save_png (the one writer of fused images: fuse, evaluate --save_fused, demo) refuses too
    target = tmp_path / "x.png"
    with pytest.raises(NonFiniteError, match="x.png: not written"):
        imio.save_png(target, np.array([[0.5, np.inf]], np.float32))
    assert not target.exists() and not list(tmp_path.glob("x.png.tmp*"))


# ---------------------------------------------------------------- 2. no input destroyed


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink"])
def test_fuse_out_dir_equal_to_vis_dir_is_refused_even_with_overwrite(
    spelling, tiny_export, tmp_path, pairs, capsys
):
    vis, ir = pairs
    before = (vis / "a.png").read_bytes()
    out = {"same": vis, "dotdot": ir / ".." / "vis", "symlink": tmp_path / "link"}[spelling]
    if spelling == "symlink":
        os.symlink(vis, out)
    argv = _fuse_dirs(tiny_export, vis, ir, out, "--overwrite")
    error_line(call(fuse.main, argv, capsys), "--out_dir", "--vis_dir")
    assert (vis / "a.png").read_bytes() == before
    assert sorted(p.name for p in vis.iterdir()) == ["a.png", "b.png"]


def test_fuse_single_out_equal_to_an_input_is_refused(tiny_export, tmp_path, pairs, capsys):
    vis, ir = pairs
    before = (ir / "a.png").read_bytes()
    os.link(ir / "a.png", tmp_path / "hard.png")
    for out in (ir / "a.png", tmp_path / "hard.png"):
        argv = [f"--workdir={tiny_export}", f"--vis={vis / 'a.png'}", f"--ir={ir / 'a.png'}",
                f"--out={out}", "--overwrite", "--no_progress"]  # fmt: skip
        error_line(call(fuse.main, argv, capsys), out, "--ir")
    assert (ir / "a.png").read_bytes() == before


# --------------------------------------------------------- 3. the contract, not tracebacks


def test_inspect_grid_to_an_unwritable_path(tmp_path, pairs, capsys):
    vis, _ = pairs
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["--dataset=bundle", f"--root={vis.parent}", f"--grid={blocker / 'grid.png'}"]
    error_line(call(inspect_cli.main, argv, capsys), blocker, "--grid")


def test_evaluate_out_naming_an_existing_file(tmp_path, pairs, capsys):
    vis, _ = pairs
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    argv = [f"--dataset=bundle={vis.parent}", f"--out={existing}", "--no_progress"]
    error_line(call(evaluate.main, argv, capsys), existing, "not a folder")
    assert existing.read_text() == "keep me"


# ----------------------------------------------------------- 4. one check, on every path


def test_fuse_refuses_images_below_the_minimum_size(tiny_export, tmp_path, capsys):
    vis = _png(tmp_path / "vis" / "t.png", 0, (8, 8))
    ir = _png(tmp_path / "ir" / "t.png", 1, (8, 8))
    out = tmp_path / "o.png"
    argv = [f"--workdir={tiny_export}", f"--vis={vis}", f"--ir={ir}", f"--out={out}"]
    error_line(call(fuse.main, argv, capsys), vis, "8x8", "minimum size 16x16")
    assert not out.exists()
    with pytest.raises(DataError, match="minimum size 16x16"):  # the library path too
        fuse.fuse_pairs(lambda v, i: v, [fuse.PairPaths("t", str(vis), str(ir), str(out))])


def test_training_refuses_fewer_pairs_than_a_batch_with_steps_per_epoch_set(tmp_path):
    from tokfusion_jax import configlib

    root = tmp_path / "one"
    _png(root / "vi" / "only.png", 0)
    _png(root / "ir" / "only.png", 1)
    config = configlib.load_config(pathlib.Path(__file__).parents[1] / "configs/ivif.py", "tiny")
    config.data.root = str(root)
    config.data.batch_size = 4
    config.train.steps_per_epoch = 2
    with pytest.raises(DataError, match=r"1 pairs is fewer than one batch.*batch_size=4"):
        trainer.train_and_evaluate(config, tmp_path / "run", devices=jax.devices()[:1])
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------- 6. inspect writes only when asked


def test_inspect_writes_no_grid_without_grid(tmp_path, pairs, capsys, monkeypatch):
    vis, _ = pairs
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system_tmp"))
    (tmp_path / "system_tmp").mkdir()
    result = call(inspect_cli.main, ["--dataset=bundle", f"--root={vis.parent}"], capsys)
    assert result.code == 0, result.err
    assert "2 pairs" in result.out and "--grid" in result.out
    assert not list((tmp_path / "system_tmp").rglob("*"))
    grid = tmp_path / "grid.png"
    argv = ["--dataset=bundle", f"--root={vis.parent}", f"--grid={grid}"]
    assert call(inspect_cli.main, argv, capsys).code == 0 and Image.open(grid).size[0] > SIZE
