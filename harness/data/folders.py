"""Real videos on disk: Sky Timelapse frame folders and video files, with optional WebVid-style captions.

Layouts read (both may be mixed under one root):

* frame folders, as Sky Timelapse ships them: ``<root>/<split>/<video>/<clip>/<video>_frames_<8 digits>.jpg``;
  any folder holding ``*.jpg`` / ``*.jpeg`` / ``*.png`` files is one clip, frames in natural sort order;
* video files ``*.mp4``, ``*.webm``, ``*.avi``, ``*.mov``, ``*.mkv`` anywhere under ``<root>/<split>``,
  decoded with PyAV; each file is one clip.

The split folder is ``<root>/<split>`` (``train`` also finds ``sky_train``/``training``; ``heldout`` finds
``test``/``sky_test``/``val``/``validation``). A root without any split folder is split by a hash of each
clip's relative path (``heldout_fraction`` of the clips are heldout); ``split=None`` takes every clip.

Each item is ``frames`` frames, ``stride`` apart, resized (shorter side, antialiased bilinear) and
centre-cropped to ``resolution``, in ``[-1, 1]``: the same dict as the synthetic dataset, with
``labels = {}``. Captions come from a WebVid-style CSV (columns ``videoid`` and ``name``; others ignored),
matched to a clip by file stem / folder name, then the parent folder name (a Sky video), then the path
relative to the split folder without suffix; without a CSV every caption is ``""`` (unconditional).

The index is cheap: frame folders are listed, not decoded, and video files are probed for their frame
count through container metadata (decoded only when the metadata has none). Unreadable files are skipped
and recorded in ``dataset.skipped``: unopenable videos while indexing, corrupt frames when an item is
loaded (that item is then replaced by the next readable one). With DataLoader workers, skips found while
loading are recorded in the worker's copy of the dataset.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from harness.data._common import DataError, uint8_frames_to_video

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mov", ".mkv")
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train", "sky_train", "training"),
    "heldout": ("heldout", "test", "sky_test", "val", "validation"),
}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, av.FFmpegError)


@dataclass(frozen=True)
class Clip:
    """One clip: a folder of frames or one video file."""

    clip_id: str  # folder name or file stem
    path: Path  # the frame folder or the video file
    frame_paths: tuple[Path, ...]  # sorted frames of a folder clip; empty for a video file
    num_frames: int
    caption: str


@dataclass(frozen=True)
class SkippedFile:
    """A file or clip left out of the dataset, and why."""

    path: str
    reason: str


class _Unreadable(Exception):
    """Raised inside the loader when a clip cannot be decoded; turned into a ``SkippedFile``."""

    def __init__(self, reason: str, path: Path | None = None) -> None:
        super().__init__(reason)
        self.path = path


# ----------------------------------------------------------------------------------------------------------
# Index building.


def read_captions(csv_path: str | os.PathLike) -> dict[str, str]:
    """Read a WebVid-style captions CSV into ``{videoid: caption}`` (columns ``videoid`` and ``name``)."""
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(
            f"captions CSV {path} does not exist; pass the WebVid-style CSV (columns videoid,name) or omit it"
        )
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "videoid" not in columns or "name" not in columns:
            raise DataError(
                f"captions CSV {path} has columns {columns}, needs 'videoid' and 'name' (caption), as WebVid's do"
            )
        reader.fieldnames = columns
        return {row["videoid"].strip(): (row["name"] or "").strip() for row in reader if row.get("videoid")}


def _natural_key(path: Path) -> list:
    """Sort key that orders ``frame_2`` before ``frame_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _find_sources(base: Path) -> tuple[list[tuple[Path, list[Path]]], list[Path]]:
    """Walk ``base``: (frame folders with their sorted frames, video files), both in sorted order."""
    folders: list[tuple[Path, list[Path]]] = []
    videos: list[Path] = []
    for directory, subdirs, files in os.walk(base, followlinks=True):
        subdirs.sort()
        here = Path(directory)
        images = sorted((here / f for f in files if f.lower().endswith(IMAGE_SUFFIXES)), key=_natural_key)
        if images:
            folders.append((here, images))
        videos.extend(here / f for f in sorted(files) if f.lower().endswith(VIDEO_SUFFIXES))
    return folders, videos


def _probe_frame_count(path: Path) -> int:
    """Frame count of a video file from container metadata, decoding only when the metadata has none."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise _Unreadable("no video stream")
        stream = container.streams.video[0]
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def _in_heldout(relative: str, fraction: float) -> bool:
    """Deterministic hash split of a clip by its relative path."""
    digest = int(hashlib.sha1(relative.encode("utf-8")).hexdigest()[:8], 16)
    return digest / 2**32 < fraction


def _split_folder(root: Path, split: str | None) -> tuple[Path, str | None]:
    """Folder to index and, when the root has no split folders, the split to select by hash."""
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; pass an existing folder or 'synthetic'")
    if split is None:
        return root, None
    names = SPLIT_FOLDERS.get(split, (split,))
    for name in names:
        if (root / name).is_dir():
            return root / name, None
    known = {n for group in SPLIT_FOLDERS.values() for n in group}
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in known)
    if present or split not in SPLIT_FOLDERS:
        raise DataError(
            f"no folder for split {split!r} under {root} (looked for {list(names)}; found {present}); "
            f"add {root / names[0]} or use split=None to read the whole folder"
        )
    return root, split


# ----------------------------------------------------------------------------------------------------------
# Frame decoding.


def _load_image(path: Path, resolution: int) -> np.ndarray:
    """One RGB frame ``(H, W, 3)`` uint8; JPEGs are DCT-downscaled while decoding when far above ``resolution``."""
    with Image.open(path) as image:
        width, height = image.size
        scale = resolution / max(1, min(width, height))
        if scale < 1.0:
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        return np.asarray(image.convert("RGB"))


def _decode_video(path: Path, indices: list[int]) -> list[np.ndarray]:
    """Decode frames at sorted ``indices`` of a video file, each ``(H, W, 3)`` uint8."""
    wanted, frames, seen = set(indices), [], 0
    with av.open(str(path)) as container:
        for seen, frame in enumerate(container.decode(video=0), start=1):
            if seen - 1 in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
            if seen - 1 >= indices[-1]:
                break
    if len(frames) < len(indices):
        raise _Unreadable(f"decoded only {seen} frames, needed {indices[-1] + 1}")
    return frames


# ----------------------------------------------------------------------------------------------------------
# Dataset.


class VideoFolderDataset(Dataset):
    """Clips from frame folders and video files under ``root`` (see the module docstring for layouts).

    Args:
        root: dataset folder.
        split: ``"train"``, ``"heldout"``, another subfolder name, or ``None`` for the whole root.
        frames: frames per item ``T``.
        stride: step between the frames of an item (1 = consecutive frames).
        resolution: output side length ``R`` (shorter side resized, then centre crop).
        captions: WebVid-style CSV path; ``None`` means empty captions. Clips without a caption are skipped.
        windows: ``"first"`` (one item per clip, from its first frame) or ``"all"`` (every
            non-overlapping window of ``(frames - 1) * stride + 1`` frames).
        heldout_fraction: share of clips that are heldout when the root has no split folders.

    Items are ``dict(video=(3, T, R, R) float32 in [-1, 1], caption=str, labels={})``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        frames: int = 16,
        stride: int = 1,
        resolution: int = 64,
        captions: str | os.PathLike | None = None,
        windows: str = "first",
        heldout_fraction: float = 0.1,
    ) -> None:
        for name, value in (("frames", frames), ("stride", stride), ("resolution", resolution)):
            if value < 1:
                raise DataError(f"{name} must be at least 1, got {value}")
        if windows not in ("first", "all"):
            raise DataError(f"windows must be 'first' or 'all', got {windows!r}")
        self.root, self.split = Path(root), split
        self.frames, self.stride, self.resolution = frames, stride, resolution
        self.span = (frames - 1) * stride + 1  # source frames one item covers
        self.skipped: list[SkippedFile] = []
        self._failed: set[int] = set()
        self.base, hash_split = _split_folder(self.root, split)
        caption_table = read_captions(captions) if captions is not None else None
        self.clips = self._index(hash_split, caption_table, heldout_fraction)
        self._items = [
            (k, start)
            for k, clip in enumerate(self.clips)
            for start in (range(0, clip.num_frames - self.span + 1, self.span) if windows == "all" else [0])
        ]

    def _index(
        self, hash_split: str | None, caption_table: dict[str, str] | None, heldout_fraction: float
    ) -> list[Clip]:
        """List clips, probe lengths, attach captions; raise a ``DataError`` when nothing usable is left."""
        folders, videos = _find_sources(self.base)
        sources = [(path, tuple(images)) for path, images in folders] + [(path, ()) for path in videos]
        found: list[Clip] = []
        if hash_split is not None:
            sources = [
                (path, images)
                for path, images in sources
                if _in_heldout(self._relative(path), heldout_fraction) == (hash_split == "heldout")
            ]
            if not sources and (folders or videos):
                raise DataError(
                    f"none of the {len(folders) + len(videos)} clips under {self.base} fell in the "
                    f"{hash_split} part of the hash split (heldout_fraction={heldout_fraction}); "
                    f"add {self.base / hash_split} or use split=None"
                )
        for path, images in sources:
            relative = self._relative(path)
            try:
                count = len(images) if images else _probe_frame_count(path)
            except (_Unreadable, *_DECODE_ERRORS) as error:
                self.skipped.append(SkippedFile(str(path), f"unreadable video: {error}"))
                continue
            clip_id = path.name if images else path.stem
            caption = ""
            if caption_table is not None:
                keys = (clip_id, path.parent.name, relative)
                caption = next((caption_table[k] for k in keys if k in caption_table), None)
                if caption is None:
                    self.skipped.append(
                        SkippedFile(str(path), f"no caption: videoid {clip_id!r} is not in the CSV")
                    )
                    continue
            found.append(Clip(clip_id, path, images, count, caption))
        return self._keep_long_enough(found, len(sources), caption_table is not None)

    def _relative(self, path: Path) -> str:
        """Path of a clip relative to the split folder, without suffix (a stable clip key)."""
        relative = path.relative_to(self.base)
        return (relative.with_suffix("") if path.suffix.lower() in VIDEO_SUFFIXES else relative).as_posix()

    def _keep_long_enough(self, found: list[Clip], num_sources: int, has_csv: bool) -> list[Clip]:
        where = self.base
        if not found:
            if num_sources == 0:
                raise DataError(
                    f"no clips found under {where}: expected frame folders <video>/<clip>/*.jpg or video files "
                    f"({', '.join('*' + s for s in VIDEO_SUFFIXES)})"
                )
            hint = (
                "check that videoid values match file stems or folder names"
                if has_csv
                else "check that the files are valid videos (ffprobe <file>)"
            )
            kinds = Counter(s.reason.split(":")[0] for s in self.skipped)
            reasons = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
            raise DataError(f"all {num_sources} clips under {where} were left out ({reasons}); {hint}")
        long_enough = [clip for clip in found if clip.num_frames >= self.span]
        for clip in found:
            if clip.num_frames < self.span:
                self.skipped.append(
                    SkippedFile(str(clip.path), f"too short: {clip.num_frames} < {self.span} frames")
                )
        if not long_enough:
            longest = max(clip.num_frames for clip in found)
            raise DataError(
                f"every clip under {where} is shorter than the {self.span} frames needed for --frames "
                f"{self.frames} --stride {self.stride}; the longest has {longest} frames: lower --frames or --stride"
            )
        return long_enough

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self._items):
            raise IndexError(f"index {index} out of range for {len(self._items)} clips")
        for offset in range(len(self._items)):
            candidate = (index + offset) % len(self._items)
            if candidate in self._failed:
                continue
            try:
                return self._load(candidate)
            except (_Unreadable, *_DECODE_ERRORS) as error:
                self._failed.add(candidate)
                clip = self.clips[self._items[candidate][0]]
                path = error.path if isinstance(error, _Unreadable) and error.path else clip.path
                self.skipped.append(SkippedFile(str(path), f"unreadable: {error}"))
        raise DataError(f"no clip under {self.base} could be decoded; see dataset.skipped for the reasons")

    def _load(self, item: int) -> dict:
        """Decode item ``item``: ``dict(video=(3, T, R, R), caption, labels={})``."""
        clip_index, start = self._items[item]
        clip = self.clips[clip_index]
        indices = list(range(start, start + self.span, self.stride))
        if clip.frame_paths:
            frames = []
            for k in indices:
                try:
                    frames.append(_load_image(clip.frame_paths[k], self.resolution))
                except _DECODE_ERRORS as error:
                    raise _Unreadable(str(error), clip.frame_paths[k]) from error
        else:
            frames = _decode_video(clip.path, indices)
        video = uint8_frames_to_video(frames, self.resolution)  # (3, T, R, R) in [-1, 1]
        return {"video": video, "caption": clip.caption, "labels": {}}
