"""Selective Token Editing probe: Gumbel-Softmax sampler, planted-position search, snippets."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import (
    ADAM_STEP,
    ELEMENTARY_ULPS,
    assert_mostly_close,
    probable_bound,
    rounding_bound,
)

from tokfusion_jax import configlib, probe
from tokfusion_jax.errors import ConfigError
from tokfusion_jax.models import interface

# ----------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_gumbel_hard_frequencies_match_softmax(tau):
    # Gumbel-max: P(argmax_k (a_k + g_k) / tau = k) = softmax(a)_k for every tau > 0.
    logits = jnp.asarray([1.2, -0.3, 0.0, 2.0, -1.5])
    n = 40_000
    y = probe.gumbel_softmax(
        jax.random.PRNGKey(3), jnp.broadcast_to(logits, (n, 5)), tau, hard=True
    )
    y = np.asarray(y)
    np.testing.assert_array_equal(np.sort(np.unique(y)), [0.0, 1.0])  # one-hot forward values
    np.testing.assert_array_equal(y.sum(axis=1), np.ones(n))
    freq = y.mean(axis=0)
    a = np.asarray(logits, np.float64)
    p = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) < 5 * sigma), (freq, p)  # 5-sigma binomial interval
    # Pearson chi-square, 4 dof: the 0.999 quantile is 18.47.
    chi2 = float(np.sum((freq * n - p * n) ** 2 / (p * n)))
    assert chi2 < 18.47, chi2


def test_gumbel_soft_sample_is_softmax_of_perturbed_logits():
    rng = jax.random.PRNGKey(7)
    logits = jnp.asarray([[0.3, -1.0, 2.0, 0.5]])
    tau = 0.7
    y = np.asarray(probe.gumbel_softmax(rng, logits, tau))
    g = np.asarray(jax.random.gumbel(rng, logits.shape), np.float64)
    z = (np.asarray(logits, np.float64) + g) / tau
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    # z = (logits + g) / tau (3 roundings on |z|), softmax: max, subtract, exp, a 4-term sum,
    # divide; a change d of z moves a probability by at most d / 2
    bound = rounding_bound(3, float(np.abs(z).max())) + rounding_bound(ELEMENTARY_ULPS + 8, 1.0)
    np.testing.assert_allclose(y, expected, rtol=0, atol=bound)


def test_straight_through_gradients_finite_and_nonzero():
    logits = jnp.asarray([[0.1, 0.4, -0.2, 0.0], [1.0, -1.0, 0.5, 0.2]])
    values = jnp.asarray([1.0, -2.0, 0.5, 3.0])

    def f(a):
        y = probe.gumbel_softmax(jax.random.PRNGKey(0), a, 0.5, hard=True)
        return jnp.sum(y * values)

    g = np.asarray(jax.grad(f)(logits))
    assert np.all(np.isfinite(g))
    assert np.all(np.abs(g).sum(axis=1) > 1e-6)  # every row receives a gradient
    # Straight-through: the gradient is exactly the soft sample's gradient.
    soft = jax.grad(lambda a: jnp.sum(probe.gumbel_softmax(jax.random.PRNGKey(0), a, 0.5) * values))
    # two programs of the same Jacobian-vector product (softmax / tau and its transpose)
    np.testing.assert_allclose(
        g, np.asarray(soft(logits)), rtol=2 * rounding_bound(ELEMENTARY_ULPS + 12, 1.0)
    )


def test_temperature_schedule():
    kw = dict(tau_start=2.0, tau_end=0.5, anneal_steps=10)
    assert float(probe.temperature(0, **kw)) == pytest.approx(2.0)
    assert float(probe.temperature(5, **kw)) == pytest.approx(1.0)  # geometric midpoint
    assert float(probe.temperature(10, **kw)) == pytest.approx(0.5)
    assert float(probe.temperature(99, **kw)) == pytest.approx(0.5)
    assert float(probe.temperature(5, mode="linear", **kw)) == pytest.approx(1.25)
    assert float(probe.temperature(5, mode="constant", **kw)) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="probe.anneal"):
        probe.temperature(0, mode="cosine", **kw)


def test_edit_tokens_matches_loop():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 2, 6, 4)).astype(np.float32)
    weights = rng.random(size=(2, 2, 3, 6)).astype(np.float32)
    offsets = rng.normal(size=(2, 3, 4)).astype(np.float32)
    mask = np.asarray([0, 1, 1, 0], np.float32)
    out = np.asarray(probe.edit_tokens(tokens, weights, offsets, mask))
    expected = tokens.astype(np.float64).copy()
    for b in range(2):
        for m in range(2):
            for s in range(3):
                for n in range(6):
                    expected[b, m, n] += weights[b, m, s, n] * offsets[m, s] * mask
    # per entry: 3 slots of (weight * offset * mask) and their sum onto the token
    size = float(np.abs(tokens).max() + (np.abs(weights).sum(2).max() * np.abs(offsets).max()))
    np.testing.assert_allclose(out, expected, rtol=0, atol=rounding_bound(3 * 3 + 1, size))


# ----------------------------------------------------------------------------- planted problem

N_TOKENS, DIM = 16, 6


def _planted_problem(target: int, seed: int):
    """Tokens are random; the objective depends on position `target` only."""
    w = jnp.asarray(np.random.default_rng(100 + seed).normal(size=(DIM,)), jnp.float32)

    def batches(stream_seed: int):
        rng = np.random.default_rng(stream_seed)
        while True:
            yield {"tokens": rng.normal(size=(8, 2, N_TOKENS, DIM)).astype(np.float32)}

    def token_fn(frozen, batch):
        del frozen
        return batch["tokens"]  # (B, M, N, C)

    def terms_fn(frozen, tokens, batch):
        del frozen, batch
        x = jnp.einsum("bmc,c->b", tokens[:, :, target, :], w)  # (B,)
        return {"edge": 2.0 + jnp.tanh(0.5 * x), "flat": 10.0 + 0.0 * x}

    return token_fn, terms_fn, batches


SETTINGS = probe.ProbeSettings(steps=120, lr=0.1, weights=(("edge", 1.0), ("flat", 1.0)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probe_finds_planted_position(seed):
    target = [11, 3, 7][seed]
    token_fn, terms_fn, batches = _planted_problem(target, seed)
    settings = probe.ProbeSettings(**{**SETTINGS.__dict__, "seed": seed})
    result = probe.probe_positions(token_fn, terms_fn, batches(seed), settings, num_slots=1)
    assert result.positions == [target]
    assert result.probs.shape == (2, 1, N_TOKENS)
    assert np.all(result.probs[:, 0].argmax(-1) == target)  # both modalities agree
    assert np.all(result.frequency[:, 0, target] > 0.5)
    # counts / steps, summed over the tokens in float32
    np.testing.assert_allclose(result.frequency.sum(-1), 1.0, rtol=rounding_bound(N_TOKENS + 1, 1))
    assert result.history[-1]["objective"] > result.history[0]["objective"]
    assert result.scales["flat"] == pytest.approx(10.0)


def test_probe_is_deterministic_and_runs_on_the_mesh():
    token_fn, terms_fn, batches = _planted_problem(5, 0)
    settings = probe.ProbeSettings(**{**SETTINGS.__dict__, "steps": 30})
    from tokfusion_jax import sharding

    mesh = sharding.make_mesh()
    a = probe.probe_positions(token_fn, terms_fn, batches(0), settings, num_slots=2, mesh=mesh)
    b = probe.probe_positions(token_fn, terms_fn, batches(0), settings, num_slots=2, mesh=mesh)
    c = probe.probe_positions(token_fn, terms_fn, batches(0), settings, num_slots=2)
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.frequency, b.frequency)
    # 8 devices vs 1: the same steps in other programs. Adam moves each selector logit by at
    # most ADAM_STEP * lr per step, so a probability by at most half that (softmax slope <= 1/2
    # per logit, two logits moving); nearly all entries stay within the rounding of the
    # objective (a small planted problem: ~100 roundings per step) carried through the steps.
    steps, lr = settings.steps, settings.lr
    worst = min(1.0, steps * ADAM_STEP * lr)
    typical = steps * 2 * probable_bound(100, 4.0) + 1e-7 * steps  # float32 softmax of O(1)
    assert_mostly_close(a.probs, c.probs, typical, worst, fraction=0.95)
    assert len(set(a.positions)) == 2


def test_choose_positions_distinct_and_modalities_vote():
    probs = np.asarray(
        [
            [[0.1, 0.7, 0.2], [0.2, 0.6, 0.2]],  # vis: both slots like 1
            [[0.1, 0.8, 0.1], [0.1, 0.3, 0.6]],  # ir: slot 1 likes 2
        ]
    )
    # slot 0 is more confident on position 1 (mean 0.75 vs 0.45); slot 1 then takes its
    # next best, 2 (mean 0.4).
    assert probe.choose_positions(probs) == [1, 2]
    # 3 slots over 3 positions: every position used once.
    assert sorted(probe.choose_positions(np.ones((1, 3, 3)) / 3)) == [0, 1, 2]


def test_channel_probe_ranks_consistent_channels():
    # Objective gradient at the chosen position: channel 3 has a consistent sign across images,
    # channel 0 a large gradient whose sign flips with the image (not exploitable by one offset).
    def batches(seed):
        rng = np.random.default_rng(seed)
        while True:
            yield {
                "tokens": rng.normal(size=(8, 2, 8, 5)).astype(np.float32),
                "sign": rng.choice([-1.0, 1.0], size=(8,)).astype(np.float32),
            }

    def terms_fn(frozen, tokens, batch):
        z = tokens[:, :, 4, :]  # (B, M, C)
        val = 3.0 * batch["sign"] * z[:, 0, 0] + 1.0 * z[:, :, 3].sum(-1) + 0.5 * z[:, :, 2].sum(-1)
        return {"t": 5.0 + val}

    settings = probe.ProbeSettings(weights=(("t", 1.0),), group_size=2, group="free")
    res = probe.probe_channels(
        lambda fz, b: b["tokens"], terms_fn, batches(0), [4], settings, scales={"t": 5.0}
    )
    assert res.ranking[:2] == [3, 2]
    assert res.channels == [2, 3]
    assert res.sensitivity[0] > res.sensitivity[3]  # large but unstable
    assert res.stability[3] == pytest.approx(1.0)
    assert res.stability[0] < 0.5
    # channels 1 and 4 do not enter the terms: their edits change nothing, exactly
    np.testing.assert_array_equal(res.score[[1, 4]], 0.0)


def test_choose_group_modes():
    score = np.asarray([0.1, 0.9, 0.0, 0.8, 0.7, 0.6])
    assert probe.choose_group(score, 3, "free") == [1, 3, 4]
    assert probe.choose_group(score, 3, "contiguous") == [3, 4, 5]  # window sums 1.0 1.7 1.5 2.1
    with pytest.raises(ConfigError, match="group_size"):
        probe.choose_group(score, 7, "free")


# ----------------------------------------------------------------------------- outputs


def test_run_probe_writes_outputs_and_snippet_round_trip(tmp_path):
    token_fn, terms_fn, batches = _planted_problem(9, 0)
    settings = probe.ProbeSettings(
        **{**SETTINGS.__dict__, "steps": 60, "channel_batches": 2, "group_size": 2}
    )
    report = probe.run_probe(
        token_fn, terms_fn, batches, settings, slots=(1, 2), select_budget=2, outdir=tmp_path
    )
    for name in ("ste.json", "probe.json", "selection_frequency.png", "selector_distributions.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "selection_frequency.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert set(saved["budgets"]) == {"1", "2"}
    assert 9 in saved["ste"]["positions"]
    assert np.asarray(saved["budgets"]["2"]["probs"]).shape == (2, 2, N_TOKENS)

    ste = probe.load_ste_snippet(tmp_path / "ste.json", num_tokens=N_TOKENS, token_dim=DIM)
    assert list(ste.positions) == sorted(report["ste"]["positions"])
    assert list(ste.channels) == report["channels"]["channels"]
    mask = interface.hard_mask(N_TOKENS, DIM, ste.positions, ste.channels)
    expected = np.zeros((N_TOKENS, DIM))
    for p in report["ste"]["positions"]:
        expected[p, report["channels"]["channels"]] = 1.0
    np.testing.assert_array_equal(mask, expected)


def test_load_ste_snippet_errors(tmp_path):
    path = tmp_path / "ste.json"
    with pytest.raises(ConfigError, match="not found"):
        probe.load_ste_snippet(path)
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not a JSON"):
        probe.load_ste_snippet(path)
    snippet = probe.ste_snippet([12, 18], [6, 7, 8], num_tokens=32, token_dim=12)
    probe.write_json(path, snippet)
    with pytest.raises(ConfigError, match="num_tokens=32 but the model has 64"):
        probe.load_ste_snippet(path, num_tokens=64)
    probe.write_json(path, {**snippet, "positions": [40]})
    with pytest.raises(ConfigError, match="positions"):
        probe.load_ste_snippet(path)


def test_settings_reject_bad_values():
    with pytest.raises(ConfigError, match="probe.group="):
        probe.ProbeSettings.from_config({"group": "diagonal"})
    with pytest.raises(ConfigError, match="probe.steps"):
        probe.ProbeSettings.from_config({"steps": 0})
    s = probe.ProbeSettings.from_config({"weights": {"ei": 2.0}, "slots": (1, 2)})
    assert s.weights == (("ei", 2.0),)


def test_probe_config_file_and_shipped_snippets():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    for arg in ("", "tiny"):
        cfg = configlib.load_config(root / "probe.py", arg)
        settings = probe.ProbeSettings.from_config(cfg)
        assert dict(settings.weights) == {"ei": 1.0, "ag": 1.0, "sf": 1.0, "ssim": 1.0}
        assert cfg.select_budget == 0  # the paper's 2 when probed, else the closest budget
        assert probe.default_select_budget(cfg.slots) == 2
    assert probe.default_select_budget([1]) == 1  # --slots=1 works with the default
    assert probe.default_select_budget([3, 4]) == 3 and probe.default_select_budget([1, 3]) == 1
    expected = {
        "titok_l32": (32, (12, 18)),
        "titok_b64": (64, (18, 60)),
        "titok_s128": (128, (20, 69)),
    }
    for name, (n, positions) in expected.items():
        ste = probe.load_ste_snippet(root / "ste" / f"{name}.json", num_tokens=n, token_dim=12)
        assert ste.positions == positions and ste.channels == (6, 7, 8)
