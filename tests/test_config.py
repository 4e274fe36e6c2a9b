"""Training configs: variants load, overrides apply, bad values fail at start with one line."""

import pathlib
import subprocess
import sys

import ml_collections
import pytest

from tokfusion_jax import configlib, trainer
from tokfusion_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    return configlib.load_config(REPO / "configs" / f"{name}.py", arg)


def test_paper_setting():
    c = load("ivif")
    assert (c.optim.lr, c.optim.decay_factor, c.optim.decay_every_epochs) == (1e-4, 0.5, 20)
    assert (c.optim.min_lr, c.optim.clip_norm) == (1e-6, 0.01)
    assert (c.train.stage1_epochs, c.train.stage2_epochs) == (40, 80)
    assert c.data.image_size == 256 and c.model.dtype == "bfloat16"
    assert (c.data.dataset, c.val.dataset) == ("msrs", "roadscene")
    assert (c.loss.rec_vis, c.loss.rec_ir, c.loss.decomp, c.loss.grad) == (1, 1, 2, 5)
    assert (c.loss.fusion, c.loss.rec) == (1, 0.5)
    assert tuple(c.model.ste.positions) == (12, 18)
    assert c.tokenizer.path == "" and not c.tokenizer.random_tiny


@pytest.mark.parametrize(
    "name,arg", [("ivif", "demo"), ("ivif", "tiny"), ("mif", None), ("mif", "pet"), ("mif", "tiny")]
)
def test_variants_load(name, arg):
    c = load(name, arg)
    assert c.train.stage1_epochs > 0 and c.train.stage2_epochs > 0
    if arg == "tiny":
        assert c.tokenizer.random_tiny and c.model.dtype == "float32"
    if arg == "demo":  # the packaged trained tokenizer, not random weights
        assert not c.tokenizer.random_tiny and c.model.dtype == "float32"
        assert pathlib.Path(c.tokenizer.path, "tokenizer.json").is_file()
        assert c.model.tokens.input_size == 64 and c.data.image_size == 64


def test_mif_validates_on_its_training_folder_by_default():
    c = load("mif", "spect")
    assert c.data.dataset == "harvard_spect"
    c.data.root = "some/folder"
    assert c.data.val_root == "some/folder"
    # An override (sweeps, --set) keeps the link: the copy preserves field references.
    out = configlib.apply_overrides(c, [("data.root", "other/folder")], "test")
    assert out.data.val_root == "other/folder" and c.data.val_root == "some/folder"


def test_unknown_variant_fails():
    with pytest.raises(ValueError, match="unknown variant"):
        load("ivif", "huge")


def _config(tmp_path, **overrides):
    c = load("ivif", "tiny")
    (tmp_path / "vi").mkdir(exist_ok=True)
    (tmp_path / "ir").mkdir(exist_ok=True)
    c.data.root = str(tmp_path)
    return configlib.apply_overrides(c, overrides.items(), "test")


def test_valid_tiny_config_passes(tmp_path):
    trainer.validate_config(_config(tmp_path))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"optim.lr": -1e-4}, r"config\.optim\.lr=-0\.0001: expected a positive"),
        ({"optim.decay_factor": 0.0}, r"optim\.decay_factor"),
        ({"tokenizer.random_tiny": False}, r"config\.tokenizer\.path is not set"),
        ({"tokenizer.random_tiny": False, "tokenizer.path": "/nonexistent/tok"}, "no such dir"),
        ({"data.root": "/nonexistent/msrs"}, r"config\.data\.root=/nonexistent/msrs"),
        ({"data.root": ""}, r"config\.data\.root is not set"),
        ({"data.batch_size": 0}, r"data\.batch_size"),
        ({"train.chunk_size": -1}, r"config\.train\.chunk_size=-1: expected >= 0"),
        ({"train.stage1_epochs": 0, "train.stage2_epochs": 0}, r"stage2_epochs"),
    ],
)
def test_bad_values_fail_with_the_key_named(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        trainer.validate_config(_config(tmp_path, **overrides))


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tokfusion_jax.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_refuses_unknown_key_and_wrong_type(tmp_path):
    out = _cli("--config=configs/ivif.py:tiny", f"--workdir={tmp_path}", "--config.optim.lrr=3e-4")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error:") and "lrr" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = _cli("--config=configs/ivif.py:tiny", f"--workdir={tmp_path}", "--config.optim.lr=fast")
    assert out.returncode == 2 and "lr" in out.stderr and "fast" in out.stderr, out.stderr


def test_cli_missing_tokenizer_fails_with_one_line(tmp_path):
    out = _cli(
        "--config=configs/ivif.py", f"--workdir={tmp_path}", f"--config.data.root={tmp_path}"
    )
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "config.tokenizer.path is not set" in lines[0], out.stderr
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------ token shape from the tokenizer


def test_training_configs_take_the_token_shape_from_the_tokenizer():
    from tokfusion_jax.models import config as model_config
    from tokfusion_jax.models import titok

    for name, arg in (("ivif", None), ("mif", "pet")):
        tokens = load(name, arg).model.tokens
        assert [tokens[k] for k in ("num_tokens", "token_dim", "input_size")] == [None] * 3
    tokens = load("ivif").model.tokens
    b64 = titok.TiTokConfig.variant("b64")
    resolved = model_config.resolve_token_shape(tokens, b64, "B-64")
    assert resolved == {"num_tokens": 64, "token_dim": 12, "input_size": 256}
    assert {k: tokens[k] for k in resolved} == resolved
    # the :tiny variants pin the shape of the random tokenizer they create
    assert load("ivif", "tiny").model.tokens.num_tokens == 32


def test_a_pinned_token_shape_that_disagrees_is_one_error_listing_every_key():
    from tokfusion_jax.models import config as model_config
    from tokfusion_jax.models import titok

    tokens = load("ivif", "tiny").model.tokens  # pins 32 x 12 at 32 px
    other = titok.TiTokConfig.tiny(image_size=64, num_tokens=16, token_size=12)
    with pytest.raises(ConfigError) as info:
        model_config.resolve_token_shape(tokens, other, "the tokenizer at T")
    message = str(info.value)
    assert "the tokenizer at T" in message and "re-probe" in message
    assert "num_tokens=32 (tokenizer: 16)" in message and "input_size=32 (tokenizer: 64)" in message
    assert "token_dim" not in message.split(";")[0]  # the matching key is not listed


def test_training_resolves_the_shape_before_building_the_model(tmp_path):
    """The trainer refuses a pinned mismatch at start, naming every key, before any step."""
    import jax

    from tokfusion_jax.models import titok

    tok_dir = tmp_path / "tok16"
    titok.save(titok.create(trainer.random_tiny_tokenizer_config(64, 16, 12), seed=0), tok_dir)
    c = _config(tmp_path, **{"tokenizer.random_tiny": False, "tokenizer.path": str(tok_dir)})
    with pytest.raises(ConfigError, match=r"num_tokens=32 \(tokenizer: 16\).*input_size=32"):
        trainer.train_and_evaluate(c, tmp_path / "run", devices=jax.devices()[:1])
    assert not (tmp_path / "run" / "checkpoints").exists()
