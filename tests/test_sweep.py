"""Sweep runner: variants, overrides, resume after interruption, the results table."""

import csv
import json
import pathlib

import pytest

from tokfusion_jax import sweep
from tokfusion_jax.errors import ConfigError

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "sweeps" / "tiny.py"


def _fake_eval(values):
    def eval_fn(workdir, sets):
        cfg = json.loads((workdir / "sweep_config.json").read_text())
        base = values[cfg["model"]["use_ste"]]
        return {s.label: {c: base + i for i, c in enumerate(sweep.TABLE_COLUMNS)} for s in sets}

    return eval_fn


def test_resume_skips_finished_variants_and_writes_table(tmp_path):
    cfg, path = sweep.load_sweep(str(TINY))
    calls = []

    def interrupted_train(config, workdir):
        calls.append(workdir.name)
        if workdir.name == "no_ste":
            raise KeyboardInterrupt  # the sweep is killed while training the second variant

    eval_fn = _fake_eval({True: 10.0, False: 5.0})
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg, path, tmp_path, train_fn=interrupted_train, eval_fn=eval_fn)
    assert calls == ["ste", "no_ste"]
    assert (tmp_path / "ste" / "done.json").is_file()
    assert not (tmp_path / "no_ste" / "done.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))

    calls.clear()
    rows = sweep.run_sweep(
        cfg, path, tmp_path, train_fn=lambda c, d: calls.append(d.name), eval_fn=eval_fn
    )
    assert calls == ["no_ste"]  # the finished variant was skipped
    assert [r["variant"] for r in rows] == ["ste", "no_ste"]
    md = (tmp_path / "results.md").read_text()
    assert "| Method | EN | SD | SCD | SSIM | EI | SF | AG |" in md
    assert "| with STE | **10.00** | **11.00** |" in md
    assert "| w/o STE | 5.00 | 6.00 |" in md
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["variant"], r["dataset"], float(r["AG"])) for r in table] == [
        ("ste", "samples", 16.0),
        ("no_ste", "samples", 11.0),
    ]

    # A third run trains nothing; an edited variant is refused instead of silently reused.
    calls.clear()
    sweep.run_sweep(
        cfg, path, tmp_path, train_fn=lambda c, d: calls.append(d.name), eval_fn=eval_fn
    )
    assert calls == []
    with pytest.raises(ConfigError, match="different configuration"):
        sweep.run_sweep(
            cfg,
            path,
            tmp_path,
            extra_overrides=[("optim.lr", 0.5)],
            train_fn=lambda c, d: None,
            eval_fn=eval_fn,
        )


def test_overrides_and_variables():
    cfg, path = sweep.load_sweep(str(TINY))
    base = sweep.base_config(cfg, path)
    out = sweep.apply_overrides(base, [("model.ste.positions", [3, 5]), ("optim.lr", 0.1)], "t")
    assert out.model.ste.positions == (3, 5) and out.optim.lr == 0.1
    assert base.optim.lr != 0.1  # the base is not modified
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        sweep.apply_overrides(base, [("optim.lrr", 1.0)], "t")
    with pytest.raises(ConfigError, match="no section 'optimm'"):
        sweep.apply_overrides(base, [("optimm.lr", 1.0)], "t")
    with pytest.raises(ConfigError, match="optim.lr"):
        sweep.apply_overrides(base, [("optim.lr", "fast")], "t")
    cfg.vars.tok = ""
    with pytest.raises(ConfigError, match="@vars.tok is not set"):
        sweep.resolve("@vars.tok", cfg, "t")
    cfg.vars.tok = "/ckpt/l32"
    assert sweep.resolve(("a", "@vars.tok"), cfg, "t") == ("a", "/ckpt/l32")
    assert sweep.parse_set(["data.root=/x", "optim.lr=3e-4", "model.ste.positions=(1, 2)"]) == [
        ("data.root", "/x"),
        ("optim.lr", 3e-4),
        ("model.ste.positions", (1, 2)),
    ]
    with pytest.raises(ConfigError, match="--set"):
        sweep.parse_set(["nonsense"])


@pytest.mark.parametrize("name", ["slots", "positions", "tokens", "baselines"])
def test_paper_sweeps_resolve(name, tmp_path):
    cfg, path = sweep.load_sweep(str(CONFIGS / "sweeps" / f"{name}.py"))
    rows = sweep.variants_of(cfg, str(path))
    assert len(rows) >= 2
    for key in list(cfg.vars.keys()):
        if not cfg.vars[key]:
            cfg.vars[key] = f"/placeholder/{key}"
    base = sweep.base_config(cfg, path)
    for v in rows:
        resolved = [(k, sweep.resolve(x, cfg, v.name)) for k, x in v.overrides]
        sweep.apply_overrides(base, resolved, v.name)  # every key exists in the training config


def test_markdown_table_marks_best_per_column():
    rows = [
        {"variant": "a", "label": "A", "metrics": {"m3fd": {"EN": 7.0, "SD": 40.0}}},
        {"variant": "b", "label": "B", "metrics": {"m3fd": {"EN": 7.2, "SD": 30.0}}},
    ]
    md = sweep.markdown_table(rows, ["m3fd"], ["EN", "SD"], "t")
    assert "| A | 7.00 | **40.00** |" in md
    assert "| B | **7.20** | 30.00 |" in md
