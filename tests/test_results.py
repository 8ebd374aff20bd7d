"""Shipped artifacts under results/: small, each produced by a command recorded beside it."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUDGET = 25 * 1024 * 1024


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "results"], cwd=REPO, text=True, capture_output=True, check=True
        )
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
        assert any((d / "command.txt").is_file() for d in (folder, folder.parent)), (
            f"{folder} has no command.txt"
        )


def test_shipped_supernets_record_all_their_training_steps():
    """config.json's trained_steps (+ the steps behind its init) equals the last step of its training log."""
    import json

    for config in (REPO / "results" / "checkpoints").glob("*/config.json"):
        log = config.parent / "train_log.jsonl"
        if not log.is_file():
            continue
        meta = json.loads(config.read_text())
        total = meta["trained_steps"] + (meta.get("init") or {}).get("trained_steps", 0)
        last = max(json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip())
        assert total == last, (
            f"{config.parent.name}: config says {total} steps, train_log.jsonl ends at {last}"
        )
