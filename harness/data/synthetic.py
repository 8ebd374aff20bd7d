"""The built-in offline dataset: procedurally generated, captioned videos of a moving shape.

Each video shows one shape (``square``, ``circle``, ``triangle``, ``cross``) of one colour (``red``,
``green``, ``blue``, ``yellow``) and size (``small``, ``large``) sliding in one direction (``left``,
``right``, ``up``, ``down``) over a dark, gently textured background; its caption is
``"a large red square moving left"``. Start position, travel distance, exact colour and background vary
per video, so videos that share a caption differ.

Videos are rendered at ``render_resolution`` (128 by default) with analytic anti-aliasing (coverage from a
signed distance, one pixel wide), quantized to 8-bit levels like real footage, and resized to the
requested resolution with antialiased bilinear resizing (SNED paper §4.1). ``video_at(i, r)`` returns the
same clip at any resolution, so a super-resolution model sees matching low- and high-resolution videos.

Item ``i`` is a pure function of ``(split, seed, i)``: its parameters come from
``numpy.random.default_rng([seed, split_id, 0, i])``. Train and heldout draw from different streams, so
they share no video; labels are balanced, each block of 128 consecutive items holding every
attribute combination once (in a seeded order).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from harness.data._common import DataError, quantize_to_uint8, resize_video, uint8_to_unit_range

ATTRIBUTES: dict[str, list[str]] = {
    "colour": ["red", "green", "blue", "yellow"],
    "shape": ["square", "circle", "triangle", "cross"],
    "direction": ["left", "right", "up", "down"],
    "size": ["small", "large"],
}
CAPTION_TEMPLATE = "a {size} {colour} {shape} moving {direction}"
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}  # split name -> seed-stream id

_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.16, 0.14),
    "green": (0.18, 0.80, 0.25),
    "blue": (0.22, 0.42, 0.96),
    "yellow": (0.95, 0.85, 0.15),
}
_RADIUS: dict[str, float] = {"small": 0.45, "large": 0.6}  # half-extent in image units (frame = [-1, 1])
# Unit step (x, y) of each direction; y points down the image.
DIRECTION_STEPS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
_COMBOS: list[tuple[int, ...]] = list(itertools.product(*(range(len(v)) for v in ATTRIBUTES.values())))


# ----------------------------------------------------------------------------------------------------------
# Captions.


def caption_for(labels: Mapping[str, int]) -> str:
    """Caption of a label dict, e.g. ``{"colour": 0, "shape": 0, "direction": 0, "size": 1}`` ->
    ``"a large red square moving left"``."""
    missing = [name for name in ATTRIBUTES if name not in labels]
    if missing:
        raise DataError(
            f"labels {dict(labels)} lack {missing}; give one class index per attribute in {list(ATTRIBUTES)}"
        )
    words = {}
    for name, classes in ATTRIBUTES.items():
        index = int(labels[name])
        if not 0 <= index < len(classes):
            raise DataError(
                f"label {name}={index} is out of range; {name} has classes 0..{len(classes) - 1} {classes}"
            )
        words[name] = classes[index]
    return CAPTION_TEMPLATE.format(**words)


def labels_for(caption: str) -> dict[str, int]:
    """Parse a caption made by :func:`caption_for` (case and spacing are ignored) back to class indices."""
    words = caption.lower().split()
    template = CAPTION_TEMPLATE.split()
    if len(words) == len(template):
        labels: dict[str, int] = {}
        for word, slot in zip(words, template):
            name = slot.strip("{}")
            if slot.startswith("{") and word in ATTRIBUTES.get(name, []):
                labels[name] = ATTRIBUTES[name].index(word)
            elif slot.startswith("{") or word != slot:
                break
        else:
            return labels
    raise DataError(
        f"caption {caption!r} is not a synthetic-dataset caption; expected '{CAPTION_TEMPLATE}' with "
        f"words from {ATTRIBUTES}, e.g. 'a large red square moving left'"
    )


def all_captions() -> list[str]:
    """Every caption of the dataset (one per attribute combination), in a fixed order."""
    return [caption_for(dict(zip(ATTRIBUTES, combo))) for combo in _COMBOS]


# ----------------------------------------------------------------------------------------------------------
# Per-video parameters.


@dataclass(frozen=True)
class _VideoParams:
    labels: tuple[int, ...]  # class index per attribute, in ATTRIBUTES order
    start: tuple[float, float]  # (x, y) shape centre at the first frame, image units, y down
    end: tuple[float, float]  # (x, y) shape centre at the last frame
    colour: tuple[float, float, float]  # RGB in [0, 1]
    # Background: r, g, b, gradient angle, gradient amplitude, fx, fy, texture phase, texture amplitude.
    background: tuple[float, ...]


@functools.lru_cache(maxsize=256)
def _block_order(seed: int, split_id: int, block: int) -> tuple[int, ...]:
    """Seeded order of the attribute combinations for items ``block * 128 ... block * 128 + 127``."""
    rng = np.random.default_rng([seed, split_id, 1, block])
    return tuple(int(k) for k in rng.permutation(len(_COMBOS)))


def _sample_params(seed: int, split_id: int, index: int) -> _VideoParams:
    """Draw the parameters of one video from its own seed stream."""
    block, position = divmod(index, len(_COMBOS))
    labels = _COMBOS[_block_order(seed, split_id, block)[position]]
    named = {name: ATTRIBUTES[name][k] for name, k in zip(ATTRIBUTES, labels)}
    rng = np.random.default_rng([seed, split_id, 0, index])

    # Motion: travel 55-95% of the allowed range along the direction; the shape may graze the border.
    radius = _RADIUS[named["size"]]
    low, high = -1.0 + 0.7 * radius, 1.0 - 0.7 * radius
    travel = float(rng.uniform(0.55, 0.95)) * (high - low)
    step_x, step_y = DIRECTION_STEPS[named["direction"]]
    along = float(rng.uniform(low, high - travel))  # start coordinate when moving in the + direction
    across = float(rng.uniform(low, high))
    if step_x + step_y < 0:
        along = along + travel  # moving in the - direction: start at the far end
    if step_x != 0:
        start, end = (along, across), (along + step_x * travel, across)
    else:
        start, end = (across, along), (across, along + step_y * travel)

    colour = np.clip(np.array(_RGB[named["colour"]]) + rng.uniform(-0.06, 0.06, 3), 0.0, 1.0)
    base = rng.uniform(0.04, 0.16) + rng.uniform(-0.03, 0.03, 3)
    texture = (
        rng.uniform(0, 2 * math.pi),  # gradient angle
        rng.uniform(0.0, 0.06),  # gradient amplitude
        *(rng.uniform(-3.0, 3.0, 2) * math.pi / 2),  # texture frequencies (x, y), radians per image unit
        rng.uniform(0, 2 * math.pi),  # texture phase
        rng.uniform(0.01, 0.03),  # texture amplitude
    )
    return _VideoParams(
        labels=labels,
        start=start,
        end=end,
        colour=tuple(float(c) for c in colour),
        background=tuple(float(b) for b in (*base, *texture)),
    )


# ----------------------------------------------------------------------------------------------------------
# Rendering.


def _sdf_square(px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    return np.maximum(np.abs(px), np.abs(py)) - 0.85 * r


def _sdf_circle(px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    return np.hypot(px, py) - r


def _sdf_triangle(px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    # Equilateral, pointing up, inradius 0.6 r: the largest of the three edge half-plane distances.
    # y points down the image; the bounding box (height 1.8 r) is centred on the shape centre.
    up = np.float32(0.3 * r) - py
    half_sqrt3 = np.float32(math.sqrt(3) / 2)
    edges = np.maximum(half_sqrt3 * px + 0.5 * up, -half_sqrt3 * px + 0.5 * up)
    return np.maximum(edges, -up) - np.float32(0.6 * r)


def _sdf_cross(px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(px), np.abs(py)
    arm, width = np.float32(0.9 * r), np.float32(0.32 * r)
    horizontal = np.maximum(ax - arm, ay - width)
    vertical = np.maximum(ax - width, ay - arm)
    return np.minimum(horizontal, vertical)


_SDF: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "square": _sdf_square,
    "circle": _sdf_circle,
    "triangle": _sdf_triangle,
    "cross": _sdf_cross,
}


def _background(params: _VideoParams, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Dark tinted background, a soft gradient and one low-frequency ripple: ``(3, 1, S, S)`` in [0, 1]."""
    r, g, b, angle, gradient, fx, fy, phase, ripple = params.background
    shade = gradient * (math.cos(angle) * x + math.sin(angle) * y) + ripple * np.sin(fx * x + fy * y + phase)
    base = np.array([r, g, b], dtype=np.float32).reshape(3, 1, 1, 1)
    return np.clip(base + shade.astype(np.float32), 0.0, 1.0)  # (3, 1, S, S)


def _render(params: _VideoParams, frames: int, size: int) -> Tensor:
    """Render one video: ``(3, frames, size, size)`` float32 in ``[-1, 1]`` with anti-aliased edges.

    Rendered with numpy (single-threaded, fast for this size) rather than torch ops, whose intra-op
    threading costs more than it saves on arrays this small.
    """
    coords = ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)
    x, y = coords.reshape(1, 1, size), coords.reshape(1, size, 1)
    progress = np.linspace(0.0, 1.0, frames, dtype=np.float32) if frames > 1 else np.zeros(1, np.float32)
    centre_x = params.start[0] + (params.end[0] - params.start[0]) * progress  # (T,)
    centre_y = params.start[1] + (params.end[1] - params.start[1]) * progress
    px = x - centre_x.reshape(frames, 1, 1).astype(np.float32)  # (T, 1, S)
    py = y - centre_y.reshape(frames, 1, 1).astype(np.float32)  # (T, S, 1)
    named = {name: ATTRIBUTES[name][k] for name, k in zip(ATTRIBUTES, params.labels)}
    coverage = _SDF[named["shape"]](px, py, _RADIUS[named["size"]])  # (T, S, S) signed distance, image units
    coverage *= np.float32(-size / 2.0)  # in pixels, positive inside
    coverage += np.float32(0.5)
    np.clip(coverage, 0.0, 1.0, out=coverage)  # one-pixel-wide soft edge
    background = _background(params, x, y) * np.float32(2.0) - np.float32(1.0)  # (3, 1, S, S) in [-1, 1]
    colour = np.array(params.colour, dtype=np.float32).reshape(3, 1, 1, 1) * np.float32(2.0) - np.float32(1.0)
    video = np.multiply(colour - background, coverage[None])  # (3, T, S, S)
    video += background
    return torch.from_numpy(video)


# ----------------------------------------------------------------------------------------------------------
# Dataset.


class SyntheticVideos(Dataset):
    """Captioned moving-shape videos, deterministic by ``(split, seed, index)``.

    Args:
        split: ``"train"`` or ``"heldout"`` (independent seed streams, no shared video).
        num_videos: number of items.
        frames: frames per video ``T``.
        resolution: side length of ``__getitem__`` videos in pixels.
        seed: non-negative base seed.
        render_resolution: side length of the master render that every resolution is resized from.
        cache_mb: budget (MiB) of the LRU cache of resized uint8 videos; 0 disables it.

    Items are ``dict(video=(3, T, R, R) float32 in [-1, 1], caption=str, labels={attribute: int})``.
    """

    def __init__(
        self,
        split: str = "train",
        num_videos: int = 1024,
        frames: int = 12,
        resolution: int = 16,
        seed: int = 0,
        render_resolution: int = 128,
        cache_mb: float = 256.0,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} for the synthetic dataset; use one of {list(SPLITS)}")
        for name, value in (("num_videos", num_videos), ("frames", frames), ("resolution", resolution)):
            if value < 1:
                raise DataError(f"{name} must be at least 1, got {value}")
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        self.split, self.num_videos, self.frames = split, num_videos, frames
        self.resolution, self.seed, self.render_resolution = resolution, seed, render_resolution
        self._split_id = SPLITS[split]
        self._cache_bytes = int(cache_mb * 2**20)
        self._videos: OrderedDict[tuple[int, int], Tensor] = OrderedDict()  # (index, R) -> uint8 (3, T, R, R)
        self._masters: OrderedDict[tuple[int, int], Tensor] = OrderedDict()  # (index, S) -> float master
        self._cached_bytes = 0

    def __len__(self) -> int:
        return self.num_videos

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        labels = self.labels_at(index)
        return {
            "video": self.video_at(index, self.resolution),
            "caption": caption_for(labels),
            "labels": labels,
        }

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_videos:
            raise IndexError(f"index {index} out of range for {self.num_videos} synthetic videos")
        return index

    def _params(self, index: int) -> _VideoParams:
        return _sample_params(self.seed, self._split_id, self._check_index(index))

    def labels_at(self, index: int) -> dict[str, int]:
        """Class index per attribute of item ``index`` (no rendering)."""
        return dict(zip(ATTRIBUTES, self._params(index).labels))

    def caption_at(self, index: int) -> str:
        """Caption of item ``index`` (no rendering)."""
        return caption_for(self.labels_at(index))

    def master(self, index: int, size: int | None = None) -> Tensor:
        """The master render ``(3, T, S, S)`` in ``[-1, 1]``, ``S = size or render_resolution`` (not quantized)."""
        size = size or self.render_resolution
        key = (self._check_index(index), size)
        if key not in self._masters:
            self._masters[key] = _render(self._params(index), self.frames, size)
            while len(self._masters) > 4:  # a few masters, so one clip at several resolutions renders once
                self._masters.popitem(last=False)
        self._masters.move_to_end(key)
        return self._masters[key]

    def video_at(self, index: int, resolution: int) -> Tensor:
        """Item ``index`` at ``resolution``: ``(3, T, R, R)`` float32 in ``[-1, 1]`` on 8-bit levels.

        Resized (antialiased bilinear) from the master render; above ``render_resolution`` the master is
        rendered at ``resolution`` itself rather than upsampled.
        """
        key = (self._check_index(index), int(resolution))
        cached = self._videos.get(key)
        if cached is None:
            master = self.master(index, max(self.render_resolution, resolution))
            cached = quantize_to_uint8(resize_video(master, resolution))
            self._remember(key, cached)
        else:
            self._videos.move_to_end(key)
        return uint8_to_unit_range(cached)

    def _remember(self, key: tuple[int, int], video: Tensor) -> None:
        size = video.numel()
        if size > self._cache_bytes:
            return
        self._videos[key] = video
        self._cached_bytes += size
        while self._cached_bytes > self._cache_bytes:
            _, dropped = self._videos.popitem(last=False)
            self._cached_bytes -= dropped.numel()
