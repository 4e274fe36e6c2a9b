"""TokFusion end to end on tiny random TiTok tokenizers: trees, tokens, both stages, gradients."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import ELEMENTARY_ULPS, U16, U32, U64, fusion_chain, rounding_bound

from tokfusion_jax import configlib, losses
from tokfusion_jax.errors import ConfigError
from tokfusion_jax.models import config as model_config_lib
from tokfusion_jax.models import fusion, interface, titok

N_TOKENS, TOKEN_DIM = 8, 12  # TiTokConfig.tiny()
# XLA's cheapest CPU code generation: the tiny graphs below run once, so compile time is
# nearly all that counts (several times shorter); each comparison compiles both sides alike.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
    """`jax.jit` with `FAST_COMPILE` (also usable as a decorator)."""
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def tiny_tokenizer(**overrides) -> titok.Tokenizer:
    """A random tiny TiTok whose weights are drawn on the host (no RNG compile)."""
    cfg = titok.TiTokConfig.tiny(finetune_decoder=False, is_legacy=False, **overrides)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: rng.normal(0.0, 0.05, s.shape).astype(np.float32), titok.abstract_params(cfg)
    )
    return titok.from_params(cfg, params)


def tiny_config(**overrides):
    cfg = model_config_lib.model_config()
    cfg.dim, cfg.heads = 8, 2
    cfg.enc_blocks = cfg.dec_blocks = cfg.detail_layers = 1
    cfg.tokens.num_tokens, cfg.tokens.input_size = N_TOKENS, 32
    cfg.ste.positions = (2, 5)
    return configlib.apply_overrides(cfg, overrides.items(), "test")


def images(shape, seed):
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.standard_normal(shape), axis=2) * 0.05
    return jnp.asarray(np.clip(0.5 + smooth + 0.05 * rng.standard_normal(shape), 0, 1), jnp.float32)


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ----------------------------------------------------------------------------- trees


def test_plain_2d_ablation_is_cddfuse_sized():
    cfg = model_config_lib.model_config()
    cfg.use_tokens = False
    model = fusion.TokFusion(cfg)
    shapes = jax.eval_shape(lambda k: model.init(k, stage=2), jax.random.key(0))
    assert set(shapes) == {"encoder", "decoder", "base_fuse", "detail_fuse"}
    assert count(shapes) == 1_188_272
    assert "patch_embed" in shapes["encoder"]


def test_paper_setting_parameter_breakdown():
    model = fusion.TokFusion(model_config_lib.model_config())
    shapes = jax.eval_shape(lambda k: model.init(k, stage=2), jax.random.key(0))
    counts = model.param_counts(shapes)
    assert counts["ste"] == 32 * 12
    assert counts["interface"] == 101_825
    assert counts["encoder"] == 599_144 - 576  # F_hat replaces patch_embed
    assert counts["total"] == 1_289_905
    assert abs(counts["total"] - 1_325_000) / 1_325_000 < 0.03  # the paper's 1.325 M


def test_init_tree_stages_and_rules():
    model = fusion.TokFusion(tiny_config())
    p1 = model.init(jax.random.key(0), stage=1, image_size=(64, 64))
    assert set(p1) == {"ste", "interface", "encoder", "decoder"}
    p2 = model.extend_to_stage2(p1, jax.random.key(1))
    assert set(p2) == set(p1) | {"base_fuse", "detail_fuse"}
    assert all(p2[k] is p1[k] for k in p1)  # trained parts kept as they are
    # The host-drawn tree has exactly the flax tree's structure, shapes and float32 dtype.
    traced = jax.eval_shape(lambda k: model.init_traced(k, stage=2), jax.random.key(0))
    assert jax.tree_util.tree_structure(traced) == jax.tree_util.tree_structure(p2)
    for a, b in zip(jax.tree_util.tree_leaves(traced), jax.tree_util.tree_leaves(p2), strict=True):
        assert a.shape == b.shape and b.dtype == jnp.float32
    # Same rng -> same params; other rng -> other params; the declared distributions hold.
    again = model.init(jax.random.key(0), stage=1)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(again), strict=True
        )
    )
    other = model.init(jax.random.key(7), stage=1)
    assert not np.array_equal(
        other["decoder"]["head_1"]["kernel"], p1["decoder"]["head_1"]["kernel"]
    )
    k = p1["encoder"]["level1_0"]["attn"]["qkv"]["kernel"]  # (1, 1, 8, 24): fan_in 8
    assert float(jnp.abs(k).max()) <= 1 / math.sqrt(8) and float(jnp.std(k)) > 0.1
    np.testing.assert_array_equal(p1["ste"]["delta"], np.zeros((N_TOKENS, TOKEN_DIM)))
    np.testing.assert_array_equal(p1["encoder"]["level1_0"]["norm1"]["weight"], np.ones(8))
    np.testing.assert_array_equal(p1["encoder"]["level1_0"]["norm1"]["bias"], np.zeros(8))
    assert float(p1["interface"]["refine_scale"]) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="image_size"):
        model.init(jax.random.key(0), stage=1, image_size=(60, 64))


def test_unshared_trees():
    model = fusion.TokFusion(tiny_config(**{"share_encoder": False, "ste.shared": False}))
    p = model.init(jax.random.key(0), stage=1)
    assert set(p["encoder"]) == {"vis", "ir"} and set(p["ste"]) == {"vis", "ir"}
    assert not np.array_equal(
        p["encoder"]["vis"]["level1_0"]["attn"]["qkv"]["kernel"],
        p["encoder"]["ir"]["level1_0"]["attn"]["qkv"]["kernel"],
    )
    no_ste = fusion.TokFusion(tiny_config(use_ste=False)).init(jax.random.key(0))
    assert "ste" not in no_ste and "interface" in no_ste


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("residual", "both", "model.residual"),
        ("tokens.source", "raw", "model.tokens.source"),
        ("ste.positions", (3, 8), "model.ste.positions"),
        ("heads", 3, "model.dim"),
        ("dtype", "float64", "model.dtype"),
        ("remat", 1, "model.remat"),
        ("encoder_input", "concat", "model.encoder_input"),
    ],
)
def test_bad_config_names_key(key, value, message):
    cfg = tiny_config().to_dict()  # a plain dict: ConfigDict itself would refuse wrong types
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        fusion.TokFusion(cfg)


# ----------------------------------------------------------------------------- tokens


def test_tokens_resize_sources_and_checks(tok):
    image = images((2, 64, 48, 1), 0)
    cont = fusion.TokFusion(tiny_config(**{"tokens.source": "continuous"}))
    z = cont.tokens(tok, image)
    assert z.shape == (2, N_TOKENS, TOKEN_DIM) and z.dtype == jnp.float32
    # Independent resize: PyTorch's antialiased bicubic (a = -0.5), clipped, replicated to RGB.
    small = F.interpolate(
        torch.from_numpy(np.asarray(image, np.float64)).permute(0, 3, 1, 2),
        size=(32, 32),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    ).clamp(0, 1)
    small = small.permute(0, 2, 3, 1).numpy()
    # The same resize as the model's, against PyTorch's: 64 -> 32 antialiased bicubic has 8 taps
    # per axis (support 4 x scale 2), separable: 2 x 8 products and sums plus the weights'
    # normalisation, on images in [0, 1] with sum|weights| <= 1.25 (a = -0.5).
    resize = lambda x: jnp.clip(  # noqa: E731
        jax.image.resize(x, (2, 32, 32, 1), "bicubic", antialias=True), 0.0, 1.0
    )
    with jax.enable_x64(True):
        err64 = float(jnp.abs(resize(jnp.asarray(image, jnp.float64)) - small).max())
    assert err64 <= rounding_bound(2 * 2 * 8 + 8, 1.25, U64)
    ours = resize(image)
    assert float(jnp.abs(ours - small).max()) <= rounding_bound(2 * 2 * 8 + 8, 1.25, U32)
    # ... and the tokens are the tokenizer's on that resize, replicated to RGB
    np.testing.assert_array_equal(z, titok.encode(tok, jnp.repeat(ours, 3, -1)).continuous)
    quant = fusion.TokFusion(tiny_config()).tokens(tok, image)
    norm = fusion.TokFusion(tiny_config(**{"tokens.source": "normalized"})).tokens(tok, image)
    # l2 norm of unit vectors over C = 12 (squares, a 12-term sum, sqrt) after the normalisation
    # that made them (the same again, and a division): values <= 1
    unit = rounding_bound(2 * (2 * TOKEN_DIM + ELEMENTARY_ULPS) + 1, 1.0)
    np.testing.assert_allclose(jnp.linalg.norm(norm, axis=-1), 1.0, atol=unit)
    np.testing.assert_allclose(jnp.linalg.norm(quant, axis=-1), 1.0, atol=unit)  # unit codes
    np.testing.assert_allclose(norm, z / jnp.linalg.norm(z, axis=-1, keepdims=True), atol=unit)
    # Already at the tokenizer's size: no resize at all.
    at_size = images((1, 32, 32, 1), 1)
    np.testing.assert_array_equal(
        cont.tokens(tok, at_size), titok.encode(tok, jnp.repeat(at_size, 3, -1)).continuous
    )
    assert fusion.TokFusion(tiny_config(use_tokens=False)).tokens(tok, image) is None
    with pytest.raises(ConfigError, match="num_tokens"):
        fusion.TokFusion(tiny_config(**{"tokens.num_tokens": 16})).tokens(tok, image)
    with pytest.raises(ConfigError, match="input_size"):
        fusion.TokFusion(tiny_config(**{"tokens.input_size": 256})).tokens(tok, image)


# ----------------------------------------------------------------------------- both stages


@pytest.mark.heavy(seconds=29)
def test_both_stages_and_gradients_on_tiny_titok(tok):
    model = fusion.TokFusion(tiny_config())
    params = model.init(jax.random.key(0), stage=2, image_size=(64, 64))
    vis, ir = images((2, 64, 64, 1), 2), images((2, 64, 64, 1), 3)
    weights = losses.loss_weights_config()

    @fast_jit
    def run(params, tok_params, vis, ir):
        def stage1(p, tp):
            t = tok.replace(params=tp)
            rv, fv = model.reconstruct(p, model.tokens(t, vis), vis, "vis")
            ri, fi = model.reconstruct(p, model.tokens(t, ir), ir, "ir")
            loss, terms = losses.stage1_loss(vis, ir, rv, ri, fv, fi, weights)
            return loss, (rv, fv)

        def stage2(p, tp):
            t = tok.replace(params=tp)
            fused, feats = model.fuse(p, model.tokens(t, vis), model.tokens(t, ir), vis, ir)
            loss, terms = losses.stage2_loss(vis, ir, fused, feats, weights)
            return loss, fused

        l1, (rv, fv) = stage1(params, tok_params)
        (l2, fused), g2 = jax.value_and_grad(stage2, argnums=(0, 1), has_aux=True)(
            params, tok_params
        )
        return l1, rv, fv, l2, fused, g2

    # Δ is nonzero so that every path through STE is exercised.
    params["ste"]["delta"] = jnp.full((N_TOKENS, TOKEN_DIM), 0.3)
    l1, rv, fv, l2, fused, (g2, g_tok) = run(params, tok.params, vis, ir)
    assert rv.shape == fused.shape == (2, 64, 64, 1)
    assert fv["base"].shape == fv["detail"].shape == (2, 64, 64, 8)
    assert float(fused.min()) > 0 and float(fused.max()) < 1
    assert np.isfinite(float(l1)) and np.isfinite(float(l2))
    mask = interface.hard_mask(N_TOKENS, TOKEN_DIM, (2, 5), (6, 7, 8))
    d = np.asarray(g2["ste"]["delta"])
    assert np.all(d[mask == 0] == 0) and np.all(d[mask == 1] != 0)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(g2))
    assert float(jnp.abs(g2["base_fuse"]["mlp"]["project_out"]["kernel"]).max()) > 0
    assert float(jnp.abs(g2["interface"]["lift"]["kernel"]).max()) > 0
    # The frozen tokenizer gets no gradient at all (stop_gradient on Z).
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(g_tok))


LIGHT = {"enc_blocks": 0, "dec_blocks": 0}  # wiring tests: no transformer blocks


def test_residual_modes_enter_inside_the_sigmoid(tok):
    params = fusion.TokFusion(tiny_config(**LIGHT)).init(jax.random.key(1), stage=2)
    vis, ir = images((1, 16, 16, 1), 4), images((1, 16, 16, 1), 5)
    z_v, z_i = titok.encode(tok, jnp.repeat(jnp.zeros((1, 32, 32, 1)), 3, -1)).quantized, None
    z_i = z_v[:, ::-1]
    outs = {}
    for mode in ("none", "vis", "sum"):
        model = fusion.TokFusion(tiny_config(residual=mode, **LIGHT))

        @fast_jit
        def run(params, z_v, z_i, vis, ir, model=model):
            fused = model.fuse(params, z_v, z_i, vis, ir)[0]
            return fused, model.reconstruct(params, z_v, vis, "vis")[0]

        outs[mode], outs[mode + "_rec"] = run(params, z_v, z_i, vis, ir)

    def through_the_sigmoid(p_none, residual):
        """sigmoid(logit(p_none) + residual) in float64, and the float32 error it may show.

        p_none is a float32 sigmoid output: off by a few ulps (relative u), which moves the
        recovered logit by u / (1 - p); the model's own sum logit + residual and its sigmoid
        round too. A change d in the logit moves the sigmoid by p (1 - p) d (<= d / 4).
        """
        p = np.asarray(p_none, np.float64)
        logit = np.log(p) - np.log1p(-p)
        total = logit + np.asarray(residual, np.float64)
        want = 1 / (1 + np.exp(-total))
        d_logit = (ELEMENTARY_ULPS + 1) * U32 * (1 / (1 - p) + np.abs(logit) + np.abs(total))
        return want, want * (1 - want) * d_logit + ELEMENTARY_ULPS * U32

    for got, p_none, residual in (
        (outs["sum"], outs["none"], vis + ir),
        (outs["vis"], outs["none"], vis),
        (outs["sum_rec"], outs["none_rec"], vis),
    ):
        want, bound = through_the_sigmoid(p_none, residual)
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bound)


@pytest.mark.heavy(seconds=15)
def test_native_resolution_any_size(tok):
    model = fusion.TokFusion(tiny_config(**LIGHT))
    params = model.init(jax.random.key(2), stage=2)
    fuse = fast_jit(model.fuse_images)
    for h, w in ((64, 48), (72, 56), (21, 14)):  # the last one is padded to 24 x 16 and cropped
        vis, ir = images((1, h, w, 1), h), images((1, h, w, 1), w)
        out = fuse(params, tok, vis, ir)
        assert out.shape == (1, h, w, 1) and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match="differ"):
        model.fuse_images(params, tok, vis, ir[:, :-1])


def test_bfloat16_close_to_float32(tok):
    f32 = fusion.TokFusion(tiny_config())
    bf16 = fusion.TokFusion(tiny_config(dtype="bfloat16"))
    params = f32.init(jax.random.key(3), stage=2)
    params["ste"]["delta"] = jnp.full((N_TOKENS, TOKEN_DIM), 0.2)
    vis, ir = images((2, 16, 24, 1), 6), images((2, 16, 24, 1), 7)
    z_v, z_i = f32.tokens(tok, vis), f32.tokens(tok, ir)
    a = fast_jit(f32.fuse)(params, z_v, z_i, vis, ir)[0]
    b = fast_jit(bf16.fuse)(params, z_v, z_i, vis, ir)[0]
    assert b.dtype == jnp.float32
    # bfloat16 keeps 8 significant bits (u = 2^-8): to first order the fused image, a sigmoid
    # (slope <= 1/4) of the decoder's last sum of O(20) bfloat16-rounded terms of size O(1),
    # is off by ~ 20 u / 4 = 5 u. A worst-case bound over every layer would exceed the [0, 1]
    # range of the output: this is the first-order estimate, the float32 path is bounded below.
    assert float(jnp.abs(a - b).max()) <= 5 * U16


@pytest.mark.heavy(seconds=20)
def test_remat_and_patch_embed_input_keep_results(tok):
    """remat only changes memory/compute; encoder_input="add" adds patch_embed(image) to F_hat."""
    plain = fusion.TokFusion(tiny_config(encoder_input="add", **LIGHT))
    remat = fusion.TokFusion(tiny_config(encoder_input="add", remat=True, **LIGHT))
    params = plain.init(jax.random.key(5), stage=2)
    assert "patch_embed" in params["encoder"]
    vis, ir = images((1, 16, 16, 1), 10), images((1, 16, 16, 1), 11)
    z = titok.encode(tok, jnp.repeat(jnp.full((1, 32, 32, 1), 0.5), 3, -1)).quantized

    def loss(model):
        return lambda p: jnp.mean(model.fuse(p, z, z[:, ::-1], vis, ir)[0] ** 2)

    l_a, g_a = fast_jit(jax.value_and_grad(loss(plain)))(params)
    l_b, g_b = fast_jit(jax.value_and_grad(loss(remat)))(params)
    # remat recomputes the same float32 operations; XLA may fuse (and so round) them otherwise:
    # both runs are within the model's float32 bound of the exact value (loss in [0, 1]; each
    # gradient leaf relative to its largest entry, the backward chain mirroring the forward).
    chain = fusion_chain(8, 2, 16 * 16, 0, 0)  # LIGHT: no transformer blocks
    assert abs(float(l_a) - float(l_b)) <= 2 * rounding_bound(chain, 1.0)
    assert float(jnp.abs(g_a["encoder"]["patch_embed"]["kernel"]).max()) > 0
    for a, b in zip(jax.tree_util.tree_leaves(g_a), jax.tree_util.tree_leaves(g_b), strict=True):
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(a, b, atol=2 * rounding_bound(2 * chain, scale))


@pytest.mark.slow
@pytest.mark.heavy(seconds=19)
def test_paper_width_at_256():
    """dim 64 / 8 heads at 256 x 256 (one block per stack to keep CPU time low), both stages."""
    tok = tiny_tokenizer(image_size=256, patch_size=64)
    cfg = model_config_lib.model_config()
    cfg.enc_blocks = cfg.dec_blocks = cfg.detail_layers = 1
    cfg.tokens.num_tokens = N_TOKENS
    cfg.ste.positions = (2, 5)
    model = fusion.TokFusion(cfg)
    params = model.init(jax.random.key(4), stage=2, image_size=(256, 256))
    vis, ir = images((1, 256, 256, 1), 8), images((1, 256, 256, 1), 9)

    @jax.jit  # full size: optimised code runs faster than it compiles slower
    def both(params, tok, vis, ir):
        z_v, z_i = model.tokens(tok, vis), model.tokens(tok, ir)
        rec, feats = model.reconstruct(params, z_v, vis, "vis")
        fused, _ = model.fuse(params, z_v, z_i, vis, ir)
        return rec, feats["base"], fused

    rec, base, fused = both(params, tok, vis, ir)
    assert rec.shape == fused.shape == (1, 256, 256, 1) and base.shape == (1, 256, 256, 64)
    assert bool(jnp.all((fused > 0) & (fused < 1))) and bool(jnp.all(jnp.isfinite(rec)))


# ----------------------------------------------------------------------------- summary CLI


def test_summary_cli(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        textwrap.dedent(
            """
            import ml_collections
            from tokfusion_jax.models.config import model_config

            def get_config():
                c = ml_collections.ConfigDict()
                c.model = model_config()
                c.model.use_tokens = False
                return c
            """
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "tokfusion_jax.models.fusion", f"--config={cfg_file}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "1,188,272" in out.stdout and "interface" not in out.stdout
    # use_tokens=False alone keeps the paper's residual "sum": not CDDFuse's IVF test path.
    assert "its infrared-visible path adds the visible image only" in out.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokfusion_jax.models.fusion",
            f"--config={cfg_file}",
            "--config.model.residual=both",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "model.residual" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "tokfusion_jax.models.fusion", f"--config={tmp_path}/none.py"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "none.py" in missing.stderr.splitlines()[-1]
    text = fusion.summary(model_config_lib.model_config())
    assert "1,289,905" in text and "interface" in text
