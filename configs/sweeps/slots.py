"""Slot-budget ablation (paper Table 7): STE on the probe's top 1-4 positions vs the 2D baseline.

Probe a trained run first (``python -m tokfusion_jax.probe --workdir=runs/ivif``), then::

    python -m tokfusion_jax.sweep --sweep=configs/sweeps/slots.py:runs/ivif/probe/probe.json \
        --workdir=runs/sweep_slots --sweep.vars.m3fd_root=data/M3FD \
        --set=tokenizer.path=weights/titok_l32 --set=data.root=data/MSRS/train

The argument is the probe's ``probe.json``: slot budget k uses the positions that the probe's
k-slot selector chose, and the channels it ranked. Without it only budgets 1 and 2 run, with the
paper's TiTok-L-32 positions (12; 12 and 18) and channels 6, 7, 8.
"""

from __future__ import annotations

import json
import pathlib

import ml_collections

from tokfusion_jax.sweep import dataset, variant

PAPER = {1: (12,), 2: (12, 18)}
PAPER_CHANNELS = (6, 7, 8)


def _budgets(probe_json: str) -> tuple[dict[int, tuple[int, ...]], tuple[int, ...]]:
    if not probe_json:
        return PAPER, PAPER_CHANNELS
    report = json.loads(pathlib.Path(probe_json).expanduser().read_text())
    positions = {int(k): tuple(sorted(v["positions"])) for k, v in report["budgets"].items()}
    return positions, tuple(report["ste"]["channels"])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: the probe's probe.json (optional)."""
    budgets, channels = _budgets(arg or "")
    c = ml_collections.ConfigDict()
    c.name = "Slot-budget ablation of Gumbel-Softmax position selection (paper Table 7)"
    c.base = "ivif.py"
    c.overrides = ()
    rows = [variant("cddfuse_2d", "2D baseline, no tokens (0 slots)", {"model.use_tokens": False})]
    for k in sorted(budgets):
        rows.append(
            variant(
                f"slot{k}",
                f"Slot {k}: positions {', '.join(map(str, budgets[k]))}",
                {
                    "model.use_tokens": True,
                    "model.use_ste": True,
                    "model.ste.positions": budgets[k],
                    "model.ste.channels": channels,
                },
            )
        )
    c.variants = tuple(rows)
    c.vars = ml_collections.ConfigDict()
    c.vars.m3fd_root = ""  # the M3FD test folder (ir/ + vi/)
    c.eval = (dataset("M3FD", "m3fd", "@vars.m3fd_root"),)

    c.columns = ("EN", "SD", "SCD", "SSIM")
    return c
