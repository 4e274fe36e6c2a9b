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


def run_in_fresh_interpreter(code: str, *args: str, env: dict | None = None) -> dict:
    """Runs `code` in a new Python process and returns the JSON of its last output line."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_probe(defaults: bool) -> dict:
    env = {**os.environ, "TOKFUSION_MALLOC_DEFAULTS": "1" if defaults else "0"}
    return run_in_fresh_interpreter(PROBE, env=env)


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


# The main thread fills the heap with small blocks (below glibc's mmap threshold) and frees every
# other one: the holes lie between blocks in use, so glibc's own trimming of the heap's top cannot
# release them; then asks for the free pages back. Prints the resident size before and after
# (KiB) and how much was freed.
TRIM_PROBE = """
import ctypes, json, sys
from tokfusion_jax import host_memory

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

size = 64 << 10
blocks = [libc.malloc(size) for _ in range(2048)]  # 128 MiB
for b in blocks:
    ctypes.memset(b, 1, size)
for b in blocks[::2]:
    libc.free(b)  # 64 MiB of holes
before = rss_kib()
released = host_memory.release_freed_memory() if sys.argv[1] == "release" else False
print(json.dumps({"released": released, "before": before, "after": rss_kib()}))
"""


def trim_probe(mode: str) -> dict:
    return run_in_fresh_interpreter(TRIM_PROBE, mode)


def test_release_freed_memory_returns_free_heap_pages():
    kept, released = trim_probe("keep"), trim_probe("release")
    assert released["released"] is True
    assert kept["before"] - kept["after"] < 8 << 10, kept  # the holes stay resident by default
    # Each 64 KiB hole gives back its whole pages: most of the 64 MiB.
    assert released["before"] - released["after"] > 48 << 10, released
