"""TiTok in Flax against the PyTorch twin (convert/titok_torch.py) and float64 NumPy formulas."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import (
    ELEMENTARY_ULPS,
    U16,
    activation_scale,
    decided_codes,
    nearest_codes,
    probable_bound,
    rounding_bound,
    titok_decoder_chain,
    titok_encoder_chain,
)

from tokfusion_jax.errors import CheckpointError, ConfigError
from tokfusion_jax.models import titok
from tokfusion_jax.models.titok import TiTokConfig

torch = pytest.importorskip("torch")
from convert.titok import torch_to_flax  # noqa: E402
from convert.titok_torch import TiTokEncoder, TiTokTorch, init_random_  # noqa: E402

# Flax (XLA) and PyTorch both run float32 with their own kernels: each is within the
# probabilistic float32 bound of the exact value (tests/tolerances.py; a worst-case bound over a
# ViT's depth would exceed the values), so they differ by at most twice that.


def two_implementations(chain: int, *arrays) -> float:
    """The bound on |Flax - PyTorch| for a result `chain` roundings deep (values: `arrays`)."""
    return 2 * probable_bound(chain, activation_scale(*arrays))


def assert_same_codes_where_decided(indices, z, codebook, use_l2_norm, z_bound):
    """Chosen codes agree with the exact nearest ones wherever an error of z up to `z_bound`
    cannot change the choice; a quarter of the tokens is plenty (each agrees by chance with
    odds 1 / codebook size)."""
    decided = decided_codes(z, codebook, use_l2_norm, z_bound)
    assert decided.mean() >= 0.25, decided.mean()
    want = nearest_codes(z, codebook, use_l2_norm)
    np.testing.assert_array_equal(np.asarray(indices)[decided], want[decided])


FAMILIES = {
    # legacy VQ, l2-normalised codebook, 1024-way-style head + soft codebook + pixel decoder
    "legacy_vq": TiTokConfig.tiny(),
    # single-stage VQ with an RGB head, no l2 norm (the *_vq8k family)
    "vq_rgb": TiTokConfig.tiny(
        is_legacy=False, use_l2_norm=False, token_size=16, codebook_size=96, num_tokens=16
    ),
    # VAE (the *_vae_c16 family), 64 px, 3 heads, different decoder width
    "vae": TiTokConfig.tiny(
        image_size=64,
        is_legacy=False,
        quantize_mode="vae",
        token_size=8,
        enc_heads=4,
        dec_width=48,
        dec_heads=3,
    ),
}


def _images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, size, size, 3), dtype=np.float32)


def _pair(cfg: TiTokConfig, seed: int = 0) -> tuple[object, titok.Tokenizer]:
    """A randomly initialised torch twin and the Flax tokenizer converted from it."""
    model = init_random_(TiTokTorch(cfg).eval(), seed)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, titok.from_params(cfg, torch_to_flax(state, cfg))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    cfg = FAMILIES[request.param]
    model, tok = _pair(cfg)
    x = _images(2, cfg.image_size, seed=1)
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2))
        ref["image"] = model.decode(ref["z_quantized"]).permute(0, 2, 3, 1)
        if cfg.is_legacy:
            ref["logits"] = model.decoder(ref["z_quantized"]).permute(0, 2, 3, 1)
    ref = {k: v.numpy() for k, v in ref.items()}
    return cfg, model, tok, x, ref


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_encode_matches_torch(family):
    cfg, _, tok, x, ref = family
    out = titok.encode(tok, x)
    n, c = cfg.num_tokens, cfg.token_size
    assert out.quantized.shape == out.continuous.shape == (2, n, c)
    assert out.indices.shape == (2, n) and out.indices.dtype == jnp.int32
    bound = two_implementations(titok_encoder_chain(cfg), x, ref["continuous"])
    assert _max_err(out.continuous, ref["continuous"]) <= bound
    if cfg.quantize_mode == "vq":
        codebook = tok.params["quantize"]["embedding"]
        assert_same_codes_where_decided(
            out.indices, ref["continuous"], codebook, cfg.use_l2_norm, bound
        )
        decided = np.asarray(out.indices) == ref["indices"]
        # the quantized codes are the codebook rows of the chosen indices, through the
        # straight-through sum z + (code - z) (2 roundings on |z| + |code|), after an l2
        # normalisation of C values when the codebook is normalised
        size = float(np.abs(ref["continuous"]).max() + np.abs(np.asarray(codebook)).max())
        code_bound = rounding_bound(2 * cfg.token_size + 10, max(size, 1.0))
        assert _max_err(out.quantized[decided], ref["quantized"][decided]) <= 2 * code_bound
        assert len(np.unique(ref["indices"])) > 1  # a non-degenerate check
    else:
        assert (np.asarray(out.indices) == -1).all()
        np.testing.assert_array_equal(out.quantized, out.continuous)  # VAE: the mode


def test_decode_matches_torch(family):
    cfg, model, tok, x, ref = family
    out = titok.encode(tok, x)
    # decoded from the twin's own codes: the decoder is checked, not the encoder again
    z_ref = jnp.asarray(ref["quantized"])
    image = titok.decode(tok, z_ref)
    assert image.shape == (2, cfg.image_size, cfg.image_size, 3)
    chain = titok_decoder_chain(cfg)
    assert _max_err(image, ref["image"]) <= two_implementations(chain, z_ref, ref["image"])
    assert np.abs(ref["image"]).max() > 0.1
    if cfg.is_legacy:
        logits = titok.decode_logits(tok, z_ref)
        bound = two_implementations(chain, z_ref, ref["logits"])
        assert _max_err(logits, ref["logits"]) <= bound
    if cfg.quantize_mode == "vq":
        with torch.no_grad():
            want = model.decode_tokens(torch.from_numpy(ref["indices"])).permute(0, 2, 3, 1)
        got = titok.decode_indices(tok, jnp.asarray(ref["indices"]))
        assert _max_err(got, want.numpy()) <= two_implementations(chain, z_ref, want.numpy())
    else:
        with pytest.raises(ConfigError, match="vae"):
            titok.decode_indices(tok, out.indices)


def test_legacy_projection_is_the_row_major_reshape():
    """Token i mixes feature columns f = i (mod N) of every latent (float64 NumPy formula)."""
    cfg = TiTokConfig.tiny(enc_width=64, num_tokens=8, token_size=12)
    tok = titok.create(cfg, seed=3)
    x = _images(2, cfg.image_size, seed=4)
    p = tok.params["encoder"]
    capture = functools.partial(
        tok.model.apply,
        method=titok.TiTok.encode,
        capture_intermediates=lambda m, _: isinstance(m, nn.LayerNorm) and m.name == "ln_post",
    )
    _, state = jax.jit(capture)({"params": tok.params}, x)
    h = np.asarray(state["intermediates"]["encoder"]["ln_post"]["__call__"][0], np.float64)
    b, n, w = h.shape  # (B, N, W)
    kernel = np.asarray(p["conv_out"]["kernel"], np.float64)  # (W, C)
    bias = np.asarray(p["conv_out"]["bias"], np.float64)
    want = np.zeros((b, n, cfg.token_size))
    for i in range(n):
        for c_in in range(w):
            # conv input channel c_in at position i is flat[c_in * N + i] of h's row-major data
            flat = c_in * n + i
            want[:, i] += h[:, flat // w, flat % w][:, None] * kernel[c_in]
    want += bias
    got = titok.encode(tok, x).continuous
    # h is the float32 LN output the projection reads (captured): only the projection's own
    # (w + 1)-term sum rounds, relative to sum |h k| + |b|
    abs_sum = np.zeros_like(want)
    for i in range(n):
        for c_in in range(w):
            flat = c_in * n + i
            abs_sum[:, i] += np.abs(h[:, flat // w, flat % w])[:, None] * np.abs(kernel[c_in])
    abs_sum += np.abs(bias)
    assert _max_err(got, want) <= rounding_bound(w + 1, float(abs_sum.max()))


def test_quantizer_against_numpy_and_first_minimum_on_ties():
    k, c = 16, 6
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((k, c)).astype(np.float32)
    codebook[9] = codebook[4] * 3.0  # same direction: a tie after l2 normalisation
    z = rng.standard_normal((2, 5, c)).astype(np.float32)
    z[0, 0] = codebook[4] * 0.5  # closest to both 4 and 9, equally
    vq = titok.VectorQuantizer(k, c, use_l2_norm=True)
    params = {"embedding": jnp.asarray(codebook)}
    indices, quantized = vq.apply({"params": params}, z)

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    z64, cb64 = unit(z.astype(np.float64)), unit(codebook.astype(np.float64))
    dist = ((z64[:, :, None, :] - cb64[None, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(indices), dist.argmin(-1))
    assert int(indices[0, 0]) == 4
    # the chosen rows, l2-normalised in float32 (2C + 8 roundings on values <= 1)
    np.testing.assert_allclose(quantized, cb64[dist.argmin(-1)], atol=rounding_bound(2 * c + 8, 1))

    # Straight-through: d quantized / d z is the Jacobian of the l2 normalisation.
    w = rng.standard_normal(z.shape).astype(np.float32)
    grad = jax.grad(lambda zz: jnp.sum(vq.apply({"params": params}, zz)[1] * w))(z)
    want = jax.grad(lambda zz: jnp.sum(titok.l2_normalize(zz) * w))(z)
    # two float32 programs of the same Jacobian-vector product: (w - (w.u) u) / ||z||, about
    # 4C + 16 roundings on values <= C max|w| / min||z||
    scale = c * float(np.abs(w).max()) / float(np.linalg.norm(z, axis=-1).min())
    np.testing.assert_allclose(grad, want, atol=2 * rounding_bound(4 * c + 16, scale))
    assert np.abs(np.asarray(grad)).max() > 0


def test_vae_sampling_uses_the_clamped_log_variance():
    cfg = FAMILIES["vae"]
    tok = titok.create(cfg, seed=1)
    x = _images(2, cfg.image_size)
    raw = functools.partial(tok.model.apply, method=_raw_z)
    z = jax.jit(raw)({"params": tok.params}, x, tok.params["latent_tokens"])
    mean, logvar = np.asarray(z[..., :8]), np.clip(np.asarray(z[..., 8:]), -30, 20)
    key = jax.random.key(7)
    out = titok.encode(tok, x, rng=key)
    eps = np.asarray(jax.random.normal(key, mean.shape))
    # the same encoder in two float32 programs (z above, encode here): twice the encoder's
    # bound; the sample adds exp (a few ulps), a product and a sum, the std scaling z's error
    enc = 2 * probable_bound(titok_encoder_chain(cfg), activation_scale(x, z))
    std = np.exp(logvar / 2)
    sample_bound = enc * (1 + float((std * np.abs(eps)).max()) / 2) + rounding_bound(
        ELEMENTARY_ULPS + 3, float((np.abs(mean) + std * np.abs(eps)).max())
    )
    np.testing.assert_allclose(out.quantized, mean + std * eps, atol=sample_bound)
    np.testing.assert_allclose(out.continuous, mean, atol=enc)


def _raw_z(model: titok.TiTok, images, latent_tokens):
    return model.encoder(images, latent_tokens)


def test_encode_inside_user_jit_with_traced_tokenizer_and_bf16():
    cfg = FAMILIES["vq_rgb"]
    tok = titok.create(cfg, seed=0)
    x = jnp.asarray(_images(4, cfg.image_size))

    @jax.jit
    def step(tokenizer, images, delta):
        z = jax.lax.stop_gradient(titok.encode(tokenizer, images).quantized)
        rec = titok.decode(tokenizer, z + delta)
        grad = jax.grad(lambda d: jnp.mean(titok.decode(tokenizer, z + d) ** 2))(delta)
        return jnp.mean((rec - images) ** 2), grad

    delta = jnp.zeros((cfg.num_tokens, cfg.token_size))
    loss, grad = step(tok, x, delta)
    want = jnp.mean((titok.decode(tok, titok.encode(tok, x).quantized) - x) ** 2)
    # one program vs separate ones: the codes agree (equal indices), the decoder twice within its
    # bound of the exact image, the squared error and its mean on top (values <= 1)
    chain = titok_decoder_chain(cfg) + 3 + int(np.prod(x.shape))
    np.testing.assert_allclose(loss, want, rtol=0, atol=2 * probable_bound(chain, 4.0))
    assert grad.shape == delta.shape and float(jnp.abs(grad).max()) > 0
    # Different weights, same static structure: no retrace, different result.
    tok2 = tok.replace(params=jax.tree_util.tree_map(lambda p: p * 1.01, tok.params))
    assert step._cache_size() == 1
    assert float(step(tok2, x, delta)[0]) != float(loss)
    assert step._cache_size() == 1

    f32 = titok.encode(tok, x)
    bf16 = titok.encode(tok, x, dtype=jnp.bfloat16)
    assert bf16.quantized.dtype == jnp.float32 and bf16.continuous.dtype == jnp.float32
    # bfloat16 keeps 8 bits (u = 2^-8); the tokens, a final projection of LayerNorm'd features
    # of size O(1), move by O(10) u to first order: 25 u = 0.1 (a coarse sanity check; the
    # float32 path is bounded tightly above)
    assert _max_err(bf16.continuous, f32.continuous) < 25 * U16
    assert jax.tree_util.tree_leaves(tok.params)[0].dtype == jnp.float32


def test_sharded_encode_matches_single_device(tmp_path):
    devices = jax.devices()
    assert len(devices) == 8
    cfg = TiTokConfig.tiny()
    path = titok.save(titok.create(cfg, seed=2), tmp_path / "tok")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    tok = titok.load(path, sharding=mesh)
    leaf = jax.tree_util.tree_leaves(tok.params)[0]
    assert len(leaf.sharding.device_set) == 8  # replicated over the mesh
    x = _images(8, cfg.image_size, seed=5)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = titok.encode(tok, jax.device_put(x, batch_sharding))
    assert len(sharded.quantized.sharding.device_set) == 8
    single = titok.encode(titok.load(path), x)
    # per-device batches of 1 vs one batch of 8: XLA may pick other kernels for each shape
    bound = 2 * probable_bound(titok_encoder_chain(cfg), activation_scale(x, single.continuous))
    np.testing.assert_allclose(sharded.continuous, single.continuous, atol=bound)
    np.testing.assert_array_equal(np.asarray(sharded.indices), np.asarray(single.indices))


def test_save_load_roundtrip_and_metadata(tmp_path):
    cfg = FAMILIES["vq_rgb"]
    tok = titok.create(cfg, seed=4)
    path = titok.save(tok, tmp_path / "a" / "tok", metadata={"note": "x"})
    meta = json.loads((path / "tokenizer.json").read_text())
    assert meta["params_sha256"] == tok.sha256 == titok.params_sha256(tok.params)
    assert meta["param_count"] == tok.num_params and meta["note"] == "x"
    back = titok.load(path)
    assert back.config == cfg and back.sha256 == tok.sha256
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(tok.params), leaves(back.params), strict=True):
        np.testing.assert_array_equal(a, b)
    # Saving another tokenizer over it replaces it whole.
    other = titok.create(cfg, seed=5)
    titok.save(other, path)
    assert titok.load(path).sha256 == other.sha256 != tok.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == ["tok"]  # no temp dirs left


def test_save_is_atomic_and_refuses_foreign_dirs(tmp_path, monkeypatch):
    tok = titok.create(TiTokConfig.tiny(), seed=0)
    path = titok.save(tok, tmp_path / "tok")
    before = (path / "tokenizer.json").read_text()

    def boom(new, path):
        assert (new / "tokenizer.json").is_file() and (new / "params").is_dir()
        raise OSError("disk full")

    monkeypatch.setattr(titok, "_swap_in", boom)
    with pytest.raises(OSError, match="disk full"):
        titok.save(titok.create(TiTokConfig.tiny(), seed=1), path)
    monkeypatch.undo()
    assert (path / "tokenizer.json").read_text() == before
    assert titok.load(path).sha256 == tok.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.jpg").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a TiTok tokenizer directory"):
        titok.save(tok, foreign)
    assert (foreign / "keep.jpg").read_bytes() == b"x"


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        titok.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing"):
        titok.load(tmp_path / "empty")
    path = titok.save(titok.create(TiTokConfig.tiny(), seed=0), tmp_path / "tok")
    meta = path / "tokenizer.json"
    good = meta.read_text()
    meta.write_text("{truncated")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        titok.load(path)
    record = json.loads(good)
    record["architecture"]["enc_width"] = 63
    meta.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="enc_width"):
        titok.load(path)
    record = json.loads(good)
    record["architecture"]["enc_depth"] = 3  # params on disk have depth 2
    meta.write_text(json.dumps(record))
    # Checked against orbax's metadata before any array is read: keys and shapes are named.
    with pytest.raises(CheckpointError, match=r"params does not match the TiTok config") as err:
        titok.load(path)
    message = str(err.value)
    assert "['encoder']['transformer']['blocks']" in message and "expected (3, " in message
    assert "\n" not in message and "more" in message  # one line, the list is capped


def test_config_variants_and_validation():
    l32 = TiTokConfig.variant("l32")
    assert (l32.enc_width, l32.enc_depth, l32.enc_heads, l32.num_tokens) == (1024, 24, 16, 32)
    assert TiTokConfig.variant("tokenizer_titok_b64_imagenet") == TiTokConfig.variant("b64")
    vae = TiTokConfig.variant("ll32_vae_c16")
    assert vae.encoder_out_channels == 32 and not vae.has_pixel_decoder
    for name in titok.VARIANT_NAMES:
        cfg = TiTokConfig.variant(name)
        assert TiTokConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown TiTok variant 'l33'"):
        TiTokConfig.variant("l33")
    with pytest.raises(ConfigError, match="patch_size"):
        TiTokConfig.tiny(image_size=36)
    with pytest.raises(ConfigError, match="pixel_channel_mult"):
        TiTokConfig.tiny(pixel_channel_mult=(1, 2))
    with pytest.raises(ConfigError, match="unknown TiTok config keys"):
        TiTokConfig.from_dict({"width": 3})
    tok = titok.create(TiTokConfig.tiny(), seed=0)
    with pytest.raises(ConfigError, match=r"\(B, 32, 32, 3\)"):
        titok.encode(tok, jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ConfigError, match=r"\(B, 8, 12\)"):
        titok.decode(tok, jnp.zeros((1, 8, 16)))


@pytest.mark.slow
@pytest.mark.heavy(seconds=45)
def test_full_l32_encoder_and_quantizer_match_torch():
    """The real TiTok-L-32 encoder + quantizer shapes, random weights, one 256x256 image."""
    cfg = TiTokConfig.variant("l32")
    with torch.device("meta"):
        encoder = TiTokEncoder(cfg)
    encoder = init_random_(encoder.to_empty(device="cpu"), seed=0).eval()
    rng = np.random.default_rng(0)
    latent = (rng.standard_normal((32, 1024)) / 32).astype(np.float32)
    codebook = rng.standard_normal((4096, 12)).astype(np.float32)
    state = {"encoder." + k: v.numpy() for k, v in encoder.state_dict().items()}
    state.update({"latent_tokens": latent, "quantize.embedding.weight": codebook})
    params = torch_to_flax(state, cfg, partial=True)
    del state
    tok = titok.Tokenizer(model=titok.TiTok(cfg), params=params, config=cfg)
    x = _images(1, 256, seed=6)
    out = titok.encode(tok, x)
    with torch.inference_mode():
        z = encoder(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(latent))
    cont = z[:, :, 0, :].transpose(1, 2).numpy()  # (1, 32, 12)
    bound = two_implementations(titok_encoder_chain(cfg), x, cont)
    assert _max_err(out.continuous, cont) <= bound
    # nearest on the sphere = max cosine, wherever the float32 error cannot flip the choice
    assert_same_codes_where_decided(out.indices, cont, codebook, True, bound)
    cb = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
    np.testing.assert_allclose(
        out.quantized, cb[np.asarray(out.indices)], atol=2 * rounding_bound(2 * 12 + 8, 1.0)
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_loads_float32(tmp_path, dtype):
    """Stored at half size; `load` restores float32 values equal to the rounded weights."""
    tok = titok.create(TiTokConfig.tiny(), seed=2)
    full = titok.save(tok, tmp_path / "f32")
    half = titok.save(tok, tmp_path / "half", storage_dtype=dtype)
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    assert size(half) < 0.6 * size(full)
    loaded = titok.load(half)
    rounded = jax.tree_util.tree_map(
        lambda x: np.asarray(x).astype(jnp.dtype(dtype)).astype(np.float32), tok.params
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(rounded), strict=True
    ):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), b)
    assert loaded.sha256 == titok.params_sha256(loaded.params)
    assert titok.read_metadata(half)["storage_dtype"] == dtype
    with pytest.raises(ConfigError, match="storage_dtype"):
        titok.save(tok, tmp_path / "bad", storage_dtype="int8")


def test_latents_and_training_init():
    cfg = TiTokConfig.tiny(quantize_mode="vq", is_legacy=False, codebook_size=16)
    tok = titok.create(cfg, seed=0, scheme="titok")
    k = cfg.codebook_size
    emb = np.asarray(tok.params["quantize"]["embedding"])
    assert emb.shape == (k, 12) and np.abs(emb).max() <= 1.0 / k
    kernel = np.asarray(tok.params["encoder"]["transformer"]["blocks"]["c_fc"]["kernel"])
    assert abs(kernel.std() - 0.02) < 0.002
    pos = np.asarray(tok.params["encoder"]["positional_embedding"])
    assert abs(pos.std() - cfg.enc_width**-0.5) < 0.2 * cfg.enc_width**-0.5
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
    z = titok.TiTok(cfg).apply({"params": tok.params}, images, method=titok.TiTok.latents)
    # The same math compiled as two programs: equal up to float32 rounding over the chain.
    cont = titok.encode(tok, images).continuous
    bound = 2 * probable_bound(titok_encoder_chain(cfg), activation_scale(z, cont))
    assert _max_err(z, cont) <= bound
    with pytest.raises(ConfigError, match="init scheme"):
        titok.create(cfg, scheme="xavier")
