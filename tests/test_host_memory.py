"""The training processes' allocator policy (`host_memory`): freed blocks stay mapped and are
reused without page faults. Each case runs in a fresh interpreter (the policy binds threads to
arenas at their first allocation, and the suite's own processes keep glibc's defaults)."""

import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the policy is glibc's mallopt; elsewhere it is a no-op",
)

BLOCK_MB = 64  # above glibc's largest mmap threshold (32 MiB): served by mmap by default

# A worker thread allocates, touches and frees a block twice (as XLA:CPU's execution
# temporaries); prints whether the policy applied and the minor page faults of the second round.
# (Plain malloc/memset/free through ctypes: NumPy would madvise its block into huge pages.)
PROBE = f"""
import ctypes, json, resource, threading
from tokfusion_jax import host_memory

applied = host_memory.retain_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []

def one_round():
    size = {BLOCK_MB} << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # touches every page
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

for _ in range(2):
    t = threading.Thread(target=one_round)
    t.start()
    t.join()
print(json.dumps({{"applied": applied, "faults": faults}}))
"""


def run_probe(defaults: bool) -> dict:
    env = {**os.environ, "TOKFUSION_MALLOC_DEFAULTS": "1" if defaults else "0"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or ""."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return ""
    return text.partition("[")[2].partition("]")[0]


def test_freed_block_is_reused_without_page_faults():
    pages = (BLOCK_MB << 20) // os.sysconf("SC_PAGE_SIZE")
    default = run_probe(defaults=True)
    retained = run_probe(defaults=False)
    assert default["applied"] is False and retained["applied"] is True
    # glibc's default: each round maps a fresh block and faults every page of it in again
    # (transparent huge pages, where the kernel uses them for every mapping, fault fewer).
    if thp_mode() != "always":
        assert default["faults"][1] > pages // 2, default
    # The policy: the second round reuses the first round's pages (small allocations of the
    # interpreter may fault a few pages: well under a tenth of the block).
    assert retained["faults"][1] < pages // 10, retained
