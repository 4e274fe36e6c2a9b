"""The CPU compiler options change how XLA partitions the work, never the values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tokfusion_jax import compile_options
from tokfusion_jax.models import backbone


def test_cpu_options_are_known_to_this_xla_and_off_by_env(monkeypatch):
    options = compile_options.compiler_options()
    if jax.default_backend() == "cpu":
        assert options == {compile_options.YNN_OPTION: compile_options.YNN_INDIVIDUAL}
    monkeypatch.setenv(compile_options.DEFAULTS_ENV, "1")
    assert compile_options.compiler_options() == {}
    assert not compile_options.option_accepted("xla_cpu_no_such_option", "1")


def test_same_values_and_gradients_with_and_without_the_options():
    block = backbone.BaseFeatureExtraction(dim=8, heads=2)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 12, 8))
    params = block.init(jax.random.key(1), x)
    cot = jax.random.normal(jax.random.key(2), x.shape)

    def loss(p, x):
        return jnp.sum(block.apply(p, x) * cot)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    tuned = jax.jit(grad, compiler_options=compile_options.compiler_options())(params, x)
    plain = jax.jit(grad)(params, x)
    # Only the grouping of float32 sums may differ: float32 eps (1.2e-7) times the ~100 terms of
    # the longest sum here (the 3x3 conv's 9 * 24 products, the spatial l2 norms), of the largest.
    leaves = zip(jax.tree_util.tree_leaves(tuned), jax.tree_util.tree_leaves(plain), strict=True)
    for a, b in leaves:
        scale = float(jnp.max(jnp.abs(b))) or 1.0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)
