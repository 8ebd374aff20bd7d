"""I3D (Inception-v1 3-D, Kinetics-400) feature extractor for FVD / KVD.

The network follows the pytorch-i3d layout used by VideoGPT / TATS / LVDM (``InceptionI3d``), so the
converted tf-hub checkpoint ``i3d_pretrained_400.pt`` loads into it with every key matched. That file is a
plain dict of 287 tensors built from the tf-hub variables (TATS ``convert_tf_pretrained.py``): per unit
``{unit}.conv3d.weight`` and ``{unit}.bn.{weight,bias,running_mean,running_var}`` (``bn.weight`` all
ones, TF used no scale), plus ``logits.conv3d.{weight,bias}``; it has no ``num_batches_tracked``. Batch
norm here is frozen (inference only) and has none either; a pytorch-i3d state dict that carries
``num_batches_tracked`` still loads (the counters are dropped).

Features (the reference FVD convention): the 400-d pre-softmax logits averaged over time, ``(B, 400)``.

Batch-norm epsilon: the tf-hub model (google-research ``frechet_video_distance``) uses 1e-3, the
default here; the VideoGPT / TATS / LVDM PyTorch ports construct ``BatchNorm3d(eps=1e-5)``. Pass
``bn_eps=1e-5`` to reproduce numbers from those codebases.

``load_i3d`` wraps either this network (state-dict file) or StyleGAN-V's TorchScript port
``i3d_torchscript.pt`` behind one ``I3DFeatureExtractor.extract(videos, input_range=...)``.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MIN_FRAMES = 9  # three temporal stride-2 stages (16 -> 8 -> 4 -> 2) then a temporal average pool of 2
RESOLUTION = 224  # frames are resized to 224 x 224 before the network
NUM_CLASSES = 400

# Inception block name -> (input channels, [b0, b1a, b1b, b2a, b2b, b3b] output channels).
INCEPTION_CHANNELS: dict[str, tuple[int, tuple[int, ...]]] = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


def check_frames(num_frames: int) -> None:
    """Raise a one-line ValueError when a clip is too short for I3D."""
    if num_frames < MIN_FRAMES:
        raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per video, got {num_frames}")


def _same_padding(sizes: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """TF "SAME" padding for input sizes ``(T, H, W)`` as an ``F.pad`` list ``[w0, w1, h0, h1, t0, t1]``.

    total = max((ceil(s / stride) - 1) * stride + k - s, 0), the smaller half in front (TensorFlow).
    """
    pad: list[int] = []
    for size, k, s in reversed(list(zip(sizes, kernel, stride))):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pad += [total // 2, total - total // 2]
    return pad


class FrozenBatchNorm3d(nn.Module):
    """Inference-only batch norm over ``(B, C, T, H, W)``: y = (x - mean) / sqrt(var + eps) * weight + bias.

    State dict keys ``weight, bias, running_mean, running_var`` (as ``nn.BatchNorm3d`` minus
    ``num_batches_tracked``, which is dropped when present in a loaded state dict).
    """

    def __init__(self, num_channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_channels))
        self.register_buffer("bias", torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))

    def _load_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object, **kwargs: object
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class Unit3D(nn.Module):
    """SAME-padded Conv3d, then optional frozen batch norm and ReLU (pytorch-i3d ``Unit3D``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        bn_eps: float | None = 1e-3,  # None: no batch norm, conv with bias, no ReLU (the logits unit)
    ) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=bn_eps is None)
        self.bn = FrozenBatchNorm3d(out_channels, bn_eps) if bn_eps is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_padding(tuple(x.shape[2:]), self.kernel, self.stride))
        x = self.conv3d(x)
        if self.bn is None:
            return x
        return F.relu(self.bn(x))


class MaxPool3dSame(nn.Module):
    """Max pool with TF "SAME" padding. Pads with zeros as pytorch-i3d does; every pooled tensor is
    post-ReLU (>= 0), so this equals TensorFlow's padding-ignoring max pool."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_padding(tuple(x.shape[2:]), self.kernel, self.stride))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four-branch Inception block; output channels b0 + b1b + b2b + b3b."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], bn_eps: float) -> None:
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = channels
        self.b0 = Unit3D(in_channels, c0, bn_eps=bn_eps)
        self.b1a = Unit3D(in_channels, c1a, bn_eps=bn_eps)
        self.b1b = Unit3D(c1a, c1b, kernel=(3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(in_channels, c2a, bn_eps=bn_eps)
        self.b2b = Unit3D(c2a, c2b, kernel=(3, 3, 3), bn_eps=bn_eps)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, c3b, bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))]
        return torch.cat(branches, dim=1)


class InceptionI3d(nn.Module):
    """Inception-v1 I3D (Carreira & Zisserman 2017) up to the Kinetics logits, pytorch-i3d layout.

    Input ``(B, 3, T, 224, 224)`` in [-1, 1] with T >= 9; output ``(B, num_classes)``: pre-softmax
    logits of each temporal window of the final ``AvgPool3d((2, 7, 7))``, averaged over time.
    Deterministic (no dropout, frozen batch norm), so train/eval mode does not matter.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3, bn_eps: float = 1e-3) -> None:
        super().__init__()
        self.num_classes, self.in_channels, self.bn_eps = num_classes, in_channels, bn_eps
        layers: list[tuple[str, nn.Module]] = [
            ("Conv3d_1a_7x7", Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2), bn_eps)),
            ("MaxPool3d_2a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
            ("Conv3d_2b_1x1", Unit3D(64, 64, bn_eps=bn_eps)),
            ("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3), bn_eps=bn_eps)),
            ("MaxPool3d_3a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
        ]
        for name, (block_in, block_channels) in INCEPTION_CHANNELS.items():
            if name == "Mixed_4b":
                layers.append(("MaxPool3d_4a_3x3", MaxPool3dSame((3, 3, 3), (2, 2, 2))))
            if name == "Mixed_5b":
                layers.append(("MaxPool3d_5a_2x2", MaxPool3dSame((2, 2, 2), (2, 2, 2))))
            layers.append((name, InceptionModule(block_in, block_channels, bn_eps)))
        self.layer_names = [name for name, _ in layers]
        for name, layer in layers:
            self.add_module(name, layer)
        self.avg_pool = nn.AvgPool3d(kernel_size=(2, 7, 7), stride=(1, 1, 1))
        self.logits = Unit3D(384 + 384 + 128 + 128, num_classes, bn_eps=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_frames(x.shape[2])
        for name in self.layer_names:
            x = getattr(self, name)(x)
        x = self.logits(self.avg_pool(x))  # (B, num_classes, T', 1, 1) for 224 x 224 input
        return x.flatten(start_dim=3).mean(dim=(2, 3))  # (B, num_classes)


def preprocess(videos: torch.Tensor, *, input_range: tuple[float, float]) -> torch.Tensor:
    """Videos ``(B, 3, T, H, W)`` -> float32 ``(B, 3, T, 224, 224)`` in [-1, 1], as TATS / LVDM / cd-fvd.

    ``input_range`` names the value range of ``videos``: ``(0, 255)`` for uint8-style pixels (the
    reference convention), ``(-1, 1)`` for diffusion-model outputs, ``(0, 1)`` for float images. Each
    frame is resized with bilinear interpolation (``align_corners=False``, no antialias, no crop),
    then mapped linearly from ``input_range`` to [-1, 1] (``x / 127.5 - 1`` for ``(0, 255)``).
    """
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be (B, 3, T, H, W), got shape {tuple(videos.shape)}")
    low, high = input_range
    if not high > low:
        raise ValueError(f"input_range must be (low, high) with high > low, got {input_range}")
    batch, channels, frames, height, width = videos.shape
    check_frames(frames)
    x = videos.to(torch.float32).transpose(1, 2).reshape(batch * frames, channels, height, width)
    if (height, width) != (RESOLUTION, RESOLUTION):
        x = F.interpolate(
            x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False, antialias=False
        )
    x = x.reshape(batch, frames, channels, RESOLUTION, RESOLUTION).transpose(1, 2)  # (B, 3, T, 224, 224)
    return ((x - low) * (2.0 / (high - low)) - 1.0).contiguous()


# ---------------------------------------------------------------------------------------------------
# Weights: loading and download.

# Public copies of the converted tf-hub checkpoint i3d_pretrained_400.pt (no checksum is published).
I3D_URLS: tuple[str, ...] = (
    # Open-Sora-Plan v1.0.0 Space, pinned to a commit (copy of VideoGPT's file).
    (
        "https://huggingface.co/spaces/LanguageBind/Open-Sora-Plan-v1.0.0/resolve/"
        "810fa8c4bdb3a4c8eec9bd57375c29bde6fb46de/opensora/eval/fvd/videogpt/i3d_pretrained_400.pt"
    ),
    # VideoGPT / TATS Google Drive file id 1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT (may need gdown for the
    # large-file confirmation page).
    "https://drive.google.com/uc?export=download&id=1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT",
)
# StyleGAN-V's TorchScript port (forward(x, rescale=False, resize=False, return_features=False)).
I3D_TORCHSCRIPT_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"


class WeightsDownloadError(RuntimeError):
    """The I3D weights could not be downloaded (no network, bad URL, HTML page instead of a file)."""


class I3DFeatureExtractor:
    """One interface over both I3D checkpoints: ``extract(videos, input_range=...) -> (B, 400)``.

    Contract: ``videos`` is ``(B, 3, T, H, W)`` with T >= 9 in the stated ``input_range``; the result
    is float32 on the CPU, the pre-softmax Kinetics-400 logits averaged over time. Deterministic, no
    gradients; batches of ``batch_size`` videos are preprocessed and run on the network's device.
    """

    def __init__(self, network: nn.Module, *, torchscript: bool = False, source: str = "") -> None:
        self.network = network.eval()
        self.torchscript = torchscript  # True: StyleGAN-V TorchScript module, called with its keywords
        self.source = source  # where the weights came from, for run records

    def to(self, device: torch.device | str) -> I3DFeatureExtractor:
        self.network.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.network.parameters())).device

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(B, 3, T, 224, 224)`` in [-1, 1] -> logits ``(B, 400)``."""
        if self.torchscript:
            # Inputs are already resized and in [-1, 1]; return_features=True gives the logits, not softmax.
            return self.network(x, rescale=False, resize=False, return_features=True)
        return self.network(x)

    @torch.inference_mode()
    def extract(
        self, videos: torch.Tensor, *, input_range: tuple[float, float], batch_size: int = 16
    ) -> torch.Tensor:
        """Videos ``(B, 3, T, H, W)`` -> I3D logits ``(B, 400)``, float32 on the CPU (see ``preprocess``)."""
        if videos.ndim != 5:
            raise ValueError(f"videos must be (B, 3, T, H, W), got shape {tuple(videos.shape)}")
        check_frames(videos.shape[2])
        outputs = []
        for start in range(0, videos.shape[0], batch_size):
            batch = videos[start : start + batch_size].to(self.device)
            outputs.append(self._forward(preprocess(batch, input_range=input_range)).float().cpu())
        return torch.cat(outputs, dim=0)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold ``*/constants.pkl`` and ``*/code/``; torch.save archives do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _load_state_dict_network(path: Path, bn_eps: float) -> InceptionI3d:
    """Build ``InceptionI3d`` and load a weights-only state dict into it (strict)."""
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ValueError(f"{path} is not an I3D state dict (expected a dict of tensors)")
    with torch.device("cpu"):  # built where its weights are read, then moved: never on a default device
        network = InceptionI3d(NUM_CLASSES, bn_eps=bn_eps)
    result = network.load_state_dict(dict(state_dict), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match the i3d_pretrained_400.pt layout: "
            f"{len(result.missing_keys)} missing keys {result.missing_keys[:3]}, "
            f"{len(result.unexpected_keys)} unexpected {result.unexpected_keys[:3]}"
        )
    return network


def load_i3d(
    path: str | os.PathLike[str], *, bn_eps: float = 1e-3, device: torch.device | str = "cpu"
) -> I3DFeatureExtractor:
    """Load ``i3d_pretrained_400.pt`` (a state dict, read with ``weights_only=True``) or StyleGAN-V's
    ``i3d_torchscript.pt`` (``torch.jit.load``); the format is detected from the file.

    ``bn_eps`` applies to the state-dict network only (1e-3 as tf-hub; 1e-5 reproduces TATS / LVDM).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"I3D weights not found at {path}; fetch them with fetch_i3d or pass --fvd-weights PATH"
        )
    if _is_torchscript(path):
        network: nn.Module = torch.jit.load(str(path), map_location="cpu")
        return I3DFeatureExtractor(network, torchscript=True, source=str(path)).to(device)
    return I3DFeatureExtractor(_load_state_dict_network(path, bn_eps), source=str(path)).to(device)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (to pin a checkpoint the first time it is seen)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, destination: Path, timeout: float, sha256: str | None) -> None:
    """Stream ``url`` into a temporary file next to ``destination``, check it, then ``os.replace`` it."""
    digest = hashlib.sha256()
    handle, temp_name = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
    )
    try:
        with os.fdopen(handle, "wb") as temp, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                if temp.tell() == 0 and chunk.lstrip()[:1] == b"<":
                    raise WeightsDownloadError("the server returned an HTML page, not a checkpoint")
                digest.update(chunk)
                temp.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise ValueError(f"downloaded file has sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(temp_name, destination)
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)


def fetch_i3d(
    cache_dir: str | os.PathLike[str],
    url: str = I3D_URLS[0],
    sha256: str | None = None,  # expected hex digest; None: not checked (none is published upstream)
    timeout: float = 60.0,  # seconds per network read
) -> Path:
    """Download the I3D checkpoint into ``cache_dir`` (once) and return its path.

    The file name is the URL's last path segment when it ends in ``.pt``, else
    ``i3d_pretrained_400.pt``. A cached file is reused after the sha256 check (when given). The
    download goes to a temporary file, is checked, and is moved into place with ``os.replace``, so a
    failed or interrupted run leaves no partial checkpoint. Raises ``WeightsDownloadError`` (one
    line, pointing at ``--fvd-weights``) when the file cannot be fetched, ``ValueError`` on a
    checksum mismatch.
    """
    name = Path(urllib.parse.urlparse(url).path).name
    destination = Path(cache_dir) / (name if name.endswith(".pt") else "i3d_pretrained_400.pt")
    if destination.is_file():
        actual = file_sha256(destination) if sha256 is not None else None
        if actual is not None and actual != sha256.lower():
            raise ValueError(
                f"cached {destination} has sha256 {actual}, expected {sha256}; delete it and retry"
            )
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download(url, destination, timeout, sha256)
    except (OSError, WeightsDownloadError) as error:  # URLError and timeouts are OSErrors
        reason = str(error).replace("\n", " ")
        raise WeightsDownloadError(
            f"could not download I3D weights from {url} ({reason}); download {destination.name} "
            "on a machine with network access and pass --fvd-weights PATH"
        ) from error
    return destination
