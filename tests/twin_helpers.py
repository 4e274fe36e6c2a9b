"""Helpers shared by the tests that compare flax modules with float64 torch twins."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch


def random_params(module, *args, seed: int = 0):
    """Random float32 params for `module` (no jax RNG compile): every leaf is perturbed.

    Kernels, and biases next to a kernel, ~ U(+-1/sqrt(fan_in)); other biases ~ U(+-0.2); every
    other leaf (LayerNorm weights, temperatures, scales) ~ U(0.6, 1.4).
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]

    def fill(node):
        out = {}
        for key, child in node.items():
            if isinstance(child, dict):
                out[key] = fill(child)
            elif key == "kernel" or (key == "bias" and "kernel" in node):
                bound = 1.0 / math.sqrt(math.prod(node["kernel"].shape[:-1]))
                out[key] = rng.uniform(-bound, bound, child.shape).astype(np.float32)
            elif key == "bias":
                out[key] = rng.uniform(-0.2, 0.2, child.shape).astype(np.float32)
            else:
                out[key] = rng.uniform(0.6, 1.4, child.shape).astype(np.float32)
        return out

    return jax.tree_util.tree_map(jnp.asarray, fill(abstract))


def t64(x):
    """A float64 torch tensor of an array (a tensor stays in the autograd graph)."""
    if isinstance(x, torch.Tensor):
        return x.double()
    return torch.from_numpy(np.asarray(x, np.float64))


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
