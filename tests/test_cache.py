"""Token cache: hit (equals direct encoding), miss, stale tokenizer, changed image, resume, CLI."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tolerances import (
    activation_scale,
    decided_codes,
    probable_bound,
    rounding_bound,
    titok_encoder_chain,
)

from tokfusion_jax.data import cache, pipeline, sources, transforms
from tokfusion_jax.errors import DataError
from tokfusion_jax.models import titok

REPO = pathlib.Path(__file__).resolve().parents[1]


def random_tokenizer(seed: int) -> titok.Tokenizer:
    """A tiny tokenizer (32 px, 8 tokens x 12) with random weights, built without tracing init."""
    config = titok.TiTokConfig.tiny(enc_depth=1, dec_depth=1)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda a: (rng.standard_normal(a.shape) * 0.05).astype(a.dtype),
        titok.abstract_params(config),
    )
    return titok.from_params(config, params)


@pytest.fixture(scope="module")
def tok():
    return random_tokenizer(0)


def write_folder(root, count, size=(40, 48)):
    root = pathlib.Path(root)
    (root / "vis").mkdir(parents=True)
    (root / "ir").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            root / "vis" / f"{i}.png"
        )
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / "ir" / f"{i}.png")
    return sources.from_preset("bundle", root)


def direct_input(tok, path):
    """The tokenizer input the model computes on device (the cache resizes on the host)."""
    y = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
    y = y @ np.array([0.299, 0.587, 0.114], np.float32)
    return transforms.token_input(jnp.asarray(y)[None, ..., None], tok.config.image_size)


def direct_tokens(tok, path):
    """Tokens computed the way the model does it, without the cache."""
    return titok.encode(tok, direct_input(tok, path))


def cache_bound(tok, path) -> float:
    """How far cached tokens may be from `direct_tokens`: the host and device resizes (40x48 ->
    32: <= 6 bicubic taps per axis, separable, on [0, 1] images with sum|weights| <= 1.25) are
    each within float32 rounding of the exact resize; the encoder carries that difference
    scaled by its gain (finite differences on a 1e-3 perturbation, far above rounding, times 2
    for the nonlinearity) and adds its own float32 error in each program (batches of 4 vs 1)."""
    x = direct_input(tok, path)
    resize = 2 * rounding_bound(2 * 2 * 6 + 8, 1.25)
    d = 1e-3 * np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
    base = np.asarray(titok.encode(tok, x).continuous)
    gain = np.abs(np.asarray(titok.encode(tok, x + d).continuous) - base).max() / 1e-3
    encoder = 2 * probable_bound(titok_encoder_chain(tok.config), activation_scale(x, base))
    return 2 * gain * resize + encoder


def test_hit_equals_direct_encoding_and_feeds_the_pipeline(tmp_path, tok):
    src = write_folder(tmp_path / "d", 3)
    stats = cache.build_cache(str(tmp_path / "c"), tok, [src], batch_size=4, progress=False)
    assert (stats.images, stats.encoded, stats.reused) == (6, 6, 0)
    rec = src[1]
    want = direct_tokens(tok, rec["ir"])
    bound = cache_bound(tok, rec["ir"])
    # the codes are compared where no such error can change the choice (most of the 8 tokens)
    cb = tok.params["quantize"]["embedding"]
    decided = decided_codes(want.continuous[0], cb, tok.config.use_l2_norm, bound)
    assert decided.mean() >= 0.5
    for source_name, ref, rows in [
        ("quantized", want.quantized[0], decided),
        ("continuous", want.continuous[0], slice(None)),
        ("normalized", titok.l2_normalize(want.continuous[0]), slice(None)),
    ]:
        tc = cache.TokenCache(str(tmp_path / "c"), tok.sha256, source=source_name)
        got = tc.lookup_bytes(pathlib.Path(rec["ir"]).read_bytes(), rec["ir"])
        assert got.shape == (8, 12) and got.dtype == np.float32
        scale = 1 / float(np.linalg.norm(want.continuous[0], axis=-1).min())  # normalised: / |z|
        atol = bound * (2 * scale if source_name == "normalized" else 1.0)
        np.testing.assert_allclose(got[rows], np.asarray(ref)[rows], atol=atol)
    tc = cache.TokenCache(str(tmp_path / "c"), tok.sha256)
    ds = pipeline.make_pipeline(
        src, batch_size=3, image_size=(32, 32), shuffle=False, token_cache=tc,
        process_index=0, process_count=1,
    )  # fmt: skip
    batch = next(iter(ds))
    assert batch["vis_tokens"].shape == (3, 8, 12) and batch["ir_tokens"].shape == (3, 8, 12)
    np.testing.assert_allclose(
        batch["ir_tokens"][1][decided], np.asarray(want.quantized[0])[decided], atol=bound
    )


def test_resume_after_interruption(tmp_path, tok):
    src = write_folder(tmp_path / "d", 3)
    out = str(tmp_path / "c")
    cache.build_cache(out, tok, [src], batch_size=2, progress=False)
    sha = cache.read_index(out)[os.path.abspath(src[0]["vis"])]
    entry = cache.entry_path(out, sha)
    before = pathlib.Path(cache.entry_path(out, cache.read_index(out)[src[2]["ir"]])).read_bytes()
    os.unlink(entry)  # as if the run stopped before this entry
    pathlib.Path(out, ".tmp-half-written").write_bytes(b"partial")  # a torn temporary file
    stats = cache.build_cache(out, tok, [src], batch_size=2, progress=False)
    assert (stats.encoded, stats.reused) == (1, 5)
    assert os.path.isfile(entry)
    after = pathlib.Path(cache.entry_path(out, cache.read_index(out)[src[2]["ir"]])).read_bytes()
    assert before == after  # finished entries untouched


def test_miss_changed_image_and_corrupt_entry(tmp_path, tok):
    src = write_folder(tmp_path / "d", 2)
    out = str(tmp_path / "c")
    cache.build_cache(out, tok, [src], progress=False)
    tc = cache.TokenCache(out, tok.sha256)
    with pytest.raises(DataError, match=r"new\.png: no tokens cached for this image"):
        tc.lookup_bytes(b"other bytes", str(tmp_path / "new.png"))
    # Overwrite an image in place: same path, new bytes -> refused as stale.
    path = src[0]["vis"]
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(path)
    ds = pipeline.make_pipeline(
        src, batch_size=2, image_size=(32, 32), shuffle=False, token_cache=tc,
        process_index=0, process_count=1,
    )  # fmt: skip
    with pytest.raises(DataError, match=r"vis/0\.png: the image changed since the cache was built"):
        next(iter(ds))
    sha = cache.read_index(out)[os.path.abspath(src[1]["ir"])]
    entry = pathlib.Path(cache.entry_path(out, sha))
    entry.write_bytes(entry.read_bytes()[:40])
    with pytest.raises(DataError, match=r"corrupt token cache entry"):
        tc.lookup(sha, src[1]["ir"])


def test_other_tokenizer_refused(tmp_path, tok):
    src = write_folder(tmp_path / "d", 1)
    out = str(tmp_path / "c")
    cache.build_cache(out, tok, [src], progress=False)
    meta = pathlib.Path(out, cache.META_FILE).read_bytes()
    other = random_tokenizer(1)
    assert other.sha256 != tok.sha256
    with pytest.raises(DataError, match=r"built with tokenizer sha256 .*the cache is stale"):
        cache.TokenCache(out, other.sha256)
    with pytest.raises(DataError, match=r"built with tokenizer sha256"):
        cache.build_cache(out, other, [src], progress=False)
    assert pathlib.Path(out, cache.META_FILE).read_bytes() == meta  # nothing rewritten
    with pytest.raises(DataError, match="not a token cache"):
        cache.TokenCache(str(tmp_path / "d"), tok.sha256)
    with pytest.raises(DataError, match="is not empty and is not a token cache"):
        cache.build_cache(str(tmp_path / "d"), tok, [src], progress=False)


def test_cli_with_config_and_stale_exit(tmp_path, tok):
    src = write_folder(tmp_path / "d", 2)
    tok_dir = titok.save(tok, tmp_path / "tok")
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "import ml_collections\n"
        "from tokfusion_jax.data.config import data_config\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.data = data_config()\n"
        f"    c.data.root = {src.root!r}\n"
        "    c.tokenizer = ml_collections.ConfigDict({'path': " + repr(str(tok_dir)) + "})\n"
        "    return c\n"
    )
    out = tmp_path / "cache"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "tokfusion_jax.data.cache", f"--config={cfg}", f"--out={out}"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "4 images, 4 encoded, 0 already cached" in run.stdout
    meta = json.loads((out / cache.META_FILE).read_text())
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["token_shape"] == [8, 12]
    titok.save(random_tokenizer(2), tmp_path / "tok2")
    stale = subprocess.run(
        [sys.executable, "-m", "tokfusion_jax.data.cache", "--dataset=bundle",
         f"--root={src.root}", f"--tokenizer={tmp_path / 'tok2'}", f"--out={out}"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert stale.returncode == 2
    assert stale.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "built with tokenizer sha256" in stale.stderr


def test_config_reads_val_root_with_the_validation_preset(tmp_path):
    """--config: data.val_root is listed with val.dataset, the training root with data.dataset."""
    import ml_collections

    def folder(root, vis_dir, ir_dir, count):
        (root / vis_dir).mkdir(parents=True)
        (root / ir_dir).mkdir()
        for i in range(count):
            Image.fromarray(np.full((20, 20, 3), 9 * i, np.uint8)).save(root / vis_dir / f"{i}.png")
            Image.fromarray(np.full((20, 20), 9 * i, np.uint8)).save(root / ir_dir / f"{i}.png")
        return str(root)

    # The RoadScene layout is unknown to the MSRS preset (the training preset).
    config = ml_collections.ConfigDict(
        {
            "data": {
                "dataset": "msrs",
                "root": folder(tmp_path / "train", "vi", "ir", 2),
                "val_root": folder(tmp_path / "val", "crop_LR_visible", "cropinfrared", 3),
            },
            "val": {"dataset": "roadscene"},
        }
    )
    srcs = cache._sources_from_config(config, allow_unpaired=False)
    assert [len(s) for s in srcs] == [2, 3]
