"""Inference export: exact parameter round trip, tokenizer identity checks, atomic replacement."""

import json
import pathlib

import jax
import numpy as np
import pytest

from tokfusion_jax import configlib, export, trainer
from tokfusion_jax.errors import CheckpointError
from tokfusion_jax.models import titok
from tokfusion_jax.models.fusion import TokFusion

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config():
    return configlib.load_config(REPO / "configs" / "ivif.py", "tiny")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tok = titok.create(trainer.random_tiny_tokenizer_config(32, 32, 12), seed=3)
    titok.save(tok, root / "tok")
    config = _config()
    config.tokenizer.path = str(root / "tok")
    params = trainer.stage_params(TokFusion(config.model), jax.random.key(0), 2, (32, 32))
    return root, config, params, tok


def test_round_trip(setup):
    root, config, params, tok = setup
    out = export.save_export(root / "run", config, params, tok)
    assert out == root / "run" / "export"
    record = json.loads((out / "export.json").read_text())
    assert record["tokenizer"]["sha256"] == tok.sha256
    assert record["modules"] == sorted(params)
    fx = export.load_export(root / "run")
    assert fx.tokenizer.sha256 == tok.sha256 and fx.config.model.dim == config.model.dim
    for a, b in zip(
        jax.tree_util.tree_leaves(fx.params), jax.tree_util.tree_leaves(params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A second export replaces the first completely; no temporary folders are left behind.
    export.save_export(root / "run", config, jax.tree_util.tree_map(lambda x: x * 0, params), tok)
    fx2 = export.load_export(out)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(fx2.params))
    assert sorted(p.name for p in (root / "run").iterdir()) == ["export"]


def test_wrong_tokenizer_is_refused(setup):
    root, config, params, tok = setup
    export.save_export(root / "run2", config, params, tok)
    other = titok.create(trainer.random_tiny_tokenizer_config(32, 32, 12), seed=4)
    titok.save(other, root / "other_tok")
    with pytest.raises(CheckpointError, match="sha256"):
        export.load_export(root / "run2", tokenizer_path=root / "other_tok")


def test_missing_export_and_tokenizer_fail_clearly(setup, tmp_path):
    root, config, params, tok = setup
    with pytest.raises(CheckpointError, match="no inference export"):
        export.load_export(tmp_path)
    export.save_export(tmp_path / "run", config, params, tok)
    with pytest.raises(CheckpointError, match="not at"):
        export.load_export(tmp_path / "run", tokenizer_path=tmp_path / "nowhere")


def test_fuse_rejects_bad_shapes(setup):
    root, config, params, tok = setup
    fx = export.FusionExport(TokFusion(config.model), params, config, tok)
    with pytest.raises(ValueError, match="same shape"):
        fx.fuse(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="expected"):
        fx.fuse(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))
