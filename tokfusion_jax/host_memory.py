"""Host allocator policy for long XLA:CPU runs (training, the bench): keep freed memory mapped.

XLA:CPU allocates each execution's temporaries as one block (about 2 GB for the 128x128 plain-2D
train step at batch 1, 7.9 GB at batch 4) and frees it when the execution ends. The block is
requested from a worker thread, so glibc serves it from that thread's arena, whose heaps are at
most 64 MB: it falls back to a fresh `mmap` and returns the block with `munmap`. Every step then
page-faults its whole temporary block back in (4 KiB pages, zeroed by the kernel): 500 k faults
and about 1.1 s of system time per 128x128 step at batch 1, 10-28 s at batch 4
(`benchmarks/NOTES.md` #22).

`retain_freed_memory()` tells glibc (via `mallopt`) to serve every thread from the main arena,
never to `mmap` a block of its own, and never to give the top of the heap back to the kernel. The
first step still faults its memory in; later steps reuse the same pages. The cost: the process
keeps its peak heap mapped until it exits (its resident size does not shrink after a peak), which
is what a training process wants and what a library imported into a long-lived service may not:
so only the training and benchmark entry points call it, never an import.

It acts only before the threads that allocate have made their first allocation (glibc binds a
thread to an arena then), so call it before the first JAX computation of the process. It is
chosen at run time: a no-op where the C library is not glibc (macOS, musl) or has no `mallopt`,
and when ``TOKFUSION_MALLOC_DEFAULTS=1`` is in the environment (A/B measurements, the test
suite). Values are unaffected: only where freed memory goes changes.

`release_freed_memory()` is the opposite move, for one-off work: it hands every free page of the
heap back to the kernel (`malloc_trim(0)`). `fuse` calls it after compiling a program, so the
compiler's freed scratch (and the loader's) is not resident while the program's temporaries are:
the 768x576 paper-size fuse peaks ~90-160 MiB lower (NOTES #24).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

DEFAULTS_ENV = "TOKFUSION_MALLOC_DEFAULTS"

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# (parameter, value): one arena, no per-block mmap, never trim (-1 = SIZE_MAX in glibc).
RETAIN_POLICY = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def _glibc(name: str):
    """glibc's function `name`, or None where the C library is not glibc or lacks it."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


@functools.cache
def retain_freed_memory() -> bool:
    """Applies `RETAIN_POLICY` once per process; True when glibc accepted every parameter."""
    if os.environ.get(DEFAULTS_ENV, "") == "1":
        return False
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in RETAIN_POLICY)


def release_freed_memory() -> bool:
    """Returns the heap's free pages to the kernel (glibc `malloc_trim(0)`); False elsewhere."""
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    trim(0)
    return True
