"""The probe on a saved fusion export (frozen model + tokenizer), in-process and via the CLI."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from tolerances import ELEMENTARY_ULPS, rounding_bound

from tokfusion_jax import configlib, export, probe, trainer
from tokfusion_jax.models import interface, titok
from tokfusion_jax.models.fusion import TokFusion

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
NUM_TOKENS = 16  # not the paper's 32: the probe must work for any token count


def _tiny_config():
    c = configlib.load_config(CONFIGS / "ivif.py", "tiny")
    c.data.dataset = "samples"  # the pairs packaged with tokfusion_jax
    c.data.root = ""
    c.model.tokens.num_tokens = NUM_TOKENS
    c.model.enc_blocks = c.model.dec_blocks = (
        0  # the probe is under test: small graphs compile fast
    )
    c.model.ste.positions = (3, 9)
    return c


def make_tiny_export(workdir: pathlib.Path) -> pathlib.Path:
    """An untrained stage-II fusion export with a random tiny tokenizer (seconds to build)."""
    config = _tiny_config()
    size = int(config.data.image_size)
    tok_cfg = trainer.random_tiny_tokenizer_config(size, NUM_TOKENS, 12)
    tok = titok.create(tok_cfg, seed=0)
    titok.save(tok, workdir / "tokenizer")
    model = TokFusion(config.model)
    params = model.init(jax.random.key(0), stage=2, image_size=(size, size))
    config.tokenizer.path = str(workdir / "tokenizer")
    export.save_export(workdir, config, params, tok)
    return workdir


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    return make_tiny_export(tmp_path_factory.mktemp("run"))


@pytest.mark.heavy(seconds=32)
def test_probe_workdir_writes_positions_channels_plots_json(tiny_export, tmp_path):
    cfg = probe.default_config()
    cfg.steps = 4
    cfg.slots = (1, 2)
    cfg.channel_batches = 1
    cfg.batch_size = 8  # one image per fake device
    report = probe.probe_workdir(tiny_export, cfg, outdir=tmp_path)
    for name in ("ste.json", "probe.json", "selection_frequency.png", "selector_distributions.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    ste = probe.load_ste_snippet(tmp_path / "ste.json", num_tokens=NUM_TOKENS, token_dim=12)
    assert len(ste.positions) == 2 and len(set(ste.positions)) == 2
    assert len(ste.channels) == 3 and list(ste.channels) == list(
        range(ste.channels[0], ste.channels[0] + 3)
    )
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved == json.loads(json.dumps(report))
    probs = np.asarray(saved["budgets"]["2"]["probs"])
    assert probs.shape == (2, 2, NUM_TOKENS)
    # softmax probabilities (max, subtract, exp, an N-term sum, divide), then their N-term sum;
    # probe.json stores each probability rounded to 6 decimals (up to 5e-7 each, N of them).
    np.testing.assert_allclose(
        probs.sum(-1),
        1.0,
        rtol=rounding_bound(2 * NUM_TOKENS + ELEMENTARY_ULPS + 4, 1.0),
        atol=NUM_TOKENS * 0.5e-6,
    )
    assert all(np.isfinite(h["objective"]) for h in saved["budgets"]["1"]["history"])
    assert set(saved["budgets"]["1"]["scales"]) == {"ei", "ag", "sf", "ssim"}
    # The snippet reproduces the STE mask the model would build from it.
    mask = interface.hard_mask(NUM_TOKENS, 12, ste.positions, ste.channels)
    assert mask.sum() == 6 and set(np.nonzero(mask.any(1))[0]) == set(ste.positions)


def test_probe_cli_reports_missing_export(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tokfusion_jax.probe", f"--workdir={tmp_path / 'nope'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "nope" in lines[-1]
