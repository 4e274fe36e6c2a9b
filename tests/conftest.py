"""Test set-up: 8 fake CPU devices, set before jax is first imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real image bundle beside the checkout; skips the test when it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not present")
    return path


@pytest.fixture(scope="session")
def metric_cases() -> pathlib.Path:
    """Metric test triplets beside the checkout; skips the test when they are absent."""
    path = SHARED / "metric_cases"
    if not path.is_dir():
        pytest.skip("../shared/metric_cases is not present")
    return path
