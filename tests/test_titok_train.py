"""Tokenizer training on a tiny TiTok: loss falls, exact resume, restarts, fine-tuning, CLI errors.

The runs use 32x32 synthetic pairs (both images of each pair are training images) and the
``configs/titok.py:tiny`` model (one block per side, 8 tokens, 64 codes) on the 8 test devices.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tokfusion_jax import configlib, optim, titok_train
from tokfusion_jax import sharding as shd
from tokfusion_jax.errors import ConfigError, NonFiniteError
from tokfusion_jax.models import titok

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32


def tiny_config(data, **overrides):
    c = configlib.load_config(REPO / "configs" / "titok.py", "tiny")
    c.data.train = f"bundle={data}"
    c.data.val = f"bundle={data}"
    return configlib.apply_overrides(c, overrides.items(), "test")


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> pathlib.Path:
    """12 synthetic 32x32 pairs (vis/ colour, ir/ gray): smooth blobs and stripes."""
    root = tmp_path_factory.mktemp("titok_pairs")
    (root / "vis").mkdir()
    (root / "ir").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for i in range(12):
        cx, cy = rng.uniform(0.2, 0.8, 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05)
        stripes = 0.5 + 0.4 * np.sin(2 * np.pi * (rng.integers(1, 4) * xx + i / 12))
        vis = np.clip(0.6 * stripes + 0.4 * blob, 0, 1)
        rgb = np.stack([vis, 0.8 * vis, 0.6 * vis + 0.2], -1)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(root / "vis" / f"{i:02d}.png")
        Image.fromarray((blob * 255).astype(np.uint8)).save(root / "ir" / f"{i:02d}.png")
    return root


def state_leaves(workdir, step):
    from orbax import checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        tree = ck.restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")
    return jax.tree_util.tree_map(np.asarray, tree)


@pytest.fixture(scope="session")
def tiny_run(tiny_images, tmp_path_factory):
    """12 steps from scratch (checkpoints every 4, all kept)."""
    config = tiny_config(
        tiny_images,
        **{"train.steps": 12, "train.keep_checkpoints": 5, "val.every_steps": 4, "optim.lr": 3e-3},
    )
    workdir = tmp_path_factory.mktemp("titok_run") / "run"
    return config, titok_train.train(config, workdir)


@pytest.mark.heavy(seconds=20)
def test_trains_from_scratch_and_writes_a_tokenizer(tiny_run):
    config, result = tiny_run
    assert (result.step, result.interrupted) == (12, False)
    records = [r for r in _metrics(result.workdir) if "train/loss" in r]
    losses = [r["train/l2"] for r in records]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    assert losses[-1] < 0.7 * losses[0], losses
    last = records[-1]
    for key in ("train/commitment", "train/codebook", "train/codebook/perplexity"):
        assert key in last and np.isfinite(last[key])
    val = [r for r in _metrics(result.workdir) if "val/PSNR/all" in r]
    assert [r["step"] for r in val] == [4, 8, 12]
    assert {"val/PSNR/visible", "val/PSNR/infrared", "val/SSIM/all"} <= set(val[-1])
    assert val[-1]["val/PSNR/all"] > val[0]["val/PSNR/all"]
    assert list((result.workdir / "tensorboard").glob("events.out.tfevents.*"))

    # The output is a tokenizer directory `titok.load` reads, with its training record.
    tok = titok.load(result.tokenizer_dir)
    meta = titok.read_metadata(result.tokenizer_dir)
    assert meta["training"]["step"] == 12 and meta["training"]["weights"] == "ema"
    assert meta["training"]["config"]["data"]["train"] == config.data.train
    assert tok.config == titok_train.architecture(config)
    ema = state_leaves(result.workdir, 12)["ema"]
    for a, b in zip(
        jax.tree_util.tree_leaves(tok.params), jax.tree_util.tree_leaves(ema), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), b)
    # Its validation PSNR is what `evaluate tokenizer` measures on the same images.
    from tokfusion_jax import evaluate

    specs = evaluate.parse_datasets([f"bundle={config.data.val.split('=', 1)[1]}"], [])
    _, domains = evaluate.tokenizer_study(str(result.tokenizer_dir), specs, progress=False)
    assert domains["visible"]["PSNR"] == pytest.approx(val[-1]["val/PSNR/visible"], abs=1e-3)
    assert domains["infrared"]["SSIM"] == pytest.approx(val[-1]["val/SSIM/infrared"], abs=1e-4)


def _metrics(workdir):
    import json

    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def test_resume_is_bitwise_exact(tiny_run, tmp_path):
    """Remove the last checkpoint and the tokenizer, rerun: the same bits at step 12."""
    config, result = tiny_run
    work = tmp_path / "resumed"
    shutil.copytree(result.workdir, work)
    for step in (12, 8):
        shutil.rmtree(work / "checkpoints" / str(step))
    shutil.rmtree(work / "tokenizer")
    again = titok_train.train(config, work)
    assert again.step == 12
    a, b = state_leaves(result.workdir, 12), state_leaves(work, 12)
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert np.array_equal(x, y), jax.tree_util.keystr(path)
    assert titok.load(work / "tokenizer").sha256 == titok.load(result.tokenizer_dir).sha256


def _step_setup(arch, config):
    opt, sched = optim.adamw(config.optim, 100)
    ctx = titok_train.StepContext(
        arch=arch,
        optimizer=opt,
        schedule=sched,
        loss_weights=config.loss.to_dict(),
        codebook=config.codebook.to_dict(),
        ema_decay=0.999,
        train_codebook=True,
    )
    return opt, ctx


@pytest.mark.heavy(seconds=17)
def test_dead_codes_are_restarted_with_batch_latents(tiny_images):
    """Planted usage: codes 32..63 dead. At a restart step they take this batch's latents.

    (The sharded step itself runs on the 8 test devices in `tiny_run`.)
    """
    config = tiny_config(tiny_images, **{"codebook.usage_decay": 0.999})
    arch = titok_train.architecture(config)
    opt, ctx = _step_setup(arch, config)
    tok = titok.create(arch, seed=1, scheme="titok")
    k = arch.codebook_size
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(8, SIZE, SIZE, 1)).astype(np.float32)}
    state = titok_train.new_state(tok.params, opt, arch, ema=True)
    usage = np.full((k,), 2.0 / k, np.float32)
    usage[k // 2 :] = 0.0
    state = {**state, "usage": jnp.asarray(usage), "step": jnp.int32(3)}  # step 4 is a restart
    # The batch's encoder latents, computed eagerly (no second compile).
    latents = np.asarray(
        titok_train.forward(ctx, tok.params, jnp.asarray(batch["image"]), None)[1]["latents"]
    )
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    step = titok_train.compile_train_step(ctx, mesh, None)
    put = lambda s: jax.device_put(jax.tree_util.tree_map(jnp.array, s), shd.replicated(mesh))
    new, metrics = jax.device_get(step(put(state), {}, batch, jax.random.key(4)))
    emb = np.asarray(new["params"]["quantize"]["embedding"])
    assert float(metrics["codebook/restarted"]) == k // 2
    restarted = emb[k // 2 :]
    # Each dead code is now one of the batch's latents (float32 noise between two programs),
    # distinct ones.
    gaps = np.abs(restarted[:, None, :] - latents[None]).max(axis=-1)  # (K/2, B*N)
    assert gaps.min(axis=1).max() < 1e-5
    assert len(set(gaps.argmin(axis=1).tolist())) == k // 2
    # Live codes only took the optimiser step (at most about lr per element for Adam).
    live_before = np.asarray(tok.params["quantize"]["embedding"])[: k // 2]
    lr = float(ctx.schedule(3))
    assert np.abs(emb[: k // 2] - live_before).max() <= 1.01 * lr
    np.testing.assert_array_equal(new["ema"]["quantize"]["embedding"][k // 2 :], restarted)
    np.testing.assert_allclose(new["usage"][k // 2 :], 1.0 / k)
    # Not a restart step: nothing is re-seeded.
    _, m0 = step(put({**state, "step": jnp.int32(2)}), {}, batch, jax.random.key(4))
    assert float(m0["codebook/restarted"]) == 0.0


@pytest.mark.heavy(seconds=30)
def test_finetune_decoder_only_freezes_the_rest(tiny_images, tmp_path):
    """A converted-style legacy tokenizer (proxy-code head + pixel decoder), decoder only."""
    arch = titok.TiTokConfig.tiny(image_size=SIZE)
    init = titok.create(arch, seed=3)
    titok.save(init, tmp_path / "converted", metadata={"source": "test"})
    config = tiny_config(
        tiny_images,
        **{
            "init_from": str(tmp_path / "converted"),
            "train.trainable": "decoder",
            "train.steps": 4,
            "val.every_steps": 0,
            "ema.decay": 0.0,
        },
    )
    result = titok_train.train(config, tmp_path / "ft")
    tuned = titok.load(result.tokenizer_dir)
    assert tuned.config == arch
    frozen = ("latent_tokens", "encoder", "quantize")
    trained = ("decoder", "pixel_quantize", "pixel_decoder")
    for name in frozen:
        for a, b in zip(
            jax.tree_util.tree_leaves(tuned.params[name]),
            jax.tree_util.tree_leaves(init.params[name]),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in trained:
        changed = [
            not np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(
                jax.tree_util.tree_leaves(tuned.params[name]),
                jax.tree_util.tree_leaves(init.params[name]),
                strict=True,
            )
        ]
        assert any(changed), name
    # The checkpoint holds the trainable modules only (no optimiser state for frozen ones).
    state = state_leaves(result.workdir, 4)
    assert set(state["params"]) == set(trained)
    opt_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)}
    assert not any("encoder" in p for p in opt_paths)
    meta = titok.read_metadata(result.tokenizer_dir)["training"]
    assert set(meta["trainable"]) == set(trained)
    assert meta["init_from"]["sha256"] == init.sha256
    # A different init tokenizer cannot resume this workdir.
    other = titok.create(arch, seed=4)
    titok.save(other, tmp_path / "other")
    from tokfusion_jax.errors import CheckpointError

    bad = configlib.apply_overrides(config, [("init_from", str(tmp_path / "other"))], "test")
    with pytest.raises(CheckpointError, match="use a fresh --workdir"):
        titok_train.train(bad, tmp_path / "ft")


@pytest.mark.heavy(seconds=16)
def test_vae_mode_trains_and_a_nan_stops_the_run(tiny_images, tmp_path):
    """VAE bottleneck (KL term, no codebook); a NaN loss from step 5 stops the run there."""
    config = tiny_config(
        tiny_images,
        **{
            "model.quantize_mode": "vae",
            "train.steps": 8,
            "train.checkpoint_every_steps": 2,
            "train.debug_nan_step": 5,
            "val.every_steps": 0,
            "loss.kl": 1e-3,
            "data.shuffle": False,
        },
    )
    with pytest.raises(NonFiniteError) as info:
        titok_train.train(config, tmp_path / "vae")
    message = str(info.value)
    assert "at step 5" in message and "checkpoints/4" in message, message
    assert "batch [" in message and ":vis" in message, message  # the images of that batch
    records = [r for r in _metrics(tmp_path / "vae") if "train/loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    assert all("train/kl" in r and "train/commitment" not in r for r in records)
    assert records[-1]["train/kl"] > 0
    steps = sorted(int(p.name) for p in (tmp_path / "vae" / "checkpoints").iterdir())
    assert steps == [2, 4]  # nothing written from the non-finite state
    state = state_leaves(tmp_path / "vae", 4)
    assert int(state["step"]) == 4 and int(state["nonfinite_step"]) == -1
    assert "quantize" not in state["params"] and not state["usage"]
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state))
    # The VAE encodes to its posterior mean.
    tok = titok.from_params(titok_train.architecture(config), state["params"])
    out = titok.encode(tok, jnp.zeros((2, SIZE, SIZE, 3)))
    np.testing.assert_array_equal(out.quantized, out.continuous)


def test_trainable_spec_and_config_checks():
    params = {"latent_tokens": 0, "encoder": 0, "quantize": 0, "decoder": 0}
    assert titok_train.trainable_modules("all", params) == tuple(params)
    assert titok_train.trainable_modules("decoder", params) == ("decoder",)
    assert titok_train.trainable_modules("encoder, decoder", params) == tuple(params)
    assert titok_train.trainable_modules("quantize", params) == ("quantize",)
    with pytest.raises(ConfigError, match="'pixel' is neither a group"):
        titok_train.trainable_modules("pixel", params)
    c = titok_train.default_config()
    with pytest.raises(ConfigError, match="config.data.train is not set"):
        titok_train.validate_config(c)
    c.data.train = "folder=x"
    for key, value, match in (
        ("optim.lr", 0.0, "config.optim.lr=0.0"),
        ("codebook.usage_decay", 1.0, "config.codebook.usage_decay"),
        ("export.dtype", "int8", "config.export.dtype"),
        ("model.patch_size", 7, "config.model: image_size=256: must be a multiple"),
        ("init_from", "/no/such/dir", "config.init_from=/no/such/dir"),
    ):
        bad = configlib.apply_overrides(c, [(key, value)], "test")
        with pytest.raises(ConfigError, match=match):
            titok_train.validate_config(bad)


@pytest.mark.heavy(seconds=15)
def test_cli_errors_are_one_line_and_exit_2(tiny_images, tmp_path):
    base = [sys.executable, "-m", "tokfusion_jax.titok_train", "--config=configs/titok.py:tiny"]
    cases = [
        ([f"--workdir={tmp_path / 'a'}"], "config.data.train is not set"),
        ([f"--workdir={tmp_path / 'b'}", "--config.data.train=folder=/no/such"], "not found"),
        (
            [f"--workdir={tmp_path / 'c'}", "--config.optim.nope=1"],
            "--config.optim.nope=1: the config has no key",
        ),
        (
            [f"--workdir={tmp_path / 'd'}", f"--config.data.train=bundle={tiny_images}"]
            + ["--config.data.batch_size=64"],
            "fewer than one batch",
        ),
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for args, message in cases:
        proc = subprocess.run(
            base + args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
