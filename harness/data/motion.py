"""Motion alignment, the check the synthetic dataset provides: does the object of a synthetic-caption
video move the way its prompt says?

A model-free check beside the proxy extractor's ``direction`` score. A learned classifier may read
direction from *where* the object is (a "moving left" clip starts right of centre) rather than from how
it moves; this measures the motion itself. The object is found as the saturated pixels of the synthetic
dataset's videos (bright shape on a dark, low-contrast background): weight ``max(0, max_rgb - 0.35)``
with ``max_rgb`` in ``[0, 1]``. Its weighted centroid is tracked from the first to the last frame.

A video *follows* its prompt when its dominant displacement axis and sign are the prompted ones
(``|along| > |across|`` and ``along > 0``): a four-way decision, chance 0.25, like the extractor's
``direction``. Held-out real clips score 1.0 and travel about 0.47 frame widths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from harness.data._common import DataError
from harness.data.synthetic import ATTRIBUTES, DIRECTION_STEPS, labels_for

FOREGROUND_LEVEL = 0.35  # max-RGB level in [0, 1] above which a pixel counts as the object


def object_centroids(videos: torch.Tensor) -> torch.Tensor:
    """Foreground centroid per frame of ``videos`` ``(B, 3, T, H, W)`` in ``[-1, 1]``: ``(B, T, 2)`` as
    ``(x, y)`` in frame widths (0 = left/top edge, 1 = right/bottom edge); NaN for a frame with no
    foreground."""
    rgb_max = ((videos.float() + 1) / 2).amax(dim=1)  # (B, T, H, W)
    weight = (rgb_max - FOREGROUND_LEVEL).clamp(min=0)
    h, w = weight.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    total = weight.sum(dim=(-2, -1))
    cx = (weight.sum(dim=-2) * xs).sum(dim=-1) / total
    cy = (weight.sum(dim=-1) * ys).sum(dim=-1) / total
    centroids = torch.stack([cx, cy], dim=-1)
    return torch.where(total[..., None] > 0, centroids, torch.full_like(centroids, math.nan))


def motion_alignment(videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """``{"fraction": ..., "travel": ..., "videos": n}`` over the prompts that parse as synthetic captions:
    the fraction whose object moves the prompted way (see the module docstring) and the mean displacement
    along the prompted direction, in frame widths (negative: against it). Empty when no prompt parses."""
    if videos.shape[0] != len(prompts):
        raise ValueError(f"got {videos.shape[0]} videos but {len(prompts)} prompts")
    steps = []
    for index, prompt in enumerate(prompts):
        try:
            direction = ATTRIBUTES["direction"][labels_for(prompt)["direction"]]
        except DataError:
            continue
        steps.append((index, DIRECTION_STEPS[direction]))
    if not steps:
        return {}
    centroids = object_centroids(videos[[i for i, _ in steps]])
    moved = torch.nan_to_num(centroids[:, -1] - centroids[:, 0], nan=0.0)  # (N, 2); no object: no motion
    unit = torch.tensor([s for _, s in steps], dtype=torch.float32)
    along = (moved * unit).sum(dim=-1)
    across = (moved * unit.flip(-1)).sum(dim=-1).abs()
    hits = (along > 0) & (along > across)
    return {"fraction": float(hits.float().mean()), "travel": float(along.mean()), "videos": len(steps)}
