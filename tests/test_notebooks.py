"""The Colab notebooks: valid nbformat, stored without outputs, thin, and runnable headless.

Each notebook is executed top to bottom with nbclient in its quick mode (``QUICK = True``, the
value it is stored with): a tiny random-weight tokenizer, the bundled sample pairs, a few training
steps on CPU. The package comes from this checkout (``TOKFUSION_REPO``), never from the network.
A cell that raises fails the test. The kernel is the running interpreter, registered under a
private kernel name in a temporary ``JUPYTER_PATH`` so a fresh machine needs no ``jupyter``
set-up of its own.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO_ROOT / "colab"
NOTEBOOKS = ("quickstart.ipynb", "probe_and_ablate.ipynb", "train_tpu.ipynb")  # run in this order
KERNEL_NAME = "tokfusion-nbtest"
CELL_TIMEOUT_S = 600  # generous: a loaded CI machine is slow, a failing cell still fails
BADGE_URL = "https://colab.research.google.com/github/{org}/tokfusion_jax/blob/main/colab/{name}"

# What a notebook leaves in its working directory after a quick run (relative paths, globbed).
EXPECTED_ARTIFACTS = {
    "quickstart.ipynb": ("runs/quickstart/export/export.json", "outputs/quickstart/*.png"),
    "train_tpu.ipynb": ("runs/train_tpu/export/export.json", "runs/train_tpu/metrics.jsonl"),
    "probe_and_ablate.ipynb": ("runs/probe/probe/*.json", "runs/probe/probe/*.png"),
}

# Model code has no place in a notebook cell: these patterns would mean a cell defines a network.
MODEL_CODE = re.compile(r"nn\.Module|nn\.compact|def __call__|flax\.linen")


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COLAB / name, as_version=4)


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_every_notebook_exists() -> None:
    present = sorted(p.name for p in COLAB.glob("*.ipynb"))
    assert sorted(NOTEBOOKS) == present


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_stripped_and_thin(name: str) -> None:
    nb = _read(name)
    nbformat.validate(nb)  # raises nbformat.ValidationError on a malformed notebook
    assert nb.metadata["kernelspec"]["language"] == "python"

    # The badge sits in the first cell and points at this very notebook.
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    badge = re.search(r"https://colab\.research\.google\.com/github/([^/]+)/[^)\s]+", first.source)
    assert badge, f"{name}: no 'Open in Colab' badge in the first cell"
    assert badge.group(0) == BADGE_URL.format(org=badge.group(1), name=name)

    code = _code_cells(nb)
    # The first code cell holds the parameters, quick mode on.
    assert re.search(r"^QUICK = True\b", code[0].source, flags=re.M), f"{name}: QUICK = True"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{name}: code cell {i} has stored outputs"
        assert cell.execution_count is None, f"{name}: code cell {i} has an execution count"
        assert not MODEL_CODE.search(cell.source), f"{name}: code cell {i} defines model code"


@pytest.fixture()
def kernel_env(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, compilation_cache: pathlib.Path
) -> str:
    """Registers this interpreter as a private Jupyter kernel and sets the notebooks' env (the
    session's compilation cache and fast-compile XLA flags included, tests/conftest.py)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tokfusion test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Two simulated CPU devices: the notebooks' mesh code runs multi-device, cheaply.
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_force_host_platform_device_count=2".strip())
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(compilation_cache))
    monkeypatch.setenv("TOKFUSION_REPO", str(REPO_ROOT))  # install from the checkout
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # importable even without an install
    return KERNEL_NAME


def _run(name: str, kernel_name: str, workdir: pathlib.Path) -> None:
    """Executes one notebook in `workdir`; raises CellExecutionError naming the failing cell."""
    nb = _read(name)
    workdir.mkdir()
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    for pattern in EXPECTED_ARTIFACTS[name]:
        assert list(workdir.glob(pattern)), f"{name} left no {pattern} in its working directory"
    for cell in _code_cells(nb):
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{name}: a cell reported an error"


@pytest.mark.heavy(seconds=200)
def test_notebooks_run_headless_in_quick_mode(
    kernel_env: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, quick_run
) -> None:
    """All three, one after the other in one test: they fuse, probe and evaluate the same tiny
    model, so the later notebooks reuse its compiled programs from the persistent XLA cache.
    Every notebook starts from the suite's finished quick run (``TOKFUSION_QUICK_RUN``, the very
    config their quick mode trains; tests/conftest.py): its training cells resume it and have
    nothing left to do, so no notebook trains the model again."""
    monkeypatch.setenv("TOKFUSION_QUICK_RUN", str(quick_run))
    for name in NOTEBOOKS:
        _run(name, kernel_env, tmp_path / name.removesuffix(".ipynb"))
