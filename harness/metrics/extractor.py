"""The offline default feature extractor for FVD / KVD: ``proxy-v1``, a small supervised 3-D conv net.

The reference FVD network (I3D, Kinetics-400; :mod:`harness.metrics.i3d`) cannot be downloaded
offline. ``proxy-v1`` stands in for it: a four-layer 3-D convolutional network trained with one linear
head per caption attribute (colour, shape, direction, size) of the synthetic dataset
(:mod:`harness.data.synthetic`), so its features encode content (colour, shape, size) and motion
(direction). Numbers computed with it are *not* FVD in the I3D sense: every result records the
extractor name ``proxy-v1``, and numbers from different extractors must never be compared.

Preprocessing mirrors the I3D references (TATS / LVDM / cd-fvd resize to 224): every frame is resized
to ``32 x 32`` with bilinear interpolation (``align_corners=False``, no antialias, no crop); values
stay in [-1, 1]. T >= 8 frames are required; features are pooled over all T.

Architecture (``ProxyConfig`` defaults), input ``(B, 3, T, 32, 32)``:

    conv3d 3x3x3, stride (1, 2, 2), 24 ch  -> (B,  24, T,   16, 16)
    conv3d 3x3x3, stride (1, 2, 2), 48 ch  -> (B,  48, T,    8,  8)
    conv3d 3x3x3, stride (2, 2, 2), 96 ch  -> (B,  96, T/2,  4,  4)
    conv3d 3x3x3, stride (1, 1, 1), 128 ch -> (B, 128, T/2,  4,  4)
    global average pool over (T, H, W)     -> (B, 128)   <- the feature (``extract``)
    one linear head per attribute          -> (B, classes)

Each conv is followed by BatchNorm3d and SiLU. Batch norm (as in I3D), not a per-sample norm: at
inference it applies fixed running statistics, so features do not depend on the batch and keep the
absolute activation energy that noise and blur change (a per-sample GroupNorm normalised that away
and made FVD blind to noise up to std 0.2). The temporal receptive field of the last layer is 11
frames (3, 5, 7, 11), so a shape's motion over the clip is visible to every output unit.

The feature is the penultimate layer: the globally pooled 128-d output of the last conv block (after
its BatchNorm and SiLU), the input of the linear heads.

Files (``save_extractor`` / ``load_extractor``): ``model.safetensors`` (float16 weights) and
``extractor.json`` (name, config, training command, dataset identity, heldout accuracy, sha256 of
the weights file), under ``results/extractor/proxy-v1/`` for the shipped one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from harness.data import ATTRIBUTES

PROXY_NAME = "proxy-v1"  # name + version, recorded with every result computed with this extractor
MIN_FRAMES = 8  # shortest clip the extractor accepts
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "extractor.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXTRACTOR_DIR = REPO_ROOT / "results" / "extractor" / PROXY_NAME


@dataclass(frozen=True)
class ProxyConfig:
    """Architecture of the proxy extractor; saved in ``extractor.json`` and rebuilt from it."""

    channels: tuple[int, ...] = (24, 48, 96, 128)  # output channels of the conv layers
    temporal_strides: tuple[int, ...] = (1, 1, 2, 1)  # time stride of each conv layer
    spatial_strides: tuple[int, ...] = (2, 2, 2, 1)  # height / width stride of each conv layer
    resolution: int = 32  # every frame is resized to resolution x resolution
    classes: dict[str, int] = field(default_factory=lambda: {k: len(v) for k, v in ATTRIBUTES.items()})

    @property
    def feature_dim(self) -> int:
        return self.channels[-1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProxyConfig:
        tuples = ("channels", "temporal_strides", "spatial_strides")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})


def check_frames(num_frames: int) -> None:
    """Raise a one-line ValueError when a clip is too short for the proxy extractor."""
    if num_frames < MIN_FRAMES:
        raise ValueError(
            f"the {PROXY_NAME} extractor needs at least {MIN_FRAMES} frames per video, got {num_frames}"
        )


def preprocess(videos: torch.Tensor, resolution: int = 32) -> torch.Tensor:
    """Videos ``(B, 3, T, H, W)`` in [-1, 1] -> float32 ``(B, 3, T, resolution, resolution)``.

    Bilinear resize of every frame, ``align_corners=False``, no antialias, no crop (as the I3D
    references TATS / LVDM / cd-fvd resize to 224). Values are not clamped.
    """
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be (B, 3, T, H, W), got shape {tuple(videos.shape)}")
    batch, channels, frames, height, width = videos.shape
    check_frames(frames)
    x = videos.to(torch.float32)
    if (height, width) == (resolution, resolution):
        return x.contiguous()
    x = x.transpose(1, 2).reshape(batch * frames, channels, height, width)  # (B*T, 3, H, W)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False)
    return x.reshape(batch, frames, channels, resolution, resolution).transpose(1, 2).contiguous()


class ProxyVideoNet(nn.Module):
    """The proxy network: preprocessed ``(B, 3, T, R, R)`` -> features ``(B, D)``; ``heads`` give logits."""

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels, t_stride, s_stride in zip(
            config.channels, config.temporal_strides, config.spatial_strides, strict=True
        ):
            layers += [
                nn.Conv3d(
                    in_channels, out_channels, 3, (t_stride, s_stride, s_stride), padding=1, bias=False
                ),
                nn.BatchNorm3d(out_channels),
                nn.SiLU(),
            ]
            in_channels = out_channels
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(config.feature_dim, n) for name, n in config.classes.items()}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(B, 3, T, R, R)`` -> pooled features ``(B, D)`` (the penultimate layer)."""
        return self.body(x).mean(dim=(2, 3, 4))  # (B, D, T', R', R') -> (B, D)

    def logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features ``(B, D)`` -> ``{attribute: (B, classes)}`` logits."""
        return {name: head(features) for name, head in self.heads.items()}


class ProxyExtractor:
    """Inference wrapper: ``extract(videos) -> (B, D)``, ``predict_attributes(videos) -> {attr: (B,)}``.

    Contract: ``videos`` is ``(B, 3, T, H, W)`` in [-1, 1], any H, W, T >= 8; results are float32 /
    int64 on the CPU, deterministic, batch-independent, computed without gradients in batches of
    ``batch_size`` videos on the network's device.
    """

    def __init__(self, network: ProxyVideoNet, metadata: Mapping[str, Any] | None = None) -> None:
        self.network = network.eval()
        self.metadata = dict(metadata or {})  # contents of extractor.json (empty for an untrained net)
        self.name = str(self.metadata.get("name", PROXY_NAME))
        self.feature_dim = network.config.feature_dim

    @property
    def device(self) -> torch.device:
        return next(iter(self.network.parameters())).device

    def to(self, device: torch.device | str) -> ProxyExtractor:
        self.network.to(device)
        return self

    @torch.inference_mode()
    def _features(self, videos: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Features ``(B, D)`` on the network's device."""
        if videos.ndim != 5:
            raise ValueError(f"videos must be (B, 3, T, H, W), got shape {tuple(videos.shape)}")
        check_frames(videos.shape[2])
        resolution = self.network.config.resolution
        chunks = [
            self.network(preprocess(videos[start : start + batch_size].to(self.device), resolution))
            for start in range(0, videos.shape[0], batch_size)
        ]
        return torch.cat(chunks, dim=0)

    def extract(self, videos: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Videos ``(B, 3, T, H, W)`` in [-1, 1] -> penultimate-layer features ``(B, D)``, float32 CPU."""
        return self._features(videos, batch_size).float().cpu()

    @torch.inference_mode()
    def predict_attributes(self, videos: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Videos ``(B, 3, T, H, W)`` in [-1, 1] -> ``{attribute: (B,) int64}`` predicted class indices."""
        logits = self.network.logits(self._features(videos, batch_size))
        return {name: value.argmax(dim=1).cpu() for name, value in logits.items()}


def attribute_accuracy(
    extractor: ProxyExtractor, videos: torch.Tensor, labels: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """Fraction of videos ``(B, 3, T, H, W)`` whose predicted class equals ``labels[attr]`` ``(B,)``."""
    predicted = extractor.predict_attributes(videos)
    return {name: float((predicted[name] == labels[name].cpu()).float().mean()) for name in labels}


# ---------------------------------------------------------------------------------------------------
# Save / load.


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _replace_atomically(destination: Path, write: Any) -> None:
    """Call ``write(temp_path)`` on a temporary file beside ``destination``, then ``os.replace`` it."""
    handle, temp_name = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"
    )
    os.close(handle)
    try:
        write(temp_name)
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600; shipped files are world-readable
        os.replace(temp_name, destination)
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)


def half_precision_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state dict on the CPU, floating tensors as float16 (the stored form)."""
    return {
        k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in network.state_dict().items()
    }


def save_extractor(
    network: ProxyVideoNet, out_dir: str | os.PathLike[str], metadata: Mapping[str, Any]
) -> Path:
    """Write ``model.safetensors`` (float16) and ``extractor.json`` into ``out_dir``, each atomically.

    ``metadata`` (training command, dataset identity, heldout accuracy, ...) is stored with the
    name, config, feature layer and the sha256 of the weights file added. Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = half_precision_state(network)
    _replace_atomically(
        out / WEIGHTS_FILE, lambda temp: save_file(state, temp, metadata={"name": PROXY_NAME})
    )
    record = {
        "name": PROXY_NAME,
        "config": network.config.to_dict(),
        "feature_layer": "global average pool of the last conv block (penultimate layer, input of the heads)",
        "feature_dim": network.config.feature_dim,
        "storage_dtype": "float16",
        **dict(metadata),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": file_sha256(out / WEIGHTS_FILE),
    }
    text = json.dumps(record, indent=2, sort_keys=False) + "\n"
    _replace_atomically(out / METADATA_FILE, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return out


def load_extractor(
    path: str | os.PathLike[str] | None = None,  # folder with extractor.json; None: the shipped proxy-v1
    device: torch.device | str = "cpu",
) -> ProxyExtractor:
    """Load a saved proxy extractor (float16 weights -> float32), checking the weights' sha256."""
    folder = Path(path) if path is not None else DEFAULT_EXTRACTOR_DIR
    meta_path, weights_path = folder / METADATA_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"no proxy extractor at {folder} (needs {METADATA_FILE} and {WEIGHTS_FILE}); "
            f"train one with python -m harness.metrics.train_extractor --out {folder}"
        )
    metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    actual = file_sha256(weights_path)
    if actual != metadata.get("weights_sha256"):
        raise ValueError(
            f"{weights_path} has sha256 {actual}, but {meta_path.name} records {metadata.get('weights_sha256')}"
        )
    with torch.device("cpu"):  # built where its weights are read, then moved: never on a default device
        network = ProxyVideoNet(ProxyConfig.from_dict(metadata["config"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights_path)).items()}
    network.load_state_dict(state, strict=True)
    return ProxyExtractor(network, metadata).to(device)
