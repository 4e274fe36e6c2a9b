"""TFDS builders without TensorFlow: build from a manual dir, read through tfds.data_source."""

import pathlib

import numpy as np
import pytest
from PIL import Image
from tolerances import BT601_FORWARD, DECODE_8BIT

from tokfusion_jax.data import io as imio
from tokfusion_jax.data import pipeline, sources
from tokfusion_jax.errors import DataError

tfds_builders = pytest.importorskip("tokfusion_jax.data.tfds_builders")


def write_split(root, names, jpeg=()):
    """MSRS layout (vi/ RGB, ir/ gray); names in `jpeg` are stored as JPEG, gray-as-RGB ir."""
    root = pathlib.Path(root)
    (root / "vi").mkdir(parents=True)
    (root / "ir").mkdir(parents=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        c = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        g = rng.integers(0, 256, (24, 32), dtype=np.uint8)
        if name in jpeg:
            Image.fromarray(c).save(root / "vi" / f"{name}.jpg")
            Image.fromarray(np.repeat(g[..., None], 3, -1)).save(root / "ir" / f"{name}.png")
        else:
            Image.fromarray(c).save(root / "vi" / f"{name}.png")
            Image.fromarray(g).save(root / "ir" / f"{name}.png")


def batches_by_name(source):
    ds = pipeline.make_pipeline(
        source, batch_size=1, image_size=(16, 16), shuffle=False, num_epochs=1,
        keep_color=True, process_index=0, process_count=1,
    )  # fmt: skip
    return {str(b["name"][0]): b for b in ds}


def test_build_and_read_msrs_without_tensorflow(tmp_path):
    manual = tmp_path / "MSRS"
    write_split(manual / "train", ["00001D", "00002N", "00003D"], jpeg=("00002N",))
    write_split(manual / "test", ["00009N", "00010D"])
    tfds_builders.prepare("msrs", str(manual), str(tmp_path / "tfds"))
    files = sorted(p.name for p in (tmp_path / "tfds").rglob("*.array_record*"))
    assert files and all("array_record" in f for f in files)
    train = tfds_builders.data_source("msrs", "train", str(tmp_path / "tfds"))
    test = tfds_builders.data_source("msrs", "test", str(tmp_path / "tfds"))
    assert len(train) == 3 and len(test) == 2
    rec = next(r for r in train if r["name"] == "00001D")
    assert rec["vis"] == (manual / "train/vi/00001D.png").read_bytes()  # PNG kept byte for byte
    # Same batches as the folder source (JPEG and gray-as-RGB re-encoded losslessly).
    want = batches_by_name(sources.from_preset("msrs", manual / "train"))
    got = batches_by_name(train)
    assert set(got) == set(want)
    for name, b in want.items():
        for key in ("vis", "ir", "vis_cbcr"):
            # gray stored as RGB is re-encoded as 1-channel: its luma (and neutral chroma) come
            # without the BT.601 row's rounding, then the same resize (sum |w| <= 1.25)
            bound = 1.25 * (BT601_FORWARD + DECODE_8BIT)
            np.testing.assert_allclose(got[name][key], b[key], atol=bound, err_msg=f"{name} {key}")


def test_unknown_preset_and_missing_manual_dir(tmp_path):
    from tokfusion_jax.errors import DataError

    with pytest.raises(DataError, match="no TFDS builder for 'bundle'"):
        tfds_builders.prepare("bundle", str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(DataError, match="manual directory not found"):
        tfds_builders.prepare("tno", str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no tno dataset folder in it or below it"):
        tfds_builders.prepare("tno", str(tmp_path / "empty"), str(tmp_path / "out"))


def test_image_sources_from_tfds_splits(tmp_path):
    """tfds=NAME/SPLIT specs: a paired builder gives both slots; any image feature works too."""
    manual = tmp_path / "MSRS"
    write_split(manual, ["00001D", "00002N"])
    tfds_builders.prepare("msrs", str(manual), str(tmp_path / "tfds"))
    data_dir = str(tmp_path / "tfds")
    both = sources.image_sources("tfds=tokfusion_msrs/train", tfds_data_dir=data_dir)
    assert len(both) == 4 and {r["domain"] for r in both} == {"visible", "infrared"}
    folder = sources.image_sources(f"msrs={manual}")
    by_name = {r["name"]: r for r in folder}
    for rec in both:
        assert imio.load_image(rec["image"]).shape[:2] == (24, 32)
        np.testing.assert_allclose(
            imio.to_luma(imio.load_image(rec["image"])),
            imio.to_luma(imio.load_image(by_name[rec["name"]]["image"])),
            atol=1e-6,
        )
    # A generic dataset with an image feature ("vis" here), read undecoded.
    generic = tfds_builders.image_source("tokfusion_msrs", "train", data_dir)
    assert len(generic) == 4
    plain = tfds_builders.TfdsImageSource(
        tfds_builders.tfds.data_source(
            "tokfusion_msrs",
            split="train",
            data_dir=data_dir,
            decoders={"vis": tfds_builders.tfds.decode.SkipDecoding()},
        ),
        "tfds:tokfusion_msrs/train",
        image_key="vis",
    )
    assert len(plain) == 2 and plain[0]["name"] == "tfds:tokfusion_msrs/train:0"
    assert plain[0]["image"][:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DataError, match="tfds=no_such_dataset/train"):
        sources.image_sources("tfds=no_such_dataset/train", tfds_data_dir=data_dir)
