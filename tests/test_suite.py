"""The suite's own scheduling: what `make test` relies on to share compiled programs.

Tests of one ``xdist_group`` share session fixtures and the programs compiled in their worker
(tests/conftest.py). Under ``--dist loadgroup`` pytest-xdist marks each one by appending
``@<group>`` to its node id and sends the whole group to one worker. When that mark is lost
(pytest 9 with pytest-xdist 3.8 read and write different attributes) every group is split
silently and the shared work is done twice: a passing run would never show it, these tests do.
"""

from __future__ import annotations

import os

import pytest

GROUP = "suite_scheduling"


def _same_worker_as_the_other_member(request: pytest.FixtureRequest, tmp_path_factory) -> None:
    if not (os.environ.get("PYTEST_XDIST_WORKER") and request.config.getvalue("loadgroup")):
        pytest.skip("runs under pytest-xdist with --dist loadgroup (make test)")
    assert request.node.nodeid.endswith(f"@{GROUP}"), request.node.nodeid
    # Whichever member runs first records its worker in the folder both workers share.
    record = tmp_path_factory.getbasetemp().parent / f"{GROUP}.worker"
    worker = os.environ["PYTEST_XDIST_WORKER"]
    if record.exists():
        assert record.read_text() == worker
    else:
        record.write_text(worker)


@pytest.mark.xdist_group(GROUP)
def test_group_member_one(request: pytest.FixtureRequest, tmp_path_factory) -> None:
    _same_worker_as_the_other_member(request, tmp_path_factory)


@pytest.mark.xdist_group(GROUP)
def test_group_member_two(request: pytest.FixtureRequest, tmp_path_factory) -> None:
    _same_worker_as_the_other_member(request, tmp_path_factory)
