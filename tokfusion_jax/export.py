"""Inference export: the trained parameters, the config and the tokenizer they were trained with.

Layout of ``<workdir>/export`` (`save_export`; `write_export` writes any directory)::

    params/       orbax checkpoint of the trainable tree (float32)
    config.json   the full training config (at least its ``model`` section)
    export.json   format version; the tokenizer's path (absolute and relative to this folder) and
                  sha256, or null for a model without tokens (``model.use_tokens=False``); the
                  test-time convention of the method the weights come from:
                  "postprocess" ("minmax": each fused image is min-max stretched before saving,
                  as CDDFuse's test scripts do; "clip": saved as it is) and "input_luma"
                  ("float": BT.601 luma of the decoded image; "uint8": that luma rounded to 8
                  bits, as CDDFuse's test scripts read images with OpenCV); "source" (where
                  converted weights came from).

`load_export` returns a `FusionExport` whose ``fuse(vis, ir)`` fuses batches of any size and
returns the decoder's sigmoid output (no stretch; the ``fuse`` and ``evaluate`` CLIs apply the
export's postprocess). The tokenizer is loaded from the recorded path (or the one given) and must
have the recorded sha256; a model without tokens needs none.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tokfusion_jax import compile_options, host_memory, memory
from tokfusion_jax.errors import CheckpointError
from tokfusion_jax.models import titok
from tokfusion_jax.models.fusion import TokFusion

FORMAT_VERSION = 2  # 2: the tokenizer may be null; postprocess, input_luma and source fields
READABLE_VERSIONS = (1, 2)
EXPORT_DIRNAME = "export"
POSTPROCESS = ("minmax", "clip")
INPUT_LUMA = ("float", "uint8")


def save_export(
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    params: Any,
    tokenizer: titok.Tokenizer | None,
    tokenizer_path: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Writes ``<workdir>/export`` atomically (a complete new export replaces an old one).

    Trained models keep the reference test-time convention: min-max stretched outputs of the
    float luma the training pipeline also reads.
    """
    return write_export(
        pathlib.Path(workdir) / EXPORT_DIRNAME,
        config,
        params,
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
    )


def write_export(
    path: str | os.PathLike,
    config: ml_collections.ConfigDict,
    params: Any,
    *,
    tokenizer: titok.Tokenizer | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    postprocess: str = "minmax",
    input_luma: str = "float",
    source: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Writes an export directory at ``path`` atomically; returns its absolute path.

    An existing export (or empty directory) at ``path`` is replaced only once the new one is
    complete; any other existing file or directory there is refused with a `CheckpointError`.
    ``tokenizer`` may be None only for a model without tokens. Only process 0 writes.
    """
    if postprocess not in POSTPROCESS:
        raise ValueError(f"postprocess: expected one of {POSTPROCESS}, got {postprocess!r}")
    if input_luma not in INPUT_LUMA:
        raise ValueError(f"input_luma: expected one of {INPUT_LUMA}, got {input_luma!r}")
    final = pathlib.Path(path).expanduser().absolute()
    if tokenizer is None and config.model.use_tokens:
        raise ValueError("write_export: a model with tokens needs its tokenizer")
    host_params = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)
    if jax.process_index() != 0:
        return final
    check_writable(final)
    tok_record = None
    if tokenizer is not None:
        tok_path = pathlib.Path(tokenizer_path or config.tokenizer.path).absolute()
        tok_record = {
            "path": str(tok_path),
            "relative_path": os.path.relpath(tok_path, final),
            "sha256": tokenizer.sha256,
        }
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", host_params)
            ckptr.wait_until_finished()
        (tmp / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        record = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tok_record,
            "postprocess": postprocess,
            "input_luma": input_luma,
            "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(host_params))),
            "modules": sorted(host_params),
        }
        if source is not None:
            record["source"] = source
        (tmp / "export.json").write_text(json.dumps(record, indent=2) + "\n")
        old = None
        if final.exists():
            old = final.parent / f".{final.name}-old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def check_writable(path: str | os.PathLike) -> None:
    """`CheckpointError` unless ``path`` is absent, an empty directory or an export to replace."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    if path.is_dir() and ((path / "export.json").is_file() or not any(path.iterdir())):
        return
    raise CheckpointError(f"{path} exists and is not an inference export; not touched")


def find_export(path: str | os.PathLike) -> pathlib.Path:
    """The export directory for a workdir or an export directory (CheckpointError if none)."""
    path = pathlib.Path(path).expanduser().absolute()
    for candidate in (path, path / EXPORT_DIRNAME):
        if (candidate / "export.json").is_file():
            return candidate
    raise CheckpointError(
        f"{path}: no inference export found (expected export.json there or in {EXPORT_DIRNAME}/)"
    )


@dataclasses.dataclass
class FusionExport:
    """A trained model ready for inference, with the test-time convention of its source."""

    model: TokFusion
    params: Any
    config: ml_collections.ConfigDict
    tokenizer: titok.Tokenizer | None
    path: pathlib.Path | None = None
    postprocess: str = "minmax"  # what the CLIs do to each fused image before saving it
    input_luma: str = "float"  # how the CLIs read the luma they feed to `fuse`
    source: dict[str, Any] | None = None  # provenance of converted weights
    # (batch, H, W) -> the fuse program compiled for that shape (see `executable`).
    _executables: dict[tuple[int, int, int], Any] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def fuse(self, vis: Any, ir: Any) -> np.ndarray:
        """Fuses gray pairs: (B, H, W, 1), (B, H, W) or (H, W) floats in [0, 1], any H, W.

        Returns float32 (B, H, W, 1) in [0, 1]: the decoder's sigmoid output, before any
        stretch (``postprocess`` says what the CLIs apply afterwards).
        """
        vis, ir = _as_batch(vis, "vis"), _as_batch(ir, "ir")
        if vis.shape != ir.shape:
            raise ValueError(f"vis {vis.shape} and ir {ir.shape} must have the same shape")
        program = self.executable(*vis.shape[:3])
        fused = program(self.params, self.tokenizer, jnp.asarray(vis), jnp.asarray(ir))
        return np.clip(np.asarray(jax.device_get(fused), np.float32), 0.0, 1.0)

    def executable(self, batch: int, height: int, width: int) -> Any:
        """The fuse program compiled for `batch` gray (H, W) pairs; compiled once per shape."""
        key = (batch, height, width)
        if key not in self._executables:
            pairs = jax.ShapeDtypeStruct((batch, height, width, 1), jnp.float32)
            lowered = _fuse_program().lower(self.model, self.params, self.tokenizer, pairs, pairs)
            self._executables[key] = lowered.compile()
            host_memory.release_freed_memory()  # the compiler's scratch, before the run's temps
        return self._executables[key]

    def memory_model(self, height: int, width: int) -> memory.MemoryModel | None:
        """Bytes per call of fusing (H, W) pairs beyond the resident weights, as a line in the
        batch size fitted to XLA's memory analysis at batch 1 and 2 (None where unreported)."""
        resident = memory.tree_bytes((self.params, getattr(self.tokenizer, "params", None)))
        needs = [
            memory.program_need_bytes(self.executable(b, height, width), resident) for b in (1, 2)
        ]
        if None in needs:
            return None
        return memory.MemoryModel.from_two(*needs)


def _fuse(model: TokFusion, params: Any, tokenizer: Any, vis: jax.Array, ir: jax.Array):
    return model.fuse_images(params, tokenizer, vis, ir)


@functools.cache
def _fuse_program() -> Any:
    """`_fuse` jitted (model static) with the backend's compiler options, built on first use."""
    return jax.jit(_fuse, static_argnums=(0,), compiler_options=compile_options.compiler_options())


def _as_batch(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[None, ..., None]
    elif x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"{name}: expected (B, H, W, 1), (B, H, W) or (H, W); got {x.shape}")
    return x


def load_export(
    path: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: str | None = None,
) -> FusionExport:
    """Loads an export written by `save_export` (path: a workdir or its export directory).

    ``tokenizer_path`` overrides the recorded tokenizer location; ``dtype`` the compute dtype.
    """
    export_dir = find_export(path)
    try:
        record = json.loads((export_dir / "export.json").read_text())
        config = ml_collections.ConfigDict(json.loads((export_dir / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{export_dir}: unreadable export metadata ({e})") from None
    version = record.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{export_dir}/export.json: format_version {version!r}, expected one of "
            f"{', '.join(map(str, READABLE_VERSIONS))} (written by a newer tokfusion_jax?)"
        )
    if dtype is not None:
        config.model.dtype = dtype
    try:
        model = TokFusion(config.model)
    except (KeyError, AttributeError) as e:
        raise CheckpointError(f"{export_dir}/config.json: no usable model section ({e})") from None
    postprocess = record.get("postprocess", "minmax")
    input_luma = record.get("input_luma", "float")
    for key, value, allowed in (
        ("postprocess", postprocess, POSTPROCESS),
        ("input_luma", input_luma, INPUT_LUMA),
    ):
        if value not in allowed:
            raise CheckpointError(
                f"{export_dir}/export.json: {key}={value!r}, expected one of {', '.join(allowed)}"
            )
    tok = None
    if model.spec.use_tokens:
        if not record.get("tokenizer"):
            raise CheckpointError(
                f"{export_dir}/export.json: the model uses tokens but the export names no tokenizer"
            )
        tok = _load_tokenizer(export_dir, record["tokenizer"], tokenizer_path)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(export_dir / "params")
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{export_dir}/params: cannot restore ({e})") from None
    params = jax.tree_util.tree_map(jnp.asarray, params)
    check_params(model, params, f"{export_dir}/params")
    return FusionExport(
        model=model,
        params=params,
        config=config,
        tokenizer=tok,
        path=export_dir,
        postprocess=postprocess,
        input_luma=input_luma,
        source=record.get("source"),
    )


def check_params(model: TokFusion, params: Any, where: str) -> None:
    """`CheckpointError` unless ``params`` has exactly the structure and shapes of the model's
    stage-II tree (``where`` names them in the message)."""
    want = jax.eval_shape(lambda k: model.init(k, stage=2), jax.random.key(0))
    flat_want = {jax.tree_util.keystr(p): v.shape for p, v in _leaves_with_path(want)}
    flat_got = {jax.tree_util.keystr(p): np.shape(v) for p, v in _leaves_with_path(params)}
    if flat_want != flat_got:
        missing = sorted(set(flat_want) - set(flat_got))
        extra = sorted(set(flat_got) - set(flat_want))
        shape = sorted(k for k in set(flat_want) & set(flat_got) if flat_want[k] != flat_got[k])
        raise CheckpointError(
            f"{where} do not match the model in config.json (missing {missing[:3]}, "
            f"unexpected {extra[:3]}, wrong shape {shape[:3]})"
        )


def _leaves_with_path(tree: Any) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _load_tokenizer(export_dir: pathlib.Path, rec: dict, override) -> titok.Tokenizer:
    if override is not None:
        candidates = [pathlib.Path(override).expanduser()]
    else:
        candidates = [export_dir / rec.get("relative_path", ""), pathlib.Path(rec["path"])]
    for cand in candidates:
        if (cand / "tokenizer.json").is_file():
            tok = titok.load(cand)
            if rec.get("sha256") and tok.sha256 != rec["sha256"]:
                raise CheckpointError(
                    f"tokenizer at {cand} has sha256 {tok.sha256[:12]}..., but the export was "
                    f"trained with {rec['sha256'][:12]}...; pass the matching tokenizer"
                )
            return tok
    raise CheckpointError(
        f"{export_dir}: the tokenizer it was trained with is not at {rec['path']}; pass its "
        "location explicitly (tokenizer_path=... / --tokenizer=...)"
    )
