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


@pytest.fixture(scope="session")
def metric_cases() -> pathlib.Path:
    """Metric test triplets beside the checkout; skips the test when they are absent."""
    path = SHARED / "metric_cases"
    if not path.is_dir():
        pytest.skip("../shared/metric_cases is not present")
    return path
