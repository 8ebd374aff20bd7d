"""Writing videos: GIF files and frame grids (PNG) for samples and notes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8_frames(video: torch.Tensor, scale: int = 1) -> np.ndarray:
    """``(3, T, H, W)`` in [-1, 1] -> ``(T, H*scale, W*scale, 3)`` uint8 (nearest upscaling)."""
    v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = v.permute(1, 2, 3, 0).cpu().numpy()
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    return frames


def save_gif(video: torch.Tensor, path: str | Path, fps: int = 6, scale: int = 4) -> Path:
    """Write one video ``(3, T, H, W)`` (or a batch ``(B, 3, T, H, W)`` side by side) as an animated GIF."""
    if video.dim() == 5:
        video = torch.cat(list(video), dim=-1)
    frames = [Image.fromarray(f) for f in to_uint8_frames(video, scale)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.gif")
    frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    tmp.replace(path)
    return path


def save_frame_grid(videos: torch.Tensor, path: str | Path, frames: int = 6, scale: int = 4) -> Path:
    """PNG grid: one row per video ``(B, 3, T, H, W)``, ``frames`` evenly spaced frames per row."""
    rows = []
    for video in videos:
        idx = np.linspace(0, video.shape[1] - 1, frames).round().astype(int)
        f = to_uint8_frames(video[:, idx], scale)  # (frames, H, W, 3)
        rows.append(np.concatenate(list(f), axis=1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path
