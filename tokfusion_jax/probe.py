"""Selective Token Editing discovery: Gumbel-Softmax probing of token positions and channels.

Paper §4.1 (Eqs. 6-8), §5.4 and appendix C. With the tokenizer and a trained fusion model
frozen, each of S editing slots owns selector logits ``a_s`` (one per token position) and a
learnable offset. A training step samples

    y_s = softmax((a_s + g_s) / tau),   g_s ~ Gumbel(0, 1)            (Eq. 6)

per image (optionally hard, straight-through: the forward pass uses one_hot(argmax y_s), the
backward pass the soft y_s), adds ``sum_s y_s (x) offset_s`` to the tokens, fuses, and maximises
a weighted sum of differentiable EI, AG, SF and SSIM of the fused image, each divided by its value
at the unperturbed tokens so that no term dominates by scale. ``tau`` is annealed. The chosen
position of a slot is the argmax of its learned selector (Eq. 7); a second pass ranks channels at
the chosen positions by how consistently (across images) an offset there moves the objective,
and picks a contiguous or free group (paper: positions {12, 18}, channels {6, 7, 8} on TiTok-L-32).

The core (:func:`probe_positions`, :func:`probe_channels`) is a pure function of two callables,
``token_fn(frozen, batch) -> (B, M, N, C)`` and ``terms_fn(frozen, tokens, batch) -> {name: (B,)}``
(``frozen``: the frozen parameters, passed to the jitted step as an argument, never baked in as
constants), so it runs on any model, any token count and on planted test problems.
:func:`main` wires it to a trained run's export (``python -m tokfusion_jax.probe --workdir=RUN``).

Outputs (``RUN/probe`` by default): ``ste.json`` (the config snippet; load it with
:func:`load_ste_snippet` into ``config.model.ste``), ``probe.json`` (everything measured),
``selection_frequency.png`` (Figure 5) and ``selector_distributions.png`` (Figure 6).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tokfusion_jax import paths
from tokfusion_jax.errors import ConfigError

Array = jax.Array
Batch = Mapping[str, Any]
# (frozen, batch) -> tokens (B, M, N, C), M modalities; `frozen` holds model/tokenizer params.
TokenFn = Callable[[Any, Batch], Array]
# (frozen, tokens, batch) -> {name: (B,)} per-image terms to maximise.
TermsFn = Callable[[Any, Array, Batch], Mapping[str, Array]]

MODALITIES = ("vis", "ir")
SNIPPET_FORMAT = "tokfusion_jax.ste/1"
GROUP_MODES = ("contiguous", "free")
ANNEAL_MODES = ("exp", "linear", "constant")


# ----------------------------------------------------------------------------- Gumbel-Softmax


def gumbel_softmax(
    rng: Array, logits: Array, tau: float | Array, *, hard: bool = False, axis: int = -1
) -> Array:
    """Samples y = softmax((logits + g) / tau), g ~ Gumbel(0, 1) i.i.d. (paper Eq. 6).

    With ``hard=True`` the value is the one-hot argmax of y (Eq. 7) while the gradient is that
    of the soft y (straight-through estimator). Shapes: ``logits`` (..., N) -> (..., N).
    """
    gumbel = jax.random.gumbel(rng, logits.shape, dtype=jnp.float32)
    y = jax.nn.softmax((logits.astype(jnp.float32) + gumbel) / tau, axis=axis)
    if not hard:
        return y
    one_hot = jax.nn.one_hot(jnp.argmax(y, axis=axis), y.shape[axis], axis=axis, dtype=y.dtype)
    return y + jax.lax.stop_gradient(one_hot - y)


def temperature(
    step: int | Array, *, tau_start: float, tau_end: float, anneal_steps: int, mode: str = "exp"
) -> Array:
    """The Gumbel temperature at ``step``: annealed from ``tau_start`` to ``tau_end``.

    ``exp``: geometric interpolation over ``anneal_steps`` steps, ``linear``: linear, both held at
    ``tau_end`` afterwards; ``constant``: always ``tau_start``.
    """
    if mode not in ANNEAL_MODES:
        raise ConfigError(f"probe.anneal={mode!r} must be one of {ANNEAL_MODES}")
    if mode == "constant":
        return jnp.asarray(tau_start, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(anneal_steps, 1), 0.0, 1.0)
    if mode == "linear":
        return tau_start + (tau_end - tau_start) * frac
    return tau_start * (tau_end / tau_start) ** frac


# ----------------------------------------------------------------------------- token editing


def edit_tokens(tokens: Array, weights: Array, offsets: Array, channel_mask: Array) -> Array:
    """Adds each slot's offset at the positions its (soft or hard) weights select.

    tokens (B, M, N, C); weights (B, M, S, N) selector samples; offsets (M, S, C);
    channel_mask (C,) of 0/1 (the channels the offsets may touch). Returns (B, M, N, C):
    ``Z + sum_s weights_s (x) (offset_s * channel_mask)`` -- Eq. 8 with a soft mask.
    """
    delta = jnp.einsum("bmsn,msc->bmnc", weights, offsets * channel_mask)
    return tokens + delta.astype(tokens.dtype)


# ----------------------------------------------------------------------------- probe settings


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """Hyper-parameters of the position and channel probes (``configs/probe.py`` documents them)."""

    steps: int = 300
    lr: float = 0.05
    tau_start: float = 2.0
    tau_end: float = 0.2
    anneal: str = "exp"
    anneal_fraction: float = 0.8  # tau reaches tau_end after this fraction of the steps
    hard: bool = True
    offset_scale: float = 0.5  # offsets are offset_scale * tanh(raw): bounded edits
    offset_init_std: float = 0.01
    shared_selector: bool = False  # one selector for all modalities (else one per modality)
    shared_offsets: bool = False
    probe_channels: tuple[int, ...] = ()  # channels edited while probing positions; () = all
    diversity: float = 1.0  # penalty on two slots putting mass on the same position
    count_fraction: float = 0.5  # hard selections counted over the last fraction of steps
    weights: tuple[tuple[str, float], ...] = (("ei", 1.0), ("ag", 1.0), ("sf", 1.0), ("ssim", 1.0))
    channel_batches: int = 8
    group_size: int = 3
    group: str = "contiguous"
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ProbeSettings:
        """Builds settings from a (ConfigDict) mapping; unknown keys fail naming the key."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                continue  # other probe keys (slots, batch_size, ...) are the CLI's
            if key == "weights":
                value = value.to_dict() if hasattr(value, "to_dict") else dict(value)
                value = tuple((str(k), float(v)) for k, v in value.items())
            elif key == "probe_channels":
                value = tuple(int(c) for c in value)
            kwargs[key] = value
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raises ConfigError naming the first out-of-range key."""
        checks = [
            ("steps", self.steps >= 1),
            ("lr", self.lr > 0),
            ("tau_start", self.tau_start > 0),
            ("tau_end", self.tau_end > 0),
            ("anneal", self.anneal in ANNEAL_MODES),
            ("anneal_fraction", 0 < self.anneal_fraction <= 1),
            ("offset_scale", self.offset_scale > 0),
            ("count_fraction", 0 < self.count_fraction <= 1),
            ("channel_batches", self.channel_batches >= 1),
            ("group_size", self.group_size >= 1),
            ("group", self.group in GROUP_MODES),
            ("weights", len(self.weights) > 0 and all(w >= 0 for _, w in self.weights)),
            ("diversity", self.diversity >= 0),
        ]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"probe.{key}={getattr(self, key)!r} is out of range")


# ----------------------------------------------------------------------------- position probe


@flax.struct.dataclass
class ProbeState:
    """Everything the position probe carries between steps (a pytree).

    Slots are padded to ``max_slots`` so that every slot budget runs the same compiled step;
    ``active`` switches the padding slots off (they edit nothing and learn nothing).
    """

    step: Array  # () int32
    params: dict[str, Array]  # logits (Ms, S, N), raw_offsets (Mo, S, C)
    opt_state: Any
    counts: Array  # (M, S, N) float32 hard selections over the counting window
    active: Array  # (S,) float32: 1 for the slots of this budget, 0 for padding


@dataclasses.dataclass(frozen=True)
class PositionResult:
    """What the position probe learned (NumPy, JSON-friendly through :meth:`to_json`)."""

    positions: list[int]  # chosen position per slot (distinct), slot order
    probs: np.ndarray  # (M, S, N) softmax of the selector logits: Figure 6
    frequency: np.ndarray  # (M, S, N) hard-selection frequency (rows sum to 1): Figure 5
    offsets: np.ndarray  # (M, S, C) learned offsets (bounded)
    history: list[dict[str, float]]  # objective, temperature, unperturbed terms along the run
    scales: dict[str, float]  # each term's mean at the unperturbed tokens (first batch)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "positions": [int(p) for p in self.positions],
            "probs": np.round(self.probs, 6).tolist(),
            "frequency": np.round(self.frequency, 6).tolist(),
            "offsets": np.round(self.offsets, 6).tolist(),
            "history": self.history,
            "scales": self.scales,
        }


def _bounded(raw: Array, scale: float) -> Array:
    return scale * jnp.tanh(raw)


def _broadcast_modalities(x: Array, m: int) -> Array:
    """(1 or M, ...) -> (M, ...)."""
    return jnp.broadcast_to(x, (m,) + x.shape[1:])


def _channel_mask(channels: Sequence[int], dim: int) -> Array:
    if not channels:
        return jnp.ones((dim,), jnp.float32)
    bad = [c for c in channels if not 0 <= c < dim]
    if bad:
        raise ConfigError(f"probe.probe_channels={tuple(channels)} has channels outside [0, {dim})")
    return jnp.zeros((dim,), jnp.float32).at[jnp.asarray(channels)].set(1.0)


def normalized_objective(
    terms: Mapping[str, Array], base: Mapping[str, Array], weights: Mapping[str, float]
) -> Array:
    """sum_k w_k mean_b(term_k) / |mean_b(base_k)| / sum_k w_k: 1 at the unperturbed tokens.

    ``base`` holds the terms of the same batch at the unperturbed tokens, so every term is
    measured relative to its own scale (EI ~ 50 and SSIM ~ 1 weigh the same).
    """
    total = sum(weights.values())
    out = 0.0
    for name, w in weights.items():
        scale = jnp.maximum(jnp.abs(jnp.mean(base[name])), 1e-8)
        out = out + w * jnp.mean(terms[name]) / jax.lax.stop_gradient(scale)
    return out / total


def _check_terms(terms: Mapping[str, Any], weights: Mapping[str, float]) -> None:
    missing = [k for k in weights if k not in terms]
    if missing:
        raise ConfigError(
            f"probe.weights names terms {missing} that the objective does not produce "
            f"(it produces {sorted(terms)})"
        )


def _overlap(logits: Array, active: Array) -> Array:
    """Mean over modalities and active slot pairs s < t of sum_n p_s,n p_t,n (0 if one slot)."""
    p = jax.nn.softmax(logits, axis=-1) * active[None, :, None]  # (Ms, S, N)
    gram = jnp.einsum("msn,mtn->mst", p, p)
    upper = jnp.triu(jnp.ones(gram.shape[1:]), k=1)
    k = jnp.sum(active)
    pairs = jnp.maximum(k * (k - 1) / 2, 1.0)
    return jnp.sum(gram * upper) / (p.shape[0] * pairs)


def make_probe_step(
    token_fn: TokenFn,
    terms_fn: TermsFn,
    settings: ProbeSettings,
    optimizer: optax.GradientTransformation,
    *,
    dim: int,
) -> Callable[[ProbeState, Any, Batch, Array], tuple[ProbeState, dict[str, Array]]]:
    """The (un-jitted) pure step ``(state, frozen, batch, rng) -> (state, metrics)``."""
    weights = dict(settings.weights)
    channel_mask = _channel_mask(settings.probe_channels, dim)
    anneal_steps = max(1, int(round(settings.anneal_fraction * settings.steps)))
    count_from = settings.steps - max(1, int(round(settings.count_fraction * settings.steps)))

    def loss_fn(params, active, frozen, tokens, base, batch, rng, tau):
        b, m = tokens.shape[:2]
        logits = _broadcast_modalities(params["logits"], m)  # (M, S, N)
        noise_logits = jnp.broadcast_to(logits[None], (b,) + logits.shape)  # (B, M, S, N)
        y = gumbel_softmax(rng, noise_logits, tau, hard=settings.hard)
        y = y * active[None, None, :, None]  # padding slots edit nothing
        offsets = _bounded(_broadcast_modalities(params["raw_offsets"], m), settings.offset_scale)
        edited = edit_tokens(tokens, y, offsets, channel_mask)
        score = normalized_objective(terms_fn(frozen, edited, batch), base, weights)
        loss = -score + settings.diversity * _overlap(params["logits"], active)
        hard = jax.nn.one_hot(jnp.argmax(y, axis=-1), y.shape[-1])  # (B, M, S, N)
        return loss, (score, jnp.sum(hard, axis=0))

    def step(state: ProbeState, frozen: Any, batch: Batch, rng: Array):
        tokens = jax.lax.stop_gradient(token_fn(frozen, batch))  # (B, M, N, C)
        base = jax.lax.stop_gradient(terms_fn(frozen, tokens, batch))  # {name: (B,)}
        tau = temperature(
            state.step,
            tau_start=settings.tau_start,
            tau_end=settings.tau_end,
            anneal_steps=anneal_steps,
            mode=settings.anneal,
        )
        (loss, (score, hard)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.active, frozen, tokens, base, batch, rng, tau
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        counting = (state.step >= count_from).astype(jnp.float32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            counts=state.counts + counting * hard,
        )
        metrics = {"loss": loss, "objective": score, "tau": tau}
        metrics.update({f"base_{k}": jnp.mean(base[k]) for k in weights})
        return new_state, metrics

    return step


def init_probe_state(
    rng: Array,
    settings: ProbeSettings,
    optimizer: optax.GradientTransformation,
    *,
    num_slots: int,
    num_modalities: int,
    num_tokens: int,
    dim: int,
    max_slots: int | None = None,
) -> ProbeState:
    """Uniform selectors (zero logits), small random offsets; slots padded to ``max_slots``."""
    total = max(num_slots, max_slots or num_slots)
    ms = 1 if settings.shared_selector else num_modalities
    mo = 1 if settings.shared_offsets else num_modalities
    params = {
        "logits": jnp.zeros((ms, total, num_tokens), jnp.float32),
        "raw_offsets": settings.offset_init_std
        * jax.random.normal(rng, (mo, total, dim), jnp.float32),
    }
    return ProbeState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        counts=jnp.zeros((num_modalities, total, num_tokens), jnp.float32),
        active=(jnp.arange(total) < num_slots).astype(jnp.float32),
    )


def choose_positions(probs: np.ndarray) -> list[int]:
    """Distinct positions, one per slot, from (M, S, N) selector probabilities.

    Modalities vote by averaging probabilities; slots pick greedily, most confident first, each
    the best position not already taken. Returns the positions in slot order.
    """
    joint = np.asarray(probs, np.float64).mean(axis=0)  # (S, N)
    s, n = joint.shape
    if s > n:
        raise ConfigError(f"probe slots={s} exceeds the number of tokens N={n}")
    chosen: dict[int, int] = {}
    for slot in np.argsort(-joint.max(axis=1), kind="stable"):
        order = np.argsort(-joint[slot], kind="stable")
        chosen[int(slot)] = int(next(p for p in order if p not in chosen.values()))
    return [chosen[k] for k in range(s)]


def _shard(batch: Batch, mesh: Any) -> dict[str, Any]:
    """This process's batch as global arrays split over the mesh; strings (names) dropped.

    Without a mesh the numeric entries stay host arrays (jit puts them on the default device).
    """
    if mesh is not None:
        from tokfusion_jax import sharding as sharding_lib

        return sharding_lib.global_batch(batch, mesh)
    return {k: v for k, v in batch.items() if np.asarray(v).dtype.kind not in "USO"}


def _mesh_shardings(mesh: Any) -> tuple[Any, Any]:
    if mesh is None:
        return None, None
    from tokfusion_jax import sharding as sharding_lib

    return sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)


@functools.lru_cache(maxsize=8)
def _compiled_step(
    token_fn: TokenFn, terms_fn: TermsFn, settings: ProbeSettings, dim: int, mesh: Any
) -> Callable:
    """One jitted step per (problem, settings, mesh): every slot budget reuses it."""
    step = make_probe_step(token_fn, terms_fn, settings, optax.adam(settings.lr), dim=dim)
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    repl = _mesh_shardings(mesh)[1]
    return jax.jit(step, out_shardings=(repl, repl), donate_argnums=(0,))


def probe_positions(
    token_fn: TokenFn,
    terms_fn: TermsFn,
    batches: Iterable[Batch],
    settings: ProbeSettings,
    *,
    num_slots: int,
    max_slots: int | None = None,
    frozen: Any = None,
    mesh: Any = None,
    progress: bool = False,
) -> PositionResult:
    """Learns ``num_slots`` Gumbel-Softmax selectors over token positions (one jitted step).

    ``batches`` yields at least ``settings.steps`` batches (numeric entries are put on ``mesh``
    with the batch axis split over its devices; the probe state and ``frozen`` are replicated).
    Budgets probed with the same ``max_slots`` share one compiled step. Deterministic for a
    fixed ``settings.seed`` and batch stream.
    """
    if num_slots < 1:
        raise ConfigError(f"probe slots={num_slots} must be >= 1")
    _, repl_sh = _mesh_shardings(mesh)
    iterator = iter(batches)
    first = _shard(next(iterator), mesh)
    if mesh is not None:
        frozen = jax.device_put(frozen, repl_sh)
    tokens = jax.eval_shape(token_fn, frozen, first)
    if len(tokens.shape) != 4:
        raise ConfigError(f"token_fn must return (B, M, N, C) tokens, got shape {tokens.shape}")
    _, m, n, c = tokens.shape
    if num_slots > n:
        raise ConfigError(f"probe slots={num_slots} exceeds the number of tokens N={n}")
    _check_terms(jax.eval_shape(terms_fn, frozen, tokens, first), dict(settings.weights))
    key = jax.random.PRNGKey(settings.seed)
    init_key, run_key = jax.random.split(key)
    state = init_probe_state(
        init_key,
        settings,
        optax.adam(settings.lr),
        num_slots=num_slots,
        num_modalities=m,
        num_tokens=n,
        dim=c,
        max_slots=max_slots,
    )
    if mesh is not None:
        state = jax.device_put(state, repl_sh)
    step_fn = _compiled_step(token_fn, terms_fn, settings, c, mesh)

    pending = []
    log_every = max(1, settings.steps // 20)
    steps = range(settings.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"probe positions ({num_slots} slots)", leave=False)
    batch = first
    for i in steps:
        if i > 0:
            try:
                batch = _shard(next(iterator), mesh)
            except StopIteration:
                raise ConfigError(
                    f"the data ran out after {i} batches; probe.steps={settings.steps} needs more"
                ) from None
        state, metrics = step_fn(state, frozen, batch, jax.random.fold_in(run_key, i))
        if i % log_every == 0 or i == settings.steps - 1:
            pending.append((i, metrics))
    # Fetched once at the end: no host sync inside the loop.
    history = [{"step": i, **{k: float(v) for k, v in mt.items()}} for i, mt in pending]

    sl = slice(0, num_slots)
    logits = _broadcast_modalities(state.params["logits"], m)[:, sl]
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    counts = np.asarray(state.counts, np.float64)[:, sl]
    frequency = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1.0)
    raw = _broadcast_modalities(state.params["raw_offsets"], m)[:, sl]
    return PositionResult(
        positions=choose_positions(probs),
        probs=probs,
        frequency=frequency,
        offsets=np.asarray(_bounded(raw, settings.offset_scale)),
        history=history,
        scales={k: history[0][f"base_{k}"] for k, _ in settings.weights},
    )


# ----------------------------------------------------------------------------- channel probe


@dataclasses.dataclass(frozen=True)
class ChannelResult:
    """Channel ranking at the chosen positions."""

    channels: list[int]  # the chosen group, sorted
    ranking: list[int]  # all channels, best first
    score: np.ndarray  # (C,) consistency-weighted sensitivity (higher is better)
    stability: np.ndarray  # (C,) |mean gradient| / mean |gradient| in [0, 1]
    sensitivity: np.ndarray  # (C,) mean |gradient|

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "channels": [int(c) for c in self.channels],
            "ranking": [int(c) for c in self.ranking],
            "score": np.round(self.score, 8).tolist(),
            "stability": np.round(self.stability, 6).tolist(),
            "sensitivity": np.round(self.sensitivity, 8).tolist(),
        }


def choose_group(score: np.ndarray, size: int, mode: str) -> list[int]:
    """The best ``size`` channels: top scores (``free``) or the best window (``contiguous``)."""
    score = np.asarray(score, np.float64)
    if size > score.size:
        raise ConfigError(f"probe.group_size={size} exceeds the token dimension C={score.size}")
    if mode == "free":
        return sorted(int(c) for c in np.argsort(-score, kind="stable")[:size])
    if mode != "contiguous":
        raise ConfigError(f"probe.group={mode!r} must be one of {GROUP_MODES}")
    windows = np.convolve(score, np.ones(size), mode="valid")  # (C - size + 1,)
    start = int(np.argmax(windows))
    return list(range(start, start + size))


def probe_channels(
    token_fn: TokenFn,
    terms_fn: TermsFn,
    batches: Iterable[Batch],
    positions: Sequence[int],
    settings: ProbeSettings,
    *,
    scales: Mapping[str, float],
    frozen: Any = None,
    mesh: Any = None,
) -> ChannelResult:
    """Ranks channels at ``positions`` by per-image gradients of the objective.

    For every image b, modality m, position p and channel c, g = d objective_b / d Z[b,m,p,c]
    (one backward pass gives all of them: a per-image zero offset is the differentiated input).
    A single learnable offset (STE's Delta is shared by all images) can only exploit a channel
    whose gradient keeps its sign across images, so the score is |mean_b g| summed over
    modalities and positions; ``stability`` = |mean_b g| / mean_b |g| is reported beside it.
    """
    weights = dict(settings.weights)
    pos = jnp.asarray(list(positions), jnp.int32)
    total = sum(weights.values())

    def grads_fn(fz, batch):
        tokens = jax.lax.stop_gradient(token_fn(fz, batch))  # (B, M, N, C)
        b, m, _, c = tokens.shape

        def per_image(delta):  # (B, M, P, C) -> scalar sum over images of their objective
            terms = terms_fn(fz, tokens.at[:, :, pos, :].add(delta), batch)
            return sum(w * jnp.sum(terms[k]) / scales[k] for k, w in weights.items()) / total

        g = jax.grad(per_image)(jnp.zeros((b, m, pos.shape[0], c), jnp.float32))
        return jnp.sum(g, axis=0), jnp.sum(jnp.abs(g), axis=0)  # (M, P, C) each

    _, repl_sh = _mesh_shardings(mesh)
    if mesh is not None:
        frozen = jax.device_put(frozen, repl_sh)
    fn = jax.jit(grads_fn)
    sum_g = sum_abs = 0.0
    count = 0
    iterator = iter(batches)
    for _ in range(settings.channel_batches):
        try:
            batch = _shard(next(iterator), mesh)
        except StopIteration:
            break
        g, a = fn(frozen, batch)
        sum_g, sum_abs = sum_g + g, sum_abs + a
        count += int(jax.tree_util.tree_leaves(batch)[0].shape[0])
    if count == 0:
        raise ConfigError("the channel probe got no data batch")
    mean_g = np.asarray(sum_g, np.float64) / count  # (M, P, C)
    mean_abs = np.asarray(sum_abs, np.float64) / count
    score = np.abs(mean_g).sum(axis=(0, 1))
    sensitivity = mean_abs.sum(axis=(0, 1))
    stability = score / np.maximum(sensitivity, 1e-30)
    ranking = [int(c) for c in np.argsort(-score, kind="stable")]
    return ChannelResult(
        channels=choose_group(score, settings.group_size, settings.group),
        ranking=ranking,
        score=score,
        stability=stability,
        sensitivity=sensitivity,
    )


# ----------------------------------------------------------------------------- outputs


def write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temp file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically (temp file + os.replace)."""
    write_bytes_atomic(pathlib.Path(path), (json.dumps(obj, indent=2) + "\n").encode())


def ste_snippet(
    positions: Sequence[int],
    channels: Sequence[int],
    *,
    num_tokens: int,
    token_dim: int,
    shared: bool = True,
    tokenizer_sha256: str = "",
    source: str = "",
) -> dict[str, Any]:
    """The config snippet that sets ``config.model.ste`` (see :func:`load_ste_snippet`)."""
    return {
        "format": SNIPPET_FORMAT,
        "positions": sorted(int(p) for p in positions),
        "channels": sorted(int(c) for c in channels),
        "shared": bool(shared),
        "num_tokens": int(num_tokens),
        "token_dim": int(token_dim),
        "tokenizer_sha256": tokenizer_sha256,
        "source": source,
    }


def load_ste_snippet(
    path: str | os.PathLike, *, num_tokens: int | None = None, token_dim: int | None = None
) -> ml_collections.ConfigDict:
    """Reads a probe snippet (``ste.json``) as the ``config.model.ste`` section.

    Returns ConfigDict(positions=tuple, channels=tuple, shared=bool). When ``num_tokens`` /
    ``token_dim`` are given they must match the snippet (a snippet probed on TiTok-L-32 does not
    fit a 64-token tokenizer). Usage in a config file::

        config.model.ste = probe.load_ste_snippet("configs/ste/titok_l32.json")
    """
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: STE snippet not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON STE snippet ({e})") from None
    if not isinstance(data, dict) or data.get("format") != SNIPPET_FORMAT:
        raise ConfigError(f"{path}: key 'format' must be {SNIPPET_FORMAT!r}")
    for key in ("positions", "channels", "num_tokens", "token_dim"):
        if key not in data:
            raise ConfigError(f"{path}: missing key {key!r}")
    n, c = int(data["num_tokens"]), int(data["token_dim"])
    positions = tuple(int(p) for p in data["positions"])
    channels = tuple(int(ch) for ch in data["channels"])
    if not positions or any(not 0 <= p < n for p in positions):
        raise ConfigError(f"{path}: positions={list(positions)} must lie in [0, {n})")
    if not channels or any(not 0 <= ch < c for ch in channels):
        raise ConfigError(f"{path}: channels={list(channels)} must lie in [0, {c})")
    if num_tokens is not None and num_tokens != n:
        raise ConfigError(f"{path}: num_tokens={n} but the model has {num_tokens} tokens")
    if token_dim is not None and token_dim != c:
        raise ConfigError(f"{path}: token_dim={c} but the model's tokens have {token_dim} dims")
    ste = ml_collections.ConfigDict()
    ste.positions = positions
    ste.channels = channels
    ste.shared = bool(data.get("shared", True))
    return ste


def _plot_slots(path: pathlib.Path, values: np.ndarray, title: str, ylabel: str) -> None:
    """Bar charts: one row per slot, one column per modality. values (M, S, N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, s, n = values.shape
    fig, axes = plt.subplots(s, m, figsize=(max(4.0, 0.18 * n) * m, 1.8 * s + 0.6), squeeze=False)
    names = MODALITIES if m == len(MODALITIES) else tuple(f"m{i}" for i in range(m))
    for si in range(s):
        for mi in range(m):
            ax = axes[si, mi]
            ax.bar(np.arange(n), values[mi, si], color=f"C{si}")
            top = int(np.argmax(values[mi, si]))
            ax.set_title(f"slot {si}, {names[mi]}: top {top}", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_xlim(-0.6, n - 0.4)
            ax.tick_params(labelsize=6)
            if mi == 0:
                ax.set_ylabel(ylabel, fontsize=7)
    axes[-1, 0].set_xlabel("token position", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig: Any, path: pathlib.Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())


def plot_distributions(
    path: pathlib.Path,
    by_budget: Mapping[int, np.ndarray],
    chosen: Mapping[int, Sequence[int]],
) -> None:
    """Figure 6: selector distributions (modality-averaged) per slot, one row per slot budget.

    by_budget: {S: (M, S, N) probabilities}; chosen: {S: the S chosen positions}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(by_budget)
    cols = max(budgets)
    n = next(iter(by_budget.values())).shape[-1]
    fig, axes = plt.subplots(
        len(budgets), cols, figsize=(max(3.0, 0.12 * n) * cols, 1.6 * len(budgets) + 0.6)
    )
    axes = np.atleast_2d(np.asarray(axes).reshape(len(budgets), cols))
    for r, budget in enumerate(budgets):
        probs = np.asarray(by_budget[budget]).mean(axis=0)  # (S, N)
        for si in range(cols):
            ax = axes[r, si]
            if si >= budget:
                ax.axis("off")
                continue
            ax.bar(np.arange(n), probs[si], color=f"C{si}")
            ax.set_ylim(0, 1)
            ax.set_title(f"{budget} slot(s): slot {si} -> {chosen[budget][si]}", fontsize=8)
            ax.tick_params(labelsize=6)
    fig.suptitle("selector distributions softmax(a_s) per slot budget", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------- whole probe


def run_probe(
    token_fn: TokenFn,
    terms_fn: TermsFn,
    make_batches: Callable[[int], Iterator[Batch]],
    settings: ProbeSettings,
    *,
    slots: Sequence[int] = (1, 2, 3, 4),
    select_budget: int = 0,
    outdir: str | os.PathLike,
    frozen: Any = None,
    mesh: Any = None,
    shared: bool = True,
    tokenizer_sha256: str = "",
    source: str = "",
    progress: bool = False,
) -> dict[str, Any]:
    """Position probes for each slot budget, a channel probe at the chosen positions, outputs.

    ``make_batches(seed)`` returns a fresh batch iterator (one per budget, seeded). The snippet
    comes from ``select_budget`` (0: `default_select_budget`, the paper's 2 slots when probed).
    Writes ``ste.json``, ``probe.json`` and the two PNG figures into ``outdir``; returns the
    ``probe.json`` content.
    """
    slots = sorted({int(s) for s in slots})
    select_budget = int(select_budget) or default_select_budget(slots)
    if select_budget not in slots:
        raise ConfigError(
            f"probe.select_budget={select_budget} is not among slots={slots}; pick one of them "
            "(or 0: the paper's 2 when probed, else the listed budget closest to it)"
        )
    outdir = pathlib.Path(outdir)
    results: dict[int, PositionResult] = {}
    for budget in slots:
        results[budget] = probe_positions(
            token_fn,
            terms_fn,
            make_batches(settings.seed + budget),
            settings,
            num_slots=budget,
            max_slots=max(slots),
            frozen=frozen,
            mesh=mesh,
            progress=progress,
        )
    chosen = results[select_budget]
    channel = probe_channels(
        token_fn,
        terms_fn,
        make_batches(settings.seed + 1000),
        chosen.positions,
        settings,
        scales=chosen.scales,
        frozen=frozen,
        mesh=mesh,
    )
    n, c = chosen.probs.shape[-1], chosen.offsets.shape[-1]
    snippet = ste_snippet(
        chosen.positions,
        channel.channels,
        num_tokens=n,
        token_dim=c,
        shared=shared,
        tokenizer_sha256=tokenizer_sha256,
        source=source,
    )
    report = {
        "ste": snippet,
        "select_budget": select_budget,
        "modalities": list(MODALITIES[: chosen.probs.shape[0]]),
        "settings": dataclasses.asdict(settings),
        "budgets": {str(b): r.to_json() for b, r in results.items()},
        "channels": channel.to_json(),
    }
    plot_distributions(
        outdir / "selector_distributions.png",
        {b: r.probs for b, r in results.items()},
        {b: r.positions for b, r in results.items()},
    )
    _plot_slots(
        outdir / "selection_frequency.png",
        chosen.frequency,
        f"hard selection frequency, {select_budget} slot(s)",
        "frequency",
    )
    write_json(outdir / "probe.json", report)
    write_json(outdir / "ste.json", snippet)
    return report


def _parse_slots(text: str) -> list[int]:
    try:
        slots = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(
            f"--slots={text!r} must be comma-separated integers, e.g. 1,2,3,4"
        ) from None
    if not slots or any(s < 1 for s in slots):
        raise ConfigError(f"--slots={text!r} must list positive integers")
    return slots


# ----------------------------------------------------------------------------- trained runs

TERM_KEYS = {"ei": "EI", "ag": "AG", "sf": "SF", "ssim": "SSIM"}
PAPER_SLOTS = 2  # the paper's STE edits two token positions


def default_select_budget(slots: Sequence[int]) -> int:
    """The budget whose positions go into ste.json when none is chosen: the paper's 2 slots if
    probed, else the probed budget closest to 2 (the smaller on a tie)."""
    return min(sorted(int(s) for s in slots), key=lambda s: abs(s - PAPER_SLOTS))


def default_config() -> ml_collections.ConfigDict:
    """The probe's settings (``configs/probe.py``; CLI overrides ``--config.steps=500``)."""
    d = ProbeSettings()
    c = ml_collections.ConfigDict()
    c.slots = (1, 2, 3, 4)  # slot budgets probed (Table 7, Figure 6)
    # The budget whose positions go into ste.json; 0 = the paper's 2 slots when probed, else the
    # probed budget closest to 2 (so --slots=1 selects 1). Otherwise it must be one of `slots`.
    c.select_budget = 0
    c.batch_size = 8  # global batch; divisible by the device count
    c.seed = d.seed  # selector / offset init, Gumbel noise and the data order
    c.steps = d.steps  # optimisation steps per slot budget
    c.lr = d.lr  # Adam learning rate of the selector logits and offsets
    c.tau_start = d.tau_start  # Gumbel temperature at step 0 ...
    c.tau_end = d.tau_end  # ... annealed to this
    c.anneal = d.anneal  # "exp" | "linear" | "constant"
    c.anneal_fraction = d.anneal_fraction  # fraction of the steps the annealing takes
    c.hard = d.hard  # straight-through hard selection (one-hot forward, soft gradient)
    c.offset_scale = d.offset_scale  # offsets are offset_scale * tanh(raw) (tokens are unit-norm)
    c.offset_init_std = d.offset_init_std
    c.shared_selector = d.shared_selector  # one selector for both modalities
    c.shared_offsets = d.shared_offsets  # one offset per slot for both modalities
    c.probe_channels = d.probe_channels  # channels edited while probing positions; () = all
    c.diversity = d.diversity  # penalty on two slots sharing probability mass
    c.count_fraction = d.count_fraction  # hard selections counted over the last fraction
    # Objective weights (each term divided by its value at the unperturbed tokens).
    c.weights = ml_collections.ConfigDict(dict(d.weights))
    c.channel_batches = d.channel_batches  # batches of per-image gradients for channel ranking
    c.group_size = d.group_size  # channels in the STE group (paper: 3)
    c.group = d.group  # "contiguous" window or "free" top-k
    c.shared = True  # value of model.ste.shared written to the snippet
    return c


def fusion_problem(model: Any) -> tuple[TokenFn, TermsFn]:
    """``token_fn``/``terms_fn`` for a frozen `TokFusion`; frozen = {"params", "tokenizer"}.

    Tokens come from the batch's cached ``vis_tokens``/``ir_tokens`` when present, else from the
    frozen tokenizer. The terms are the differentiable EI, AG, SF and SSIM (sum over both
    sources) of the fused image, per image.
    """
    from tokfusion_jax import metrics

    def token_fn(frozen: Any, batch: Batch) -> Array:
        if "vis_tokens" in batch and "ir_tokens" in batch:
            z_vis, z_ir = batch["vis_tokens"], batch["ir_tokens"]
        else:
            z_vis = model.tokens(frozen["tokenizer"], batch["vis"])
            z_ir = model.tokens(frozen["tokenizer"], batch["ir"])
        return jnp.stack([z_vis, z_ir], axis=1).astype(jnp.float32)  # (B, 2, N, C)

    def terms_fn(frozen: Any, tokens: Array, batch: Batch) -> dict[str, Array]:
        vis, ir = batch["vis"], batch["ir"]  # (B, H, W, 1)
        fused, _ = model.fuse(frozen["params"], tokens[:, 0], tokens[:, 1], vis, ir)
        values = metrics.differentiable(fused.astype(jnp.float32), vis, ir)
        return {key: values[name] for key, name in TERM_KEYS.items()}

    return token_fn, terms_fn


def _data_batches(
    config: ml_collections.ConfigDict, tokenizer: Any, batch_size: int, seed: int
) -> Iterator[Batch]:
    """An endless, seeded iterator over the run's training pairs (the trainer's pipeline)."""
    from tokfusion_jax import trainer

    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.data.batch_size = batch_size
    cfg.data.seed = seed
    cfg.data.shuffle = True
    root = cfg.data.get("train_root") or cfg.data.root
    source = trainer.open_source(cfg.data.dataset, root, bool(cfg.data.allow_unpaired))
    return trainer.train_iterator(cfg, source, tokenizer, int(cfg.data.image_size))


def probe_workdir(
    workdir: str | os.PathLike,
    cfg: ml_collections.ConfigDict | None = None,
    *,
    outdir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Probes a trained run: loads ``workdir``'s export (model and tokenizer frozen) and probes
    on the run's training data. Writes to ``outdir`` (default ``workdir/probe``)."""
    from tokfusion_jax import export, sharding

    cfg = default_config() if cfg is None else cfg
    settings = ProbeSettings.from_config(cfg)
    exp = export.load_export(workdir)
    model_cfg = exp.config.model
    if not model_cfg.get("use_tokens", True):
        raise ConfigError(
            f"{workdir}: the run was trained without tokens (model.use_tokens=False); "
            "there is nothing to probe"
        )
    mesh = sharding.make_mesh()
    if cfg.batch_size % mesh.devices.size:
        raise ConfigError(
            f"probe batch_size={cfg.batch_size} must be divisible by the "
            f"{mesh.devices.size} devices"
        )
    token_fn, terms_fn = fusion_problem(exp.model)
    frozen = {"params": exp.params, "tokenizer": exp.tokenizer}
    return run_probe(
        token_fn,
        terms_fn,
        lambda seed: _data_batches(exp.config, exp.tokenizer, cfg.batch_size, seed),
        settings,
        slots=list(cfg.slots),
        select_budget=int(cfg.select_budget),
        outdir=pathlib.Path(outdir) if outdir else pathlib.Path(workdir) / "probe",
        frozen=frozen,
        mesh=mesh,
        shared=bool(cfg.shared),
        tokenizer_sha256=getattr(exp.tokenizer, "sha256", ""),
        source=os.fspath(workdir),
        progress=progress,
    )


def _summary(report: Mapping[str, Any], outdir: pathlib.Path) -> str:
    lines = [f"probe outputs in {outdir}"]
    for budget, res in report["budgets"].items():
        lines.append(f"  {budget} slot(s): positions {res['positions']}")
    ste = report["ste"]
    lines.append(
        f"  chosen (budget {report['select_budget']}): positions {ste['positions']}, "
        f"channels {ste['channels']} (ranking {report['channels']['ranking']})"
    )
    lines.append(f"  snippet: {outdir / 'ste.json'}  (probe.load_ste_snippet -> config.model.ste)")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    """CLI: ``python -m tokfusion_jax.probe --workdir=RUN [--slots=1,2,3,4] [--out=DIR]``."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    from absl import flags

    f = flags.FLAGS
    if not f.workdir:
        raise ConfigError("--workdir is required (a trained run with an export/)")
    cfg = f.config
    if f.slots:
        with cfg.unlocked():
            cfg.slots = tuple(_parse_slots(f.slots))
    outdir = pathlib.Path(f.out) if f.out else pathlib.Path(f.workdir) / "probe"
    paths.check_output_folder(outdir, "--out")
    report = probe_workdir(f.workdir, cfg, outdir=outdir, progress=True)
    print(_summary(report, outdir), flush=True)


__all__ = [
    "ChannelResult",
    "PositionResult",
    "ProbeSettings",
    "ProbeState",
    "choose_group",
    "choose_positions",
    "default_config",
    "fusion_problem",
    "edit_tokens",
    "gumbel_softmax",
    "init_probe_state",
    "load_ste_snippet",
    "make_probe_step",
    "normalized_objective",
    "plot_distributions",
    "probe_channels",
    "probe_positions",
    "probe_workdir",
    "run_probe",
    "ste_snippet",
    "temperature",
    "write_bytes_atomic",
    "write_json",
]


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from tokfusion_jax.errors import run_absl

    flags.DEFINE_string("workdir", None, "trained run (its export/ is loaded)")
    flags.DEFINE_string("slots", "", "comma-separated slot budgets (default: config.slots)")
    flags.DEFINE_string("out", "", "output folder (default: WORKDIR/probe)")
    config_flags.DEFINE_config_dict("config", default_config(), "probe settings")
    run_absl(main)
