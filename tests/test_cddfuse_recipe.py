"""CDDFuse's training recipe: the grid patches with the low-contrast filter, the configs, a
plain-2D run without a tokenizer, and starting TokFusion from a converted CDDFuse export."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from tokfusion_jax import checkpointing, configlib, export, trainer
from tokfusion_jax.data import patches, pipeline, sources
from tokfusion_jax.data.transforms import DecodePair
from tokfusion_jax.errors import CheckpointError, DataError
from tokfusion_jax.models.config import model_config
from tokfusion_jax.models.fusion import TokFusion

REPO = pathlib.Path(__file__).resolve().parents[1]


def load(name: str, arg: str):
    return configlib.load_config(REPO / "configs" / f"{name}.py", arg)


# ----------------------------------------------------------------------------------------------
# The patches, against a NumPy transcription of dataprocessing.py's Im2Patch and filter
# ----------------------------------------------------------------------------------------------


def im2patch_corners(h: int, w: int, win: int, stride: int) -> list[tuple[int, int]]:
    """Im2Patch: patch[k] = img[i : H - win + i + 1 : stride, j : W - win + j + 1 : stride]."""
    rows = np.arange(h)[0 : h - win + 1 : stride]
    cols = np.arange(w)[0 : w - win + 1 : stride]
    return [(int(r), int(c)) for r in rows for c in cols]  # reshape order: rows, then columns


def reference_low_contrast(patch: np.ndarray) -> bool:
    limits = np.percentile(patch, [10, 90])
    with np.errstate(divide="ignore", invalid="ignore"):
        return bool((limits[1] - limits[0]) / limits[1] < 0.1)


def test_grid_corners_match_im2patch():
    assert patches.grid_corners(480, 640, 128, 200) == [
        (0, 0), (0, 200), (0, 400), (200, 0), (200, 200), (200, 400)
    ]  # fmt: skip
    for h, w, size, stride in ((256, 256, 128, 200), (300, 129, 128, 1), (128, 128, 128, 200)):
        assert patches.grid_corners(h, w, size, stride) == im2patch_corners(h, w, size, stride)
    assert patches.grid_corners(100, 300, 128, 200) == []


def test_low_contrast_filter_matches_dataprocessing():
    rng = np.random.default_rng(0)
    cases = [
        rng.random((16, 16), dtype=np.float32),  # high contrast
        0.5 + 0.01 * rng.random((16, 16), dtype=np.float32),  # low contrast
        np.zeros((16, 16), np.float32),  # P90 = 0: NaN ratio, kept as in CDDFuse
        np.where(rng.random((16, 16)) < 0.95, 0.0, 1.0).astype(np.float32),  # P90 = 0 again
    ]
    for patch in cases:
        assert patches.is_low_contrast(patch) == reference_low_contrast(patch)
    assert [patches.is_low_contrast(p) for p in cases] == [False, True, False, False]


@pytest.fixture(scope="module")
def grid_data(tmp_path_factory) -> pathlib.Path:
    """Two 48x64 pairs (MSRS layout): in pair 1 the visible top-left corner is flat."""
    root = tmp_path_factory.mktemp("grid")
    (root / "vi").mkdir()
    (root / "ir").mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        vis = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        ir = rng.integers(0, 256, (48, 64), dtype=np.uint8)
        if i == 1:
            vis[:24, :24] = 200
        Image.fromarray(vis).save(root / "vi" / f"{i}.png")
        Image.fromarray(ir).save(root / "ir" / f"{i}.png")
    return root


def test_grid_patch_source_keeps_the_contrasted_patches_and_crops_them(grid_data):
    source = sources.from_preset("msrs", str(grid_data))
    grid = patches.GridPatchSource(source, 24, 20, 0.1, progress=False)
    corners = patches.grid_corners(48, 64, 24, 20)  # 2 x 3
    assert len(corners) == 6 and grid.num_grid_patches == 12
    assert len(grid) == 11  # pair 1 loses its flat top-left patch
    assert [grid[k]["name"] for k in range(7)][-2:] == ["0@20,40", "1@0,20"]
    assert grid.color_from == source.color_from  # the wrapped source's attributes
    full = DecodePair(image_size=None, keep_color=True).map(source[1])
    element = DecodePair(image_size=None, keep_color=True).map(grid[7])  # pair 1 at (0, 40)
    assert element["name"] == "1@0,40" and element["vis"].shape == (24, 24, 1)
    assert element["vis_cbcr"].shape == (24, 24, 2)
    np.testing.assert_array_equal(element["vis"], full["vis"][0:24, 40:64])
    np.testing.assert_array_equal(element["ir"], full["ir"][0:24, 40:64])
    np.testing.assert_array_equal(element["vis_cbcr"], full["vis_cbcr"][0:24, 40:64])
    with pytest.raises(DataError, match="native-size"):
        DecodePair(image_size=(32, 32)).map(grid[0])
    with pytest.raises(DataError, match="smaller than"):
        patches.GridPatchSource(source, 64, 20, progress=False)


def test_pipeline_from_config_batches_patches(grid_data):
    data = load("ivif", "cddfuse").data
    data.root, data.patch_size, data.patch_stride, data.batch_size = str(grid_data), 24, 20, 4
    batch = next(iter(pipeline.from_config(data, process_index=0, process_count=1)))
    assert batch["vis"].shape == (4, 24, 24, 1) and batch["ir"].shape == (4, 24, 24, 1)
    assert all("@" in str(n) for n in batch["name"])


# ----------------------------------------------------------------------------------------------
# The configs: CDDFuse's train.py values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "arg"), [("ivif", "cddfuse"), ("mif", "cddfuse_spect")])
def test_cddfuse_configs_hold_train_py_values(name, arg):
    c = load(name, arg)
    m = c.model
    assert (m.use_tokens, m.residual, m.share_encoder, m.dtype) == (False, "vis", True, "float32")
    assert (m.dim, m.heads, m.enc_blocks, m.dec_blocks) == (64, 8, 4, 4)
    assert (m.detail_layers, m.fuse_detail_layers, m.ffn_expansion) == (3, 1, 2)
    d = c.data
    assert (d.patch_size, d.patch_stride, d.patch_min_contrast) == (128, 200, 0.1)
    assert (d.batch_size, d.shuffle, d.crop_size, d.flip) == (8, True, 0, False)
    assert (c.train.stage1_epochs, c.train.stage2_epochs) == (40, 80)
    o = c.optim
    assert (o.lr, o.weight_decay, o.clip_norm, o.min_lr) == (1e-4, 0.0, 0.01, 1e-6)
    assert (o.b1, o.b2, o.eps, o.decay_every_epochs, o.decay_factor) == (0.9, 0.999, 1e-8, 20, 0.5)
    assert c.loss.to_dict() == {
        "rec_vis": 1.0, "rec_ir": 1.0, "decomp": 2.0, "grad": 5.0, "fusion": 1.0, "rec": 0.0,
        "ssim_weight": 5.0, "fusion_grad_weight": 10.0,
    }  # fmt: skip
    shapes = jax.eval_shape(lambda k: TokFusion(m).init(k, stage=2), jax.random.key(0))
    assert TokFusion.param_counts(shapes)["total"] == 1_188_272
    if name == "mif":
        assert c.data.dataset == "harvard_spect"


def test_cddfuse_differences_name_what_is_not_cddfuse():
    from tokfusion_jax.models import fusion

    assert fusion.cddfuse_differences(fusion.spec_from_config(load("ivif", "cddfuse").model)) == []
    cfg = model_config()
    cfg.use_tokens, cfg.heads, cfg.residual = False, 4, "none"
    assert fusion.cddfuse_differences(fusion.spec_from_config(cfg)) == [
        "model.heads=4 (CDDFuse: 8)"
    ]
    paper = fusion.cddfuse_differences(fusion.spec_from_config(model_config()))
    assert paper == ["model.use_tokens=True (CDDFuse: False)"]


@pytest.mark.heavy(seconds=33)
def test_plain_2d_run_needs_no_tokenizer_and_exports_without_one(grid_data, tmp_path):
    """ivif:cddfuse shrunk: patches, both stages, no tokenizer anywhere, a loadable export."""
    c = load("ivif", "cddfuse")
    for key, value in dict(dim=8, heads=2, enc_blocks=1, dec_blocks=1, detail_layers=1).items():
        c.model[key] = value
    c.data.root, c.data.image_size = str(grid_data), 32
    c.data.patch_size, c.data.patch_stride, c.data.batch_size = 24, 20, 4
    c.val.dataset = ""
    c.train.update(stage1_epochs=1, stage2_epochs=1, log_every_steps=1, async_checkpoints=False)
    trainer.validate_config(c)  # no tokenizer.path, no random_tiny
    result = trainer.train_and_evaluate(c, tmp_path / "run", devices=jax.devices()[:1])
    assert (result.step, result.stage) == (4, 2)  # 11 patches // 4 = 2 steps per epoch
    assert not (tmp_path / "run" / "tokenizer").exists()
    record = json.loads((result.export_dir / "export.json").read_text())
    assert record["tokenizer"] is None and record["postprocess"] == "minmax"
    fx = export.load_export(tmp_path / "run")  # (fusing with such exports: test_convert_cddfuse)
    assert fx.tokenizer is None and not fx.model.spec.use_tokens


# ----------------------------------------------------------------------------------------------
# init_from: TokFusion starts from a converted CDDFuse export
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cddfuse_export(tmp_path_factory) -> pathlib.Path:
    torch = pytest.importorskip("torch")
    from convert import cddfuse_torch
    from convert.cddfuse import convert_cddfuse

    root = tmp_path_factory.mktemp("cddfuse_init")
    torch.save(cddfuse_torch.random_release_checkpoint(seed=4), root / "CDDFuse_IVF.pth")
    return convert_cddfuse(root / "CDDFuse_IVF.pth", root / "export", log=lambda _: None).out


def _leaves(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_tokfusion_takes_every_counterpart_bit_for_bit(cddfuse_export, capsys):
    cfg = model_config()  # the paper's model: tokens, STE, encoder_input = "replace"
    model = TokFusion(cfg)
    fresh = model.init(jax.random.key(0), stage=1)
    stage2 = jax.eval_shape(lambda: model.extend_to_stage2(fresh, jax.random.key(1)))
    params, pending = trainer.load_init_params(str(cddfuse_export), fresh, stage2)
    src = export.load_export(cddfuse_export).params
    log = capsys.readouterr().out
    assert log.startswith(f"init_from: parameters from {cddfuse_export}")
    assert "taken:  decoder (all 207,936), encoder (all 598,568)" in log
    assert "fresh:  interface" in log and "ste (" in log
    assert "unused: encoder/patch_embed (576) (no counterpart in this model)" in log
    assert (
        "at the stage-II switch, taken:  base_fuse (all 363,016), detail_fuse (all 18,176)" in log
    )
    for name in ("encoder", "decoder"):
        got, want = _leaves(params[name]), _leaves(src[name])
        assert set(got) <= set(want) and len(got) == len(want) - (name == "encoder")
        for key, value in got.items():
            assert value.dtype == want[key].dtype and np.array_equal(value, want[key]), key
    for name in ("interface", "ste"):  # left exactly as initialised
        for a, b in zip(jax.tree_util.tree_leaves(params[name]),
                        jax.tree_util.tree_leaves(fresh[name]), strict=True):  # fmt: skip
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(pending) == {"base_fuse", "detail_fuse"}
    # The stage switch takes the fuse layers, bit for bit, and keeps the trained modules.
    from tokfusion_jax import optim

    opt = optim.ModuleOptimizer(load("ivif", "tiny").optim, 10)
    state = trainer.to_stage2(
        trainer.new_state(params, opt), model, opt, jax.random.key(2), pending
    )
    for name in ("base_fuse", "detail_fuse", "encoder"):
        want = src[name] if name != "encoder" else params[name]
        for a, b in zip(jax.tree_util.tree_leaves(state["params"][name]),
                        jax.tree_util.tree_leaves(want), strict=True):  # fmt: skip
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_refuses_other_architectures(cddfuse_export):
    cfg = model_config()
    cfg.dim, cfg.heads = 32, 4
    model = TokFusion(cfg)
    fresh = model.init(jax.random.key(0), stage=1)
    with pytest.raises(CheckpointError, match=r"init_from=.*different architecture.*there"):
        trainer.load_init_params(str(cddfuse_export), fresh)
    with pytest.raises(CheckpointError, match="nothing in it fits"):
        trainer.load_init_params(str(cddfuse_export), {"other": {"w": np.zeros(3, np.float32)}})


def test_merge_report_collapses_subtrees():
    target = {"a": {"x": np.zeros(2), "y": {"k": np.zeros(3)}}, "b": {"z": np.zeros(4)}}
    source = {"a": {"x": np.ones(2), "extra": {"q": np.ones(5)}}}
    merged, report = checkpointing.merge_params(target, source)
    np.testing.assert_array_equal(merged["a"]["x"], np.ones(2))
    assert report.taken == {"a": (2, 5)}
    assert report.fresh == {"a/y": 3, "b": 4} and report.unused == {"a/extra": 5}


def test_train_init_from_key_and_its_older_name(tmp_path):
    c = load("ivif", "tiny")
    c.train.init_from = str(tmp_path)
    assert trainer.init_from_path(c) == str(tmp_path)
    c.train.init_from, c.init_from = "", str(tmp_path)
    assert trainer.init_from_path(c) == str(tmp_path)
    c.train.init_from = str(tmp_path / "other")
    with pytest.raises(Exception, match="disagree"):
        trainer.init_from_path(c)
