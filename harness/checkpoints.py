"""Training-run bookkeeping beside the model loader: a run's total steps, and exporting its EMA supernet.

Loading lives in ``harness.models`` (``load_bundle``); ``load_model`` here is the old entry point, kept
for scripts that want the bare network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.diffusion import NoiseSchedule
from harness.models import checkpoint_hash, load_bundle, training_checkpoint_dir  # noqa: F401  (old home)
from harness.paths import DEFAULT_BASE, DEFAULT_SSR, RESULTS  # noqa: F401  (old home of these names)
from search_spaces import Supernet, VideoUNet


def load_model(path: str | Path, use_ema: bool = True) -> Supernet | VideoUNet:
    """The network of ``load_bundle(path)`` (without its provenance: prefer ``load_bundle``)."""
    return load_bundle(path, use_ema).network


def _trained_steps(directory: str | Path) -> int | None:
    """All steps behind a saved supernet or a training run: its own plus, when it was itself trained from
    one, its init's."""
    ckpt = training_checkpoint_dir(Path(directory))
    if ckpt is not None and (ckpt / "training.json").is_file():  # a run: count on through its own init
        meta = json.loads((ckpt / "training.json").read_text())
        before = _trained_steps(meta["init"]["path"]) if meta.get("init") else 0
        return meta["step"] + before if before is not None else None
    config = Path(directory) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    steps = data.get("trained_steps")
    before = (data.get("init") or {}).get("trained_steps")
    return steps + before if steps is not None and before is not None else steps


def export_supernet(
    run_or_checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write a training run's EMA supernet as a shippable ``save_pretrained`` directory (fp16 by default)."""
    from harness.latent import FOLDER
    from search_spaces.unet import save_module

    bundle = load_bundle(run_or_checkpoint)
    net = bundle.supernet
    meta = json.loads((bundle.directory / "training.json").read_text())
    schedule = NoiseSchedule.from_dict(meta.get("noise_schedule"))
    config = net.config_dict() | {
        "text_encoder_name": meta["options"]["text_encoder"],
        "trained_steps": meta["step"],
        "text_encoder": meta["text_encoder"],
        "noise_schedule": schedule.to_dict(),
    }
    if meta.get("init"):  # trained further from another supernet: its steps come on top of these
        config["init"] = meta["init"] | {"trained_steps": _trained_steps(meta["init"]["path"])}
    save_module(net.to(dtype), out, config)
    if bundle.codec is not None:  # the autoencoder stays fp32 (it is small and decodes every generated video)
        bundle.codec.save(Path(out) / FOLDER)
    return Path(out)
