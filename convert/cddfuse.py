"""Convert an official CDDFuse checkpoint into an inference export of the plain-2D model.

    python -m convert cddfuse --source CDDFuse_IVF.pth --out DIR [--task ivif|mif]
                              [--residual vis|sum|none]

SRC is a release file (``models/CDDFuse_IVF.pth`` / ``CDDFuse_MIF.pth`` of
Zhaozixiang1228/MMIF-CDDFuse): ``torch.save`` of ``{'DIDF_Encoder', 'DIDF_Decoder',
'BaseFuseLayer', 'DetailFuseLayer'}``, each an ``nn.DataParallel`` state_dict (keys
``module.*``), read with ``torch.load(weights_only=True)``; or a ``.safetensors`` file of the
same tensors under flattened keys (``DIDF_Encoder.module.patch_embed.proj.weight``), read without
torch. Entries saved without the DataParallel wrapper (no ``module.``) are accepted too.

DIR becomes an inference export (`tokfusion_jax.export`) of the plain-2D model
(`models.config.cddfuse_model_config`) with the decoder residual CDDFuse's own test scripts use:
``--task ivif`` (default) adds the visible image (test_IVF.py); ``--task mif`` adds none, as
test_MIF.py does with ``CDDFuse_MIF.pth``. test_MIF.py runs ``CDDFuse_IVF.pth`` on medical pairs
with the sum of both images: ``--task mif --residual sum``. The export records CDDFuse's
test-time convention (8-bit rounded gray input, min-max stretched output), which the ``fuse``
and ``evaluate`` CLIs apply. DIR is written atomically.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from convert.checkpoint_io import (
    TORCH_SUFFIXES,
    check_finite,
    check_keys,
    file_sha256,
    read_state_dict,
)
from tokfusion_jax import export
from tokfusion_jax.errors import CheckpointError, ConfigError
from tokfusion_jax.models.config import RESIDUAL_MODES, cddfuse_model_config
from tokfusion_jax.models.fusion import TokFusion

Shape = tuple[int, ...]
Params = dict[str, Any]
ENTRIES = ("DIDF_Encoder", "DIDF_Decoder", "BaseFuseLayer", "DetailFuseLayer")
TASK_RESIDUAL = {"ivif": "vis", "mif": "none"}  # what CDDFuse's test scripts add
DIM, HEADS, BLOCKS, ENC_DETAIL_LAYERS, FUSE_DETAIL_LAYERS = 64, 8, 4, 3, 1
PARAM_COUNT = 1_188_272


# --------------------------------------------------------------------------------------------
# The mapping between the release keys and the Flax parameter tree
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Flax leaf made from one release tensor."""

    torch_key: str  # flattened, e.g. "DIDF_Encoder.module.patch_embed.proj.weight"
    torch_shape: Shape
    flax_path: tuple[str, ...]
    kind: str = "copy"  # copy | conv (OIHW -> HWIO) | heads ((h, 1, 1) -> (h,))


class _RuleBuilder:
    """Collects rules in the release's state_dict order (module registration order)."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []

    def add(self, key: str, shape: Shape, path: tuple[str, ...], kind: str = "copy") -> None:
        self.rules.append(Rule(key, shape, path, kind))

    def conv(self, t: str, f: tuple[str, ...], c_out: int, c_in: int, k: int) -> None:
        self.add(f"{t}.weight", (c_out, c_in, k, k), (*f, "kernel"), "conv")

    def layer_norm(self, t: str, f: tuple[str, ...]) -> None:
        self.add(f"{t}.body.weight", (DIM,), (*f, "weight"))
        self.add(f"{t}.body.bias", (DIM,), (*f, "bias"))

    def transformer_block(self, t: str, f: tuple[str, ...]) -> None:
        hidden = 2 * DIM  # ffn_expansion_factor 2
        self.layer_norm(f"{t}.norm1", (*f, "norm1"))
        self.add(f"{t}.attn.temperature", (HEADS, 1, 1), (*f, "attn", "temperature"), "heads")
        self.conv(f"{t}.attn.qkv", (*f, "attn", "qkv"), 3 * DIM, DIM, 1)
        self.conv(f"{t}.attn.qkv_dwconv", (*f, "attn", "qkv_dwconv"), 3 * DIM, 1, 3)
        self.conv(f"{t}.attn.project_out", (*f, "attn", "project_out"), DIM, DIM, 1)
        self.layer_norm(f"{t}.norm2", (*f, "norm2"))
        self.conv(f"{t}.ffn.project_in", (*f, "ffn", "project_in"), 2 * hidden, DIM, 1)
        self.conv(f"{t}.ffn.dwconv", (*f, "ffn", "dwconv"), 2 * hidden, 1, 3)
        self.conv(f"{t}.ffn.project_out", (*f, "ffn", "project_out"), DIM, hidden, 1)

    def base_branch(self, t: str, f: tuple[str, ...]) -> None:
        self.layer_norm(f"{t}.norm1", (*f, "norm1"))
        self.add(f"{t}.attn.scale", (HEADS, 1, 1), (*f, "attn", "scale"), "heads")
        self.conv(f"{t}.attn.qkv1", (*f, "attn", "qkv1"), 3 * DIM, DIM, 1)
        self.conv(f"{t}.attn.qkv2", (*f, "attn", "qkv2"), 3 * DIM, 3 * DIM, 3)  # dense
        self.conv(f"{t}.attn.proj", (*f, "attn", "proj"), DIM, DIM, 1)
        self.layer_norm(f"{t}.norm2", (*f, "norm2"))
        self.conv(f"{t}.mlp.project_in", (*f, "mlp", "project_in"), 2 * DIM, DIM, 1)
        self.conv(f"{t}.mlp.dwconv", (*f, "mlp", "dwconv"), 2 * DIM, 2, 3)  # groups = dim
        self.conv(f"{t}.mlp.project_out", (*f, "mlp", "project_out"), DIM, DIM, 1)

    def detail_branch(self, t: str, f: tuple[str, ...], layers: int) -> None:
        half = DIM // 2
        for j in range(layers):
            node, fn = f"{t}.net.{j}", (*f, f"nodes_{j}")
            for theta, name in (("theta_phi", "phi"), ("theta_rho", "rho"), ("theta_eta", "eta")):
                b = f"{node}.{theta}.bottleneckBlock"
                self.conv(f"{b}.0", (*fn, name, "expand"), 2 * half, half, 1)
                self.conv(f"{b}.3", (*fn, name, "dw"), 2 * half, 1, 3)
                self.conv(f"{b}.5", (*fn, name, "project"), half, 2 * half, 1)
            self.conv(f"{node}.shffleconv", (*fn, "shuffle"), DIM, DIM, 1)
            self.add(f"{node}.shffleconv.bias", (DIM,), (*fn, "shuffle", "bias"))


def conversion_rules() -> list[Rule]:
    """Every tensor of a release checkpoint, in its state_dict order, with its Flax leaf."""
    r = _RuleBuilder()
    enc, f = "DIDF_Encoder.module", ("encoder",)
    r.conv(f"{enc}.patch_embed.proj", (*f, "patch_embed"), DIM, 1, 3)
    for i in range(BLOCKS):
        r.transformer_block(f"{enc}.encoder_level1.{i}", (*f, f"level1_{i}"))
    r.base_branch(f"{enc}.baseFeature", (*f, "base"))
    r.detail_branch(f"{enc}.detailFeature", (*f, "detail"), ENC_DETAIL_LAYERS)
    dec, f = "DIDF_Decoder.module", ("decoder",)
    r.conv(f"{dec}.reduce_channel", (*f, "reduce_channel"), DIM, 2 * DIM, 1)
    for i in range(BLOCKS):
        r.transformer_block(f"{dec}.encoder_level2.{i}", (*f, f"level2_{i}"))
    r.conv(f"{dec}.output.0", (*f, "head_0"), DIM // 2, DIM, 3)
    r.conv(f"{dec}.output.2", (*f, "head_1"), 1, DIM // 2, 3)
    r.base_branch("BaseFuseLayer.module", ("base_fuse",))
    r.detail_branch("DetailFuseLayer.module", ("detail_fuse",), FUSE_DETAIL_LAYERS)
    return r.rules


def expected_shapes() -> dict[str, Shape]:
    """The release layout: flattened key -> shape, in state_dict order."""
    return {rule.torch_key: rule.torch_shape for rule in conversion_rules()}


def _transform(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(x, (2, 3, 1, 0))  # (out, in / groups, kh, kw) -> (kh, kw, in / g, out)
    if kind == "heads":
        return x.reshape(-1)  # (heads, 1, 1) -> (heads,)
    return x


def torch_to_flax(state: Mapping[str, np.ndarray]) -> Params:
    """Maps a validated release state (flattened keys) to the plain-2D model's stage-II tree."""
    params: Params = {}
    for rule in conversion_rules():
        node = params
        for name in rule.flax_path[:-1]:
            node = node.setdefault(name, {})
        leaf = _transform(np.asarray(state[rule.torch_key]), rule.kind)
        node[rule.flax_path[-1]] = np.ascontiguousarray(leaf, np.float32)
    return params


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def normalize_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Adds the ``module.`` DataParallel prefix to an entry saved without it (all or none)."""
    out = dict(state)
    for entry in ENTRIES:
        keys = [k for k in state if k.startswith(f"{entry}.")]
        if keys and not any(k.startswith(f"{entry}.module.") for k in keys):
            for k in keys:
                out[f"{entry}.module.{k[len(entry) + 1 :]}"] = out.pop(k)
    return out


def check_checkpoint(shapes: Mapping[str, Shape], source: str) -> None:
    """Raises `CheckpointError`: not a CDDFuse checkpoint at all (one line), or every missing,
    unexpected and mis-shaped key in one message."""
    entries = {k.split(".", 1)[0] for k in shapes}
    if not entries & set(ENTRIES):
        sample = ", ".join(list(shapes)[:3]) or "no tensors"
        raise CheckpointError(
            f"{source}: not a CDDFuse checkpoint (expected the entries {', '.join(ENTRIES)}; "
            f"found {len(shapes)} tensors such as {sample})"
        )
    check_keys(shapes, expected_shapes(), f"{source} does not match the CDDFuse release layout")


# --------------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    """What `convert_cddfuse` wrote: the export folder, its task and residual, its size."""

    out: Path
    task: str
    residual: str
    param_count: int


def export_config(residual: str) -> ml_collections.ConfigDict:
    """The config.json of a converted export: the plain-2D model section."""
    c = ml_collections.ConfigDict()
    c.model = cddfuse_model_config(residual)
    c.model.dtype = "float32"
    return c


def _resolve_source(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "file not found"
        raise CheckpointError(f"{source}: {what} (pass the release .pth or a .safetensors file)")
    if path.suffix not in (*TORCH_SUFFIXES, ".safetensors"):
        raise CheckpointError(
            f"{source}: unsupported file type {path.suffix!r} (use .pth, .pt, .bin or .safetensors)"
        )
    return path


def _check_out(out: Path, source: Path) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ConfigError(f"--out {out}: would overwrite the input {source}; choose another folder")
    export.check_writable(out)


def convert_cddfuse(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    task: str = "ivif",
    residual: str | None = None,
    log: Callable[[str], None] = print,
) -> ConversionResult:
    """Reads, validates and converts a CDDFuse checkpoint; writes the export ``out`` atomically."""
    if task not in TASK_RESIDUAL:
        raise ConfigError(f"--task {task!r}: expected one of {', '.join(TASK_RESIDUAL)}")
    if residual is not None and residual not in RESIDUAL_MODES:
        raise ConfigError(f"--residual {residual!r}: expected one of {', '.join(RESIDUAL_MODES)}")
    residual = residual or TASK_RESIDUAL[task]
    path = _resolve_source(str(source))
    out_path = Path(out).expanduser().absolute()
    _check_out(out_path, path)
    state = normalize_keys(read_state_dict(path))
    check_checkpoint({k: tuple(v.shape) for k, v in state.items()}, str(path))
    check_finite(state, str(path))
    params = torch_to_flax(state)
    del state
    config = export_config(residual)
    export.check_params(TokFusion(config.model), params, f"parameters converted from {path}")
    count = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    provenance = {
        "kind": "cddfuse",
        "path": str(path.absolute()),
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "task": task,
        "residual": residual,
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "converter": "python -m convert cddfuse",
    }
    written = export.write_export(
        out_path, config, params, postprocess="minmax", input_luma="uint8", source=provenance
    )
    log(
        f"wrote {written} (params/ + config.json + export.json): CDDFuse plain-2D model, "
        f"task {task}, residual {residual}, {count:,} parameters"
    )
    return ConversionResult(written, task, residual, count)
