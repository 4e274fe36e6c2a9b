"""The PyTorch CDDFuse twin: the release checkpoint layout, strict loading, the test path."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from convert import cddfuse_torch as ct  # noqa: E402

LISTING = Path(__file__).with_name("data") / "cddfuse_release_state_dict.tsv"


def read_listing() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """{entry: [(key, shape), ...]} in state_dict order, as listed from the official classes."""
    out: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for line in LISTING.read_text().splitlines():
        if line and not line.startswith("#"):
            entry, key, shape = line.split("\t")
            out.setdefault(entry, []).append(
                (key, tuple(int(d) for d in re.findall(r"\d+", shape)))
            )
    return out


@pytest.fixture(scope="module")
def release():
    return ct.random_release_checkpoint(seed=0)


def test_release_layout_matches_the_official_classes(release):
    listing = read_listing()
    assert list(release) == list(ct.RELEASE_ENTRIES) == list(listing)
    for entry, keys in listing.items():
        got = [(k, tuple(v.shape)) for k, v in release[entry].items()]
        assert got == keys, entry
    assert sum(len(v) for v in listing.values()) == 158
    count = sum(v.numel() for sd in release.values() for v in sd.values())
    assert count == 1_188_272 == sum(math.prod(s) for ks in listing.values() for _, s in ks)


def test_release_file_loads_strictly_through_weights_only(tmp_path, release):
    path = tmp_path / "CDDFuse_IVF.pth"
    torch.save(release, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    model = ct.build_cddfuse().load_release(loaded)
    for entry in ct.RELEASE_ENTRIES:
        for key, value in getattr(model, entry).state_dict().items():
            assert torch.equal(value, release[entry][key]), (entry, key)
    # The flat state_dict is the .safetensors layout: "<entry>.module.<key>".
    flat = model.state_dict()
    assert len(flat) == 158
    assert all(k.split(".")[0] in ct.RELEASE_ENTRIES and k.split(".")[1] == "module" for k in flat)


def test_strict_load_refuses_a_missing_or_misshaped_key(release):
    broken = {k: dict(v) for k, v in release.items()}
    del broken["DIDF_Decoder"]["module.output.2.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key.*module\.output\.2\.weight"):
        ct.build_cddfuse().load_release(broken)
    broken = {k: dict(v) for k, v in release.items()}
    broken["BaseFuseLayer"]["module.attn.scale"] = torch.ones(4, 1, 1)
    with pytest.raises(RuntimeError, match="size mismatch for module.attn.scale"):
        ct.build_cddfuse().load_release(broken)


def test_test_path_residual_modes_and_reconstruction(release):
    model = ct.build_cddfuse().load_release(release)
    gen = torch.Generator().manual_seed(0)
    vis, ir = torch.rand(2, 1, 1, 24, 20, generator=gen)
    with torch.no_grad():
        fused = {r: model.fuse(vis, ir, residual=r) for r in ct.RESIDUALS}
        rec = model.reconstruct(vis)
        base, detail = model.encode(vis)
        by_hand = model.DIDF_Decoder(vis, base, detail)[0]
    for out in (*fused.values(), rec):
        assert out.shape == (1, 1, 24, 20) and 0 < float(out.min()) <= float(out.max()) < 1
    assert torch.equal(rec, by_hand)
    # The residual enters inside the sigmoid: logit(fused_vis) - logit(fused_none) == vis
    # (float64: the logit of a float32 probability near 0 or 1 loses most of its digits).
    m64, v64, i64 = model.double(), vis.double(), ir.double()
    with torch.no_grad():
        logit = lambda p: torch.log(p) - torch.log1p(-p)
        diff = logit(m64.fuse(v64, i64, "vis")) - logit(m64.fuse(v64, i64, "none"))
    torch.testing.assert_close(diff, v64, atol=1e-9, rtol=0)
    assert float((fused["sum"] - fused["vis"]).abs().max()) > 1e-3
    stretched = ct.minmax_stretch(fused["vis"])
    assert float(stretched.min()) == 0.0 and float(stretched.max()) == 1.0
    with pytest.raises(ValueError, match="residual"):
        model.fuse(vis, ir, residual="ir")
