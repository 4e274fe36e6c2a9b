"""Training end to end on a tiny model: two stages, devices, resume, signals, NaN, multi-process.

The runs use 32x32 synthetic pairs, an 8-channel model and a random-weight tiny tokenizer. The
subprocess runs share the session's persistent XLA compilation cache (tests/conftest.py), so
that each program compiles once in the whole test run.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tolerances import ADAM_STEP, assert_mostly_close, fusion_chain, probable_bound

from tokfusion_jax import checkpointing, configlib, optim, trainer
from tokfusion_jax import sharding as shd
from tokfusion_jax.errors import NonFiniteError
from tokfusion_jax.models import titok
from tokfusion_jax.models.fusion import TokFusion

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGE = 32
N_PAIRS = 16


def load_config(arg="tiny"):
    return configlib.load_config(REPO / "configs" / "ivif.py", arg)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> pathlib.Path:
    """16 synthetic 32x32 pairs in the MSRS layout (vi/ colour, ir/ gray)."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "vi").mkdir()
    (root / "ir").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:IMAGE, 0:IMAGE] / IMAGE
    for i in range(N_PAIRS):
        base = 0.5 + 0.3 * np.sin(6 * xx + i) * np.cos(4 * yy - i)
        vis = np.clip(base + 0.1 * rng.normal(size=base.shape), 0, 1)
        ir = np.clip(1 - base + 0.3 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.05), 0, 1)
        rgb = np.stack([vis, 0.9 * vis, 0.8 * vis], -1)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(root / "vi" / f"{i:03d}.png")
        Image.fromarray((ir * 255).astype(np.uint8)).save(root / "ir" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> pathlib.Path:
    """A converted-checkpoint directory of a random tiny TiTok (titok.create + titok.save)."""
    path = tmp_path_factory.mktemp("tok") / "titok_tiny"
    tok = titok.create(trainer.random_tiny_tokenizer_config(IMAGE, 32, 12), seed=0)
    titok.save(tok, path)
    return path


@pytest.fixture(scope="session")
def token_cache(tiny_data, tiny_tokenizer, tmp_path_factory) -> pathlib.Path:
    """The tiny tokenizer's tokens of `tiny_data`: the subprocess runs compile a smaller step."""
    from tokfusion_jax.data import cache

    out = tmp_path_factory.mktemp("tokens")
    tok = titok.load(tiny_tokenizer)
    cache.build_cache(str(out), tok, [trainer.open_source("msrs", str(tiny_data))], progress=False)
    return out


@pytest.fixture(scope="session")
def compile_cache(compilation_cache) -> pathlib.Path:
    """The session's XLA cache, shared with the subprocesses (tests/conftest.py)."""
    return compilation_cache


# The optimiser of every run here: a step large enough for the losses to fall within a few
# steps. Shared by all the tests that compile the cached 8-device train step (the end-to-end
# run, 1 vs 8 devices, SIGTERM/SIGKILL/resume, one vs two processes), so that the session's
# compilation cache compiles each of its two stages once for all of them.
FAST_OPTIM = {"optim.lr": 2e-3, "optim.clip_norm": 0.0}


def tiny_config(data, tok, **overrides):
    c = load_config("tiny")
    c.tokenizer.path = str(tok)
    c.tokenizer.random_tiny = False
    c.data.root = str(data)
    c.train.checkpoint_every_steps = 2
    return configlib.apply_overrides(c, overrides.items(), "test")


def cli_args(data, tok, workdir, **overrides):
    args = [
        sys.executable,
        "-m",
        "tokfusion_jax.train",
        "--config=configs/ivif.py:tiny",
        f"--workdir={workdir}",
        f"--config.tokenizer.path={tok}",
        "--config.tokenizer.random_tiny=False",
        f"--config.data.root={data}",
        "--config.train.checkpoint_every_steps=2",
        "--config.train.export=False",
    ]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return args


def subprocess_env(cache, devices=8, **extra):
    """This process's environment (its XLA flags and compilation cache) with `devices` CPUs."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env.update(
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
    )
    env.update(extra)
    return env


def final_state_leaves(workdir):
    """(params, opt_state leaves) of the newest checkpoint, as host arrays."""
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    from orbax import checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        tree = ck.restore(ckpt_dir / str(steps[-1]) / "state")
    return steps[-1], jax.tree_util.tree_map(np.asarray, tree)


def read_metrics(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


# ----------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("tiny_train_8_devices")
def test_two_stage_run_end_to_end(tiny_data, tiny_tokenizer, tmp_path):
    """Both stages in one invocation: losses fall, validation metrics, logs, export, init_from.

    The run reads cached tokens (validation computes its own with the tokenizer) and logs every 4
    steps, which does not divide the 6 stage-I steps (the stage-I remainder is logged at the
    switch).
    """
    from tokfusion_jax.data import cache

    token_dir = tmp_path / "tokens"
    cache.build_cache(
        str(token_dir), titok.load(tiny_tokenizer), [trainer.open_source("msrs", str(tiny_data))]
    )
    config = tiny_config(
        tiny_data,
        tiny_tokenizer,
        **{
            **FAST_OPTIM,
            "train.stage1_epochs": 3,
            "train.stage2_epochs": 3,
            "train.keep_checkpoints": 2,
            "train.log_every_steps": 4,
            "train.image_every_steps": 12,
            "data.token_cache": str(token_dir),
            "val.dataset": "msrs",
            "val.max_pairs": 4,
            "val.every_steps": -1,
            "data.val_root": str(tiny_data),
        },
    )
    result = trainer.train_and_evaluate(config, tmp_path / "run")
    assert (result.step, result.stage, result.interrupted) == (12, 2, False)
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if "train/loss" in r]
    s1 = [r["train/loss"] for r in train if r["stage"] == 1]
    s2 = [r["train/loss"] for r in train if r["stage"] == 2]
    assert [r["step"] for r in train] == [4, 6, 8, 12]
    assert "train/grad" in train[1] and "train/fusion" not in train[1]  # stage I only
    assert s1[-1] < s1[0] and s2[-1] < s2[0], (s1, s2)
    # The fuse layers' schedule starts at stage II; the encoder's counts from step 0.
    assert "train/lr/base_fuse" in train[-1] and "train/lr/base_fuse" not in train[0]
    val = [r for r in records if "val/loss" in r]
    assert val and any(k.startswith("val/metric/") for k in val[-1])
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == [10, 12]  # keep-last-K = 2

    from tokfusion_jax import export

    fx = export.load_export(tmp_path / "run")
    rng = np.random.default_rng(1)
    vis, ir = rng.uniform(size=(2, 40, 36)), rng.uniform(size=(2, 40, 36))
    fused = fx.fuse(vis, ir)
    assert fused.shape == (2, 40, 36, 1) and np.all((fused >= 0) & (fused <= 1))
    np.testing.assert_array_equal(fused, fx.fuse(vis, ir))

    # --config.init_from: a new stage-I tree takes this run's modules, the fuse layers wait.
    model = TokFusion(config.model)
    fresh = trainer.stage_params(model, jax.random.key(5), 1, (IMAGE, IMAGE))
    loaded, fuse = trainer.load_init_params(str(tmp_path / "run"), fresh)
    assert set(loaded) == set(fresh) and set(fuse) == {"base_fuse", "detail_fuse"}
    for name in loaded:
        for x, y in zip(
            jax.tree_util.tree_leaves(loaded[name]),
            jax.tree_util.tree_leaves(fx.params[name]),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_host_scalars_average_each_key_over_the_steps_that_have_it():
    stage1, stage2 = {"loss": 1.0, "grad": 2.0}, {"loss": 3.0, "fusion": 4.0}
    got = trainer._host_scalars([stage1, stage1, stage2])
    assert got == pytest.approx({"loss": 5 / 3, "grad": 2.0, "fusion": 4.0})


def test_pipelines_take_the_data_options(tiny_data, monkeypatch):
    """Training batches honour data.min_size/crop_size/flip; validation reads every pair."""
    from tokfusion_jax.data import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "make_pipeline", lambda source, **kw: calls.append(kw) or [])
    c = load_config("tiny")
    c.data.min_size, c.data.crop_size, c.data.flip = 24, 16, True
    source = trainer.open_source("msrs", str(tiny_data))
    trainer.train_iterator(c, source, None, IMAGE)
    assert trainer.val_batches(c, source, IMAGE) == []
    train_kw, val_kw = calls
    assert (train_kw["min_size"], train_kw["crop_size"], train_kw["flip"]) == (24, 16, True)
    assert (val_kw["process_index"], val_kw["process_count"], val_kw["min_size"]) == (0, 1, 24)


def test_model_init_under_eval_shape_with_a_closed_over_key():
    model = TokFusion(load_config("tiny").model)
    key = jax.random.key(3)
    abstract = jax.eval_shape(lambda: model.init(key, stage=2, image_size=(IMAGE, IMAGE)))
    concrete = model.init(key, stage=2, image_size=(IMAGE, IMAGE))
    shapes = lambda t: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), t)
    assert shapes(abstract) == shapes(concrete)


def loss_rtol(steps_done: int, batch: int = 8) -> float:
    """Relative bound on |loss(run A) - loss(run B)| for two shardings of the same steps.

    Each program (other per-device batch shapes, other kernels, another reduction order) is
    within the probabilistic float32 bound of the exact loss (tests/tolerances.py) over the
    tiny model's rounding chain plus the loss's mean over the batch; after k updates the
    parameters differ, to first order, by as much again per step.
    """
    chain = fusion_chain(8, 2, IMAGE * IMAGE, 1, 1) + batch * IMAGE * IMAGE
    return 2 * probable_bound(chain, 4.0) * (1 + steps_done)


@pytest.mark.xdist_group("tiny_train_8_devices")
def test_one_vs_eight_devices_same_losses():
    """The sharded step on 8 devices gives the 1-device losses (within rounding) for 3 steps.

    The batches carry their tokens (the token-cache path): the step compiles without the ViT.
    """
    c = configlib.apply_overrides(load_config("tiny"), FAST_OPTIM.items(), "test")
    model = TokFusion(c.model)
    opt = optim.ModuleOptimizer(c.optim, steps_per_epoch=2)
    ctx = trainer.StepContext(
        model, opt, c.loss.to_dict(), stage=2, use_token_cache=True, use_tokens=True
    )
    rng = np.random.default_rng(0)
    t = c.model.tokens
    batches = [
        {k: rng.uniform(size=(8, IMAGE, IMAGE, 1)).astype(np.float32) for k in ("vis", "ir")}
        | {
            k: rng.normal(size=(8, t.num_tokens, t.token_dim)).astype(np.float32)
            for k in ("vis_tokens", "ir_tokens")
        }
        for _ in range(3)
    ]
    params = jax.device_get(trainer.stage_params(model, jax.random.key(0), 2, (IMAGE, IMAGE)))
    losses = {}
    for n in (1, 8):
        mesh = shd.make_mesh(devices=jax.devices()[:n])
        step = trainer.compile_train_step(ctx, mesh, None)
        state = jax.device_put(trainer.new_state(params, opt), shd.replicated(mesh))
        losses[n] = []
        for b in batches:
            state, m = step(state, None, shd.global_batch(b, mesh), jax.random.key(1))
            losses[n].append(float(m["loss"]))
        assert len(state["params"]["encoder"]) > 0
    for k, (a, b) in enumerate(zip(losses[8], losses[1], strict=True)):
        assert abs(a - b) <= loss_rtol(k) * abs(b), (k, a, b)
    assert losses[1][0] != losses[1][2]  # the parameters did move


@pytest.mark.xdist_group("tiny_train_8_devices")
def test_nan_stops_with_step_batch_and_last_checkpoint(
    tiny_data, tiny_tokenizer, token_cache, tmp_path
):
    """NaN batches from step 5 on (`train.debug_nan_step`, poisoned on the host: the compiled
    stage-I step is the end-to-end run's) make the loss non-finite inside the real step."""
    config = tiny_config(
        tiny_data,
        tiny_tokenizer,
        **{
            **FAST_OPTIM,
            "train.debug_nan_step": 5,
            "train.stage1_epochs": 4,
            "train.stage2_epochs": 1,
            "data.token_cache": str(token_cache),
        },
    )
    config.data.shuffle = False
    with pytest.raises(NonFiniteError) as info:
        trainer.train_and_evaluate(config, tmp_path / "run")
    message = str(info.value)
    assert "at step 5" in message and "checkpoints/4" in message, message
    # 16 pairs, batch 8, no shuffling: step 5 is the second batch of epoch 2.
    assert "batch [008, 009, 010, 011, 012, 013, 014, 015]" in message, message
    ckpt = checkpointing.Checkpointer(tmp_path / "run" / "checkpoints", use_async=False)
    assert ckpt.all_steps() == [2, 4]  # nothing written from the non-finite state
    step, tree = final_state_leaves(tmp_path / "run")
    assert step == 4 and int(tree["step"]) == 4 and int(tree["nonfinite_step"]) == -1
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree))


def _wait_for_checkpoint(proc, ckpt_dir, at_least, timeout=900):
    start = time.time()
    while time.time() - start < timeout:
        if ckpt_dir.is_dir():
            steps = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()]
            if steps and max(steps) >= at_least:
                return max(steps)
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"run ended (rc {proc.returncode}) before checkpoint {at_least}:\n{out}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint >= {at_least} after {timeout}s")


@pytest.mark.xdist_group("tiny_train_8_devices")
def test_sigterm_and_sigkill_then_resume_is_bitwise_exact(
    tiny_data, tiny_tokenizer, token_cache, compile_cache, tmp_path, capsys
):
    """Uninterrupted run vs. SIGTERM (clean stop) + SIGKILL (crash) + resume: same bits."""
    overrides = {  # 4 + 4 steps
        **FAST_OPTIM,
        "train.stage1_epochs": 2,
        "train.stage2_epochs": 2,
        "data.token_cache": token_cache,
    }
    env = subprocess_env(compile_cache)
    # The uninterrupted reference runs here: the CLI subprocesses below compile the same programs
    # (same XLA flags, 8 devices) and CPU execution is deterministic, so bits must agree.
    in_process(tiny_data, tiny_tokenizer, tmp_path / "ref", overrides)

    work = tmp_path / "run"
    args = cli_args(tiny_data, tiny_tokenizer, work, **overrides)
    popen = dict(cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(args, **popen)
    _wait_for_checkpoint(proc, work / "checkpoints", 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by signal" in out, out[-3000:]
    stopped_at, tree = final_state_leaves(work)  # restorable, finite, consistent
    assert int(tree["step"]) == stopped_at and stopped_at < 8
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree["params"]))

    proc = subprocess.Popen(args, **popen)  # resumes; killed hard in stage II
    _wait_for_checkpoint(proc, work / "checkpoints", 6)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)

    # The resume after the crash runs in this process (its programs are the reference run's,
    # already loaded here): the CLI's signal handling is what the two runs above checked.
    capsys.readouterr()
    in_process(tiny_data, tiny_tokenizer, work, overrides)
    assert "resuming from" in capsys.readouterr().out
    step_a, a = final_state_leaves(tmp_path / "ref")
    step_b, b = final_state_leaves(work)
    assert step_a == step_b == 8
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert np.array_equal(x, y), jax.tree_util.keystr(path)


def in_process(data, tok, workdir, overrides) -> None:
    """The run `cli_args(data, tok, workdir, **overrides)` describes, in this process (which has
    the CLI subprocesses' XLA flags and 8 devices)."""
    settings = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in overrides.items()}
    config = tiny_config(data, tok, **settings, **{"train.export": False})
    result = trainer.train_and_evaluate(config, workdir)
    assert not result.interrupted


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.xdist_group("tiny_train_8_devices")
def test_two_processes_match_single_process(
    tiny_data, tiny_tokenizer, token_cache, compile_cache, tmp_path
):
    """jax.distributed on localhost (2 x 4 CPU devices) == one process with 8 devices."""
    overrides = {
        **FAST_OPTIM,
        "train.stage1_epochs": 1,
        "train.stage2_epochs": 1,
        "data.shuffle": False,
        "data.token_cache": token_cache,
    }
    in_process(tiny_data, tiny_tokenizer, tmp_path / "single", overrides)  # one process, 8 devices

    port = _free_port()
    procs = []
    for pid in range(2):
        env = subprocess_env(
            compile_cache,
            devices=4,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        args = cli_args(tiny_data, tiny_tokenizer, tmp_path / "multi", **overrides)
        procs.append(
            subprocess.Popen(
                args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    step_a, a = final_state_leaves(tmp_path / "single")
    step_b, b = final_state_leaves(tmp_path / "multi")
    assert step_a == step_b == 4
    # The same per-device programs (8 x 1 pair); the all-reduce over 2 x 4 devices may sum in
    # another order. Parameters: every entry within 4 Adam steps of each other, nearly all
    # within the loss's rounding carried through the steps (relative to each leaf's scale).
    lr = FAST_OPTIM["optim.lr"]  # every module's schedule decays from it
    rel = loss_rtol(4)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        if np.issubdtype(np.asarray(x).dtype, np.integer):
            np.testing.assert_array_equal(x, y)
            continue
        typical = rel * (np.abs(y) + float(np.abs(y).max()))
        assert_mostly_close(x, y, typical, worst=4 * 2 * ADAM_STEP * lr + typical.max())
    loss_a = [r["train/loss"] for r in read_metrics(tmp_path / "single") if "train/loss" in r]
    loss_b = [r["train/loss"] for r in read_metrics(tmp_path / "multi") if "train/loss" in r]
    for k, (x, y) in enumerate(zip(loss_b, loss_a, strict=True)):
        assert abs(x - y) <= loss_rtol(k) * abs(y), (k, x, y)


def test_global_batch_is_split_over_all_devices():
    mesh = shd.make_mesh()
    batch = shd.global_batch({"vis": np.zeros((8, 4, 4, 1), np.float32), "name": ["a"] * 8}, mesh)
    assert set(batch) == {"vis"}
    assert len(batch["vis"].addressable_shards) == 8
    assert batch["vis"].addressable_shards[0].data.shape == (1, 4, 4, 1)
    assert jnp.allclose(batch["vis"], 0)


def test_poison_batch_makes_only_float_arrays_nan_from_its_step_on():
    from tokfusion_jax import loop

    batch = {"vis": np.ones((2, 4, 4, 1), np.float32), "index": np.arange(2), "name": ["a", "b"]}
    assert loop.poison_batch(batch, 4, 5) is batch and loop.poison_batch(batch, 9, -1) is batch
    poisoned = loop.poison_batch(batch, 5, 5)
    assert np.isnan(poisoned["vis"]).all() and np.all(batch["vis"] == 1)  # the input is kept
    assert poisoned["index"] is batch["index"] and poisoned["name"] == ["a", "b"]
