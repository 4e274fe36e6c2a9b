"""grain pipelines: batch format and values, determinism, exact resume, process sharding."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tolerances import BT601_FORWARD, BT601_ROUND_TRIP, DECODE_8BIT, resize_bound

from tokfusion_jax import color
from tokfusion_jax.data import config as data_config_lib
from tokfusion_jax.data import pipeline, sources, transforms
from tokfusion_jax.errors import ConfigError, DataError


def write_folder(root, count, size=(24, 32), sizes=None, ir_is_luma=False, vis="vis", ir="ir"):
    """`count` pairs: RGB visible, gray infrared (or exactly the visible luma, 8-bit)."""
    root = pathlib.Path(root)
    (root / vis).mkdir(parents=True, exist_ok=True)
    (root / ir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = sizes[i] if sizes else size
        c = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if ir_is_luma:
            c = np.repeat(c[..., :1], 3, -1)  # gray stored as RGB: its luma is the gray value
            g = c[..., 0]
        else:
            g = rng.integers(0, 256, (h, w), dtype=np.uint8)
        Image.fromarray(c).save(root / vis / f"{i:03d}.png")
        Image.fromarray(g).save(root / ir / f"{i:03d}.png")
    return sources.from_preset("bundle", root)


@pytest.fixture(scope="module")
def src10(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("p10"), 10)


def make(source, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("image_size", (16, 16))
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return pipeline.make_pipeline(source, **kw)


def names_of(batches):
    return [list(b["name"]) for b in batches]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batch_format_and_values(src10):
    batch = next(iter(make(src10, shuffle=False)))
    assert set(batch) == {"name", "vis", "ir"}
    assert batch["vis"].shape == (4, 16, 16, 1) and batch["ir"].shape == (4, 16, 16, 1)
    assert batch["vis"].dtype == np.float32 and batch["name"].shape == (4,)
    assert list(batch["name"]) == ["000", "001", "002", "003"]
    # Independent reference: float64 BT.601 luma, then jax's bicubic antialiased resize.
    rec = src10[1]
    rgb = np.asarray(Image.open(rec["vis"]), np.float64) / 255.0
    y = rgb @ np.array([0.299, 0.587, 0.114])
    ref = jax.image.resize(jnp.asarray(y), (16, 16), "bicubic", antialias=True)
    # PIL's float32 luma (BT.601 row) and resize (24x32 -> 16x16, scale 2) against the float64
    # luma and jax's float32 resize of the same scale
    bound = BT601_FORWARD + 2 * resize_bound(2.0)
    np.testing.assert_allclose(batch["vis"][1, ..., 0], np.clip(ref, 0, 1), atol=bound)
    ir = np.asarray(Image.open(rec["ir"]), np.float64) / 255.0
    ref_ir = jax.image.resize(jnp.asarray(ir), (16, 16), "bicubic", antialias=True)
    np.testing.assert_allclose(batch["ir"][1, ..., 0], np.clip(ref_ir, 0, 1), atol=bound)


def test_upsampling_and_token_input_agree_with_jax():
    y = np.random.default_rng(0).uniform(0, 1, (20, 28)).astype(np.float32)
    up = transforms.resize(y, (40, 48))
    ref = jax.image.resize(jnp.asarray(y), (40, 48), "bicubic", antialias=True)
    np.testing.assert_allclose(up, np.asarray(ref), atol=2 * resize_bound(1.0))  # two resizes
    host = transforms.token_input_np(y, 32)
    dev = transforms.token_input(jnp.asarray(y)[None, ..., None], 32)[0]
    assert host.shape == (32, 32, 3) and host.min() >= 0 and host.max() <= 1
    np.testing.assert_allclose(host, np.asarray(dev), atol=2 * resize_bound(1.0))


def test_deterministic_per_seed(src10):
    a = names_of(take(iter(make(src10, seed=3)), 5))
    b = names_of(take(iter(make(src10, seed=3)), 5))
    c = names_of(take(iter(make(src10, seed=4)), 5))
    assert a == b and a != c
    first_epoch = sum(a, [])[:10]
    assert sorted(first_epoch) == [f"{i:03d}" for i in range(10)]  # a permutation per epoch
    assert sum(a, [])[10:20] != first_epoch  # reshuffled next epoch


def test_exact_resume_across_epochs(src10):
    it = iter(make(src10, seed=1))
    take(it, 3)  # 12 examples: into the second epoch
    state = it.get_state()
    expected = take(it, 4)
    resumed = iter(make(src10, seed=1))
    resumed.set_state(state)
    got = take(resumed, 4)
    for e, g in zip(expected, got, strict=True):
        assert list(e["name"]) == list(g["name"])
        np.testing.assert_array_equal(e["vis"], g["vis"])
        np.testing.assert_array_equal(e["ir"], g["ir"])


def test_two_processes_disjoint_and_complete(src10):
    seen = []
    for index in range(2):
        ds = make(
            src10, batch_size=2, seed=5, num_epochs=1, drop_remainder=False,
            process_index=index, process_count=2,
        )  # fmt: skip
        seen.append(sum(names_of(list(ds)), []))
    assert len(seen[0]) == len(seen[1]) == 5
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"{i:03d}" for i in range(10)]


def test_finite_epochs_and_remainder(src10):
    kept = list(make(src10, shuffle=False, num_epochs=1, drop_remainder=False))
    assert [len(b["name"]) for b in kept] == [4, 4, 2]
    dropped = list(make(src10, shuffle=False, num_epochs=2, drop_remainder=True))
    assert len(dropped) == 5  # 20 examples / 4


def test_keep_color_restores_rgb(tmp_path):
    src = write_folder(tmp_path, 2)
    batch = next(iter(make(src, batch_size=2, image_size=None, shuffle=False, keep_color=True)))
    assert batch["vis_cbcr"].shape == (2, 24, 32, 2) and batch["ir_cbcr"].shape == (2, 24, 32, 2)
    rgb = np.asarray(Image.open(src[0]["vis"]), np.float32) / 255.0
    back = color.merge_y_cbcr(batch["vis"][0], batch["vis_cbcr"][0])
    np.testing.assert_allclose(back, rgb, atol=BT601_ROUND_TRIP + DECODE_8BIT)
    np.testing.assert_allclose(batch["ir_cbcr"], 0.5)  # gray infrared: neutral chroma


def test_native_sizes(tmp_path):
    src = write_folder(tmp_path, 2, sizes=[(24, 32), (20, 36)])
    batches = list(make(src, batch_size=1, image_size=None, shuffle=False, num_epochs=1))
    assert [b["vis"].shape for b in batches] == [(1, 24, 32, 1), (1, 20, 36, 1)]
    with pytest.raises(DataError, match=r"cannot batch images of different sizes .*000 32x24"):
        next(iter(make(src, batch_size=2, image_size=None, shuffle=False)))


def test_crop_and_flip_identical_for_both_images(tmp_path):
    src = write_folder(tmp_path, 6, ir_is_luma=True)
    kw = dict(batch_size=3, image_size=None, crop_size=12, flip=True, seed=2)
    a = take(iter(make(src, **kw)), 4)
    b = take(iter(make(src, **kw)), 4)
    for x, y in zip(a, b, strict=True):
        assert x["vis"].shape == (3, 12, 12, 1)
        np.testing.assert_array_equal(x["vis"], y["vis"])  # deterministic
        # same crop and flip: the luma of a gray RGB pixel is the gray value up to BT.601 rounding
        np.testing.assert_allclose(x["vis"], x["ir"], atol=BT601_FORWARD + DECODE_8BIT)
    plain = next(iter(make(src, batch_size=3, image_size=None, shuffle=False)))
    crops = next(iter(make(src, batch_size=3, image_size=None, shuffle=False, crop_size=12)))
    assert not np.array_equal(plain["vis"][:, :12, :12], crops["vis"])  # random offsets used
    with pytest.raises(ConfigError, match="token_cache cannot be combined"):
        make(src, token_cache=object(), flip=True)


def test_worker_processes_match_in_process(src10):
    a = names_of(take(iter(make(src10, seed=7)), 4))
    it = iter(make(src10, seed=7, worker_count=1))
    try:
        got = take(it, 2)
        state = it.get_state()  # worker-pipeline state (restore with the same worker_count)
        got += take(it, 2)
        assert names_of(got) == a  # same stream as decoding in-process
        it.set_state(state)
        assert names_of(take(it, 2)) == a[2:]
    finally:
        it.close()


def test_from_config_defaults(src10):
    c = data_config_lib.data_config()
    assert c.image_size == 256 and c.batch_size == 8 and c.keep_color is False
    assert c.token_cache == "" and c.allow_unpaired is False and c.shuffle is True
    c.root = src10.root
    c.image_size = 16
    c.batch_size = 2
    batch = next(iter(pipeline.from_config(c, process_index=0, process_count=1)))
    assert batch["vis"].shape == (2, 16, 16, 1)


def test_shared_data_batches(shared_data):
    src = sources.from_preset("harvard_pet", shared_data / "harvard_mri_pet/test")
    batch = next(iter(make(src, batch_size=2, image_size=(64, 64), keep_color=True)))
    assert batch["vis"].shape == (2, 64, 64, 1)
    assert batch["ir"].min() >= 0.0 and batch["ir"].max() <= 1.0  # bicubic overshoot clipped
    assert np.abs(batch["ir_cbcr"] - 0.5).max() > 0.05  # pseudo-colour PET keeps its chroma


def test_packaged_samples_feed_the_demo():
    c = data_config_lib.data_config()
    c.dataset, c.root, c.image_size, c.batch_size = "samples", "", 64, 4
    batch = next(iter(pipeline.from_config(c, process_index=0, process_count=1)))
    assert batch["vis"].shape == (4, 64, 64, 1) and batch["ir"].shape == (4, 64, 64, 1)
    assert sorted(batch["name"]) == ["00200D", "00964N", "FLIR_07555", "FLIR_08021"]
