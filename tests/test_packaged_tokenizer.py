"""The tokenizer packaged with tokfusion_jax: intact, small, and it reconstructs the samples.

The thresholds are the figures in tokfusion_jax/assets/titok_fusion64/README.md (measured with
`evaluate tokenizer` on the bundled samples) less 0.5 dB / 0.02 SSIM: the computation is
deterministic up to float32 rounding across CPUs (about 1e-4 dB), so only a broken tokenizer,
loader or preprocessing falls below them. The infrared-visible samples are MSRS and RoadScene
test pairs, which the tokenizer was not trained on; the MRI-PET pair was in its training set.
"""

import jax
import numpy as np
import pytest

from tokfusion_jax import evaluate
from tokfusion_jax.models import titok

PATH = titok.PACKAGED_TOKENIZER
# Domain -> (PSNR dB, SSIM) the README states for the bundled samples.
STATED = {"infrared": (24.41, 0.601), "visible": (18.43, 0.587), "medical": (20.97, 0.695)}
MAX_BYTES = 2 * 1024 * 1024


def test_packaged_tokenizer_is_intact_and_small():
    files = [f for f in PATH.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= MAX_BYTES
    tok = titok.load(PATH)
    cfg = tok.config
    assert (cfg.image_size, cfg.num_tokens, cfg.token_size) == (64, 32, 12)
    assert cfg.quantize_mode == "vq" and cfg.use_l2_norm
    assert {x.dtype for x in jax.tree_util.tree_leaves(tok.params)} == {np.dtype("float32")}
    assert titok.params_sha256(tok.params) == tok.sha256  # the stored values, as recorded
    meta = titok.read_metadata(PATH)
    assert meta["storage_dtype"] == "float16" and meta["training"]["step"] > 0


@pytest.mark.parametrize("preset_root", [("samples", ""), ("samples", "mri_pet")])
def test_packaged_tokenizer_reconstructs_the_samples(preset_root):
    preset, root = preset_root
    spec = evaluate.DatasetSpec(root or "ivif", preset, root)
    _, domains = evaluate.tokenizer_study(str(PATH), [spec], progress=False)
    for domain, scores in domains.items():
        psnr, ssim = STATED[domain]
        assert scores["PSNR"] >= psnr - 0.5, (domain, scores)
        assert scores["SSIM"] >= ssim - 0.02, (domain, scores)


def test_packaged_ste_mask_was_probed_on_this_tokenizer():
    """configs/ste/titok_fusion64.json is the probe's choice for exactly these weights."""
    import json
    import pathlib

    snippet = (
        pathlib.Path(__file__).resolve().parents[1] / "configs" / "ste" / "titok_fusion64.json"
    )
    record = json.loads(snippet.read_text())
    assert record["tokenizer_sha256"] == titok.load(PATH).sha256
    assert (record["num_tokens"], record["token_dim"]) == (32, 12)
