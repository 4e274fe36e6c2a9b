"""The benchmark evaluator: baselines, folders of fused images, tables and output files."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest
from PIL import Image
from tolerances import METRIC_RTOL

from tokfusion_jax import evaluate, metrics

NAMES = ("EN", "SD", "SSIM")


def _write(path: pathlib.Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> pathlib.Path:
    """A bundle-layout IVIF set: 3 pairs, two sizes, colour visible images, gray infrared."""
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (24, 32), "b": (24, 32), "c": (20, 28)}.items():
        _write(root / "vis" / f"{name}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        _write(root / "ir" / f"{name}.png", rng.integers(0, 256, (h, w), dtype=np.uint8))
    return root


def test_read_gray_follows_each_convention(tiny_dataset):
    path = tiny_dataset / "vis" / "a.png"
    rgb = np.asarray(Image.open(path), np.float64)
    pil_l = np.asarray(Image.open(path).convert("L"))
    np.testing.assert_array_equal(evaluate.read_gray_u8(path, "ivif_zoo"), pil_l)
    cd = evaluate.read_gray_u8(path, "cddfuse")
    want = np.round(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114)
    assert np.abs(cd.astype(int) - want).max() <= 1  # float32 arithmetic vs float64 here
    assert np.abs(cd.astype(int) - pil_l).max() <= 1


def test_vifb_scores_images_as_stored_and_tang_reads_like_matlab(tiny_dataset, tmp_path):
    """vifb: colour visible images stay colour (the baselines become colour, scored per
    channel against the gray infrared); tang: MATLAB rgb2gray of the colour files."""
    path = tiny_dataset / "vis" / "a.png"
    rgb = np.asarray(Image.open(path))
    np.testing.assert_array_equal(evaluate.read_image(path, "vifb"), rgb)
    want = np.floor(rgb.astype(np.float64) @ metrics.ops.MATLAB_GRAY_COEFFS + 0.5)
    np.testing.assert_array_equal(evaluate.read_gray_u8(path, "tang"), want)
    specs = evaluate.parse_datasets(["tiny:bundle"], [str(tiny_dataset)])
    names = ("EN", "SF", "Qcv")
    rows = evaluate.evaluate(
        [evaluate.Method("max", "baseline")], specs, names=names, convention="vifb", progress=False
    )
    got = {r["name"]: r for r in rows}
    for name in ("a", "c"):
        vis = np.asarray(Image.open(tiny_dataset / "vis" / f"{name}.png"))
        ir = np.asarray(Image.open(tiny_dataset / "ir" / f"{name}.png"))
        fused = np.maximum(vis, ir[..., None])  # (H, W, 3)
        want = metrics.compute(fused, ir, vis, names=names, convention="vifb")
        for n in names:
            assert got[name][n] == pytest.approx(want[n], rel=1e-12), (name, n)
    assert evaluate.metric_names("paper", "tang") == ("EN", "SD", "SCD", "SF", "AG", "SSIM")
    assert evaluate.metric_names("all", "vifb") == metrics.convention_metrics("vifb")


def test_baselines_and_folder_method_scores(tiny_dataset, tmp_path):
    # A folder of "published" fused images: the per-pixel max, so it must score like `max`.
    fused_dir = tmp_path / "published" / "tiny"
    for name in ("a", "b", "c"):
        v = evaluate.read_gray_u8(tiny_dataset / "vis" / f"{name}.png")
        i = evaluate.read_gray_u8(tiny_dataset / "ir" / f"{name}.png")
        _write(fused_dir / f"{name}.png", np.maximum(v, i))
    methods = [
        evaluate.Method("average", "baseline"),
        evaluate.Method("max", "baseline"),
        evaluate.parse_method(f"pub={tmp_path / 'published'}"),
    ]
    assert methods[2].kind == "folder"
    specs = evaluate.parse_datasets(["tiny:bundle"], [str(tiny_dataset)])
    rows = evaluate.evaluate(methods, specs, names=NAMES, progress=False, batch_size=2)
    assert len(rows) == 9
    by = {(r["method"], r["name"]): r for r in rows}
    for name in ("a", "b", "c"):
        v = evaluate.read_gray_u8(tiny_dataset / "vis" / f"{name}.png")
        i = evaluate.read_gray_u8(tiny_dataset / "ir" / f"{name}.png")
        avg = np.floor((v.astype(float) + i) / 2 + 0.5).astype(np.uint8)
        want = metrics.compute(avg, i, v, names=NAMES)
        for n in NAMES:
            assert by[("average", name)][n] == pytest.approx(want[n], rel=METRIC_RTOL[n]), n
            assert by[("pub", name)][n] == by[("max", name)][n]

    summary = evaluate.summarize(rows, NAMES)
    assert summary["max"]["tiny"]["n"] == 3
    assert summary["max"]["tiny"]["EN"] == pytest.approx(
        np.mean([by[("max", k)]["EN"] for k in "abc"])
    )
    table = evaluate.markdown_table(summary, ["tiny"], NAMES)
    lines = table.splitlines()
    assert lines[0] == "| Method | tiny EN | tiny SD | tiny SSIM |"
    assert len(lines) == 5
    best_sd = max(summary[m]["tiny"]["SD"] for m in summary)
    bold = [ln for ln in lines[2:] if f"**{evaluate._fmt(best_sd)}**" in ln]
    assert bold  # the best SD is bold (max and pub tie: both bold)
    # with three methods the second best is underlined
    assert "<u>" in table


def test_cli_writes_table_csv_json_and_fused_images(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    table = evaluate.main(
        [
            f"--dataset=bundle={tiny_dataset}",
            "--metrics=EN,SD",
            f"--out={out}",
            "--save_fused",
            "--no_progress",
        ]
    )
    assert capsys.readouterr().out.strip() == table
    assert (out / "table.md").read_text().strip() == table
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and set(rows[0]) == {"method", "dataset", "name", "EN", "SD"}
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["convention"] == "ivif_zoo"
    assert len(data["per_image"]) == 6
    saved = np.asarray(Image.open(out / "fused" / "max" / "bundle" / "c.png"))
    v = evaluate.read_gray_u8(tiny_dataset / "vis" / "c.png")
    i = evaluate.read_gray_u8(tiny_dataset / "ir" / "c.png")
    np.testing.assert_array_equal(saved, np.maximum(v, i))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset=tno"], "1 dataset(s) but 0 --root"),
        (["--dataset=nope", "--root=x"], "unknown dataset preset"),
        (["--dataset=tno", "--root=/nonexistent/tno"], "/nonexistent/tno"),
        (["--dataset=bundle=DS", "--metrics=PSNRX"], "unknown metric(s) ['PSNRX']"),
        (["--dataset=bundle=DS", "--metrics=PSNR"], "'ivif_zoo' does not define ['PSNR']"),
        (["--dataset=bundle=DS", "--method=x=/nonexistent/run"], "/nonexistent/run"),
        (["--dataset=bundle=DS", "--baselines=median"], "median"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, message, tiny_dataset, capsys):
    argv = [a.replace("DS", str(tiny_dataset)) for a in argv]
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv + ["--no_progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert message in err


def test_missing_fused_file_names_it(tiny_dataset, tmp_path, capsys):
    folder = tmp_path / "partial"
    _write(folder / "a.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(SystemExit):
        evaluate.main([f"--dataset=bundle={tiny_dataset}", f"--method=p={folder}", "--no_progress"])
    err = capsys.readouterr().err
    assert "fused image missing" in err and str(folder / "b") in err
    # A fused image of the wrong size is named too.
    _write(folder / "b.png", np.zeros((10, 10), np.uint8))
    _write(folder / "c.png", np.zeros((20, 28), np.uint8))
    with pytest.raises(SystemExit):
        evaluate.main([f"--dataset=bundle={tiny_dataset}", f"--method=p={folder}", "--no_progress"])
    err = capsys.readouterr().err
    assert f"{folder / 'b.png'}: fused image is 10x10" in err


def test_average_baseline_on_real_tno_matches_metric_case(shared_data, metric_cases):
    """The evaluator's average of TNO 01 is the reference case real_tno_01_avg, bit for bit."""
    specs = evaluate.parse_datasets(["tno"], [str(shared_data / "tno" / "test")])
    rows = evaluate.evaluate(
        [evaluate.Method("average", "baseline")],
        specs,
        names=("EN", "SD"),
        limit=1,
        progress=False,
    )
    case = metric_cases / "real_tno_01_avg"
    f, a, b = (np.asarray(Image.open(case / f"{n}.png")) for n in ("fused", "ir", "vis"))
    want = metrics.compute(f, a, b, names=("EN", "SD"))
    assert rows[0]["name"] == "01"
    assert rows[0]["EN"] == pytest.approx(want["EN"], rel=METRIC_RTOL["EN"])
    assert rows[0]["SD"] == pytest.approx(want["SD"], rel=METRIC_RTOL["SD"])


def test_reconstruction_scores_scale():
    x = np.full((16, 16), 0.5)
    y = x + 2.0 / 255.0  # 2 grey levels off everywhere -> MSE 4 on the 0..255 scale
    s = evaluate.reconstruction_scores(x, y)
    assert s["MSE"] == pytest.approx(4.0)
    assert s["PSNR"] == pytest.approx(10 * np.log10(255.0**2 / 4.0))
    assert evaluate.reconstruction_scores(x, x)["SSIM"] == pytest.approx(1.0)


def test_tokenizer_study_per_domain(tiny_dataset, tmp_path, capsys):
    from tokfusion_jax import trainer
    from tokfusion_jax.models import titok

    tok = titok.create(trainer.random_tiny_tokenizer_config(32, 8, 12), seed=0)
    titok.save(tok, tmp_path / "tok")
    med = tmp_path / "med"
    rng = np.random.default_rng(5)
    for mod in ("mri", "ct"):
        _write(med / mod / "11.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    table = evaluate.main(
        [
            "tokenizer",
            f"--tokenizer={tmp_path / 'tok'}",
            f"--data=bundle={tiny_dataset}",
            f"--data=harvard_ct={med}",
            "--batch_size=1",
            f"--out={tmp_path / 'o'}",
            "--no_progress",
        ]  # fmt: skip
    )
    assert capsys.readouterr().out.strip() == table
    data = json.loads((tmp_path / "o" / "tokenizer.json").read_text())
    assert {d: v["n"] for d, v in data["domains"].items()} == {
        "infrared": 3, "medical": 2, "visible": 3
    }  # fmt: skip
    rows = data["per_image"]
    assert len(rows) == 8
    for r in rows:
        assert r["PSNR"] == pytest.approx(10 * np.log10(255.0**2 / r["MSE"]))
        assert r["MSE"] > 0 and -1 <= r["SSIM"] <= 1
    ir_rows = [r for r in rows if r["domain"] == "infrared"]
    assert data["domains"]["infrared"]["MSE"] == pytest.approx(np.mean([r["MSE"] for r in ir_rows]))
    assert {r["name"] for r in ir_rows} == {"a:ir", "b:ir", "c:ir"}
