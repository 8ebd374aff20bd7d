"""Video autoencoder of the latent-space pipeline (LVDM §3.1, SNED §4.3): 3D convolutions, KL latent.

The architecture follows LVDM's ``aemodules3d`` (itself from TATS): an encoder of strided ``4x4x4``
convolutions, each followed by a residual block of two ``3x3x3`` convolutions, then GroupNorm-SiLU-conv to
the mean and log-variance of a diagonal Gaussian; a decoder of ``4x4x4`` transposed convolutions, each
followed by two residual blocks. Every convolution pads by replicating the border ("repeat" padding) in
all three dimensions, so the encoder is temporally shift-equivariant: shifting the video by one latent
stride shifts the latent by one frame (away from the clip's ends, where the padding differs). For that to
hold exactly, GroupNorm statistics are taken per frame by default; LVDM normalises over the whole clip,
which makes every latent frame depend on every video frame (``frame_norm=False`` restores that).

The autoencoder has no dynamic cost (SNED only uses super-position over resolutions for it): it is fully
convolutional, so one set of weights encodes every resolution divisible by its spatial downsampling.
Checkpoints are ``config.json`` + ``model.safetensors`` (see ``save_pretrained`` / ``load_autoencoder``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.unet import load_weights, save_module

CONFIG_KIND = "video-autoencoder"


@dataclass(frozen=True)
class AutoencoderConfig:
    """Sizes of a ``VideoAutoencoder`` (constructor arguments are the saved config)."""

    hidden: int = 8  # channels after the first convolution; doubles per stage
    downsample: tuple[int, int, int] = (2, 4, 4)  # (time, height, width) factors, each a power of two
    z_channels: int = 4  # latent channels
    image_channels: int = 3
    norm_groups: int = 4  # GroupNorm groups (gcd with the width when it does not divide)
    frame_norm: bool = True  # GroupNorm statistics per frame (False: over the clip, as LVDM)

    def __post_init__(self) -> None:
        for factor in self.downsample:
            if factor < 1 or factor & (factor - 1):
                raise ValueError(f"downsample factors must be powers of two, got {self.downsample}")
        if max(self.downsample) < 2:
            raise ValueError("downsample must reduce at least one dimension")

    @property
    def num_stages(self) -> int:
        """Number of strided stages: ``log2`` of the largest factor."""
        return int(math.log2(max(self.downsample)))

    def stage_strides(self) -> list[tuple[int, int, int]]:
        """Per stage, stride 2 along a dimension until its factor is used up, then 1 (TATS)."""
        remaining = [int(math.log2(f)) for f in self.downsample]
        strides = []
        for _ in range(self.num_stages):
            strides.append(tuple(2 if r > 0 else 1 for r in remaining))
            remaining = [r - 1 for r in remaining]
        return strides

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(z_channels, T', H', W')`` of a video with ``frames x height x width`` pixels."""
        t, h, w = self.downsample
        if frames % t or height % h or width % w:
            raise ValueError(
                f"video {frames}x{height}x{width} is not divisible by the downsampling {self.downsample}"
            )
        return self.z_channels, frames // t, height // h, width // w

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "downsample" in d:
            d["downsample"] = tuple(d["downsample"])
        return cls(**d)


AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    # CPU-trainable (~0.3M parameters): 16 frames of 32^2 / 64^2 -> 8 latent frames of 8^2 / 16^2.
    "tiny": AutoencoderConfig(hidden=8, downsample=(2, 4, 4), z_channels=4, norm_groups=4),
    # LVDM Sky Timelapse (``configs/videoae/sky.yaml``, ~19.5M parameters): 16x256^2 -> 4x32^2.
    "paper": AutoencoderConfig(hidden=32, downsample=(4, 8, 8), z_channels=4, norm_groups=32),
}


def _same_pad(kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """``F.pad`` widths (last dim first) padding ``kernel - stride`` per dim, the odd one at the front."""
    pad: list[int] = []
    for k, s in reversed(list(zip(kernel, stride))):
        total = k - s
        pad += [total - total // 2, total // 2]
    return tuple(pad)


class ReplicateConv3d(nn.Module):
    """``Conv3d`` with replicate padding so that output size = ``ceil(input / stride)``.

    Input ``(B, C_in, T, H, W)``, output ``(B, C_out, T / s_t, H / s_h, W / s_w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride=(1, 1, 1)):
        super().__init__()
        kernel = (kernel_size,) * 3
        self.pad = _same_pad(kernel, tuple(stride))
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=tuple(stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class ReplicateConvTranspose3d(nn.Module):
    """Transposed ``Conv3d`` on a replicate-padded input: output size = ``input * stride``.

    Input ``(B, C_in, T, H, W)``, output ``(B, C_out, T * s_t, H * s_h, W * s_w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride=(1, 1, 1)):
        super().__init__()
        kernel = (kernel_size,) * 3
        self.pad = _same_pad(kernel, tuple(stride))
        self.conv = nn.ConvTranspose3d(
            in_channels, out_channels, kernel, stride=tuple(stride), padding=tuple(k - 1 for k in kernel)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class VideoGroupNorm(nn.GroupNorm):
    """GroupNorm of videos ``(B, C, T, H, W)``, with statistics per frame or over the whole clip.

    Per-frame statistics (over ``C / groups x H x W``) keep the network exactly temporally
    shift-equivariant; clip-wide ones (LVDM's ``GroupNorm`` on 5D tensors) make every frame depend on
    the whole clip. Same parameters either way, so checkpoints are interchangeable.
    """

    def __init__(self, channels: int, groups: int, per_frame: bool = True):
        super().__init__(math.gcd(groups, channels), channels, eps=1e-6)
        self.per_frame = per_frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_frame:
            return super().forward(x)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        out = super().forward(frames)
        return out.reshape(b, t, c, h, w).transpose(1, 2)  # (B, C, T, H, W)


class ResBlock3d(nn.Module):
    """``x + conv(SiLU(norm(conv(SiLU(norm(x))))))`` with ``3x3x3`` replicate-padded convolutions.

    Input and output ``(B, C, T, H, W)``.
    """

    def __init__(self, channels: int, groups: int, per_frame: bool = True):
        super().__init__()
        self.norm1 = VideoGroupNorm(channels, groups, per_frame)
        self.conv1 = ReplicateConv3d(channels, channels, 3)
        self.norm2 = VideoGroupNorm(channels, groups, per_frame)
        self.conv2 = ReplicateConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class DiagonalGaussian:
    """A diagonal Gaussian over latents ``(B, C, T, H, W)`` given its mean and log-variance."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # each (B, C, T, H, W)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised draw ``mean + std * eps`` ``(B, C, T, H, W)``."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """``KL(q || N(0, I))`` per sample, summed over latent elements: ``(B,)``."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class Encoder3d(nn.Module):
    """Video ``(B, 3, T, H, W)`` -> moments ``(B, 2 * z_channels, T / d_t, H / d_h, W / d_w)``."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c = config
        self.conv_in = ReplicateConv3d(c.image_channels, c.hidden, 3)
        self.down = nn.ModuleList()
        self.res = nn.ModuleList()
        width = c.hidden
        for stride in c.stage_strides():
            self.down.append(ReplicateConv3d(width, width * 2, 4, stride))
            width *= 2
            self.res.append(ResBlock3d(width, c.norm_groups, c.frame_norm))
        self.norm_out = VideoGroupNorm(width, c.norm_groups, c.frame_norm)
        self.conv_out = ReplicateConv3d(width, 2 * c.z_channels, 3)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(video)
        for down, res in zip(self.down, self.res):
            h = res(down(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder3d(nn.Module):
    """Latent ``(B, z_channels, T', H', W')`` -> video ``(B, 3, T' * d_t, H' * d_h, W' * d_w)``."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c = config
        self.up = nn.ModuleList()
        self.res = nn.ModuleList()
        width, in_channels = c.hidden * 2**c.num_stages, c.z_channels
        for stride in c.stage_strides():
            self.up.append(ReplicateConvTranspose3d(in_channels, width, 4, stride))
            self.res.append(
                nn.Sequential(
                    ResBlock3d(width, c.norm_groups, c.frame_norm),
                    ResBlock3d(width, c.norm_groups, c.frame_norm),
                )
            )
            in_channels, width = width, width // 2
        self.conv_out = ReplicateConv3d(in_channels, c.image_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for up, res in zip(self.up, self.res):
            h = res(up(h))
        return self.conv_out(h)


class VideoAutoencoder(nn.Module):
    """KL video autoencoder: ``encode(video) -> DiagonalGaussian``, ``decode(z) -> video``.

    Videos are ``(B, 3, T, H, W)`` in ``[-1, 1]`` with ``T, H, W`` divisible by ``config.downsample``;
    latents are ``(B, z_channels, T / d_t, H / d_h, W / d_w)``.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.quant_conv = nn.Conv3d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv3d(config.z_channels, config.z_channels, 1)
        self.decoder = Decoder3d(config)

    def _check(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != self.config.image_channels:
            raise ValueError(
                f"expected a video (B, {self.config.image_channels}, T, H, W), got {tuple(video.shape)}"
            )
        self.config.latent_shape(*video.shape[2:])

    def encode(self, video: torch.Tensor) -> DiagonalGaussian:
        """Video ``(B, 3, T, H, W)`` in ``[-1, 1]`` -> posterior over latents ``(B, z, T', H', W')``."""
        self._check(video)
        return DiagonalGaussian(self.quant_conv(self.encoder(video)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, z, T', H', W')`` -> reconstructed video ``(B, 3, T, H, W)`` (unclamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, video: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction ``(B, 3, T, H, W)`` and the posterior (sampled, or its mean)."""
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def config_dict(self) -> dict:
        return {"kind": CONFIG_KIND, "config": self.config.to_dict()}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` atomically (temp files, then ``os.replace``)."""
        save_module(self, directory, self.config_dict())


def build_autoencoder(preset: str = "tiny", **overrides) -> VideoAutoencoder:
    """An autoencoder at a preset of ``AUTOENCODER_PRESETS``; ``overrides`` replace config fields."""
    if preset not in AUTOENCODER_PRESETS:
        raise ValueError(
            f"unknown autoencoder preset '{preset}' (known: {', '.join(sorted(AUTOENCODER_PRESETS))})"
        )
    config = AUTOENCODER_PRESETS[preset]
    if overrides:
        config = AutoencoderConfig.from_dict({**config.to_dict(), **overrides})
    return VideoAutoencoder(config)


def load_autoencoder(directory: str | Path, device: str | torch.device = "cpu") -> VideoAutoencoder:
    """Load an autoencoder written by ``save_pretrained`` (safetensors only; nothing is unpickled)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no autoencoder at {directory}: config.json is missing")
    saved = json.loads(path.read_text())
    if saved.get("kind") != CONFIG_KIND:
        raise ValueError(f"{directory} does not hold a video autoencoder (kind={saved.get('kind')!r})")
    model = VideoAutoencoder(AutoencoderConfig.from_dict(saved["config"]))
    model.load_state_dict(load_weights(directory))
    return model.to(device)
