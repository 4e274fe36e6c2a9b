"""XLA compiler options chosen at run time for the backend a program compiles for.

XLA:CPU hands matrix products and dense convolutions to YNNPACK. By default it also pulls the
elementwise and reduction ops around them (LayerNorm statistics, the depthwise tap sums, gates)
into the same YNNPACK subgraph, and those subgraphs run the non-GEMM part far slower than XLA's
own loop fusions do (`benchmarks/NOTES.md`, entry "YNNPACK fusion granularity"). Keeping YNNPACK to
individual dots and convolutions (`LIBRARY_FUSION_TYPE_INDIVIDUAL_*`) leaves the GEMMs on
YNNPACK's kernels (which pick their ISA from the CPU at run time) and the rest to XLA's fusions.
The rule does not depend on the vector ISA: it is about which library runs the elementwise work.

    jitted = jax.jit(fn, compiler_options=compile_options.compiler_options())

`compiler_options()` returns the options for the default backend: on CPU the YNNPACK setting when
this XLA build knows the option (probed once per process by compiling a one-line program; other
jaxlib versions get `{}`), on GPU/TPU `{}`. `TOKFUSION_XLA_DEFAULTS=1` in the environment turns
the choice off (XLA's defaults everywhere), for A/B measurements.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
YNN_INDIVIDUAL = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
DEFAULTS_ENV = "TOKFUSION_XLA_DEFAULTS"


@functools.cache
def option_accepted(name: str, value: str) -> bool:
    """Whether this XLA build compiles a program with `{name: value}` on the default backend."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
            jnp.zeros((), jnp.float32)
        ).compile()
    except Exception:  # noqa: BLE001 - unknown option, or a backend that rejects it
        return False
    return True


def compiler_options() -> dict[str, str]:
    """The options tokfusion_jax compiles its programs with on the default backend: the YNNPACK
    granularity above on CPU, nothing on GPU/TPU. A new dict on every call."""
    if os.environ.get(DEFAULTS_ENV, "") == "1" or jax.default_backend() != "cpu":
        return {}
    if not option_accepted(YNN_OPTION, YNN_INDIVIDUAL):
        return {}
    return {YNN_OPTION: YNN_INDIVIDUAL}
