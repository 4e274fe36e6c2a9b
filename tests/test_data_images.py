"""Single-image sources and pipelines (tokenizer training): specs, both slots, in-memory decode."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from tokfusion_jax.data import io as imio
from tokfusion_jax.data import pipeline, sources, transforms
from tokfusion_jax.errors import DataError


def write_pairs(root, count, mri=False, size=(20, 28)):
    """`count` pairs: vis/ RGB + ir/ gray (or mri/ + pet/ for a medical bundle)."""
    root = pathlib.Path(root)
    a, b = ("mri", "pet") if mri else ("vis", "ir")
    (root / a).mkdir(parents=True)
    (root / b).mkdir(parents=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            root / a / f"{i}.png"
        )
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / b / f"{i}.png")
    return root


def write_folder(root, count, size=(18, 22)):
    root = pathlib.Path(root)
    root.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def test_pair_images_both_slots_with_domains(tmp_path):
    ivif = write_pairs(tmp_path / "ivif", 3)
    med = write_pairs(tmp_path / "med", 2, mri=True)
    src = sources.image_sources(f"bundle={ivif}, harvard_pet={med}")
    assert len(src) == 10
    recs = list(src)
    assert [r["name"] for r in recs[:2]] == ["0:vis", "0:ir"]
    assert [r["domain"] for r in recs[:2]] == ["visible", "infrared"]
    assert {r["domain"] for r in recs[6:]} == {"medical"}
    assert recs[1]["image"] == str(ivif / "ir" / "0.png")
    assert recs[9]["image"] == str(med / "pet" / "1.png")


def test_folder_spec_natural_order_and_errors(tmp_path):
    folder = write_folder(tmp_path / "plain", 11)
    src = sources.image_sources([f"folder={folder}"])
    assert [r["name"] for r in src][:3] == ["img0", "img1", "img2"]
    assert [r["name"] for r in src][-1] == "img10" and src[0]["domain"] == "image"
    with pytest.raises(DataError, match="expected PRESET=ROOT"):
        sources.image_sources("msrs")
    with pytest.raises(DataError, match="image folder not found"):
        sources.image_sources(f"folder={tmp_path / 'nope'}")
    with pytest.raises(DataError, match="unknown dataset preset"):
        sources.image_sources(f"nosuch={folder}")
    with pytest.raises(DataError, match="no image sources"):
        sources.image_sources(" , ")
    with pytest.raises(IndexError):
        sources.ConcatSource([src, src])[22]


def test_image_pipeline_matches_the_fusion_pipeline_luma(tmp_path):
    """Both slots of a pair decode to the very images the paired pipeline yields."""
    root = write_pairs(tmp_path / "p", 4)
    pairs = sources.from_preset("bundle", root)
    images = sources.PairImages(pairs)
    kw = dict(batch_size=8, image_size=(16, 16), shuffle=False, num_epochs=1)
    kw |= dict(process_index=0, process_count=1)
    single = next(iter(pipeline.make_image_pipeline(images, **kw)))
    paired = next(iter(pipeline.make_pipeline(pairs, **{**kw, "batch_size": 4})))
    assert single["image"].shape == (8, 16, 16, 1) and single["image"].dtype == np.float32
    np.testing.assert_array_equal(single["image"][0::2], paired["vis"])
    np.testing.assert_array_equal(single["image"][1::2], paired["ir"])
    assert list(single["domain"][:2]) == ["visible", "infrared"]
    # The luma at the tokenizer's size, as the fusion model and `evaluate tokenizer` compute it.
    want = transforms.token_input_np(imio.to_luma(imio.load_image(images[0]["image"])), 16)
    np.testing.assert_allclose(single["image"][0, ..., 0], want[..., 0], atol=2e-6)


def test_in_memory_decode_gives_the_same_batches_and_resumes(tmp_path):
    folder = write_folder(tmp_path / "f", 10)
    src = sources.image_sources(f"folder={folder}")
    kw = dict(batch_size=4, image_size=(16, 16), seed=3, flip=True)
    kw |= dict(process_index=0, process_count=1)
    decoded = pipeline.decode_images(src, 16, progress=False)
    assert isinstance(decoded[0]["image"], np.ndarray) and decoded[0]["image"].shape == (16, 16)
    a = iter(pipeline.make_image_pipeline(src, **kw))
    b = iter(pipeline.make_image_pipeline(decoded, **kw))
    first = [next(a) for _ in range(3)]
    for want in first:
        got = next(b)
        np.testing.assert_array_equal(got["image"], want["image"])
        assert list(got["name"]) == list(want["name"])
    state = b.get_state()
    later = [next(b)["image"] for _ in range(2)]
    c = iter(pipeline.make_image_pipeline(decoded, **kw))
    c.set_state(state)
    for want in later:
        np.testing.assert_array_equal(next(c)["image"], want)


def test_small_or_corrupt_images_fail_naming_the_file(tmp_path):
    folder = write_folder(tmp_path / "f", 2, size=(8, 8))
    src = sources.image_sources(f"folder={folder}")
    with pytest.raises(DataError, match=r"img0\.png.*smaller than the minimum size 16x16"):
        pipeline.decode_images(src, 16, progress=False)
    (folder / "img0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"img0\.png"):
        next(
            iter(pipeline.make_image_pipeline(src, batch_size=1, process_index=0, process_count=1))
        )
