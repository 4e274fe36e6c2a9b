"""The fuse CLI and the evaluator's export path, on a tiny untrained export made here."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from PIL import Image
from tolerances import BT601_FORWARD, METRIC_RTOL

from tokfusion_jax import color, configlib, evaluate, export, fuse, metrics, trainer
from tokfusion_jax.models import titok
from tokfusion_jax.models.fusion import TokFusion

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    """An untrained stage-II export with a random tiny tokenizer, via the real save_export."""
    run = tmp_path_factory.mktemp("run")
    config = configlib.load_config(CONFIGS / "ivif.py", "tiny")
    size = int(config.data.image_size)
    num_tokens = int(config.model.tokens.num_tokens)
    token_dim = int(config.model.tokens.token_dim)
    tok = titok.create(trainer.random_tiny_tokenizer_config(size, num_tokens, token_dim), seed=0)
    titok.save(tok, run / "tokenizer")
    params = TokFusion(config.model).init(jax.random.key(0), stage=2, image_size=(size, size))
    config.tokenizer.path = str(run / "tokenizer")
    export.save_export(run, config, params, tok)
    return run


def _save(path: pathlib.Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def folders(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """Three 32x32 pairs: two with colour visible images, one gray.

    One size and batches of one keep the tests to a single compile of the fusion model.
    """
    rng = np.random.default_rng(0)
    vis, ir = tmp_path / "vis", tmp_path / "ir"
    for name, (h, w), colour in (("p1", (32, 32), True), ("p2", (32, 32), True),
                                 ("p3", (32, 32), False)):  # fmt: skip
        shape = (h, w, 3) if colour else (h, w)
        _save(vis / f"{name}.png", rng.integers(0, 256, shape, dtype=np.uint8))
        _save(ir / f"{name}.jpg", rng.integers(0, 256, (h, w), dtype=np.uint8))
    return vis, ir


def test_fuse_folder_batches_restores_colour_and_matches_export(workdir, folders, tmp_path):
    vis, ir = folders
    out = tmp_path / "out"
    counts = fuse.main(
        [
            f"--workdir={workdir}",
            f"--vis_dir={vis}",
            f"--ir_dir={ir}",
            f"--out_dir={out}",
            "--batch_size=1",
            "--no_progress",
        ]  # fmt: skip
    )
    assert counts == {"fused": 3, "skipped": 0}
    p1 = np.asarray(Image.open(out / "p1.png"))
    p3 = np.asarray(Image.open(out / "p3.png"))
    assert p1.shape == (32, 32, 3) and p3.shape == (32, 32)  # colour restored / gray kept

    # The saved luma is the export's fusion, min-max stretched, rounded to 8 bits.
    exp = export.load_export(workdir)
    pair = fuse.load_pair(str(vis / "p3.png"), str(ir / "p3.jpg"))
    y = exp.fuse(pair.vis_y, pair.ir_y)[0, ..., 0]
    want = np.round((y - y.min()) / (y.max() - y.min()) * 255.0)
    assert np.abs(p3.astype(float) - want).max() <= 1  # float32 stretch vs float64 here
    assert p3.min() == 0 and p3.max() == 255
    # Colour output: its luma is the stretched fusion, its chroma the visible image's.
    pair1 = fuse.load_pair(str(vis / "p1.png"), str(ir / "p1.jpg"))
    ycc = color.rgb_to_ycbcr(p1.astype(np.float32) / 255.0)
    inside = np.all((p1 > 0) & (p1 < 255), axis=-1)  # pixels not clipped by the RGB range
    assert inside.mean() > 0.3
    # saving rounds each RGB channel to 8 bits (<= 0.5 / 255): a chroma row's |coefficients| sum
    # to 1, so Cb/Cr move by at most 0.5 / 255, plus the two conversions' float32 rounding
    np.testing.assert_allclose(
        ycc[inside][:, 1:], pair1.cbcr[inside], atol=0.5 / 255 + 2 * BT601_FORWARD
    )

    # Second run: nothing is overwritten.
    before = (out / "p1.png").stat().st_mtime_ns
    counts = fuse.main(
        [
            f"--workdir={workdir}",
            f"--vis_dir={vis}",
            f"--ir_dir={ir}",
            f"--out_dir={out}",
            "--no_progress",
        ]  # fmt: skip
    )
    assert counts == {"fused": 0, "skipped": 3}
    assert (out / "p1.png").stat().st_mtime_ns == before


def test_fuse_single_pair_and_no_overwrite(workdir, folders, tmp_path, capsys):
    vis, ir = folders
    out = tmp_path / "single.png"
    args = [f"--workdir={workdir}", f"--vis={vis / 'p3.png'}", f"--ir={ir / 'p3.jpg'}",
            f"--out={out}", "--nocolor", "--no_progress"]  # fmt: skip
    assert fuse.main(args) == {"fused": 1, "skipped": 0}
    assert np.asarray(Image.open(out)).shape == (32, 32)
    with pytest.raises(SystemExit) as e:
        fuse.main(args)
    assert e.value.code == 2
    assert f"{out}: output exists" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["unpaired", "size", "corrupt", "export"])
def test_fuse_bad_input_one_line_error_naming_the_file(problem, workdir, folders, tmp_path,
                                                       capsys):  # fmt: skip
    vis, ir = folders
    wd = workdir
    if problem == "unpaired":
        _save(vis / "extra.png", np.zeros((8, 8), np.uint8))
        culprit = vis / "extra.png"
    elif problem == "size":
        _save(ir / "p2.jpg", np.zeros((20, 32), np.uint8))
        culprit = ir / "p2.jpg"
    elif problem == "corrupt":
        (vis / "p1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        culprit = vis / "p1.png"
    else:
        wd = tmp_path / "no_run"
        wd.mkdir()
        culprit = wd
    with pytest.raises(SystemExit) as e:
        fuse.main([f"--workdir={wd}", f"--vis_dir={vis}", f"--ir_dir={ir}",
                   f"--out_dir={tmp_path / 'o'}", "--no_progress"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert str(culprit) in err


def test_group_same_size_and_padded_batches():
    sizes = [(4, 6), (5, 5), (4, 6), (4, 6), (5, 5)]
    assert fuse.group_same_size(sizes, 2) == [[0, 2], [3], [1, 4]]
    calls = []

    def fake(vis, ir):
        calls.append(vis.shape[0])
        return vis + ir

    v, i = np.ones((3, 4, 6)), np.full((3, 4, 6), 2.0)
    np.testing.assert_array_equal(fuse.fuse_padded(fake, v, i), np.full((3, 4, 6), 3.0))
    assert calls == [4]  # padded to a power of two, cropped back


def test_evaluate_scores_an_export_method(workdir, folders, tmp_path):
    vis, ir = folders
    root = tmp_path / "ds"
    root.mkdir()
    (root / "vis").symlink_to(vis)
    (root / "ir").symlink_to(ir)
    specs = evaluate.parse_datasets([f"bundle={root}"], [])
    method = evaluate.parse_method(f"ours={workdir}")
    assert method.kind == "export"
    rows = evaluate.evaluate([method], specs, names=("EN", "SD"), progress=False, batch_size=1,
                             save_dir=str(tmp_path / "fused"))  # fmt: skip
    assert [r["name"] for r in rows] == ["p1", "p2", "p3"]
    saved = np.asarray(Image.open(tmp_path / "fused" / "ours" / "bundle" / "p3.png"))
    a = evaluate.read_gray_u8(ir / "p3.jpg")
    b = evaluate.read_gray_u8(vis / "p3.png")
    want = metrics.compute(saved, a, b, names=("EN", "SD"))
    assert rows[2]["EN"] == pytest.approx(want["EN"], rel=METRIC_RTOL["EN"])
    assert rows[2]["SD"] == pytest.approx(want["SD"], rel=METRIC_RTOL["SD"])


def test_export_memory_model_and_per_shape_programs(workdir):
    """XLA's memory analysis of the real export at batch 1 and 2 gives a growing need, and the
    batch-2 program fuses each pair as the batch-1 program does."""
    exp = export.load_export(workdir)
    need = exp.memory_model(32, 32)
    assert need is not None and need.per_item_bytes > 0 and need.need(2) > need.need(1)
    # 32x32 float32 inputs and output alone are 3 * 4 KiB per pair.
    assert need.per_item_bytes >= 3 * 32 * 32 * 4
    rng = np.random.default_rng(1)
    vis, ir = rng.random((2, 32, 32)), rng.random((2, 32, 32))
    both = exp.fuse(vis, ir)
    assert set(exp._executables) == {(1, 32, 32), (2, 32, 32)}  # reused, not recompiled
    for k in range(2):
        np.testing.assert_allclose(both[k], exp.fuse(vis[k], ir[k])[0], atol=1e-6)
