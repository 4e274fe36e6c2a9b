"""Test set-up: 8 fake CPU devices and fast-compiling XLA flags, set before jax is imported; one
persistent compilation cache for the whole run; the fixtures several test files share.

The suite checks values, not speed: XLA's unoptimised CPU code generation
(``FAST_COMPILE_FLAGS``) compiles the tiny models' programs about a third faster, and the
few full-size checks run nearly as fast with it (their time is in GEMMs and convolutions that
XLA hands to its runtime libraries). Every program compiled once, in any test process (both
xdist workers, the CLI subprocesses, the notebook kernels), is reused from the session's
persistent cache by every later identical compile.
"""

import os

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        FAST_COMPILE_FLAGS,
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's processes are long-lived and do many unrelated things (as a library imported into a
# service): glibc keeps its default trimming there; tests/test_host_memory.py checks the policy
# the training entry points set, in a process of its own.
os.environ["TOKFUSION_MALLOC_DEFAULTS"] = "1"

import math  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Heavy tests first, costliest first (the rest keep their order): with ``--dist loadgroup``
    the two workers take the next test as they free up, so the long ones overlap each other and
    the run ends on short tests instead of one worker waiting for the other's last long one.
    Tests of one ``xdist_group`` share compiled programs through the persistent cache and run
    one after the other on one worker (the group goes first)."""

    def cost(item: pytest.Item) -> float:
        mark = item.get_closest_marker("heavy")
        return -float(mark.kwargs.get("seconds", mark.args[0] if mark.args else 1)) if mark else 0

    items.sort(key=cost)


def _session_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The folder every worker of this pytest run shares (its basetemp's parent with xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One persistent XLA cache for the run: this process, the other worker and every
    subprocess or notebook kernel started from it (they inherit the environment)."""
    import jax

    path = _session_root(tmp_path_factory) / "xla_cache"
    path.mkdir(exist_ok=True)
    settings = {
        "JAX_COMPILATION_CACHE_DIR": str(path),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    os.environ.update(settings)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real image bundle beside the checkout; skips the test when it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not present")
    return path


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> pathlib.Path:
    """A workdir holding an untrained stage-II export of ``configs/ivif.py:tiny`` (32x32, width 8)
    and its random tiny tokenizer, written by the real `export.save_export` (seconds to build)."""
    import jax

    from tokfusion_jax import configlib, export, trainer
    from tokfusion_jax.models import titok
    from tokfusion_jax.models.fusion import TokFusion

    run = tmp_path_factory.mktemp("tiny_export")
    config = configlib.load_config(REPO_ROOT / "configs" / "ivif.py", "tiny")
    size, t = int(config.data.image_size), config.model.tokens
    tok_config = trainer.random_tiny_tokenizer_config(size, int(t.num_tokens), int(t.token_dim))
    tok = titok.create(tok_config, seed=0)
    titok.save(tok, run / "tokenizer")
    params = TokFusion(config.model).init(jax.random.key(0), stage=2, image_size=(size, size))
    config.tokenizer.path = str(run / "tokenizer")
    export.save_export(run, config, params, tok)
    return run


def quick_run_config():
    """The notebooks' quick run: ``configs/ivif.py:quick`` (the tiny model with the packaged
    tokenizer) on the bundled samples, one step per stage, the 4 sample pairs as one batch."""
    from tokfusion_jax import configlib

    config = configlib.load_config(REPO_ROOT / "configs" / "ivif.py", "quick")
    config.data.dataset, config.data.root = "samples", ""
    config.val.dataset, config.data.val_root = "", ""
    config.train.stage1_epochs = config.train.stage2_epochs = 1
    config.train.steps_per_epoch = 1
    config.train.log_every_steps = 1
    config.data.batch_size = 4
    return config


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> pathlib.Path:
    """One finished quick run (checkpoints, metrics, export, tokenizer) for the whole test run,
    trained once under a file lock by whichever worker needs it first. Tests copy it before
    writing into it (`copy_run`)."""
    import jax
    from filelock import FileLock

    from tokfusion_jax import trainer

    root = _session_root(tmp_path_factory)
    run = root / "quick_run"
    with FileLock(str(root / "quick_run.lock")):
        if not (run / "export" / "export.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
            devices = jax.devices()[: math.gcd(4, jax.device_count())]
            trainer.train_and_evaluate(quick_run_config(), run, devices=devices)
    return run


def copy_run(run: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """A private copy of a finished run (a rerun of the same config resumes it: no training)."""
    shutil.copytree(run, dest)
    return dest


@pytest.fixture(scope="session")
def metric_cases() -> pathlib.Path:
    """Metric test triplets beside the checkout; skips the test when they are absent."""
    path = SHARED / "metric_cases"
    if not path.is_dir():
        pytest.skip("../shared/metric_cases is not present")
    return path
