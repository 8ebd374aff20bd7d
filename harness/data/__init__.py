"""Datasets: the built-in synthetic captioned videos and real videos from folders.

Every dataset yields ``dict(video=(3, T, R, R) float32 in [-1, 1], caption=str, labels=dict)``;
:func:`build_dataset` is the one constructor the CLIs use.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from harness.data._common import DataError, resize_video
from harness.data.folders import (
    IMAGE_SUFFIXES,
    SPLIT_FOLDERS,
    VIDEO_SUFFIXES,
    Clip,
    SkippedFile,
    VideoFolderDataset,
    read_captions,
)
from harness.data.motion import motion_alignment
from harness.data.synthetic import (
    ATTRIBUTES,
    CAPTION_TEMPLATE,
    SPLITS,
    SyntheticVideos,
    all_captions,
    caption_for,
    labels_for,
)

__all__ = [
    "ATTRIBUTES",
    "CAPTION_TEMPLATE",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "SPLIT_FOLDERS",
    "VIDEO_SUFFIXES",
    "Clip",
    "DataError",
    "SkippedFile",
    "SyntheticVideos",
    "VideoFolderDataset",
    "all_captions",
    "build_dataset",
    "caption_for",
    "caption_strata",
    "dataset_checks",
    "labels_for",
    "read_captions",
    "resize_video",
]


def dataset_checks(spec: str | os.PathLike) -> dict:
    """Checks a dataset provides for generated videos: ``{name: check(videos (N, 3, T, R, R), prompts) ->
    dict}``. Only the built-in synthetic data has one: motion alignment, which reads how its captions
    describe motion (``harness.data.motion``). Folders of real videos provide none."""
    if str(spec) != "synthetic":
        return {}
    return {"motion_alignment": motion_alignment}


def caption_strata(spec: str | os.PathLike):
    """The strata of a dataset's captions, for the balanced prompt design of a generated set
    (``harness.metrics.prompts``): ``caption -> {stratum: value}``, or ``None`` where the captions are
    free text. The built-in synthetic captions name their attributes (``labels_for``); folders: none."""
    return labels_for if str(spec) == "synthetic" else None


SYNTHETIC_SIZES: dict[str, int] = {"train": 1024, "heldout": 256}  # default number of synthetic videos


def build_dataset(
    spec: str | os.PathLike,
    split: str = "train",
    frames: int = 12,
    resolution: int = 16,
    seed: int = 0,
    *,
    captions: str | os.PathLike | None = None,
    stride: int = 1,
    num_videos: int | None = None,
    windows: str = "first",
) -> Dataset:
    """Build a dataset from a spec: ``"synthetic"`` or a folder path.

    Args:
        spec: ``"synthetic"`` (the built-in captioned shapes) or a dataset folder (see ``VideoFolderDataset``).
        split: ``"train"`` or ``"heldout"``.
        frames: frames per item ``T``.
        resolution: side length ``R`` of the items.
        seed: seed of the synthetic dataset (folders are deterministic without one).
        captions: WebVid-style captions CSV for a folder; ``None`` means empty captions (unconditional).
        stride: frame step for a folder.
        num_videos: synthetic dataset size; ``None`` means 1024 for train, 256 for heldout.
        windows: ``"first"`` or ``"all"`` clip windows for a folder.

    Returns:
        A ``Dataset`` whose items are ``dict(video=(3, T, R, R), caption=str, labels=dict)``.
    """
    if str(spec) == "synthetic":
        if captions is not None:
            raise DataError(
                "the synthetic dataset makes its own captions; drop the captions CSV or use a folder"
            )
        if split not in SYNTHETIC_SIZES:
            raise DataError(f"unknown split {split!r}; use one of {list(SYNTHETIC_SIZES)}")
        size = num_videos if num_videos is not None else SYNTHETIC_SIZES[split]
        return SyntheticVideos(split=split, num_videos=size, frames=frames, resolution=resolution, seed=seed)
    if not os.path.isdir(spec):
        raise DataError(
            f"dataset {str(spec)!r} is neither 'synthetic' nor an existing folder; pass one of those"
        )
    return VideoFolderDataset(
        spec,
        split=split,
        frames=frames,
        stride=stride,
        resolution=resolution,
        captions=captions,
        windows=windows,
    )
