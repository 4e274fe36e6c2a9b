"""Train-and-evaluate sweeps over config variants, collected into one table (paper Tables 3, 4, 7).

A sweep definition is an ml_collections file (``configs/sweeps/*.py``) whose ``get_config(arg)``
returns::

    name       "slots"                         the table's title
    base       "ivif.py" | "ivif.py:tiny"      the training config (relative to configs/)
    overrides  (("data.root", "..."), ...)     applied to every variant (dotted keys)
    variants   (variant(...), ...)             name, row label, overrides of each variant
    eval       (dataset(...), ...)             evaluation sets; () = the base config's val set
    columns    ("EN", "SD", "SCD", "SSIM", ...)  metrics of the table
    convention "ivif_zoo" | "cddfuse" | "vifb" | "tang"   metric conventions (optional)
    vars       ConfigDict                      free values that overrides reference as
                                               "@vars.key" (set them on the command line)

Run::

    python -m tokfusion_jax.sweep --sweep=configs/sweeps/slots.py --workdir=runs/sweep_slots \
        --set=tokenizer.path=weights/titok_l32 --set=data.root=data/MSRS/train

Each variant trains in ``WORKDIR/<name>`` with `trainer.train_and_evaluate` (which resumes from
its own checkpoints), is scored on every evaluation set by the benchmark evaluator
(`tokfusion_jax.evaluate`, native resolution, IVIF-ZOO conventions, per-image means), and then
gets a ``done.json`` marker (written atomically) holding its numbers. A rerun skips variants
whose marker matches their configuration, so an interrupted sweep resumes where it stopped. The
table goes to ``WORKDIR/results.{md,csv,json}``.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from tokfusion_jax import configlib, paths
from tokfusion_jax.configlib import apply_overrides
from tokfusion_jax.errors import ConfigError
from tokfusion_jax.probe import write_bytes_atomic, write_json

TABLE_COLUMNS = ("EN", "SD", "SCD", "SSIM", "EI", "SF", "AG")  # paper Tables 1/7 and 3/4
DONE_FILE = "done.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VAR_PREFIX = "@vars."


class SweepInterrupted(KeyboardInterrupt):
    """Training of a variant stopped on a signal; rerunning the sweep resumes it."""


# ----------------------------------------------------------------------------- definitions


def variant(name: str, label: str, overrides: Mapping[str, Any] | None = None) -> tuple:
    """One row of a sweep: ``(name, label, ((dotted_key, value), ...))`` (ConfigDict-safe)."""
    return (name, label, tuple((k, _freeze(v)) for k, v in (overrides or {}).items()))


def dataset(label: str, preset: str, root: str = "", max_pairs: int = 0) -> tuple:
    """One evaluation set: ``(label, preset, root, max_pairs)``; max_pairs 0 = all pairs."""
    return (label, preset, root, int(max_pairs))


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, list | tuple) else v


@dataclasses.dataclass(frozen=True)
class Variant:
    """A resolved sweep row."""

    name: str
    label: str
    overrides: tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A resolved evaluation set."""

    label: str
    preset: str
    root: str
    max_pairs: int


def load_sweep(spec: str) -> tuple[ml_collections.ConfigDict, pathlib.Path]:
    """Loads ``path/to/sweep.py[:arg]``; returns (sweep config, the file's path)."""
    path_text, _, arg = str(spec).partition(":")
    path = pathlib.Path(path_text).expanduser()
    module = _load_module(path, "sweep")
    try:
        cfg = module.get_config(arg or None)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg, path.resolve()


def _load_module(path: pathlib.Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} config file not found")
    module = configlib.load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a {what} config file must define get_config(arg)")
    return module


def base_config(sweep: ml_collections.ConfigDict, sweep_path: pathlib.Path):
    """The sweep's base training config; ``sweep.base`` is resolved against configs/."""
    path_text, _, arg = str(sweep.base).partition(":")
    path = pathlib.Path(path_text).expanduser()
    if not path.is_absolute():
        for root in (sweep_path.parent.parent, sweep_path.parent, pathlib.Path.cwd()):
            if (root / path).is_file():
                path = root / path
                break
    module = _load_module(path, "training")
    try:
        return module.get_config(arg or None)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def resolve(value: Any, sweep: ml_collections.ConfigDict, where: str) -> Any:
    """Replaces ``"@vars.key"`` strings (also inside tuples) with ``sweep.vars.key``."""
    if isinstance(value, tuple):
        return tuple(resolve(v, sweep, where) for v in value)
    if isinstance(value, str) and value.startswith(_VAR_PREFIX):
        node: Any = sweep.get("vars", ml_collections.ConfigDict())
        for part in value[len(_VAR_PREFIX) :].split("."):
            if not hasattr(node, "keys") or part not in node:
                raise ConfigError(f"{where}: {value!r} names no key of the sweep's vars")
            node = node[part]
        if node in ("", None):
            raise ConfigError(f"{where}: {value} is not set (pass --sweep.{value[1:]}=...)")
        return node
    return value


def parse_set(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=text"]`` -> ``[("a.b", 3), ("c", "text")]`` (Python literals or strings)."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set={item!r} must look like section.key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        out.append((key.strip(), _freeze(value)))
    return out


def variants_of(sweep: ml_collections.ConfigDict, where: str) -> list[Variant]:
    """The sweep's rows, validated (unique, path-safe names)."""
    rows, seen = [], set()
    for i, item in enumerate(sweep.variants):
        try:
            name, label, overrides = item
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: variants[{i}] must be variant(name, label, {{...}})"
            ) from None
        if not _NAME_RE.match(str(name)) or name in seen:
            raise ConfigError(f"{where}: variants[{i}] name {name!r} is not a unique folder name")
        seen.add(name)
        rows.append(Variant(str(name), str(label), tuple((str(k), v) for k, v in overrides)))
    if not rows:
        raise ConfigError(f"{where}: the sweep has no variants")
    return rows


def eval_sets(
    sweep: ml_collections.ConfigDict, config: ml_collections.ConfigDict, where: str
) -> list[EvalSet]:
    """The evaluation sets; () means the base config's validation set."""
    items = tuple(sweep.get("eval", ()))
    if not items:
        if not config.val.dataset:
            raise ConfigError(f"{where}: no eval sets and the base config has no val.dataset")
        items = (dataset(config.val.dataset, config.val.dataset, config.data.val_root, 0),)
    out = []
    for label, preset, root, max_pairs in items:
        out.append(
            EvalSet(str(label), str(preset), str(resolve(root, sweep, where)), int(max_pairs))
        )
    return out


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """sha256 of the variant's full training config (detects an edited sweep on resume)."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- evaluation


def evaluate_workdir(
    workdir: str | os.PathLike,
    sets: Sequence[EvalSet],
    *,
    names: Sequence[str] = TABLE_COLUMNS,
    convention: str = "ivif_zoo",
) -> dict[str, dict[str, float]]:
    """Scores a trained run on every set with the benchmark evaluator; per-set means.

    `tokfusion_jax.evaluate`: native resolution, fused images stretched and rounded to 8 bits as
    the references save them, A = infrared, B = visible, the IVIF-ZOO conventions by default.
    Returns {set label: {metric: mean, "pairs": count}}.
    """
    from tokfusion_jax import evaluate

    method = evaluate.parse_method(f"run={os.fspath(workdir)}")
    out: dict[str, dict[str, float]] = {}
    for s in sets:
        spec = evaluate.DatasetSpec(s.label, s.preset, s.root)
        rows = evaluate.evaluate(
            [method],
            [spec],
            names=tuple(names),
            convention=convention,
            limit=s.max_pairs or None,
            progress=False,
        )
        if not rows:
            raise ConfigError(f"eval set {s.label!r} ({s.preset} at {s.root!r}) has no pairs")
        entry = evaluate.summarize(rows, tuple(names))["run"][s.label]
        out[s.label] = {k: float(entry[k]) for k in names}
        out[s.label]["pairs"] = float(entry["n"])
    return out


# ----------------------------------------------------------------------------- runner

TrainFn = Callable[[ml_collections.ConfigDict, pathlib.Path], Any]
EvalFn = Callable[[pathlib.Path, Sequence[EvalSet]], Mapping[str, Mapping[str, float]]]


def _default_train(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Any:
    from tokfusion_jax import trainer

    return trainer.train_and_evaluate(config, workdir)


def run_sweep(
    sweep: ml_collections.ConfigDict,
    sweep_path: pathlib.Path,
    workdir: str | os.PathLike,
    *,
    extra_overrides: Sequence[tuple[str, Any]] = (),
    only: Sequence[str] = (),
    train_fn: TrainFn | None = None,
    eval_fn: EvalFn | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Trains and evaluates every (unfinished) variant; writes the table; returns its rows."""
    where = str(sweep_path)
    workdir = pathlib.Path(workdir).expanduser().absolute()
    train_fn = train_fn or _default_train
    columns = tuple(sweep.get("columns", TABLE_COLUMNS))
    convention = str(sweep.get("convention", "ivif_zoo"))
    eval_fn = eval_fn or (
        lambda d, sets: evaluate_workdir(d, sets, names=columns, convention=convention)
    )
    base = base_config(sweep, sweep_path)
    common = [(k, resolve(v, sweep, where)) for k, v in tuple(sweep.get("overrides", ()))]
    common += list(extra_overrides)
    base = apply_overrides(base, common, where)
    sets = eval_sets(sweep, base, where)
    rows = variants_of(sweep, where)
    unknown = sorted(set(only) - {v.name for v in rows})
    if unknown:
        raise ConfigError(f"--only names unknown variants {unknown} of {where}")

    # Resolve every variant before training anything: a typo fails in seconds, not hours.
    configs = {}
    for v in rows:
        vwhere = f"{where} variant {v.name!r}"
        resolved = [(k, resolve(val, sweep, vwhere)) for k, val in v.overrides]
        configs[v.name] = apply_overrides(base, resolved, vwhere)

    results = []
    for v in rows:
        vdir = workdir / v.name
        config = configs[v.name]
        fp = fingerprint(config)
        done = _read_done(vdir / DONE_FILE)
        if done is not None and done.get("fingerprint") != fp:
            raise ConfigError(
                f"{vdir / DONE_FILE}: finished with a different configuration than variant "
                f"{v.name!r} now has; use a new --workdir or delete {vdir}"
            )
        if done is None and (not only or v.name in only):
            log(f"[sweep] {v.name}: training in {vdir}")
            start = time.time()
            vdir.mkdir(parents=True, exist_ok=True)
            write_json(vdir / "sweep_config.json", config.to_dict())
            outcome = train_fn(config, vdir)
            if getattr(outcome, "interrupted", False):
                log(f"[sweep] {v.name}: training stopped (checkpoint saved); rerun to resume")
                raise SweepInterrupted(v.name)
            scores = {k: dict(m) for k, m in eval_fn(vdir, sets).items()}
            done = {
                "variant": v.name,
                "label": v.label,
                "overrides": [[k, _jsonable(val)] for k, val in v.overrides],
                "fingerprint": fp,
                "metrics": scores,
                "seconds": round(time.time() - start, 1),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            write_json(vdir / DONE_FILE, done)  # atomic: the marker is whole or absent
        elif done is not None:
            log(f"[sweep] {v.name}: done earlier, skipped")
        if done is not None:
            results.append(done)
    write_table(results, [s.label for s in sets], columns, workdir, title=str(sweep.name))
    return results


def _read_done(path: pathlib.Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # cannot happen with atomic writes; retrain rather than trust it


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# ----------------------------------------------------------------------------- table


def markdown_table(
    results: Sequence[Mapping[str, Any]], sets: Sequence[str], columns: Sequence[str], title: str
) -> str:
    """Rows = variants, column groups = evaluation sets; the best value of a column in bold."""
    header = ["Method"] + [f"{s} {c}" if len(sets) > 1 else c for s in sets for c in columns]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    best = {}
    for s in sets:
        for c in columns:
            vals = [r["metrics"].get(s, {}).get(c) for r in results]
            vals = [x for x in vals if x is not None]
            best[(s, c)] = max(vals) if vals else None
    for r in results:
        cells = [r["label"]]
        for s in sets:
            for c in columns:
                x = r["metrics"].get(s, {}).get(c)
                text = "-" if x is None else f"{x:.2f}"
                if x is not None and len(results) > 1 and x == best[(s, c)]:
                    text = f"**{text}**"
                cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    results: Sequence[Mapping[str, Any]],
    sets: Sequence[str],
    columns: Sequence[str],
    outdir: pathlib.Path,
    *,
    title: str,
) -> str:
    """Writes ``results.md``, ``results.csv`` (one row per variant and set) and ``results.json``."""
    md = markdown_table(results, sets, columns, title)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["variant", "label", "dataset", *columns])
    for r in results:
        for s in sets:
            m = r["metrics"].get(s, {})
            writer.writerow(
                [r["variant"], r["label"], s, *(f"{m[c]:.6f}" if c in m else "" for c in columns)]
            )
    outdir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(outdir / "results.md", md.encode())
    write_bytes_atomic(outdir / "results.csv", buffer.getvalue().encode())
    write_json(outdir / "results.json", {"title": title, "sets": list(sets), "rows": list(results)})
    return md


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> None:
    """CLI: ``python -m tokfusion_jax.sweep --sweep=FILE[:ARG] --workdir=DIR [--set=k=v]``."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    from absl import flags

    f = flags.FLAGS
    if not f.workdir:
        raise ConfigError("--workdir is required (one sub-folder per variant goes there)")
    if f.sweep is None:
        raise ConfigError("--sweep is required, e.g. --sweep=configs/sweeps/slots.py")
    paths.check_output_folder(f.workdir, "--workdir")
    spec = flags.FLAGS["sweep"].config_filename
    path = pathlib.Path(spec.partition(":")[0]).expanduser().resolve()
    only = [x for x in (f.only or "").split(",") if x]
    run_sweep(f.sweep, path, f.workdir, extra_overrides=parse_set(f.set or []), only=only)
    print(pathlib.Path(f.workdir, "results.md").read_text(), flush=True)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from tokfusion_jax.errors import run_absl

    config_flags.DEFINE_config_file("sweep", None, "sweep definition file[:arg]", lock_config=False)
    flags.DEFINE_string("workdir", None, "sweep folder (one sub-folder per variant)")
    flags.DEFINE_multi_string("set", [], "override of the base config, e.g. data.root=DIR")
    flags.DEFINE_string("only", "", "comma-separated variant names to run (default: all)")
    run_absl(main)
