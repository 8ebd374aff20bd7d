"""Position priors for the built-in moving-shapes synthetic data (``harness.data.synthetic``).

These are *not* the paper's architecture. They encode how that data is generated: one shape translated
across the frame at a constant velocity given by the prompt ("moving left"). Fixed coordinate features
tell the network where a pixel is; a per-frame modulation of them, and coordinates that move at a
velocity read from the prompt (a shift by ``v * t``), are a constant-velocity, global-translation prior.
They suit data whose motion is of that kind and nothing else; presets for other data should not list them.

Three conditioning extras, each applied right after ``conv_in`` and zero at init:

- ``position_embedding``: projected coordinate features added to the features;
- ``position_modulation``: those features scaled and shifted per sample and frame by the time embedding;
- ``position_velocity``: features of coordinates in a frame of reference moving at a prompted velocity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import FULL, zero_
from ..conditioning import ConditioningExtra, ConditioningExtras, register_conditioning
from ..ops import DynamicConv

if TYPE_CHECKING:
    from ..unet import UNetSpec

POSITION_BANDS = 2  # sin/cos of k*pi*x for k = 1..POSITION_BANDS, beside x and y themselves
POSITION_FEATURES = 2 + 4 * POSITION_BANDS


def position_features(
    height: int,
    width: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fixed features of the pixel-centre coordinates in ``[-1, 1]``: ``(1, POSITION_FEATURES, 1, H, W)``;
    with ``offset`` ``(B, 2, T)`` (x, y), of the coordinates minus that offset: ``(B, POSITION_FEATURES, T,
    H, W)``.

    Normalised coordinates, so the same features (and the projection that reads them) serve every
    resolution of a multi-resolution supernet.
    """
    y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (2.0 / height) - 1.0
    x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (2.0 / width) - 1.0
    y, x = y[:, None].expand(height, width), x[None, :].expand(height, width)
    if offset is not None:  # (B, T, H, W) each
        offset = offset.float()
        x, y = x - offset[:, 0, :, None, None], y - offset[:, 1, :, None, None]
    feats = [x, y]
    for k in range(1, POSITION_BANDS + 1):
        for c in (x, y):
            feats += [torch.sin(k * torch.pi * c), torch.cos(k * torch.pi * c)]
    if offset is not None:
        return torch.stack(feats, dim=1).to(dtype)  # (B, F, T, H, W)
    return torch.stack(feats)[None, :, None].to(dtype)  # (1, F, 1, H, W)


class _PositionProjection(ConditioningExtra):
    """An extra whose ``embed`` projects coordinate features to the subnet's ``conv_in`` width (1x1 conv,
    sliced like ``conv_in``)."""

    def __init__(self, spec: UNetSpec):
        super().__init__(spec)
        self.embed = zero_(DynamicConv(POSITION_FEATURES, spec.conv_in, (1, 1, 1)))

    def plan(self, spec: UNetSpec) -> dict[str, object]:
        return {"embed": ((POSITION_FEATURES,), spec.conv_in)}


class PositionEmbedding(_PositionProjection):
    """Projected pixel coordinates added to the features after ``conv_in`` (modulated per frame when the
    network also has ``position_modulation``).

    Why: convolutions are translation-equivariant and the spatial attention has no position, so from the
    pure noise of the first zero-terminal-SNR step the network could place an object where "moving left"
    puts it at frame ``t`` only through the zero padding."""

    legacy_flag = "position_embedding"
    legacy_keys: ClassVar[dict[str, str]] = {"position_embed": "embed"}

    def features(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor | None,
        spec: UNetSpec,
        extras: ConditioningExtras,
    ) -> torch.Tensor:
        feats = position_features(x.shape[-2], x.shape[-1], temb.device, temb.dtype)  # (1, F, 1, H, W)
        modulation = extras.get("position_modulation")
        if modulation is not None:
            feats = modulation.modulate(feats, temb)
        return x + self.embed(feats, self.plan(spec)["embed"])  # (B, C, T, H, W) + (1 or B, C, 1 or T, H, W)


class PositionModulation(ConditioningExtra):
    """Scales and shifts the position embedding's coordinate features per sample and frame by the time
    embedding (FiLM); acts through ``position_embedding``.

    Why: a "moving left" object sits right of centre early and left of it late, so where it is depends on
    the product of position, frame and prompt. A shift of the coordinates by an amount that depends on
    (frame, prompt) offers that product, though only weakly: the amount is a linear map of a SiLU of the
    *sum* of the frame and prompt embeddings (``position_velocity`` forms the product explicitly)."""

    requires = ("position_embedding",)
    legacy_flag = "position_modulation"
    legacy_keys: ClassVar[dict[str, str]] = {"position_film": "film"}

    def __init__(self, spec: UNetSpec):
        super().__init__(spec)
        self.film = zero_(nn.Linear(spec.temb_dim, 2 * POSITION_FEATURES))  # (1 + 0) * features + 0

    def modulate(self, feats: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``feats`` ``(1, F, 1, H, W)``, ``temb`` ``(B, D)`` or ``(B, T, D)`` -> ``(B, F, 1 or T, H, W)``."""
        film = self.film(F.silu(temb))  # (B, [T,] 2F)
        film = film[:, None] if film.dim() == 2 else film
        scale, shift = film.permute(0, 2, 1)[..., None, None].chunk(2, dim=1)  # (B, F, T', 1, 1) each
        return feats * (1 + scale) + shift


class PositionVelocity(_PositionProjection):
    """Coordinate features in a frame of reference that moves at a velocity read (linearly) from the
    mean text token, projected and added after ``conv_in``. The offset is zero at the clip's middle frame;
    the velocity is in coordinate units (the frame spans 2) per ``max_frames`` frames.

    Why: to place a "moving left" object at frame ``t`` a network needs the product of prompt and frame,
    which the pooled prompt and the frame embedding form only through a SiLU of their sum; a narrow subnet
    whose only text paths are those and one cross-attention does not learn it. Here the product is formed
    explicitly (velocity times frame offset), and the subnet only has to place the object still, in
    coordinates that move with it, as it already does for colour and shape."""

    requires = ("position_embedding",)
    needs_text = True
    legacy_flag = "position_velocity"
    legacy_keys: ClassVar[dict[str, str]] = {"velocity": "velocity", "moving_position_embed": "embed"}

    def __init__(self, spec: UNetSpec):
        super().__init__(spec)
        self.max_frames = spec.max_frames
        self.velocity = zero_(nn.Linear(spec.context_dim, 2))

    def features(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor | None,
        spec: UNetSpec,
        extras: ConditioningExtras,
    ) -> torch.Tensor:
        frames = x.shape[2]
        velocity = self.velocity(context.mean(dim=1))  # (B, 2)
        tau = torch.arange(frames, device=velocity.device, dtype=velocity.dtype) - (frames - 1) / 2
        offset = velocity[:, :, None] * (tau / self.max_frames)  # (B, 2, T)
        moving = position_features(x.shape[-2], x.shape[-1], velocity.device, x.dtype, offset=offset)
        return x + self.embed(moving, self.plan(spec)["embed"])  # (B, C, T, H, W) + (B, C, T, H, W)

    def plan(self, spec: UNetSpec) -> dict[str, object]:
        return {"velocity": FULL, **super().plan(spec)}


register_conditioning("position_embedding", PositionEmbedding)
register_conditioning("position_modulation", PositionModulation)
register_conditioning("position_velocity", PositionVelocity)
