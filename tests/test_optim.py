"""Per-module optimiser vs a PyTorch twin of the reference recipe (Adam + clip + StepLR)."""

import numpy as np
import pytest
import torch
from tolerances import ADAM_STEP, rounding_bound

from tokfusion_jax import optim

CFG = dict(
    lr=1e-2,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    clip_norm=0.01,
    decay_every_epochs=2,
    decay_factor=0.5,
    min_lr=2e-3,
    weight_decay=0.0,
)


def test_step_decay_schedule_matches_steplr_with_floor():
    sched = optim.step_decay_schedule(
        1e-4, steps_per_epoch=3, step_epochs=20, gamma=0.5, min_lr=1e-6
    )
    for count in [0, 2, 3, 59, 60, 119, 120, 3 * 20 * 10]:
        epoch = count // 3
        want = max(1e-4 * 0.5 ** (epoch // 20), 1e-6)
        # float32 lr * gamma^k, floored: a few roundings
        np.testing.assert_allclose(float(sched(count)), want, rtol=rounding_bound(4, 1.0))
    assert float(sched(10**6)) == pytest.approx(1e-6)


def _torch_run(init, grads_per_step, fuse_start, steps_per_epoch):
    """The reference loop: one Adam + StepLR per module, per-module clip_grad_norm_."""
    params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in init.items()}
    opts, scheds = {}, {}
    for k in params:
        opts[k] = torch.optim.Adam([params[k]], lr=CFG["lr"], betas=(0.9, 0.999), eps=1e-8)
        scheds[k] = torch.optim.lr_scheduler.StepLR(opts[k], CFG["decay_every_epochs"], 0.5)
    for step, grads in enumerate(grads_per_step):
        active = ["enc", "dec"] + (["fuse"] if step >= fuse_start else [])
        for k in active:
            params[k].grad = torch.tensor(grads[k], dtype=torch.float64)
            torch.nn.utils.clip_grad_norm_([params[k]], CFG["clip_norm"])
            opts[k].step()
        if (step + 1) % steps_per_epoch == 0:  # end of an epoch
            for k in active:
                scheds[k].step()
                for g in opts[k].param_groups:  # the reference's 1e-6-style floor
                    g["lr"] = max(g["lr"], CFG["min_lr"])
    return {k: v.detach().numpy() for k, v in params.items()}


def test_module_optimizer_matches_pytorch_reference():
    rng = np.random.default_rng(0)
    init = {
        "enc": rng.normal(size=(4, 3)),
        "dec": rng.normal(size=(5,)),
        "fuse": rng.normal(size=(2, 2)),
    }
    steps_per_epoch, fuse_start, n_steps = 2, 4, 12
    grads_seq = [
        {k: rng.normal(size=v.shape) * (0.001 if s % 3 == 0 else 1.0) for k, v in init.items()}
        for s in range(n_steps)
    ]
    want = _torch_run(init, grads_seq, fuse_start, steps_per_epoch)

    import jax

    jax.config.update("jax_enable_x64", True)
    try:
        import jax.numpy as jnp

        opt = optim.ModuleOptimizer(CFG, steps_per_epoch)
        params = {k: jnp.asarray(init[k]) for k in ("enc", "dec")}
        states = opt.init(params)
        fuse = jnp.asarray(init["fuse"])
        for step, grads in enumerate(grads_seq):
            if step == fuse_start:  # stage switch: add the fusion module and its fresh state
                params = {**params, "fuse": fuse}
                states = opt.extend(states, params)
            g = {k: jnp.asarray(grads[k]) for k in params}
            updates, states = opt.update(g, states, params)
            params = {k: params[k] + updates[k] for k in params}
        lrs = opt.learning_rates(states)
    finally:
        jax.config.update("jax_enable_x64", False)
    for k in init:
        # the learning rate is float32 in the schedule (a few roundings, relative), the rest
        # float64: each of the 12 updates is off by that relative amount, at most |update| <=
        # ADAM_STEP * lr <= 3.2e-2 each
        lr_rel = rounding_bound(4, 1.0)
        np.testing.assert_allclose(
            np.asarray(params[k]), want[k], rtol=0, atol=12 * lr_rel * ADAM_STEP * 1e-2
        )
    # enc: 12 updates = 6 epochs -> 1e-2 * 0.5**3 floored at 2e-3; fuse: 8 updates = 4 epochs.
    assert float(lrs["enc"]) == pytest.approx(2e-3)
    assert float(lrs["fuse"]) == pytest.approx(1e-2 * 0.5**2)


def test_update_rejects_mismatched_modules():
    import jax.numpy as jnp

    opt = optim.ModuleOptimizer(CFG, 1)
    states = opt.init({"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="do not match"):
        opt.update({"a": jnp.zeros(2), "b": jnp.zeros(2)}, states, {"a": jnp.zeros(2)})
