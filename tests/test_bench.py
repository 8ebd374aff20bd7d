"""The regression suite gates against committed baselines and fails readably on a regression."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BASELINES = REPO / "results" / "baselines" / "bench.json"
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "harness.bench", *args],
        cwd=REPO,
        env=ENV,
        text=True,
        capture_output=True,
        timeout=1200,
        check=False,
    )


def test_perturbed_baseline_fails_with_a_readable_verdict(tmp_path):
    baselines = json.loads(BASELINES.read_text())
    key = "pixel-base/largest/params"
    baselines[key]["value"] += 1
    perturbed = tmp_path / "bench.json"
    perturbed.write_text(json.dumps(baselines))
    proc = bench("--only", "counts", "--baselines", str(perturbed), "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 1
    row = next(line for line in proc.stdout.splitlines() if line.startswith(key))
    assert row.split()[-1] == "REGRESSION" and "exact" in row
    assert "REGRESSION in 1 figure(s): pixel-base/largest/params" in proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["regression"] is True


@pytest.mark.slow
def test_full_bench_passes_against_committed_baselines(tmp_path):
    proc = bench("--report", str(tmp_path / "r.json"))
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert all(r["verdict"] in ("ok", "info") for r in rows)
    assert {r["metric"].split("/")[0] for r in rows} >= {
        "pixel-base",
        "pixel-ssr",
        "latency",
        "training",
        "quality",
    }
