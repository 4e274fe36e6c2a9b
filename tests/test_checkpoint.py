"""Checkpointer: exact round trip of params + optimiser state + iterator state, keep-last-K."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokfusion_jax import checkpointing, optim
from tokfusion_jax.errors import CheckpointError

OPT = dict(
    lr=1e-3,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    clip_norm=0.01,
    decay_every_epochs=1,
    decay_factor=0.5,
    min_lr=1e-6,
)


def _state(seed=0, steps=3):
    rng = np.random.default_rng(seed)
    params = {
        "encoder": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
        "decoder": {"b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
    }
    opt = optim.ModuleOptimizer(OPT, 2)
    opt_state = opt.init(params)
    for _ in range(steps):  # non-trivial moments and counts
        grads = jax.tree_util.tree_map(lambda p: p * 0.1 + 0.01, params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.int32(steps),
        "nonfinite_step": jnp.int32(-1),
    }


@pytest.mark.parametrize("iterator_state", [{"next_index": 7, "epoch": [1, 2]}, b"\x00\xffgrain"])
def test_round_trip_is_exact(tmp_path, iterator_state):
    state = _state()
    ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", keep=3, use_async=True)
    ckpt.save(3, state, {"stage": 1, "step": 3}, iterator_state)
    ckpt.wait()
    restored, meta, it_state = ckpt.restore(checkpointing.abstract_like(state))
    assert meta == {"stage": 1, "step": 3}
    assert it_state == iterator_state
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(
        jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state), strict=True
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and a.dtype == b.dtype
    assert ckpt.read_meta()["stage"] == 1
    ckpt.close()


def test_keep_last_k_and_latest(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", keep=2, use_async=False)
    for step in (2, 4, 6):
        ckpt.save(step, _state(steps=1), {"stage": 1}, None)
    assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["4", "6"]
    assert ckpt.save(6, _state(), {"stage": 1}) is False  # an existing step is never overwritten
    ckpt.close()


def test_restore_params_from_workdir(tmp_path):
    state = _state()
    ckpt = checkpointing.Checkpointer(tmp_path / "run" / "checkpoints", use_async=False)
    ckpt.save(5, state, {"stage": 1})
    ckpt.close()
    params = checkpointing.restore_params(tmp_path / "run")
    np.testing.assert_array_equal(
        params["encoder"]["w"], np.asarray(state["params"]["encoder"]["w"])
    )


def test_missing_checkpoints_fail_clearly(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path / "empty", use_async=False)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ckpt.read_meta()
    with pytest.raises(CheckpointError, match="no such file"):
        checkpointing.restore_params(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match="found neither an export"):
        checkpointing.restore_params(tmp_path / "other")


def test_restore_into_a_different_structure_fails_clearly(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", use_async=False)
    ckpt.save(1, _state(), {"stage": 1})
    wrong = _state()
    wrong["params"]["encoder"]["w"] = jnp.zeros((7, 7))
    with pytest.raises(CheckpointError, match="does not match"):
        ckpt.restore(checkpointing.abstract_like(wrong))
