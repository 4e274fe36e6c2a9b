"""Image loading rules, paired sources, presets, manifests and every bad-input case."""

import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image
from tolerances import BT601_FORWARD, DECODE_8BIT, resize_bound

from tokfusion_jax.data import io as imio
from tokfusion_jax.data import pipeline, sources
from tokfusion_jax.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]


def gray(h=24, w=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def rgb(h=24, w=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_pair_folder(root, names, vis_dir="vis", ir_dir="ir", size=(24, 32), exts=None):
    """Writes RGB visible and gray infrared images under root/vis_dir and root/ir_dir."""
    root = pathlib.Path(root)
    (root / vis_dir).mkdir(parents=True, exist_ok=True)
    (root / ir_dir).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        ext_v, ext_i = (exts or {}).get(name, (".png", ".png"))
        Image.fromarray(rgb(*size, seed=i)).save(root / vis_dir / f"{name}{ext_v}")
        Image.fromarray(gray(*size, seed=100 + i)).save(root / ir_dir / f"{name}{ext_i}")
    return root


# ------------------------------------------------------------------------- loading rules


def test_load_8bit_gray_rgb_and_gray_as_rgb(tmp_path):
    g, c = gray(), rgb()
    Image.fromarray(g).save(tmp_path / "g.png")
    Image.fromarray(c).save(tmp_path / "c.png")
    Image.fromarray(np.repeat(g[..., None], 3, -1)).save(tmp_path / "g3.png")
    a = imio.load_image(tmp_path / "g.png")
    assert a.dtype == np.float32 and a.shape == (24, 32)
    np.testing.assert_allclose(a, g / 255.0, atol=DECODE_8BIT)
    np.testing.assert_allclose(imio.load_image(tmp_path / "c.png"), c / 255.0, atol=DECODE_8BIT)
    g3 = imio.load_image(tmp_path / "g3.png")
    assert g3.shape == (24, 32, 3)
    luma_of_gray = BT601_FORWARD + DECODE_8BIT  # luma of gray is gray
    np.testing.assert_allclose(imio.to_luma(g3), g / 255.0, atol=luma_of_gray)


def test_load_16bit_gray_png_and_tiff(tmp_path):
    g16 = np.random.default_rng(1).integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(g16).save(tmp_path / "g16.tif")
    for name in ("g16.png", "g16.tif"):
        a = imio.load_image(tmp_path / name)
        assert a.shape == (20, 30)
        np.testing.assert_allclose(a, g16.astype(np.float64) / 65535.0, atol=DECODE_8BIT)


def test_load_rgba_palette_bilevel_bmp_jpeg(tmp_path):
    c = rgb()
    rgba = np.concatenate([c, np.full((24, 32, 1), 7, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_allclose(imio.load_image(tmp_path / "a.png"), c / 255.0, atol=DECODE_8BIT)
    pal = Image.fromarray(c).quantize(colors=16)
    pal.save(tmp_path / "p.png")
    expected = np.asarray(pal.convert("RGB")) / 255.0
    np.testing.assert_allclose(imio.load_image(tmp_path / "p.png"), expected, atol=DECODE_8BIT)
    bits = gray() > 128
    Image.fromarray(bits).save(tmp_path / "b.png")
    np.testing.assert_array_equal(imio.load_image(tmp_path / "b.png"), bits.astype(np.float32))
    Image.fromarray(c).save(tmp_path / "c.bmp")
    np.testing.assert_allclose(imio.load_image(tmp_path / "c.bmp"), c / 255.0, atol=DECODE_8BIT)
    Image.fromarray(c).save(tmp_path / "c.jpg", quality=95)
    jpeg = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")) / 255.0
    np.testing.assert_allclose(imio.load_image(tmp_path / "c.jpg"), jpeg, atol=DECODE_8BIT)
    # bytes decode the same as the path
    data = (tmp_path / "c.bmp").read_bytes()
    np.testing.assert_array_equal(imio.load_image(data), imio.load_image(tmp_path / "c.bmp"))


def test_split_luma_keeps_chroma(tmp_path):
    c = rgb() / np.float32(255.0)
    y, cbcr = imio.split_luma(c.astype(np.float32))
    np.testing.assert_allclose(y, c @ np.array([0.299, 0.587, 0.114]), atol=BT601_FORWARD)
    assert cbcr.shape == (24, 32, 2)
    y2, cbcr2 = imio.split_luma(gray() / np.float32(255.0))
    assert y2.shape == (24, 32) and np.all(cbcr2 == 0.5)


# -------------------------------------------------------------------------------- sources


def test_pairs_by_stem_with_mixed_extensions(tmp_path):
    exts = {"b": (".jpg", ".bmp"), "c": (".tif", ".png")}
    root = write_pair_folder(tmp_path, ["a", "b", "c", "10", "2"], exts=exts)
    (root / "vis" / "notes.txt").write_text("ignored")
    (root / "ir" / ".DS_Store").write_bytes(b"ignored")
    src = sources.PairedSource(root, "vis", "ir")
    assert [r["name"] for r in src] == ["2", "10", "a", "b", "c"]  # natural order
    rec = src[3]
    assert rec["vis"].endswith("b.jpg") and rec["ir"].endswith("b.bmp")
    assert len(src) == 5 and src.modalities == ("vis", "ir")


@pytest.mark.parametrize(
    "preset,vis_dir,ir_dir,mods",
    [
        ("msrs", "vi", "ir", ("vis", "ir")),
        ("msrs", "vis", "ir", ("vis", "ir")),
        ("roadscene", "crop_LR_visible", "cropinfrared", ("vis", "ir")),
        ("roadscene", "vis", "ir", ("vis", "ir")),
        ("tno", "vi", "ir", ("vis", "ir")),
        ("tno", "VIS", "IR", ("vis", "ir")),
        ("tno", "Test_vi", "Test_ir", ("vis", "ir")),
        ("m3fd", "Vis", "Ir", ("vis", "ir")),
        ("m3fd", "vis", "ir", ("vis", "ir")),
        ("harvard_ct", "MRI", "CT", ("mri", "ct")),
        ("harvard_pet", "mri", "pet", ("mri", "pet")),
        ("harvard_spect", "MRI", "SPECT", ("mri", "spect")),
        ("bundle", "vis", "ir", ("vis", "ir")),
        ("bundle", "mri", "spect", ("mri", "spect")),
    ],
)
def test_preset_layouts(tmp_path, preset, vis_dir, ir_dir, mods):
    write_pair_folder(tmp_path, ["01", "02"], vis_dir=vis_dir, ir_dir=ir_dir)
    src = sources.from_preset(preset, tmp_path)
    assert len(src) == 2 and src.modalities == mods
    assert os.path.basename(os.path.dirname(src[0]["vis"])) == vis_dir
    assert src.color_from == ("ir" if mods[0] == "mri" else "vis")


def test_manifest_plain_and_with_header(tmp_path):
    write_pair_folder(tmp_path, ["a", "b"])
    m = tmp_path / "pairs.tsv"
    m.write_text("# comment\na\tvis/a.png\tir/a.png\n\nb\tvis/b.png\tir/b.png\n")
    src = sources.from_preset("manifest", m)
    assert [r["name"] for r in src] == ["a", "b"] and src[1]["vis"].endswith("vis/b.png")
    h = tmp_path / "h.tsv"
    h.write_text("name\tir\tvis\na\tir/a.png\tvis/a.png\n")
    src = sources.from_preset("manifest", h)
    assert src[0]["vis"].endswith("vis/a.png") and src[0]["ir"].endswith("ir/a.png")


def test_samples_preset():
    ivif, mri_pet = sources.from_preset("samples", ""), sources.from_preset("samples", "mri_pet")
    assert len(ivif) == 4 and ivif.modalities == ("vis", "ir")
    assert len(mri_pet) == 2 and mri_pet.modalities == ("mri", "pet")
    assert os.path.isfile(os.path.join(sources.SAMPLES_DIR, "ATTRIBUTION.md"))


SHARED_LAYOUTS = [
    ("msrs", "msrs/train", 30),
    ("msrs", "msrs/test", 50),
    ("roadscene", "roadscene/test", 50),
    ("roadscene", "roadscene/val", 171),
    ("tno", "tno/test", 42),
    ("harvard_ct", "harvard_mri_ct/test", 21),
    ("harvard_pet", "harvard_mri_pet/test", 42),
    ("harvard_spect", "harvard_mri_spect/test", 73),
    ("bundle", "harvard_mri_spect/test", 73),
]


@pytest.mark.parametrize("preset,rel,count", SHARED_LAYOUTS)
def test_shared_data_presets(shared_data, preset, rel, count):
    src = sources.from_preset(preset, shared_data / rel)
    assert len(src) == count
    sizes = src.check(min_size=16)  # every header readable, pair sizes agree
    assert len(sizes) == count


def test_shared_data_decodes_to_luma(shared_data):
    """MSRS train ir is gray stored as RGB, test ir is 1-channel: both give the same luma rule."""
    for rel in ("msrs/train", "msrs/test", "harvard_mri_pet/test"):
        rec = sources.from_preset("bundle", shared_data / rel)[0]
        for slot in ("vis", "ir"):
            img = imio.load_image(rec[slot])
            ref = np.asarray(Image.open(rec[slot]).convert("RGB"), np.float64) / 255.0
            y_ref = ref @ np.array([0.299, 0.587, 0.114])
            np.testing.assert_allclose(imio.to_luma(img), y_ref, atol=BT601_FORWARD + DECODE_8BIT)


# ------------------------------------------------------------------------------ bad input


def test_missing_modality_folder(tmp_path):
    write_pair_folder(tmp_path, ["a"])
    (tmp_path / "ir" / "a.png").unlink()
    (tmp_path / "ir").rmdir()
    with pytest.raises(DataError, match=r"vis/.*missing|modality folder is missing"):
        sources.from_preset("msrs", tmp_path)
    with pytest.raises(DataError, match=r"modality folder ir/ missing"):
        sources.PairedSource(tmp_path, "vis", "ir")
    with pytest.raises(DataError, match="dataset folder not found"):
        sources.from_preset("tno", tmp_path / "nope")


def test_unpaired_files_listed_or_skipped(tmp_path):
    root = write_pair_folder(tmp_path, ["a", "b", "c"])
    (root / "ir" / "b.png").unlink()
    Image.fromarray(gray()).save(root / "ir" / "z.png")
    with pytest.raises(DataError, match=r"2 unpaired file\(s\).*vis/b\.png.*ir/z\.png"):
        sources.from_preset("bundle", root)
    with pytest.warns(UserWarning, match=r"skipping 2 unpaired"):
        src = sources.from_preset("bundle", root, allow_unpaired=True)
    assert [r["name"] for r in src] == ["a", "c"]


def test_empty_dataset(tmp_path):
    (tmp_path / "vis").mkdir()
    (tmp_path / "ir").mkdir()
    with pytest.raises(DataError, match="empty dataset"):
        sources.from_preset("bundle", tmp_path)
    m = tmp_path / "m.tsv"
    m.write_text("# nothing\n")
    with pytest.raises(DataError, match="empty dataset"):
        sources.from_preset("manifest", m)


def test_unsupported_format(tmp_path):
    root = write_pair_folder(tmp_path, ["a"])
    Image.fromarray(gray()).save(root / "ir" / "b.gif")
    with pytest.raises(DataError, match=r"ir/b\.gif: unsupported image format '\.gif'"):
        sources.from_preset("bundle", root)
    # A GIF saved under a .png name is caught when decoding.
    Image.fromarray(gray()).save(tmp_path / "fake.png", format="GIF")
    with pytest.raises(DataError, match=r"fake\.png: unsupported image format GIF"):
        imio.load_image(tmp_path / "fake.png")


def test_zero_byte_corrupt_and_truncated(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"zero\.png: zero-byte image file"):
        imio.load_image(tmp_path / "zero.png")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=r"junk\.png: not a readable image"):
        imio.load_image(tmp_path / "junk.png")
    Image.fromarray(rgb(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png: corrupt or truncated image"):
        imio.load_image(tmp_path / "cut.png")
    Image.fromarray(rgb(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"cut\.jpg: corrupt or truncated image"):
        imio.load_image(tmp_path / "cut.jpg")
    with pytest.raises(DataError, match=r"gone\.png: image file not found"):
        imio.load_image(tmp_path / "gone.png")


def first_batch(root, **kw):
    src = sources.from_preset("bundle", root)
    ds = pipeline.make_pipeline(
        src,
        batch_size=1,
        image_size=(16, 16),
        shuffle=False,
        process_index=0,
        process_count=1,
        **kw,
    )
    return next(iter(ds))


def test_bad_images_inside_the_pipeline(tmp_path):
    root = write_pair_folder(tmp_path / "sizes", ["a"])
    Image.fromarray(gray(20, 32)).save(root / "ir" / "a.png")
    with pytest.raises(
        DataError, match=r"pair sizes differ: .*vis/a\.png is 32x24, .*ir/a\.png is 32x20"
    ):
        first_batch(root)
    with pytest.raises(DataError, match=r"pair sizes differ"):
        sources.from_preset("bundle", root).check()
    root = write_pair_folder(tmp_path / "small", ["a"], size=(8, 12))
    with pytest.raises(
        DataError, match=r"vis/a\.png: image 12x8 is smaller than the minimum size 16x16"
    ):
        first_batch(root)
    root = write_pair_folder(tmp_path / "zero", ["a"])
    (root / "ir" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"ir/a\.png: zero-byte image file"):
        first_batch(root)


def test_manifest_errors(tmp_path):
    write_pair_folder(tmp_path, ["a"])
    m = tmp_path / "m.tsv"
    m.write_text("a\tvis/a.png\n")
    with pytest.raises(DataError, match=r"m\.tsv:1: expected 3 tab-separated columns"):
        sources.from_preset("manifest", m)
    m.write_text("a\tvis/a.png\tir/a.png\nb\tvis/b.png\tir/b.png\n")
    with pytest.raises(DataError, match=r"2 listed file\(s\) missing: .*vis/b\.png"):
        sources.from_preset("manifest", m)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert len(sources.from_preset("manifest", m, allow_unpaired=True)) == 1
    with pytest.raises(DataError, match="unknown dataset preset 'nope'"):
        sources.from_preset("nope", tmp_path)


def test_inspect_cli_and_error_exit(tmp_path):
    root = write_pair_folder(
        tmp_path / "d", ["a", "b", "c"], vis_dir="crop_LR_visible", ir_dir="cropinfrared"
    )
    grid = tmp_path / "grid.png"
    cmd = [
        sys.executable,
        "-m",
        "tokfusion_jax.data.inspect",
        "--dataset=roadscene",
        f"--root={root}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run([*cmd, f"--grid={grid}"], capture_output=True, text=True, env=env, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "3 pairs" in ok.stdout and "32x24" in ok.stdout and str(grid) in ok.stdout
    assert Image.open(grid).size[0] > 32
    (root / "cropinfrared" / "b.png").unlink()
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: 1 unpaired file(s)")
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["gray", "rgb", "rgba", "palette", "bilevel", "gray16", "jpeg"])
def test_fast_luma_path_matches_numpy_path(tmp_path, kind):
    from tokfusion_jax.data import transforms

    c, g = rgb(30, 40), gray(30, 40)
    images = {
        "gray": Image.fromarray(g),
        "rgb": Image.fromarray(c),
        "rgba": Image.fromarray(np.concatenate([c, g[..., None]], -1)),
        "palette": Image.fromarray(c).quantize(colors=32),
        "bilevel": Image.fromarray(g > 100),
        "gray16": Image.fromarray(g.astype(np.uint16) * 257 + 3),
        "jpeg": Image.fromarray(c),
    }
    path = tmp_path / ("x.jpg" if kind == "jpeg" else "x.png")
    images[kind].save(path)
    data = path.read_bytes()
    slow = imio.to_luma(imio.load_image(path))
    # PIL's float luma against NumPy's (two BT.601 rows), then two resizes by 2 (30x40 -> 16x20)
    luma = 2 * (BT601_FORWARD + DECODE_8BIT)
    np.testing.assert_allclose(imio.decode_luma(data, "x"), slow, atol=luma)
    np.testing.assert_allclose(
        imio.decode_luma(data, "x", (16, 20)),
        transforms.resize(slow, (16, 20)),
        atol=1.25 * luma + 2 * resize_bound(2.0),
    )
