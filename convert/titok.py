"""Convert an official TiTok tokenizer checkpoint (PyTorch state_dict) into a Flax tokenizer dir.

    python -m convert titok --source SRC --out DIR [--config config.json] [--variant NAME]
                            [--heads N | --heads ENC,DEC]

SRC is a ``model.safetensors`` (read with safetensors' numpy loader, no torch), a
``pytorch_model.bin`` / ``*.bin`` state_dict (``torch.load(weights_only=True)``), a directory
holding one of them, or a Hugging Face repo id such as ``yucornetto/tokenizer_titok_l32_imagenet``.
Every size is read from the tensor shapes; the head counts (not visible in any shape) come from
``--heads``, else the size names in config.json, else ``--variant``, else the official size
table for the width. The output directory is written atomically by `titok.save`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from convert.checkpoint_io import (
    check_finite,
    check_keys,
    file_sha256,
    fmt_shape,
    read_state_dict,
)
from tokfusion_jax import paths
from tokfusion_jax.errors import CheckpointError, ConfigError
from tokfusion_jax.models import titok
from tokfusion_jax.models.titok import VIT_SIZES, TiTokConfig

Shape = tuple[int, ...]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WIDTH_TO_HEADS = {w: h for w, _, h in VIT_SIZES.values()}


# --------------------------------------------------------------------------------------------
# The mapping between the official state_dict and the Flax parameter tree
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Flax leaf made from one torch tensor, or from one tensor per transformer block."""

    flax_path: tuple[str, ...]
    torch_keys: tuple[str, ...]
    torch_shape: Shape
    kind: str = "copy"  # copy | linear | conv | conv1x1
    stacked: bool = False


def _transform(x: Any, kind: str, xp: Any = jnp) -> Any:
    """One tensor to its Flax layout with the array module ``xp`` (numpy or jax.numpy)."""
    if kind == "linear":
        return xp.transpose(x)  # (out, in) -> (in, out)
    if kind == "conv":
        return xp.transpose(x, (2, 3, 1, 0))  # OIHW -> HWIO
    if kind == "conv1x1":
        return xp.transpose(x[:, :, 0, 0])  # (out, in, 1, 1) -> (in, out)
    return xp.asarray(x)


def _vit_rules(
    prefix: str, flax_prefix: tuple[str, ...], width: int, depth: int, mlp: int
) -> list[Rule]:
    def stack(flax_tail: tuple[str, ...], torch_tail: str, shape: Shape, kind: str) -> Rule:
        keys = tuple(f"{prefix}.transformer.{i}.{torch_tail}" for i in range(depth))
        path = (*flax_prefix, "transformer", "blocks", *flax_tail)
        return Rule(path, keys, shape, kind, stacked=True)

    rules = []
    for ln in ("ln_1", "ln_2"):
        rules += [
            stack((ln, "scale"), f"{ln}.weight", (width,), "copy"),
            stack((ln, "bias"), f"{ln}.bias", (width,), "copy"),
        ]
    rules += [
        stack(("in_proj", "kernel"), "attn.in_proj_weight", (3 * width, width), "linear"),
        stack(("in_proj", "bias"), "attn.in_proj_bias", (3 * width,), "copy"),
        stack(("out_proj", "kernel"), "attn.out_proj.weight", (width, width), "linear"),
        stack(("out_proj", "bias"), "attn.out_proj.bias", (width,), "copy"),
        stack(("c_fc", "kernel"), "mlp.c_fc.weight", (mlp, width), "linear"),
        stack(("c_fc", "bias"), "mlp.c_fc.bias", (mlp,), "copy"),
        stack(("c_proj", "kernel"), "mlp.c_proj.weight", (width, mlp), "linear"),
        stack(("c_proj", "bias"), "mlp.c_proj.bias", (width,), "copy"),
    ]
    for ln in ("ln_pre", "ln_post"):
        rules += [
            Rule((*flax_prefix, ln, "scale"), (f"{prefix}.{ln}.weight",), (width,)),
            Rule((*flax_prefix, ln, "bias"), (f"{prefix}.{ln}.bias",), (width,)),
        ]
    return rules


def _resnet_rules(torch_prefix: str, flax_name: str, cin: int, cout: int) -> list[Rule]:
    p, f = torch_prefix, ("pixel_decoder", flax_name)
    rules = [
        Rule((*f, "norm1", "scale"), (f"{p}.norm1.weight",), (cin,)),
        Rule((*f, "norm1", "bias"), (f"{p}.norm1.bias",), (cin,)),
        Rule((*f, "conv1", "kernel"), (f"{p}.conv1.weight",), (cout, cin, 3, 3), "conv"),
        Rule((*f, "norm2", "scale"), (f"{p}.norm2.weight",), (cout,)),
        Rule((*f, "norm2", "bias"), (f"{p}.norm2.bias",), (cout,)),
        Rule((*f, "conv2", "kernel"), (f"{p}.conv2.weight",), (cout, cout, 3, 3), "conv"),
    ]
    if cin != cout:
        shape = (cout, cout, 1, 1)
        rules.append(
            Rule((*f, "nin_shortcut", "kernel"), (f"{p}.nin_shortcut.weight",), shape, "conv")
        )
    return rules


def conversion_rules(cfg: TiTokConfig) -> list[Rule]:
    """Every tensor of the official state_dict for ``cfg``, in state_dict order, with its leaf."""
    ew, dw, g, n = cfg.enc_width, cfg.dec_width, cfg.grid_size, cfg.num_tokens
    p, c = cfg.patch_size, cfg.token_size
    r = [Rule(("latent_tokens",), ("latent_tokens",), (n, ew))]
    enc = ("encoder",)
    r += [
        Rule((*enc, "class_embedding"), ("encoder.class_embedding",), (1, ew)),
        Rule((*enc, "positional_embedding"), ("encoder.positional_embedding",), (g * g + 1, ew)),
        Rule(
            (*enc, "latent_token_positional_embedding"),
            ("encoder.latent_token_positional_embedding",),
            (n, ew),
        ),
        Rule(
            (*enc, "patch_embed", "kernel"), ("encoder.patch_embed.weight",), (ew, 3, p, p), "conv"
        ),
        Rule((*enc, "patch_embed", "bias"), ("encoder.patch_embed.bias",), (ew,)),
    ]
    r += _vit_rules("encoder", enc, ew, cfg.enc_depth, cfg.mlp_ratio * ew)
    c_out = cfg.encoder_out_channels
    r += [
        Rule(
            (*enc, "conv_out", "kernel"), ("encoder.conv_out.weight",), (c_out, ew, 1, 1), "conv1x1"
        ),
        Rule((*enc, "conv_out", "bias"), ("encoder.conv_out.bias",), (c_out,)),
    ]
    dec = ("decoder",)
    r += [
        Rule((*dec, "class_embedding"), ("decoder.class_embedding",), (1, dw)),
        Rule((*dec, "positional_embedding"), ("decoder.positional_embedding",), (g * g + 1, dw)),
        Rule((*dec, "mask_token"), ("decoder.mask_token",), (1, 1, dw)),
        Rule(
            (*dec, "latent_token_positional_embedding"),
            ("decoder.latent_token_positional_embedding",),
            (n, dw),
        ),
        Rule(
            (*dec, "decoder_embed", "kernel"), ("decoder.decoder_embed.weight",), (dw, c), "linear"
        ),
        Rule((*dec, "decoder_embed", "bias"), ("decoder.decoder_embed.bias",), (dw,)),
    ]
    r += _vit_rules("decoder", dec, dw, cfg.dec_depth, cfg.mlp_ratio * dw)
    if cfg.is_legacy:
        k = cfg.pixel_codebook_size
        r += [
            Rule(
                (*dec, "ffn_0", "kernel"), ("decoder.ffn.0.weight",), (2 * dw, dw, 1, 1), "conv1x1"
            ),
            Rule((*dec, "ffn_0", "bias"), ("decoder.ffn.0.bias",), (2 * dw,)),
            Rule(
                (*dec, "ffn_2", "kernel"), ("decoder.ffn.2.weight",), (k, 2 * dw, 1, 1), "conv1x1"
            ),
            Rule((*dec, "ffn_2", "bias"), ("decoder.ffn.2.bias",), (k,)),
        ]
    else:
        out = p * p * 3
        r += [
            Rule((*dec, "ffn_0", "kernel"), ("decoder.ffn.0.weight",), (out, dw, 1, 1), "conv1x1"),
            Rule((*dec, "ffn_0", "bias"), ("decoder.ffn.0.bias",), (out,)),
            Rule((*dec, "conv_out", "kernel"), ("decoder.conv_out.weight",), (3, 3, 3, 3), "conv"),
            Rule((*dec, "conv_out", "bias"), ("decoder.conv_out.bias",), (3,)),
        ]
    if cfg.quantize_mode == "vq":
        r.append(
            Rule(("quantize", "embedding"), ("quantize.embedding.weight",), (cfg.codebook_size, c))
        )
    if cfg.has_pixel_decoder:
        r += _pixel_rules(cfg)
    return r


def _pixel_rules(cfg: TiTokConfig) -> list[Rule]:
    widths, z = cfg.pixel_widths, cfg.pixel_z_channels
    shape = (cfg.pixel_codebook_size, z)
    r = [Rule(("pixel_quantize", "embedding"), ("pixel_quantize.embedding.weight",), shape)]
    pd, fp = "pixel_decoder", ("pixel_decoder",)
    r += [
        Rule((*fp, "conv_in", "kernel"), (f"{pd}.conv_in.weight",), (widths[-1], z, 3, 3), "conv"),
        Rule((*fp, "conv_in", "bias"), (f"{pd}.conv_in.bias",), (widths[-1],)),
    ]
    for i in range(2):
        r += _resnet_rules(f"{pd}.mid.{i}", f"mid_{i}", widths[-1], widths[-1])
    for level, width in enumerate(widths):
        cin = widths[min(level + 1, len(widths) - 1)]
        for j in range(cfg.pixel_num_res_blocks):
            name = f"up_{level}_block_{j}"
            r += _resnet_rules(f"{pd}.up.{level}.block.{j}", name, cin if j == 0 else width, width)
        if level != 0:
            t, f = f"{pd}.up.{level}.upsample_conv", (*fp, f"up_{level}_upsample_conv")
            r += [
                Rule((*f, "kernel"), (f"{t}.weight",), (width, width, 3, 3), "conv"),
                Rule((*f, "bias"), (f"{t}.bias",), (width,)),
            ]
    r += [
        Rule((*fp, "norm_out", "scale"), (f"{pd}.norm_out.weight",), (widths[0],)),
        Rule((*fp, "norm_out", "bias"), (f"{pd}.norm_out.bias",), (widths[0],)),
        Rule((*fp, "conv_out", "kernel"), (f"{pd}.conv_out.weight",), (3, widths[0], 3, 3), "conv"),
        Rule((*fp, "conv_out", "bias"), (f"{pd}.conv_out.bias",), (3,)),
    ]
    return r


def expected_torch_shapes(cfg: TiTokConfig) -> dict[str, Shape]:
    """The official state_dict layout for ``cfg``: key -> shape, in state_dict order."""
    return {key: rule.torch_shape for rule in conversion_rules(cfg) for key in rule.torch_keys}


def check_state_dict(shapes: Mapping[str, Shape], cfg: TiTokConfig, source: str) -> None:
    """Raises one `CheckpointError` listing every missing, unexpected and mis-shaped key."""
    check_keys(
        shapes,
        expected_torch_shapes(cfg),
        f"{source} does not match the TiTok architecture {describe(cfg)}",
    )


def torch_to_flax(
    state_dict: Mapping[str, Any], cfg: TiTokConfig, partial: bool = False
) -> dict[str, Any]:
    """Maps a validated official state_dict (numpy or jax arrays) to the Flax param tree.

    NumPy tensors are converted with NumPy on the host (host float32 arrays out: eager
    ``jax.numpy`` would dispatch one device op per tensor and took ~20 s for TiTok-L-32); anything
    else (jax arrays, the tracers of ``jax.eval_shape`` on shape structs) with ``jax.numpy``.
    ``partial=True`` skips leaves whose tensors are absent (e.g. an encoder-only state_dict).
    """
    params: dict[str, Any] = {}
    for rule in conversion_rules(cfg):
        if partial and not all(k in state_dict for k in rule.torch_keys):
            continue
        tensors = [state_dict[k] for k in rule.torch_keys]
        xp = np if all(isinstance(t, np.ndarray) for t in tensors) else jnp
        leaves = [_transform(t, rule.kind, xp) for t in tensors]
        leaf = xp.stack(leaves) if rule.stacked else leaves[0]
        node = params
        for name in rule.flax_path[:-1]:
            node = node.setdefault(name, {})
        node[rule.flax_path[-1]] = (
            leaf.astype(np.float32, copy=False) if xp is np else leaf.astype(jnp.float32)
        )
    return params


# --------------------------------------------------------------------------------------------
# Architecture inference
# --------------------------------------------------------------------------------------------

_ANCHORS = (
    "latent_tokens",
    "encoder.patch_embed.weight",
    "encoder.positional_embedding",
    "encoder.conv_out.weight",
    "decoder.decoder_embed.weight",
    "decoder.positional_embedding",
)


def _count_indexed(shapes: Mapping[str, Shape], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def parse_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The ``model.vq_model`` section of an official config.json (+ ``crop_size`` if given)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    root = raw.get("config", raw) if isinstance(raw.get("config"), dict) else raw
    model = root.get("model", {})
    vq = model.get("vq_model") if isinstance(model, dict) else None
    if vq is None and "vit_enc_model_size" in root:
        vq = root
    if not isinstance(vq, dict):
        raise ConfigError(f"{path}: no 'model.vq_model' section (not a TiTok config.json)")
    out = dict(vq)
    crop = root.get("dataset", {}).get("preprocessing", {}).get("crop_size")
    if crop is not None:
        out["crop_size"] = crop
    return out


def _heads_for_width(width: int, source: str) -> int:
    if width not in _WIDTH_TO_HEADS:
        raise ConfigError(
            f"cannot tell the head count of a width-{width} ViT from the official size table; "
            f"pass --heads N (or --heads ENC,DEC) [{source}]"
        )
    return _WIDTH_TO_HEADS[width]


def parse_heads(text: str) -> tuple[int, int]:
    """``"16"`` -> (16, 16); ``"12,16"`` -> (12, 16) (encoder, decoder)."""
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--heads {text!r}: expected N or ENC,DEC integers") from None
    if len(values) not in (1, 2) or min(values) <= 0:
        raise ConfigError(f"--heads {text!r}: expected N or ENC,DEC positive integers")
    return (values[0], values[-1])


def infer_config(
    shapes: Mapping[str, Shape],
    *,
    source: str = "state_dict",
    heads: tuple[int, int] | None = None,
    config_json: Mapping[str, Any] | None = None,
    variant: str | None = None,
) -> tuple[TiTokConfig, dict[str, str]]:
    """Reads the architecture off the tensor shapes. Returns (config, where each choice came from).

    Head counts and ``use_l2_norm`` are invisible in shapes: they come from ``heads``, else the
    config.json size names / flag, else the variant, else the official tables (l2 norm is on for
    exactly the legacy checkpoints).
    """
    missing = [k for k in _ANCHORS if k not in shapes]
    if missing:
        sample = ", ".join(list(shapes)[:3]) or "none"
        raise CheckpointError(
            f"{source}: not a TiTok tokenizer state_dict (no {', '.join(missing)}; "
            f"found keys like {sample})"
        )
    ew, _, patch, _ = _shape(shapes, "encoder.patch_embed.weight", 4, source)
    n_pos = _shape(shapes, "encoder.positional_embedding", 2, source)[0]
    grid = math.isqrt(max(n_pos - 1, 0))
    if grid * grid != n_pos - 1:
        raise CheckpointError(
            f"{source}: encoder.positional_embedding has {n_pos} rows, not 1 + g*g"
        )
    num_tokens = _shape(shapes, "latent_tokens", 2, source)[0]
    c_out = _shape(shapes, "encoder.conv_out.weight", 4, source)[0]
    dw, token_size = _shape(shapes, "decoder.decoder_embed.weight", 2, source)
    fc = shapes.get("encoder.transformer.0.mlp.c_fc.weight")
    mlp_ratio = max(1, int(fc[0]) // ew) if fc is not None and len(fc) == 2 else 4
    has_codebook = "quantize.embedding.weight" in shapes
    mode = "vae" if (not has_codebook and c_out == 2 * token_size) else "vq"
    legacy = "decoder.ffn.2.weight" in shapes or "decoder.conv_out.weight" not in shapes
    pixel = any(k.startswith(("pixel_decoder.", "pixel_quantize.")) for k in shapes)
    var_cfg = TiTokConfig.variant(variant) if variant else None
    cj = dict(config_json or {})
    origin: dict[str, str] = {}

    fields: dict[str, Any] = dict(
        image_size=grid * patch,
        patch_size=patch,
        enc_width=ew,
        enc_depth=_count_indexed(shapes, "encoder.transformer.") or 1,
        dec_width=dw,
        dec_depth=_count_indexed(shapes, "decoder.transformer.") or 1,
        mlp_ratio=mlp_ratio,
        num_tokens=num_tokens,
        token_size=token_size,
        quantize_mode=mode,
        is_legacy=legacy,
        finetune_decoder=pixel and legacy,
    )
    if mode == "vq":
        if has_codebook:
            fields["codebook_size"] = shapes["quantize.embedding.weight"][0]
        else:
            fields["codebook_size"] = int(cj.get("codebook_size", 0)) or (
                var_cfg.codebook_size if var_cfg and var_cfg.codebook_size else 4096
            )
    else:
        fields["codebook_size"] = 0
    if legacy:
        k = shapes.get("decoder.ffn.2.weight")
        fields["pixel_codebook_size"] = int(k[0]) if k else 1024
    if pixel and legacy:
        fields.update(_infer_pixel_decoder(shapes, source))

    # Head counts: --heads > config.json size names > --variant > official width table.
    if heads is not None:
        fields["enc_heads"], fields["dec_heads"] = heads
        origin["heads"] = "--heads"
    elif "vit_enc_model_size" in cj or "vit_dec_model_size" in cj:
        for side in ("enc", "dec"):
            size = str(cj.get(f"vit_{side}_model_size", ""))
            if size not in VIT_SIZES:
                raise ConfigError(
                    f"config.json: vit_{side}_model_size={size!r} is not small/base/large"
                )
            fields[f"{side}_heads"] = VIT_SIZES[size][2]
        origin["heads"] = "config.json"
    elif var_cfg is not None:
        fields["enc_heads"], fields["dec_heads"] = var_cfg.enc_heads, var_cfg.dec_heads
        origin["heads"] = f"--variant {variant}"
    else:
        fields["enc_heads"] = _heads_for_width(ew, source)
        fields["dec_heads"] = _heads_for_width(dw, source)
        origin["heads"] = "official size table"

    if "use_l2_norm" in cj:
        fields["use_l2_norm"] = bool(cj["use_l2_norm"])
        origin["use_l2_norm"] = "config.json"
    elif var_cfg is not None:
        fields["use_l2_norm"] = var_cfg.use_l2_norm
        origin["use_l2_norm"] = f"--variant {variant}"
    else:
        fields["use_l2_norm"] = legacy
        origin["use_l2_norm"] = "default (on for legacy checkpoints)"
    fields["use_l2_norm"] = fields["use_l2_norm"] and mode == "vq"

    try:
        cfg = TiTokConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(f"{source}: inconsistent TiTok tensor shapes ({e})") from None
    _check_against_config_json(cfg, cj, source)
    if var_cfg is not None:
        want = dataclasses.replace(var_cfg, enc_heads=cfg.enc_heads, dec_heads=cfg.dec_heads)
        want = dataclasses.replace(want, use_l2_norm=cfg.use_l2_norm)
        if want != cfg:
            # The per-key report against the variant's layout says exactly what differs.
            check_state_dict(shapes, want, f"{source} (--variant {variant})")
            raise CheckpointError(
                f"{source}: architecture {describe(cfg)} is not --variant {variant}"
            )
    return cfg, origin


def _shape(shapes: Mapping[str, Shape], key: str, ndim: int, source: str) -> Shape:
    shape = tuple(int(d) for d in shapes[key])
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: {key} has shape {fmt_shape(shape)}, expected {ndim} dims")
    return shape


def _infer_pixel_decoder(shapes: Mapping[str, Shape], source: str) -> dict[str, Any]:
    levels = _count_indexed(shapes, "pixel_decoder.up.")
    widths = []
    for level in range(levels):
        key = f"pixel_decoder.up.{level}.block.0.conv1.weight"
        if key not in shapes:
            raise CheckpointError(f"{source}: missing {key} (cannot infer the pixel decoder)")
        widths.append(int(shapes[key][0]))
    if not widths:
        raise CheckpointError(f"{source}: pixel_decoder has no up.* levels")
    hidden = math.gcd(*widths)
    z = shapes.get("pixel_quantize.embedding.weight") or shapes.get("pixel_decoder.conv_in.weight")
    z_channels = int(z[1]) if z is not None else 256
    return dict(
        pixel_hidden=hidden,
        pixel_channel_mult=tuple(w // hidden for w in widths),
        pixel_num_res_blocks=_count_indexed(shapes, "pixel_decoder.up.0.block.") or 1,
        pixel_z_channels=z_channels,
    )


def _check_against_config_json(cfg: TiTokConfig, cj: Mapping[str, Any], source: str) -> None:
    checks = {
        "num_latent_tokens": cfg.num_tokens,
        "token_size": cfg.token_size,
        "crop_size": cfg.image_size,
        "vit_enc_patch_size": cfg.patch_size,
        "quantize_mode": cfg.quantize_mode,
    }
    if cfg.quantize_mode == "vq":
        checks["codebook_size"] = cfg.codebook_size
    bad = [f"{k}={cj[k]!r} (weights: {v!r})" for k, v in checks.items() if k in cj and cj[k] != v]
    for side, width in (("enc", cfg.enc_width), ("dec", cfg.dec_width)):
        size = cj.get(f"vit_{side}_model_size")
        if size in VIT_SIZES and VIT_SIZES[size][0] != width:
            bad.append(f"vit_{side}_model_size={size!r} (weights: width {width})")
    if bad:
        raise CheckpointError(f"config.json disagrees with {source}: " + ", ".join(bad))


def describe(cfg: TiTokConfig) -> str:
    """A one-line summary, e.g. ``enc 1024x24 (16 heads) / dec ..., 32x12 tokens, legacy VQ``."""
    if cfg.quantize_mode == "vq":
        quant = f"VQ {cfg.codebook_size}{' l2' if cfg.use_l2_norm else ''}"
    else:
        quant = "VAE"
    head = (
        "legacy + pixel decoder"
        if cfg.has_pixel_decoder
        else ("legacy" if cfg.is_legacy else "RGB head")
    )
    return (
        f"[{cfg.image_size}px/p{cfg.patch_size}, enc {cfg.enc_width}x{cfg.enc_depth} "
        f"({cfg.enc_heads} heads), dec {cfg.dec_width}x{cfg.dec_depth} ({cfg.dec_heads} heads), "
        f"{cfg.num_tokens}x{cfg.token_size} tokens, {quant}, {head}]"
    )


# --------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------


def resolve_source(source: str) -> tuple[Path, Path | None, dict[str, Any]]:
    """SRC -> (weights file, config.json beside it or None, provenance for tokenizer.json)."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return _local(path / name)
        raise CheckpointError(f"{path}: directory holds no model.safetensors or pytorch_model.bin")
    if path.is_file():
        return _local(path)
    if _REPO_ID.match(source) and path.suffix not in (".safetensors", ".bin"):
        return _download(source)
    raise CheckpointError(f"{source}: file not found (pass a .safetensors or .bin file)")


def _local(path: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    config = path.with_name("config.json")
    return path, (config if config.is_file() else None), {"path": str(path.absolute())}


def _download(repo_id: str) -> tuple[Path, Path | None, dict[str, Any]]:
    """Fetches model.safetensors (+ config.json) with huggingface_hub, or its cached copy.

    Offline (HF_HUB_OFFLINE set, or the hub's host does not resolve) only the local cache is
    tried, so the command fails at once instead of retrying for half a minute.
    """
    hint = "download model.safetensors yourself and pass its local path as --source"
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: huggingface_hub is not installed (pip install '.[hub]'); or {hint}"
        ) from None
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable(constants)

    def fetch(filename: str) -> Path:
        return Path(
            huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=bool(offline))
        )

    try:
        weights = fetch("model.safetensors")
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        if offline:
            raise CheckpointError(
                f"{repo_id}: offline ({offline}) and not cached; {hint}"
            ) from None
        msg = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{repo_id}: download failed ({msg}); {hint}") from None
    try:
        config: Path | None = fetch("config.json")
    except Exception:
        config = None
    return weights, config, {"repo_id": repo_id, "file": "model.safetensors"}


def _unreachable(constants: Any) -> str:
    """'' when the hub's host resolves, else why not."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"cannot resolve {host}: {e.strerror or e}"
    return ""


# --------------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    out: Path
    config: TiTokConfig
    param_count: int
    params_sha256: str


def convert_titok(
    source: str,
    out: str | os.PathLike,
    *,
    config_path: str | os.PathLike | None = None,
    variant: str | None = None,
    heads: str | tuple[int, int] | None = None,
    log: Callable[[str], None] = print,
) -> ConversionResult:
    """Reads, validates and converts a TiTok checkpoint; writes ``out`` atomically."""
    if variant is not None:
        TiTokConfig.variant(variant)  # unknown names fail before any reading
    heads_t = parse_heads(heads) if isinstance(heads, str) else heads
    titok.check_save_path(out)  # before a download or a long read
    weights, sibling_config, provenance = resolve_source(source)
    config_file = Path(config_path) if config_path is not None else sibling_config
    paths.check_roles(  # --out is replaced as a whole: it may not hold the source
        inputs=[("--source", weights), ("--config", config_file or "")],
        outputs=[],
        replaced=[("--out", out)],
    )
    config_json = parse_config_json(config_file) if config_file is not None else None
    if config_file is not None and config_path is None:
        log(f"using {config_file}")
    state_dict = read_state_dict(weights)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    cfg, origin = infer_config(
        shapes, source=str(weights), heads=heads_t, config_json=config_json, variant=variant
    )
    check_state_dict(shapes, cfg, str(weights))
    check_finite(state_dict, str(weights))
    params = torch_to_flax(state_dict, cfg)
    del state_dict
    tok = titok.from_params(cfg, params)
    metadata = {
        "source": {
            **provenance,
            "sha256": file_sha256(weights),
            "bytes": weights.stat().st_size,
            "config_json": str(config_file) if config_file else None,
            "heads_from": origin["heads"],
            "use_l2_norm_from": origin["use_l2_norm"],
        },
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "converter": "python -m convert titok",
    }
    path = titok.save(tok, out, metadata=metadata)
    count = tok.num_params
    log(f"wrote {path} (params/ + tokenizer.json): TiTok {describe(cfg)}, {count:,} parameters")
    return ConversionResult(path, cfg, count, tok.sha256)
