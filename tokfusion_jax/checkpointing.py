"""Training checkpoints: orbax `CheckpointManager` in ``<workdir>/checkpoints``.

Each step directory holds three items, written together and atomically (orbax writes to a
temporary directory and renames it when every item is complete):

* ``state`` -- the trainable parameters, the optimiser state and the step (a pytree);
* ``meta``  -- JSON: stage, step, epoch, the config, the tokenizer's path and sha256;
* ``data``  -- JSON: the data iterator's state (dict, or bytes as base64), so that a restarted
  run sees exactly the batches an uninterrupted run would have seen.

The frozen tokenizer is never saved here (only its path and hash). The trainer checks that a
state is finite before it calls `CheckpointManager.save`; this module never writes anything else.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tokfusion_jax.errors import CheckpointError

PyTree = Any


def encode_iterator_state(state: Any) -> dict[str, Any]:
    """A grain iterator state (dict or bytes) as a JSON-serialisable dict."""
    if state is None:
        return {"kind": "none"}
    if isinstance(state, bytes | bytearray):
        return {"kind": "bytes", "value": base64.b64encode(bytes(state)).decode("ascii")}
    try:
        json.dumps(state)
    except TypeError as e:
        raise CheckpointError(f"data iterator state is not JSON-serialisable: {e}") from None
    return {"kind": "json", "value": state}


def decode_iterator_state(blob: Mapping[str, Any]) -> Any:
    """Inverse of `encode_iterator_state`."""
    kind = blob.get("kind")
    if kind == "none":
        return None
    if kind == "bytes":
        return base64.b64decode(blob["value"])
    if kind == "json":
        return blob["value"]
    raise CheckpointError(f"unknown data iterator state kind {kind!r} in checkpoint")


class Checkpointer:
    """Save / restore of training states in ``<workdir>/checkpoints`` with keep-last-K."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, use_async: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=use_async,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta", "data")
        )

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def step_path(self, step: int) -> pathlib.Path:
        """Directory of the checkpoint at `step`."""
        return self.directory / str(step)

    def save(
        self,
        step: int,
        state: PyTree,
        meta: Mapping[str, Any],
        iterator_state: Any = None,
        *,
        force: bool = True,
    ) -> bool:
        """Starts saving (asynchronously when enabled); returns whether a save was started."""
        if step in self.manager.all_steps():
            return False
        # Replicated device arrays are copied to the host once here: orbax then writes plain
        # numpy arrays (no per-device slicing), and the caller may donate the device buffers
        # while an asynchronous save is still writing.
        host_state = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), state)
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(host_state),
                meta=ocp.args.JsonSave(dict(meta)),
                data=ocp.args.JsonSave(encode_iterator_state(iterator_state)),
            ),
            force=force,
        )

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of a checkpoint (latest by default)."""
        step = self._resolve(step)
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, abstract_state: PyTree, step: int | None = None) -> tuple[PyTree, dict, Any]:
        """Restores (state, meta, iterator_state); ``abstract_state`` fixes shapes and shardings.

        Leaves come back as device arrays with the abstract leaves' shardings (when given).
        """
        step = self._resolve(step)
        host_target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract_state)
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(host_target),
                    meta=ocp.args.JsonRestore(),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(
                f"cannot restore {self.step_path(step)}: it does not match this model/config "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        for (path, got), want in zip(
            jax.tree_util.tree_flatten_with_path(out["state"])[0],
            jax.tree_util.tree_leaves(abstract_state),
            strict=True,
        ):
            if np.shape(got) != tuple(want.shape):
                raise CheckpointError(
                    f"cannot restore {self.step_path(step)}: it does not match this model/config "
                    f"({jax.tree_util.keystr(path)} has shape {np.shape(got)}, expected "
                    f"{tuple(want.shape)})"
                )
        shardings = jax.tree_util.tree_map(lambda s: getattr(s, "sharding", None), abstract_state)
        state = jax.tree_util.tree_map(
            lambda x, sh: jax.device_put(x, sh) if sh is not None else jnp.asarray(x),
            out["state"],
            shardings,
        )
        return state, dict(out["meta"]), decode_iterator_state(out["data"])

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        return step


def abstract_like(tree: PyTree, shardings: PyTree | None = None) -> PyTree:
    """ShapeDtypeStructs (with shardings when given) describing ``tree`` for a restore."""
    if shardings is None:
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            tree,
        )
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def restore_params(source: str | pathlib.Path, abstract_params: PyTree | None = None) -> PyTree:
    """Trainable parameters from another run (``--config.train.init_from``).

    ``source`` may be a run's workdir, its ``checkpoints`` directory, one step directory, or an
    inference export directory. Returns a dict of top-level modules (host arrays).
    """
    path = pathlib.Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"init_from={source}: no such file or directory")
    candidates = [path / "export" / "params", path / "params"]
    for params_dir in candidates:
        if params_dir.is_dir():
            return _restore_plain(params_dir)
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    state_dir = None
    if (ckpt_dir / "state").is_dir():
        state_dir = ckpt_dir / "state"
    else:
        steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
        if steps:
            state_dir = ckpt_dir / str(steps[-1]) / "state"
    if state_dir is None or not state_dir.is_dir():
        raise CheckpointError(
            f"init_from={source}: found neither an export (export/params) nor a checkpoint "
            "(checkpoints/<step>/state)"
        )
    tree = _restore_plain(state_dir)
    if not isinstance(tree, Mapping) or "params" not in tree:
        raise CheckpointError(f"init_from={source}: {state_dir} holds no 'params' entry")
    logging.info("init_from: parameters from %s", state_dir)
    return tree["params"]


def _restore_plain(directory: pathlib.Path) -> PyTree:
    """Restores a pytree saved with StandardSave as host numpy arrays, no target needed."""
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(directory)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"cannot read parameters from {directory}: {e}") from None
    return jax.tree_util.tree_map(jax.device_get, restored)


# ----------------------------------------------------------------------------------------------
# Taking parameters from another model (init_from)
# ----------------------------------------------------------------------------------------------

KeyPath = tuple[str, ...]


def _flatten(tree: Mapping[str, Any], prefix: KeyPath = ()) -> dict[KeyPath, Any]:
    out: dict[KeyPath, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def _unflatten(flat: Mapping[KeyPath, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return out


def _size(leaf: Any) -> int:
    return int(np.prod(np.shape(leaf), dtype=np.int64))


def covering_subtrees(paths: set[KeyPath], tree: Mapping[KeyPath, Any]) -> list[KeyPath]:
    """The shallowest subtrees of ``tree`` (flat) whose leaves all lie in ``paths``."""
    out: list[KeyPath] = []
    for path in sorted(paths):
        if any(path[: len(p)] == p for p in out):
            continue
        cover = path
        for depth in range(1, len(path)):
            prefix = path[:depth]
            if all(q in paths for q in tree if q[:depth] == prefix):
                cover = prefix
                break
        out.append(cover)
    return out


@dataclasses.dataclass
class MergeReport:
    """What `merge_params` took, left alone and could not use (paths joined with '/')."""

    taken: dict[str, tuple[int, int]]  # top-level module -> (parameters taken, in the module)
    fresh: dict[str, int]  # subtrees of the target with no counterpart -> parameter count
    unused: dict[str, int]  # subtrees of the source with no counterpart -> parameter count

    def lines(self) -> list[str]:
        """Human-readable lines, one per kind (empty kinds omitted)."""

        def fmt(items: Mapping[str, Any]) -> str:
            return ", ".join(f"{k} ({v:,})" for k, v in items.items())

        taken = {
            k: (f"{n:,} of {total:,}" if n != total else f"all {n:,}")
            for k, (n, total) in self.taken.items()
        }
        out = ["taken:  " + ", ".join(f"{k} ({v})" for k, v in taken.items())] if taken else []
        if self.fresh:
            out.append("fresh:  " + fmt(self.fresh))
        if self.unused:
            out.append("unused: " + fmt(self.unused) + " (no counterpart in this model)")
        return out


def merge_params(target: Mapping[str, Any], source: Mapping[str, Any]) -> tuple[dict, MergeReport]:
    """``target`` with every leaf that ``source`` has at the same path copied in, bit for bit.

    Leaves of ``target`` that ``source`` lacks stay as they are ("fresh"); leaves of ``source``
    without a counterpart are ignored ("unused"). A leaf present in both with different shapes
    is a `CheckpointError` (the architectures differ). Only top-level modules of ``target`` are
    considered.
    """
    flat_t, flat_s = _flatten(target), _flatten(source)
    wrong = [
        f"{'/'.join(p)} {tuple(np.shape(flat_s[p]))} there, {tuple(np.shape(v))} here"
        for p, v in flat_t.items()
        if p in flat_s and np.shape(flat_s[p]) != np.shape(v)
    ]
    if wrong:
        more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise CheckpointError(
            "the parameters have a different architecture than config.model: "
            + "; ".join(wrong[:3])
            + more
        )
    merged = {
        p: (np.asarray(flat_s[p], dtype=v.dtype) if p in flat_s else v) for p, v in flat_t.items()
    }
    modules = sorted({p[0] for p in flat_t})
    taken = {}
    for m in modules:
        total = sum(_size(v) for p, v in flat_t.items() if p[0] == m)
        n = sum(_size(v) for p, v in flat_t.items() if p[0] == m and p in flat_s)
        if n:
            taken[m] = (n, total)
    in_modules = {p: v for p, v in flat_s.items() if p[0] in set(modules)}
    fresh = covering_subtrees({p for p in flat_t if p not in flat_s}, flat_t)
    unused = covering_subtrees({p for p in in_modules if p not in flat_t}, in_modules)

    def count(paths: list[KeyPath], flat: Mapping[KeyPath, Any]) -> dict[str, int]:
        return {
            "/".join(c): sum(_size(v) for p, v in flat.items() if p[: len(c)] == c) for c in paths
        }

    report = MergeReport(taken, count(fresh, flat_t), count(unused, in_modules))
    return _unflatten(merged), report
