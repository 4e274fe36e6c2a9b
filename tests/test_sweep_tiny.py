"""The sweep CLI with the real trainer and evaluator: interrupted by SIGTERM, then resumed."""

import csv
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One CPU device (the tiny sweep's batch of 4 needs no fake devices), the suite's fast-compile
    # flags and its compilation cache (tests/conftest.py): both variants compile the same graphs
    # (they differ by seed), the second one reuses the first one's executables.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.heavy(seconds=100)
def test_tiny_sweep_interrupted_then_resumed(tmp_path):
    workdir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "tokfusion_jax.sweep",
        f"--sweep={REPO / 'configs' / 'sweeps' / 'tiny.py'}:seeds",
        f"--workdir={workdir}",
    ]
    env = _env()
    first_done = workdir / "seed0" / "done.json"
    with open(tmp_path / "run1.log", "w") as log1:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not first_done.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        if not first_done.exists():
            proc.kill()
        assert first_done.exists(), (tmp_path / "run1.log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)  # stop the sweep while the second variant starts
        assert proc.wait(timeout=300) != 0
    assert not (workdir / "seed1" / "done.json").exists()
    first = json.loads(first_done.read_text())

    run2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run2.returncode == 0, run2.stdout[-3000:] + run2.stderr[-3000:]
    assert "seed0: done earlier, skipped" in run2.stdout
    assert json.loads(first_done.read_text()) == first  # not retrained
    assert (workdir / "seed1" / "export" / "export.json").is_file()
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["seed0", "seed1"]
    for r in rows:
        assert r["dataset"] == "samples"
        values = {k: float(r[k]) for k in ("EN", "SD", "SCD", "SSIM", "EI", "SF", "AG")}
        assert 0 < values["EN"] <= 8 and values["SD"] > 0 and values["EI"] > 0, values
        assert 0 < values["SSIM"] <= 2, values
    md = (workdir / "results.md").read_text()
    assert "| Method | EN | SD | SCD | SSIM | EI | SF | AG |" in md and "| seed 1 |" in md
    assert md in run2.stdout
