"""Shared pieces of the data package: the error type and the one resize used by every dataset.

Every dataset returns videos as ``(C, T, H, W)`` float32 in ``[-1, 1]`` with ``C = 3`` (RGB). Lower
resolutions are always made from a higher-resolution video with antialiased bilinear resizing
(``torch.nn.functional.interpolate(mode="bilinear", antialias=True)``), as the SNED paper (§4.1) builds
its multi-resolution training data.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class DataError(ValueError):
    """A dataset cannot be built or read; the message names the problem and the fix on one line."""


def resize_video(video: Tensor, resolution: int) -> Tensor:
    """Resize the shorter side to ``resolution`` (antialiased bilinear), then centre-crop to a square.

    Args:
        video: ``(C, T, H, W)`` float tensor (any value range; bilinear weights are positive, so the
            output stays within the input's range).
        resolution: output side length in pixels.

    Returns:
        ``(C, T, resolution, resolution)`` float32 tensor.
    """
    if resolution < 1:
        raise DataError(f"resolution must be a positive number of pixels, got {resolution}")
    channels, frames, height, width = video.shape
    scale = resolution / min(height, width)
    new_h = max(resolution, round(height * scale))
    new_w = max(resolution, round(width * scale))
    out = video.float()
    if (new_h, new_w) != (height, width):
        # Bilinear works per channel, so fold time into channels: (C, T, H, W) -> (1, C*T, H, W).
        flat = out.reshape(1, channels * frames, height, width)
        flat = F.interpolate(flat, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        out = flat.reshape(channels, frames, new_h, new_w)
    top = (new_h - resolution) // 2
    left = (new_w - resolution) // 2
    return out[:, :, top : top + resolution, left : left + resolution].contiguous()


def uint8_frames_to_video(frames: list[np.ndarray], resolution: int) -> Tensor:
    """Turn decoded RGB frames into a square video in ``[-1, 1]``.

    Args:
        frames: ``T`` arrays of shape ``(H, W, 3)``, dtype uint8 (sizes may differ between frames).
        resolution: output side length in pixels.

    Returns:
        ``(3, T, resolution, resolution)`` float32 in ``[-1, 1]``.
    """
    if len({frame.shape for frame in frames}) == 1:
        stacked = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)  # (T, H, W, 3) -> (3, T, H, W)
        video = resize_video(stacked.float(), resolution)
    else:
        video = torch.cat(
            [resize_video(torch.from_numpy(f).permute(2, 0, 1)[:, None].float(), resolution) for f in frames],
            dim=1,
        )
    return (video / 127.5 - 1.0).clamp_(-1.0, 1.0)


def quantize_to_uint8(video: Tensor) -> Tensor:
    """Map ``[-1, 1]`` floats to uint8 levels ``0..255`` (round to nearest). Shape is unchanged."""
    return ((video.clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)


def uint8_to_unit_range(video: Tensor) -> Tensor:
    """Inverse of :func:`quantize_to_uint8`: uint8 levels to float32 in ``[-1, 1]``."""
    return video.float() / 127.5 - 1.0
