"""Shipped artifacts under results/: small, each produced by a command recorded beside it."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUDGET = 25 * 1024 * 1024


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "results"], cwd=REPO, text=True, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / line for line in out.stdout.splitlines() if line]


def test_shipped_results_fit_the_budget():
    files = _tracked()
    total = sum(f.stat().st_size for f in files if f.is_file())
    assert files and total <= BUDGET, f"results/ ships {total / 2**20:.1f} MiB, over 25 MiB"


def test_every_shipped_model_records_its_command():
    for weights in (f for f in _tracked() if f.suffix == ".safetensors"):
        folder = weights.parent
        assert any((d / "command.txt").is_file() for d in (folder, folder.parent)), f"{folder} has no command.txt"
