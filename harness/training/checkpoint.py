"""Training checkpoints: safetensors (weights, EMA, optimizer state) + JSON metadata, written atomically.

A checkpoint is a directory ``<run>/checkpoint``. It is written to a temporary sibling, then swapped in by
renames; a kill at any moment leaves either the new or the previous checkpoint (``checkpoint.old``)
loadable. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "config.json", "training.json")


class CheckpointError(ValueError):
    pass


def _tensors(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in d.items()}


def save_checkpoint(
    run_dir: str | Path,
    *,
    model_state: dict,
    ema_state: dict,
    optimizer_state: dict,
    config: dict,
    training: dict,
) -> Path:
    """Write ``<run_dir>/checkpoint`` atomically and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final, old, tmp = run_dir / "checkpoint", run_dir / "checkpoint.old", run_dir / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_tensors(model_state), str(tmp / "model.safetensors"))
    save_file(_tensors(ema_state), str(tmp / "ema.safetensors"))
    save_file(_tensors(optimizer_state), str(tmp / "optimizer.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    (tmp / "training.json").write_text(json.dumps(training, indent=1, sort_keys=True))
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (``checkpoint``, else ``checkpoint.old``), or None."""
    for name in ("checkpoint", "checkpoint.old"):
        path = Path(run_dir) / name
        if all((path / f).is_file() for f in FILES):
            return path
    return None


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)})")
    return {
        "model": load_file(str(path / "model.safetensors")),
        "ema": load_file(str(path / "ema.safetensors")),
        "optimizer": load_file(str(path / "optimizer.safetensors")),
        "config": json.loads((path / "config.json").read_text()),
        "training": json.loads((path / "training.json").read_text()),
    }
