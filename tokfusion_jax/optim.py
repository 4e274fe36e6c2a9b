"""Per-module Adam with gradient clipping and step-decayed learning rates.

The reference recipe (CDDFuse) builds one Adam optimiser per top-level module, clips each
module's gradient to an L2 norm of 0.01 on its own, and steps a StepLR scheduler per optimiser:
learning rate ``lr * gamma ** floor(epoch / step_epochs)``, never below ``min_lr``. The encoder
and decoder count epochs from the start of training; the fusion layers are created at stage II
and their schedule (and Adam's bias correction) starts there.

Here the optimiser state is a plain dict ``{module_name: optax_state}`` built for the modules
present in the trainable tree, so stage II just adds entries for the new modules. Each module's
learning rate is a pure function of the update count held in its own state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any
ModuleStates = dict[str, optax.OptState]


def optim_config() -> ml_collections.ConfigDict:
    """Returns the paper's optimiser settings (the ``config.optim`` section)."""
    o = ml_collections.ConfigDict()
    o.lr = 1e-4
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = 0.0
    o.clip_norm = 0.01  # L2 norm per module (torch clip_grad_norm_); 0 = no clipping
    o.decay_every_epochs = 20  # StepLR step size
    o.decay_factor = 0.5  # StepLR gamma
    o.min_lr = 1e-6
    return o


def step_decay_schedule(
    base_lr: float, steps_per_epoch: int, step_epochs: int, gamma: float, min_lr: float
) -> Callable[[jax.Array], jax.Array]:
    """StepLR as a function of the update count: ``max(base * gamma**floor(epoch/step), min)``.

    ``epoch = count // steps_per_epoch`` is the epoch the update with index ``count`` (0-based)
    belongs to, so every update within an epoch uses that epoch's learning rate.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def schedule(count: jax.Array) -> jax.Array:
        epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
        decays = epoch // step_epochs
        lr = base_lr * jnp.power(jnp.float32(gamma), decays.astype(jnp.float32))
        return jnp.maximum(lr, jnp.float32(min_lr))

    return schedule


def clip_by_global_norm_torch(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max_norm / (norm + eps))``.

    Unlike ``optax.clip_by_global_norm`` the coefficient has PyTorch's ``+ 1e-6`` in the
    denominator, so it matches the reference to float precision.
    """

    def init(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: PyTree, state: optax.EmptyState, params: PyTree = None):
        del params
        norm = optax.global_norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + eps))
        return jax.tree_util.tree_map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def module_transform(
    optim_cfg: Mapping[str, Any], steps_per_epoch: int
) -> optax.GradientTransformation:
    """One module's optimiser: clip the module's global norm, then Adam at the decayed rate."""
    schedule = step_decay_schedule(
        float(optim_cfg["lr"]),
        steps_per_epoch,
        int(optim_cfg["decay_every_epochs"]),
        float(optim_cfg["decay_factor"]),
        float(optim_cfg["min_lr"]),
    )
    parts = []
    clip = float(optim_cfg["clip_norm"])
    if clip > 0:
        parts.append(clip_by_global_norm_torch(clip))
    parts.append(
        optax.scale_by_adam(
            b1=float(optim_cfg["b1"]), b2=float(optim_cfg["b2"]), eps=float(optim_cfg["eps"])
        )
    )
    wd = float(optim_cfg.get("weight_decay", 0.0))
    if wd > 0:  # torch.optim.Adam's L2 weight decay adds wd * param to the gradient before Adam.
        parts.insert(len(parts) - 1, optax.add_decayed_weights(wd))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


class ModuleOptimizer:
    """Independent optimisers, one per top-level entry of the trainable parameter dict.

    All methods are pure; instances hold only the configuration, so they can be closed over by
    jitted functions.
    """

    def __init__(self, optim_cfg: Mapping[str, Any], steps_per_epoch: int):
        self.steps_per_epoch = int(steps_per_epoch)
        self.transform = module_transform(optim_cfg, self.steps_per_epoch)
        self._schedule = step_decay_schedule(
            float(optim_cfg["lr"]),
            self.steps_per_epoch,
            int(optim_cfg["decay_every_epochs"]),
            float(optim_cfg["decay_factor"]),
            float(optim_cfg["min_lr"]),
        )

    def init(self, params: Mapping[str, PyTree]) -> ModuleStates:
        """Fresh optimiser state for every module in ``params``."""
        return {name: self.transform.init(p) for name, p in params.items()}

    def extend(self, states: ModuleStates, params: Mapping[str, PyTree]) -> ModuleStates:
        """Keeps the existing modules' states and adds fresh ones for modules new in ``params``."""
        out = dict(states)
        for name, p in params.items():
            if name not in out:
                out[name] = self.transform.init(p)
        return out

    def update(
        self, grads: Mapping[str, PyTree], states: ModuleStates, params: Mapping[str, PyTree]
    ) -> tuple[dict[str, PyTree], ModuleStates]:
        """Per-module clip + Adam + schedule; returns (updates, new states)."""
        if set(grads) != set(states):
            raise ValueError(
                f"gradient modules {sorted(grads)} do not match optimiser modules {sorted(states)}"
            )
        updates, new_states = {}, {}
        for name in grads:
            updates[name], new_states[name] = self.transform.update(
                grads[name], states[name], params[name]
            )
        return updates, new_states

    def learning_rates(self, states: ModuleStates) -> dict[str, jax.Array]:
        """The learning rate each module's next update will use (for logging)."""
        return {name: self._schedule(update_count(s)) for name, s in states.items()}


def update_count(state: optax.OptState) -> jax.Array:
    """Number of updates applied so far, read from the Adam state inside a module's chain."""
    for leaf_state in jax.tree_util.tree_leaves(
        state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
    ):
        if isinstance(leaf_state, optax.ScaleByAdamState):
            return leaf_state.count
    raise ValueError("optimiser state holds no Adam state")


def global_norms(tree: Mapping[str, PyTree]) -> dict[str, jax.Array]:
    """L2 norm of each top-level module's leaves (float32)."""
    return {name: optax.global_norm(sub).astype(jnp.float32) for name, sub in tree.items()}


# ----------------------------------------------------------------------------------------------
# AdamW with warm-up and cosine decay, and weight EMA (TiTok's training recipe)
# ----------------------------------------------------------------------------------------------


def adamw_config() -> ml_collections.ConfigDict:
    """TiTok's optimiser settings (its stage-1 training config), the tokenizer trainer's default."""
    o = ml_collections.ConfigDict()
    o.lr = 1e-4  # peak learning rate, reached at the end of the warm-up
    o.end_lr = 1e-5  # learning rate at the last step (cosine decay from the peak)
    o.warmup_steps = 10_000  # linear warm-up from 0
    o.b1 = 0.9
    o.b2 = 0.99
    o.eps = 1e-8
    o.weight_decay = 1e-4  # decoupled (AdamW); not applied to norms, biases and embeddings
    o.clip_norm = 1.0  # global L2 norm of the whole gradient (torch clip_grad_norm_); 0 = off
    return o


def warmup_cosine_schedule(
    base_lr: float, warmup_steps: int, total_steps: int, end_lr: float
) -> Callable[[jax.Array], jax.Array]:
    """Learning rate of the update with index ``count`` (0-based).

    ``base_lr * count / warmup`` during the warm-up, then a half cosine from ``base_lr`` down to
    ``end_lr`` at ``total_steps`` (the official TiTok ``get_cosine_schedule_with_warmup``).
    """

    def schedule(count: jax.Array) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        warm = step / jnp.float32(max(1, warmup_steps))
        progress = (step - warmup_steps) / jnp.float32(max(1, total_steps - warmup_steps))
        ratio = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        cosine = (end_lr + (base_lr - end_lr) * ratio) / base_lr
        return jnp.float32(base_lr) * jnp.where(step < warmup_steps, warm, cosine)

    return schedule


# Parameter names that get no weight decay (TiTok: gains, biases, norms and embeddings).
NO_DECAY_KEYS = ("bias", "scale", "ln", "norm", "embed", "latent_tokens", "mask_token")


def decay_mask(params: PyTree) -> PyTree:
    """True for the leaves AdamW decays: every kernel whose path names no `NO_DECAY_KEYS`."""

    def decays(path: tuple[Any, ...], leaf: Any) -> bool:
        del leaf
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        return not any(key in name for name in names for key in NO_DECAY_KEYS)

    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(
    optim_cfg: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
    """(optimiser, schedule): clip the global norm, AdamW with `decay_mask`, warm-up + cosine."""
    schedule = warmup_cosine_schedule(
        float(optim_cfg["lr"]),
        int(optim_cfg["warmup_steps"]),
        int(total_steps),
        float(optim_cfg["end_lr"]),
    )
    parts = []
    clip = float(optim_cfg["clip_norm"])
    if clip > 0:
        parts.append(clip_by_global_norm_torch(clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim_cfg["b1"]),
            b2=float(optim_cfg["b2"]),
            eps=float(optim_cfg["eps"]),
            weight_decay=float(optim_cfg["weight_decay"]),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
    """Decay of the weight EMA after the update with index ``step`` (0-based).

    0 for the first update (the EMA starts as the weights), then ``(1 + step) / (10 + step)``,
    capped at ``max_decay`` (the official TiTok EMAModel without warm-up power).
    """
    s = jnp.asarray(step, jnp.float32)
    warm = (1.0 + s) / (10.0 + s)
    return jnp.where(s <= 0, 0.0, jnp.minimum(warm, jnp.float32(max_decay)))


def ema_update(ema: PyTree, params: PyTree, decay: jax.Array) -> PyTree:
    """``decay * ema + (1 - decay) * params``, leaf by leaf."""
    return jax.tree_util.tree_map(
        lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params
    )
