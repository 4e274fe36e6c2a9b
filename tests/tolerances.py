"""Error bounds for comparing floating-point results, derived from the computation.

A tolerance printed by one machine does not hold on another: XLA picks different kernels (FMA
or not, vector width, summation order) on AVX2 and AVX-512 CPUs. The bounds here follow the
standard worst-case analysis (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1):
a result reached through a chain of ``n`` roundings (a length-``k`` sum or dot product counts
``k``) on values of size at most ``M`` is off by at most ``gamma_n * M`` with
``gamma_n = n u / (1 - n u)`` and ``u`` the unit roundoff. Any IEEE-754 CPU stays inside them,
whatever order it sums in. ``cond`` scales a bound by the amplification of the operations after
the roundings (an inverse, a division by a small norm) where that is not 1.

The tight checks are the float64 ones (``u = 2^-53``: a wrong formula, epsilon or padding shows
up there at once); the float32 bounds check that float32 execution does not go astray.
"""

from __future__ import annotations

import numpy as np

U32 = float(np.finfo(np.float32).eps) / 2  # 2^-24, float32 unit roundoff
U64 = float(np.finfo(np.float64).eps) / 2  # 2^-53
U16 = 2.0**-8  # bfloat16 unit roundoff (8-bit significand)


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n roundings."""
    if n * u >= 1:
        raise ValueError(f"gamma_{n} is unbounded at u={u}")
    return n * u / (1 - n * u)


def rounding_bound(chain: int, magnitude: float, u: float = U32, cond: float = 1.0) -> float:
    """Worst-case absolute error of a result `chain` roundings deep on values <= `magnitude`."""
    return gamma(chain, u) * magnitude * cond
