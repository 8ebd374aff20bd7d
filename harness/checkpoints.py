"""Finding and loading models: shipped supernets, training checkpoints, extracted subnets.

Everything loads through safetensors + JSON (nothing is unpickled). A *model directory* is one of:
- a supernet saved with ``save_pretrained`` (``config.json`` kind ``supernet``), e.g. the shipped ones;
- a training run or its ``checkpoint`` folder (EMA weights are used);
- an extracted subnet (kind ``subnet``) written by ``harness.export``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from harness.diffusion import NoiseSchedule
from search_spaces import Supernet, VideoUNet, build_supernet, load_static, load_supernet
from search_spaces.plan import UNetHyper

RESULTS = Path(__file__).resolve().parent.parent / "results"
DEFAULT_BASE = RESULTS / "checkpoints" / "pixel-base-tiny"
DEFAULT_SSR = RESULTS / "checkpoints" / "pixel-ssr-tiny"


def _checkpoint_dir(path: Path) -> Path | None:
    for candidate in (path, path / "checkpoint", path / "checkpoint.old"):
        if (candidate / "ema.safetensors").is_file() and (candidate / "config.json").is_file():
            return candidate
    return None


def load_model(path: str | Path, use_ema: bool = True) -> Supernet | VideoUNet:
    """Load a supernet or an extracted subnet from a model directory (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass --checkpoint with a model directory "
                                f"(the shipped ones are under {RESULTS / 'checkpoints'})")
    ckpt = _checkpoint_dir(path)
    if ckpt is not None:
        config = json.loads((ckpt / "config.json").read_text())
        net = build_supernet(config["family"], config["preset"], hyper=UNetHyper.from_dict(config["hyper"]))
        weights = load_file(str(ckpt / "model.safetensors"))
        if use_ema:
            ema = load_file(str(ckpt / "ema.safetensors"))
            weights.update({k[: -len(".ema")]: v for k, v in ema.items() if k.endswith(".ema")})
        net.load_state_dict(weights)
        net.checkpoint_dir = ckpt
        return net.eval()
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} holds no model (no config.json); pass a model directory")
    kind = json.loads(config_path.read_text()).get("kind")
    model = load_supernet(path) if kind == "supernet" else load_static(path)
    model.checkpoint_dir = path
    return model.float().eval()


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over a model directory's weight files (identifies a supernet in the store)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _recorded_metadata(model):
    """The JSON metadata saved beside a model's weights: a run's ``training.json``, then ``config.json``."""
    directory = getattr(model, "checkpoint_dir", None)
    for name in ("training.json", "config.json"):
        f = Path(directory) / name if directory else None
        if f is not None and f.is_file():
            yield json.loads(f.read_text())


def text_encoder_name(model) -> str:
    """The text encoder a model was trained with (recorded beside its weights); 'minilm' by default."""
    for meta in _recorded_metadata(model):
        enc = meta.get("text_encoder_name") or meta.get("options", {}).get("text_encoder")
        if enc:
            return enc
    return "minilm"


def noise_schedule_of(model) -> NoiseSchedule:
    """The noise schedule a model was trained on (recorded beside its weights); the paper's setting,
    epsilon on the cosine schedule, for models saved before schedules were recorded."""
    for meta in _recorded_metadata(model):
        if "noise_schedule" in meta:
            return NoiseSchedule.from_dict(meta["noise_schedule"])
    return NoiseSchedule()


def training_provenance(model) -> dict:
    """What a subnet extracted from ``model`` must carry to be sampled like it (see ``save_static``)."""
    return {"text_encoder_name": text_encoder_name(model),
            "noise_schedule": noise_schedule_of(model).to_dict()}


def _trained_steps(directory: str | Path) -> int | None:
    """All steps behind a saved supernet or a training run: its own plus, when it was itself trained from
    one, its init's."""
    ckpt = _checkpoint_dir(Path(directory))
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


def export_supernet(run_or_checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a training run's EMA supernet as a shippable ``save_pretrained`` directory (fp16 by default)."""
    from search_spaces.unet import save_module

    net = load_model(run_or_checkpoint)
    meta = json.loads((net.checkpoint_dir / "training.json").read_text())
    schedule = NoiseSchedule.from_dict(meta.get("noise_schedule"))
    config = net.config_dict() | {"text_encoder_name": meta["options"]["text_encoder"],
                                  "trained_steps": meta["step"], "text_encoder": meta["text_encoder"],
                                  "noise_schedule": schedule.to_dict()}
    if meta.get("init"):  # trained further from another supernet: its steps come on top of these
        config["init"] = meta["init"] | {"trained_steps": _trained_steps(meta["init"]["path"])}
    save_module(net.to(dtype), out, config)
    from harness.latent import FOLDER, find_codec

    codec = find_codec(net)
    if codec is not None:  # the autoencoder stays fp32 (it is small and decodes every generated video)
        codec.save(Path(out) / FOLDER)
    return Path(out)
