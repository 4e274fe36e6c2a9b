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
    method = evaluate.Method("nan", "export", str(tmp_path), fuse.ExportFuser(nan_model))
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


# ================================================================================================
# A careful user's next tries, for every CLI (in-process for argparse CLIs; the absl CLIs in a
# real process each: their flags live in module-global state)
# ================================================================================================


class World:
    """The files a bad-input case may name (made fresh per case under tmp_path)."""

    def __init__(self, tmp: pathlib.Path, export: pathlib.Path) -> None:
        self.tmp, self.export = tmp, export
        self.root = tmp / "data"
        self.vis, self.ir = self.root / "vis", self.root / "ir"
        for i, name in enumerate("ab"):
            _png(self.vis / f"{name}.png", i)
            _png(self.ir / f"{name}.png", 10 + i)
        self.file = tmp / "notes.txt"
        self.file.write_text("an ordinary file")
        self.folder_png = tmp / "looks_like.png"
        self.folder_png.mkdir()

    def snapshot(self) -> dict[str, bytes]:
        """Every input file's bytes: nothing may change them."""
        return {str(p): p.read_bytes() for p in self.root.rglob("*") if p.is_file()}


def _fuse_one(w: World, **kw: str) -> list[str]:
    args = {"workdir": w.export, "vis": w.vis / "a.png", "ir": w.ir / "a.png",
            "out": w.tmp / "o.png"} | kw  # fmt: skip
    return [f"--{k}={v}" for k, v in args.items()] + ["--no_progress"]


def _prev_fused(w: World) -> World:
    """A folder of earlier saved fused images, where --save_fused would write the baseline's."""
    for name in "ab":
        _png(w.tmp / "eval" / "fused" / "average" / "d" / f"{name}.png", 7)
    return w


def _empty_ir(w: World) -> None:
    (w.tmp / "empty.png").write_bytes(b"")


def _gif(w: World) -> None:
    Image.new("L", (SIZE, SIZE)).save(w.tmp / "a.gif")


def _nan_ir(w: World) -> None:
    (w.ir / "b.png").unlink()
    _float_tiff(w.ir / "b.tif")


def _tiny_pair(w: World) -> World:
    _png(w.vis / "small.png", 3, (12, 40))
    _png(w.ir / "small.png", 4, (12, 40))
    return w


def _torch_source(w: World) -> World:
    from safetensors.numpy import save_file

    (w.tmp / "ckpt").mkdir()
    save_file({"x": np.zeros(2, np.float32)}, str(w.tmp / "ckpt" / "model.safetensors"))
    return w


# (id, entry point, argv(w), what the one line must name (w), set-up)
INPROCESS_CASES = [
    (
        "fuse: --vis_dir == --ir_dir",
        fuse.main,
        lambda w: _fuse_dirs(w.export, w.vis, w.vis / ".", w.tmp / "out"),
        lambda w: ["same folder", w.vis],
        None,
    ),
    (
        "fuse: --vis is a folder",
        fuse.main,
        lambda w: _fuse_one(w, vis=w.vis),
        lambda w: [w.vis, "is a folder", "--vis_dir"],
        None,
    ),
    (
        "fuse: --out is not a .png",
        fuse.main,
        lambda w: _fuse_one(w, out=w.tmp / "f.jpg"),
        lambda w: [w.tmp / "f.jpg", "PNG"],
        None,
    ),
    (
        "fuse: --out is a folder",
        fuse.main,
        lambda w: _fuse_one(w, out=w.folder_png),
        lambda w: [w.folder_png, "is a folder"],
        None,
    ),
    (
        "fuse: --out_dir is a file",
        fuse.main,
        lambda w: _fuse_dirs(w.export, w.vis, w.ir, w.file),
        lambda w: [w.file, "not a folder"],
        None,
    ),
    (
        "fuse: --ir is an empty file",
        fuse.main,
        lambda w: _fuse_one(w, ir=w.tmp / "empty.png"),
        lambda w: [w.tmp / "empty.png", "zero-byte"],
        lambda w: (w.tmp / "empty.png").write_bytes(b"") and w,
    ),
    (
        "fuse: --vis is a GIF",
        fuse.main,
        lambda w: _fuse_one(w, vis=w.tmp / "a.gif"),
        lambda w: [w.tmp / "a.gif", "unsupported image format"],
        lambda w: Image.new("L", (32, 32)).save(w.tmp / "a.gif") or w,
    ),
    (
        "fuse: --batch_size=0",
        fuse.main,
        lambda w: _fuse_one(w) + ["--batch_size=0"],
        lambda w: ["--batch_size=0"],
        None,
    ),
    (
        "fuse: a typo in a flag",
        fuse.main,
        lambda w: _fuse_one(w) + ["--overwite"],
        lambda w: ["--overwite", "--help"],
        None,
    ),
    (
        "evaluate: --limit=0",
        evaluate.main,
        lambda w: [f"--dataset=bundle={w.root}", "--limit=0"],
        lambda w: ["--limit=0"],
        None,
    ),
    (
        "evaluate: --save_fused over a method's folder",
        evaluate.main,
        lambda w: [
            f"--dataset=d:bundle={w.root}",
            f"--method=prev={w.tmp / 'eval/fused/average'}",
            f"--out={w.tmp / 'eval'}",
            "--save_fused",
            "--no_progress",
        ],
        lambda w: ["fused images of average", "method prev"],
        _prev_fused,
    ),
    (
        "evaluate: a pair below the minimum size",
        evaluate.main,
        lambda w: [f"--dataset=bundle={w.root}", "--no_progress"],
        lambda w: [w.vis / "small.png", "minimum size 16x16"],
        _tiny_pair,
    ),
    (
        "evaluate: a NaN float source",
        evaluate.main,
        lambda w: [f"--dataset=bundle={w.root}", "--no_progress"],
        lambda w: [w.ir / "b.tif"],
        lambda w: (w.ir / "b.png").unlink() or _float_tiff(w.ir / "b.tif") and w,
    ),
    (
        "evaluate tokenizer: --batch_size=0",
        evaluate.main,
        lambda w: [
            "tokenizer",
            f"--tokenizer={w.export / 'tokenizer'}",
            f"--data=bundle={w.root}",
            "--batch_size=0",
        ],
        lambda w: ["--batch_size=0"],
        None,
    ),
    (
        "evaluate tokenizer: --tokenizer missing",
        evaluate.main,
        lambda w: ["tokenizer", f"--tokenizer={w.tmp / 'no_tok'}", f"--data=bundle={w.root}"],
        lambda w: [w.tmp / "no_tok"],
        None,
    ),
    (
        "inspect: --rows=0",
        inspect_cli.main,
        lambda w: [f"--root={w.root}", "--rows=0"],
        lambda w: ["--rows=0"],
        None,
    ),
    (
        "inspect: --grid is a dataset image",
        inspect_cli.main,
        lambda w: [f"--root={w.root}", f"--grid={w.ir / '..' / 'ir' / 'a.png'}"],
        lambda w: ["--grid", "is the input"],
        None,
    ),
    (
        "inspect: --grid is not a .png",
        inspect_cli.main,
        lambda w: [f"--root={w.root}", f"--grid={w.tmp / 'grid.jpg'}"],
        lambda w: [w.tmp / "grid.jpg", ".png"],
        None,
    ),
    (
        "inspect: --root missing",
        inspect_cli.main,
        lambda w: [f"--root={w.tmp / 'nope'}"],
        lambda w: [w.tmp / "nope", "not found"],
        None,
    ),
]


def _demo_main(argv):
    from tokfusion_jax import demo

    return demo._main(argv)


def _bench_main(argv):
    from tokfusion_jax import bench

    return bench.main(argv)


def _convert_main(argv):
    from convert.__main__ import main

    return main(argv)


def _tfds_main(argv):
    from tokfusion_jax.data import tfds_builders
    from tokfusion_jax.errors import cli_main

    return cli_main(tfds_builders.main)(argv)


INPROCESS_CASES += [
    ("demo: --max_pairs=-1", _demo_main, lambda w: [f"--workdir={w.export}", "--max_pairs=-1"],
     lambda w: ["--max_pairs=-1"], None),
    ("demo: --workdir without an export", _demo_main, lambda w: [f"--workdir={w.root}"],
     lambda w: [w.root, "no inference export"], None),
    ("bench: --json is a folder", _bench_main,
     lambda w: ["--rows=encode", f"--json={w.folder_png}"],
     lambda w: [w.folder_png, "--json", "is a folder"], None),
    ("convert: --out holds the source", _convert_main,
     lambda w: ["titok", f"--source={w.tmp / 'ckpt' / 'model.safetensors'}",
                f"--out={w.tmp / 'ckpt'}"],
     lambda w: [w.tmp / "ckpt", "not touched"], _torch_source),
    ("convert: --out is a file", _convert_main,
     lambda w: ["titok", f"--source={w.file}", f"--out={w.file}"],
     lambda w: [w.file, "not touched"], None),
    ("convert: an unknown model", _convert_main, lambda w: ["cddfusee", "--source=x"],
     lambda w: ["cddfusee", "--help"], None),
    ("tfds_builders: unknown dataset", _tfds_main,
     lambda w: ["--dataset=nope", f"--manual_dir={w.root}", f"--data_dir={w.tmp / 'tfds'}"],
     lambda w: ["--dataset", "nope"], None),
]  # fmt: skip


@pytest.mark.parametrize(
    "main, argv, names, setup",
    [c[1:] for c in INPROCESS_CASES],
    ids=[c[0] for c in INPROCESS_CASES],
)
def test_bad_input_table_in_process(main, argv, names, setup, tiny_export, tmp_path, capsys):
    w = World(tmp_path, tiny_export)
    if setup is not None:
        setup(w)
    before = w.snapshot()
    written_before = set(tmp_path.rglob("*"))
    error_line(call(main, argv(w), capsys), *names(w))
    assert w.snapshot() == before  # no input changed
    assert set(tmp_path.rglob("*")) == written_before  # nothing written


ABSL_CASES = [  # (id, module, argv(w), names(w))
    ("train: --workdir is a file", "tokfusion_jax.train",
     lambda w: ["--config=configs/ivif.py:tiny", f"--workdir={w.file}"],
     lambda w: [w.file, "--workdir", "not a folder"]),
    ("train: a positional argument", "tokfusion_jax.train",
     lambda w: ["--config=configs/ivif.py:tiny", f"--workdir={w.tmp / 'run'}", "stray"],
     lambda w: ["stray"]),
    ("data.cache: --out is a file", "tokfusion_jax.data.cache",
     lambda w: ["--dataset=bundle", f"--root={w.root}", f"--tokenizer={w.export / 'tokenizer'}",
                f"--out={w.file}"],
     lambda w: [w.file, "--out", "not a folder"]),
    ("data.cache: --dtype=float64", "tokfusion_jax.data.cache",
     lambda w: ["--dataset=bundle", f"--root={w.root}", f"--out={w.tmp / 'c'}", "--dtype=float64"],
     lambda w: ["--dtype", "float64"]),
    ("probe: --out is a file", "tokfusion_jax.probe",
     lambda w: [f"--workdir={w.export}", f"--out={w.file}"],
     lambda w: [w.file, "not a folder"]),
    ("probe: --slots=0", "tokfusion_jax.probe", lambda w: [f"--workdir={w.export}", "--slots=0"],
     lambda w: ["--slots='0'", "positive"]),
    ("sweep: --workdir is a file", "tokfusion_jax.sweep",
     lambda w: ["--sweep=configs/sweeps/tiny.py", f"--workdir={w.file}"],
     lambda w: [w.file, "--workdir"]),
    ("sweep: --set without =", "tokfusion_jax.sweep",
     lambda w: ["--sweep=configs/sweeps/tiny.py", f"--workdir={w.tmp / 's'}", "--set=data.root"],
     lambda w: ["--set='data.root'"]),
    ("models.fusion: a config without a model section", "tokfusion_jax.models.fusion",
     lambda w: [f"--config={w.tmp / 'nomodel.py'}"], lambda w: ["no 'model' section"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "module, argv, names", [c[1:] for c in ABSL_CASES], ids=[c[0] for c in ABSL_CASES]
)
def test_bad_input_table_absl_clis(module, argv, names, tiny_export, tmp_path):
    from cli_helpers import run_module

    w = World(tmp_path, tiny_export)
    (tmp_path / "nomodel.py").write_text(
        "import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict()\n"
    )
    before = w.snapshot()
    error_line(run_module(module, *argv(w)), *names(w))
    assert w.snapshot() == before
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()
