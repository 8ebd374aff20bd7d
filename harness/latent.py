"""The latent space of a latent family: a trained video autoencoder and the scale of its latents.

Diffusion runs on ``scale * z`` where ``z`` is the autoencoder's posterior mean and ``scale`` brings the
latents to unit standard deviation (LDM's ``scale_by_std``), fitted once on training clips when a latent
supernet's training starts. A *codec directory* holds the autoencoder (``config.json`` +
``model.safetensors``) and ``latent.json`` (scale, provenance). Training runs and exported latent supernets
keep theirs in an ``autoencoder/`` folder beside the weights, so every tool finds it without an option.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from harness.autoencoder import VideoAutoencoder, load_autoencoder

LATENT_FILE = "latent.json"
FOLDER = "autoencoder"


class LatentCodec:
    """Video ``(B, 3, T, H, W)`` in [-1, 1] <-> latents ``(B, z, T / d_t, H / d_h, W / d_w)`` of unit std."""

    def __init__(
        self,
        autoencoder: VideoAutoencoder,
        scale: float,
        source: str | None = None,
        directory: Path | None = None,
    ):
        self.autoencoder = autoencoder.eval()
        self.scale = float(scale)
        self.source = source  # where the autoencoder came from (recorded with results)
        self.directory = directory  # the codec directory it was loaded from, if any

    @property
    def downsample(self) -> tuple[int, int, int]:
        return self.autoencoder.config.downsample

    @property
    def channels(self) -> int:
        return self.autoencoder.config.z_channels

    def pixel_resolution(self, latent_resolution: int) -> int:
        return latent_resolution * self.downsample[1]

    def pixel_frames(self, latent_frames: int) -> int:
        return latent_frames * self.downsample[0]

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Scaled posterior mean of ``video`` (deterministic, as the diffusion target)."""
        return self.autoencoder.encode(video).mode() * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Video in [-1, 1] from scaled latents."""
        return self.autoencoder.decode(latents / self.scale).clamp(-1, 1)

    @classmethod
    def fit(
        cls, autoencoder: VideoAutoencoder, videos: torch.Tensor, source: str | None = None
    ) -> LatentCodec:
        """Codec whose scale is ``1 / std`` of the posterior means of ``videos`` ``(B, 3, T, H, W)``."""
        with torch.no_grad():
            std = float(autoencoder.eval().encode(videos).mode().float().std())
        if not std > 0:
            raise ValueError("the autoencoder maps every training clip to the same latent; train it first")
        return cls(autoencoder, 1.0 / std, source)

    def save(self, directory: str | Path) -> Path:
        """Write the codec directory (weights through safetensors, ``latent.json`` atomically)."""
        directory = Path(directory)
        self.autoencoder.save_pretrained(directory)
        tmp = directory / f".{LATENT_FILE}.tmp"
        tmp.write_text(json.dumps({"scale": self.scale, "source": self.source}, indent=1))
        os.replace(tmp, directory / LATENT_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> LatentCodec:
        directory = Path(directory)
        meta_path = directory / LATENT_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{directory} holds no latent codec ({LATENT_FILE} is missing); it is written "
                f"when a latent supernet is trained with --autoencoder"
            )
        meta = json.loads(meta_path.read_text())
        return cls(load_autoencoder(directory, device).float(), meta["scale"], meta.get("source"), directory)

    def decoder_module(self) -> LatentDecoder:
        """The decoding step as a module ``(latents) -> video`` (what FLOPs and latency measure)."""
        return LatentDecoder(self)


class LatentDecoder(torch.nn.Module):
    """``forward(latents (B, z, T', H', W')) -> video (B, 3, T, H, W)``: the last stage of a latent pipeline."""

    def __init__(self, codec: LatentCodec):
        super().__init__()
        self.autoencoder, self.scale = codec.autoencoder, codec.scale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents / self.scale).clamp(-1, 1)


def is_latent(model: torch.nn.Module) -> bool:
    """Whether ``model`` (supernet or static subnet) denoises autoencoder latents rather than RGB pixels."""
    spec = getattr(model, "spec", None)
    return spec is not None and spec.in_channels != 3
