"""Batch sizes from free memory (planted budgets) and the out-of-memory fallback of `fuse`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tokfusion_jax import fuse, memory
from tokfusion_jax.errors import DataError

GIB = memory.GIB


def test_choose_batch_fits_the_planted_budget():
    model = memory.MemoryModel(base_bytes=1 * GIB, per_item_bytes=2 * GIB)
    # 0.7 * 10 GiB = 7 GiB; minus the 1 GiB base leaves room for 3 items of 2 GiB.
    assert memory.choose_batch(10 * GIB, model, upper=8) == 3
    assert memory.choose_batch(10 * GIB, model, upper=2) == 2  # the user's bound wins
    assert memory.choose_batch(10 * GIB, model, upper=8, headroom=1.0) == 4
    assert memory.choose_batch(1 * GIB, model, upper=8) == 1  # one pair is always tried
    assert memory.choose_batch(None, model, upper=8) == 8  # unknown free memory: the bound
    assert memory.choose_batch(10 * GIB, None, upper=8) == 8
    for batch in range(1, 9):  # exactly the need of `batch` items free: that batch, no more
        assert memory.choose_batch(model.need(batch), model, upper=8, headroom=1.0) == batch
        assert memory.choose_batch(model.need(batch) - 1, model, 8, 1.0) == max(batch - 1, 1)
    with pytest.raises(ValueError):
        memory.choose_batch(GIB, model, upper=0)


def test_memory_model_from_two_analyses():
    m = memory.MemoryModel.from_two(3 * GIB, 5 * GIB)
    assert (m.base_bytes, m.per_item_bytes) == (1 * GIB, 2 * GIB)
    assert m.need(4) == 9 * GIB
    # No growth in the analysis is not trusted: at least half the batch-1 need per item.
    flat = memory.MemoryModel.from_two(4 * GIB, 4 * GIB)
    assert flat.per_item_bytes == 2 * GIB and flat.need(1) == 4 * GIB


def test_free_memory_readers(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    1048576 kB\n")
    assert memory.meminfo_available(str(meminfo)) == GIB
    assert memory.meminfo_available(str(tmp_path / "missing")) is None

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{6 * GIB}\n")
    (v2 / "memory.current").write_text(f"{2 * GIB}\n")
    assert memory.cgroup_free(str(v2)) == 4 * GIB
    (v2 / "memory.max").write_text("max\n")
    assert memory.cgroup_free(str(v2)) is None  # no limit

    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{3 * GIB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 * GIB}\n")
    assert memory.cgroup_free(str(tmp_path / "v1")) == 2 * GIB
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1 "unlimited"
    assert memory.cgroup_free(str(tmp_path / "v1")) is None

    free = memory.free_bytes()  # this machine: a positive number of bytes
    assert free is None or free > 0


def test_out_of_memory_recognised():
    assert memory.is_out_of_memory(MemoryError())
    assert memory.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating"))
    assert not memory.is_out_of_memory(ValueError("shapes (2, 3) and (4,) differ"))


def _pairs(tmp_path, n: int, hw=(16, 20)) -> list[fuse.PairPaths]:
    rng = np.random.default_rng(0)
    pairs = []
    for k in range(n):
        for side in ("vis", "ir"):
            (tmp_path / side).mkdir(exist_ok=True)
            img = rng.integers(0, 256, hw, dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / side / f"p{k}.png")
        pairs.append(
            fuse.PairPaths(
                f"p{k}",
                str(tmp_path / "vis" / f"p{k}.png"),
                str(tmp_path / "ir" / f"p{k}.png"),
                str(tmp_path / "out" / f"p{k}.png"),
            )
        )
    return pairs


def _mean_fuse(calls: list[int], fail_above: int):
    """A fuse function that records each batch size and fails like XLA above `fail_above`."""

    def fuse_fn(vis: np.ndarray, ir: np.ndarray) -> np.ndarray:
        calls.append(vis.shape[0])
        if vis.shape[0] > fail_above:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return (vis + ir) / 2

    return fuse_fn


def test_fuse_pairs_halves_the_batch_on_an_allocation_failure(tmp_path):
    pairs = _pairs(tmp_path, 7)
    calls: list[int] = []
    counts = fuse.fuse_pairs(_mean_fuse(calls, fail_above=2), pairs, batch_size=8, progress=False)
    assert counts == {"fused": 7, "skipped": 0}
    # 8 (7 padded) fails, 4 fails, then batches of 2 for the rest (the last pair alone).
    assert calls == [8, 4, 2, 2, 2, 1]
    for p in pairs:
        out = np.asarray(Image.open(p.out))
        assert out.shape == (16, 20) and out.max() == 255  # min-max stretched


def test_fuse_pairs_one_pair_out_of_memory_is_a_data_error(tmp_path):
    pairs = _pairs(tmp_path, 2)
    with pytest.raises(DataError, match=r"p0\.png: out of memory fusing one 20x16 pair"):
        fuse.fuse_pairs(_mean_fuse([], fail_above=0), pairs, batch_size=4, progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_memory_planner_lowers_the_batch_to_what_fits(tmp_path, capsys):
    pairs = _pairs(tmp_path, 5)
    model = memory.MemoryModel(base_bytes=GIB, per_item_bytes=GIB)
    asked = []

    def memory_model(h: int, w: int) -> memory.MemoryModel:
        asked.append((h, w))
        return model

    plan = fuse.memory_planner(memory_model, free_bytes=lambda: int(3.5 * GIB / 0.7))
    calls: list[int] = []
    fuse.fuse_pairs(_mean_fuse(calls, 99), pairs, batch_size=8, progress=False, plan_batch=plan)
    assert asked == [(16, 20)]  # one plan per image size
    assert calls == [2, 2, 1]  # 3.5 GiB of budget: base 1 + 2 pairs
    assert "20x16 pairs in batches of 2 (not 5)" in capsys.readouterr().err
