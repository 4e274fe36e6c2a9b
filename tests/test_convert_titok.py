"""The TiTok converter: official layouts, both file formats, the CLI and every error path."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tolerances import (
    activation_scale,
    decided_codes,
    probable_bound,
    titok_decoder_chain,
    titok_encoder_chain,
)

from tokfusion_jax.errors import CheckpointError, ConfigError
from tokfusion_jax.models import titok
from tokfusion_jax.models.titok import TiTokConfig

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file  # noqa: E402

from convert import checkpoint_io  # noqa: E402
from convert import titok as conv  # noqa: E402
from convert.__main__ import main  # noqa: E402
from convert.titok_torch import TiTokTorch, init_random_  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LISTINGS = Path(__file__).resolve().parents[2] / "shared/reference/titok_state_dicts"
OFFICIAL = ("l32", "b64", "s128", "bl64_vq8k", "ll32_vae_c16")


def read_listings() -> dict[str, dict[str, tuple[int, ...]]]:
    """{variant: {key: shape}} from the reference listings (``key<TAB>shape<TAB>dtype``)."""
    if not LISTINGS.is_dir():
        pytest.skip("reference state_dict listings are not present")
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for file in sorted(LISTINGS.glob("*.txt")):
        name, current = file.stem, {}
        for line in file.read_text().splitlines():
            if line.startswith("## "):
                name, current = line[3:].split()[0], {}
                out[name] = current
            elif line and not line.startswith("#"):
                key, shape, _ = line.split("\t")
                current[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
                out.setdefault(name, current)
    return out


def header_total(variant: str) -> int:
    """The parameter total printed in a listing's header."""
    for file in LISTINGS.glob("*.txt"):
        for line in file.read_text().splitlines():
            if (line.startswith(f"## {variant} ") or file.stem == variant) and "'total'" in line:
                return int(re.search(r"'total': (\d+)", line).group(1))
    raise AssertionError(f"no header for {variant}")


@pytest.fixture(scope="module")
def listings():
    return read_listings()


# ----------------------------------------------------------------------------------------------
# Official layouts, checked on shapes only (nothing full-size is materialised)
# ----------------------------------------------------------------------------------------------


def test_torch_reference_has_the_official_state_dict_layout(listings):
    for name in titok.VARIANT_NAMES:
        with torch.device("meta"):
            model = TiTokTorch(TiTokConfig.variant(name))
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert list(got.items()) == list(listings[name].items()), name
        with torch.device("meta"):  # the released files load with strict=True
            model.load_state_dict(
                {k: torch.empty(s, device="meta") for k, s in listings[name].items()},
                strict=True,
                assign=True,
            )


@pytest.mark.parametrize("name", titok.VARIANT_NAMES)
def test_converter_infers_each_official_variant_from_shapes(listings, name):
    shapes = listings[name]
    cfg, origin = conv.infer_config(shapes, source=name)
    assert cfg == TiTokConfig.variant(name)
    assert origin["heads"] == "official size table"
    assert conv.expected_torch_shapes(cfg) == shapes
    conv.check_state_dict(shapes, cfg, name)  # accepts it: no missing/unexpected/mis-shaped


@pytest.mark.parametrize("name", OFFICIAL)
def test_converted_tree_of_each_official_variant_fits_the_flax_model(listings, name):
    cfg = TiTokConfig.variant(name)
    structs = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in listings[name].items()}
    converted = jax.eval_shape(lambda sd: conv.torch_to_flax(sd, cfg), structs)
    titok.check_param_shapes(converted, titok.abstract_params(cfg), where=name)
    assert titok.param_count(converted) == header_total(name)


def test_heads_come_from_flag_then_config_json_then_variant(listings):
    shapes = listings["bl64_vq8k"]
    cj = {"vit_enc_model_size": "base", "vit_dec_model_size": "large", "use_l2_norm": False}
    cfg, origin = conv.infer_config(shapes, config_json=cj)
    assert (cfg.enc_heads, cfg.dec_heads, origin["heads"]) == (12, 16, "config.json")
    cfg, origin = conv.infer_config(shapes, heads=(4, 8), config_json=cj)
    assert (cfg.enc_heads, cfg.dec_heads, origin["heads"]) == (4, 8, "--heads")
    cfg, origin = conv.infer_config(shapes, variant="bl64_vq8k")
    assert (cfg.enc_heads, cfg.dec_heads, origin["heads"]) == (12, 16, "--variant bl64_vq8k")
    assert conv.parse_heads("12,16") == (12, 16) and conv.parse_heads("8") == (8, 8)
    with pytest.raises(ConfigError, match="--heads 'x'"):
        conv.parse_heads("x")
    with pytest.raises(CheckpointError, match="codebook_size=4096"):
        conv.infer_config(shapes, config_json={**cj, "codebook_size": 4096})
    with pytest.raises(CheckpointError, match=r"--variant l32.*missing"):
        conv.infer_config(shapes, variant="l32")


# ----------------------------------------------------------------------------------------------
# Real conversions of tiny same-family models, numerically reproduced
# ----------------------------------------------------------------------------------------------

TINY = {
    "legacy_vq": TiTokConfig.tiny(enc_heads=4),
    "vq_rgb": TiTokConfig.tiny(is_legacy=False, use_l2_norm=False, token_size=16),
    "vae": TiTokConfig.tiny(is_legacy=False, quantize_mode="vae", token_size=8),
}


def _torch_model(kind: str, seed: int = 0):
    return init_random_(TiTokTorch(TINY[kind]).eval(), seed)


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _write(path: Path, state: dict[str, np.ndarray]) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize(
    ("kind", "fmt"), [("legacy_vq", ".safetensors"), ("vq_rgb", ".bin"), ("vae", ".safetensors")]
)
def test_convert_reproduces_torch_outputs(tmp_path, kind, fmt):
    cfg = TINY[kind]
    model = _torch_model(kind)
    src = _write(tmp_path / f"model{fmt}", _state(model))
    lines: list[str] = []
    heads = f"{cfg.enc_heads},{cfg.dec_heads}"
    result = conv.convert_titok(str(src), tmp_path / "out", heads=heads, log=lines.append)
    assert result.config == cfg
    assert re.fullmatch(rf"wrote .*out .*{result.param_count:,} parameters", lines[-1])
    assert result.param_count == sum(v.numel() for v in model.state_dict().values())

    tok = titok.load(tmp_path / "out")
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2))
        image = model.decode(ref["z_quantized"]).permute(0, 2, 3, 1).numpy()
    out = titok.encode(tok, x)
    # Flax and PyTorch each within the probabilistic float32 bound of the exact value over the
    # ViT's rounding chain (tests/tolerances.py), so twice that apart.
    cont = ref["continuous"].numpy()
    bound = 2 * probable_bound(titok_encoder_chain(cfg), activation_scale(x, cont))
    np.testing.assert_allclose(out.continuous, cont, atol=bound, rtol=0)
    if cfg.quantize_mode == "vq":  # the same codes wherever the error cannot flip the choice
        decided = decided_codes(cont, tok.params["quantize"]["embedding"], cfg.use_l2_norm, bound)
        assert decided.mean() >= 0.25
        got = np.asarray(out.indices)[decided]
        np.testing.assert_array_equal(got, ref["indices"].numpy()[decided])
    else:
        np.testing.assert_allclose(out.quantized, ref["quantized"].numpy(), atol=bound, rtol=0)
    z_ref = ref["quantized"].numpy()
    decoded = titok.decode(tok, z_ref)  # from the twin's own codes: the decoder is checked
    dec_bound = 2 * probable_bound(titok_decoder_chain(cfg), activation_scale(z_ref, image))
    np.testing.assert_allclose(decoded, image, atol=dec_bound, rtol=0)

    meta = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert meta["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["params_sha256"] == tok.sha256 == titok.params_sha256(tok.params)
    assert meta["architecture"] == cfg.to_dict() and meta["converted_at"]


def test_cli_subprocess_converts_and_fails_with_exit_2(tmp_path):
    model = _torch_model("vq_rgb", seed=1)
    src = _write(tmp_path / "model.safetensors", _state(model))
    cfg_json = tmp_path / "cfg.json"
    cfg_json.write_text(
        json.dumps({"model": {"vq_model": {"token_size": 16, "use_l2_norm": False}}})
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "convert", "titok", "--source", str(src), "--out"]
    done = subprocess.run(
        [*cmd, str(tmp_path / "out"), "--config", str(cfg_json), "--heads", "2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {tmp_path / 'out'}") and "parameters" in last
    assert titok.load(tmp_path / "out").config == TINY["vq_rgb"]

    bad = subprocess.run(
        [*cmd, str(tmp_path / "out2"), "--variant", "l99"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("error: unknown TiTok variant 'l99'")
    assert not (tmp_path / "out2").exists()


# ----------------------------------------------------------------------------------------------
# Error paths through the CLI entry point (in-process): exit 2 with one line naming the problem
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state():
    return _state(_torch_model("legacy_vq", seed=2))


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["titok", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_error_truncated_and_corrupt_files(tmp_path, capsys, tiny_state):
    for suffix in (".safetensors", ".bin"):
        good = _write(tmp_path / f"good{suffix}", tiny_state)
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        err = _cli_error(
            capsys, "--source", str(cut), "--out", str(tmp_path / "o"), "--heads", "4,2"
        )
        assert str(cut) in err and "truncated or corrupt" in err
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    err = _cli_error(capsys, "--source", str(empty), "--out", str(tmp_path / "o"))
    assert "empty file" in err
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(1000))
    assert "truncated or corrupt" in _cli_error(
        capsys, "--source", str(garbage), "--out", str(tmp_path / "o")
    )
    assert not (tmp_path / "o").exists()


class _RunsCode:
    """An object whose unpickling would call a function (what weights_only must refuse)."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("payload", ["numpy array", "callable"])
def test_cli_unsafe_pickle_is_refused_as_unsafe_with_the_safe_route(
    tmp_path, capsys, tiny_state, payload
):
    state = {k: torch.from_numpy(v) for k, v in tiny_state.items()}
    state["extra"] = np.zeros(3) if payload == "numpy array" else _RunsCode()
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    err = _cli_error(capsys, "--source", str(path), "--out", str(tmp_path / "o"))
    assert str(path) in err and "refused as unsafe" in err and "truncated" not in err
    assert "weights_only=True" in err and "safetensors" in err  # says how to convert it safely
    assert "GLOBAL" in err  # names what the pickle wanted to import
    assert not (tmp_path / "o").exists()


def test_cli_torch_messages_end_at_a_sentence(tmp_path, capsys):
    """A long torch explanation is never cut mid-sentence (the zip-format case)."""
    import zipfile

    path = tmp_path / "model.bin"
    with zipfile.ZipFile(path, "w") as z:  # a zip archive that is not a torch checkpoint
        z.writestr("data/notes.txt", "x" * 10)
    err = _cli_error(capsys, "--source", str(path), "--out", str(tmp_path / "o"))
    assert str(path) in err and "truncated or corrupt" in err
    reason = err[err.index("(") + 1 : err.rindex(")")]
    assert reason and (len(reason) < 400 or reason.endswith("."))
    long = RuntimeError("First sentence is fine. " + "Second one is very long " * 30 + "end.")
    cut = checkpoint_io.reason(long, limit=100)
    assert cut == "First sentence is fine."


def test_cli_error_not_titok_unknown_variant_missing_file(tmp_path, capsys):
    other = _write(tmp_path / "resnet.safetensors", {"conv1.weight": np.zeros((4, 3, 3, 3))})
    err = _cli_error(capsys, "--source", str(other), "--out", str(tmp_path / "o"))
    assert "not a TiTok tokenizer state_dict" in err and "conv1.weight" in err
    err = _cli_error(
        capsys, "--source", str(other), "--out", str(tmp_path / "o"), "--variant", "xl1"
    )
    assert "unknown TiTok variant 'xl1'" in err
    err = _cli_error(capsys, "--source", str(tmp_path / "nope.bin"), "--out", str(tmp_path / "o"))
    assert "nope.bin: file not found" in err
    stray = tmp_path / "notes.txt"
    stray.write_text("hi")
    assert "unsupported file type '.txt'" in _cli_error(
        capsys, "--source", str(stray), "--out", str(tmp_path / "o")
    )


def test_cli_error_lists_all_missing_unexpected_and_misshaped_keys(tmp_path, capsys, tiny_state):
    state = dict(tiny_state)
    del state["decoder.ln_post.bias"]
    del state["encoder.transformer.1.mlp.c_fc.bias"]
    state["encoder.extra.weight"] = np.zeros((3,), np.float32)
    state["decoder.mask_token"] = np.zeros((1, 2, 64), np.float32)
    src = _write(tmp_path / "m.safetensors", state)
    out = tmp_path / "existing"
    titok.save(titok.create(TINY["legacy_vq"], seed=0), out)
    before = (out / "tokenizer.json").read_bytes()
    err = _cli_error(capsys, "--source", str(src), "--out", str(out), "--heads", "4,2")
    assert "2 missing: " in err and "decoder.ln_post.bias (64)" in err
    assert "encoder.transformer.1.mlp.c_fc.bias (256)" in err
    assert "1 unexpected: encoder.extra.weight (3)" in err
    assert "1 wrong shape: decoder.mask_token expected (1, 1, 64) found (1, 2, 64)" in err
    assert (out / "tokenizer.json").read_bytes() == before  # DIR left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "m.safetensors"]


def test_cli_error_heads_and_config_json(tmp_path, capsys, tiny_state):
    src = _write(tmp_path / "m.bin", tiny_state)
    err = _cli_error(capsys, "--source", str(src), "--out", str(tmp_path / "o"))
    assert "width-64" in err and "--heads" in err
    err = _cli_error(capsys, "--source", str(src), "--out", str(tmp_path / "o"), "--heads", "3")
    assert "enc_width=64" in err and "enc_heads=3" in err
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({"model": {"vq_model": {"num_latent_tokens": 32}}}))
    err = _cli_error(capsys, "--source", str(src), "--out", str(tmp_path / "o"), "--heads", "2")
    assert "config.json disagrees" in err and "num_latent_tokens=32 (weights: 8)" in err
    cfg_json.write_text("{not json")
    err = _cli_error(
        capsys, "--source", str(src), "--out", str(tmp_path / "o"), "--config", str(cfg_json)
    )
    assert "config.json: not valid JSON" in err


def test_hub_repo_id_offline_fails_at_once_with_a_hint(tmp_path, capsys, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    repo = "yucornetto/tokenizer_titok_l32_imagenet"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    err = _cli_error(capsys, "--source", repo, "--out", str(tmp_path / "o"))
    assert repo in err and "HF_HUB_OFFLINE is set" in err and "not cached" in err
    assert "pass its local path as --source" in err
    # No network and no offline flag: the unresolvable host is noticed before any retry loop.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    err = _cli_error(capsys, "--source", repo, "--out", str(tmp_path / "o"))
    assert "cannot resolve hub.invalid" in err and "pass its local path" in err
    assert time.monotonic() - start < 20
    assert not (tmp_path / "o").exists()


def test_directory_source_uses_its_config_json(tmp_path, tiny_state):
    snap = tmp_path / "snapshot"
    snap.mkdir()
    _write(snap / "model.safetensors", tiny_state)
    (snap / "config.json").write_text(
        json.dumps({"model": {"vq_model": {"token_size": 12, "use_l2_norm": True}}})
    )
    lines: list[str] = []
    result = conv.convert_titok(str(snap), tmp_path / "o", heads="4,2", log=lines.append)
    assert lines[0] == f"using {snap / 'config.json'}"
    assert result.config == TINY["legacy_vq"]
    assert math.isclose(result.param_count, sum(v.size for v in tiny_state.values()))
