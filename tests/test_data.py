"""Datasets: the synthetic captioned videos and real videos from frame folders / video files."""

from __future__ import annotations

import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from harness.data import (
    ATTRIBUTES,
    DataError,
    SyntheticVideos,
    VideoFolderDataset,
    all_captions,
    build_dataset,
    caption_for,
    labels_for,
    resize_video,
)
from harness.data._common import quantize_to_uint8

# ----------------------------------------------------------------------------------------------------------
# Synthetic videos.


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_synthetic_shapes_and_range(resolution: int) -> None:
    dataset = SyntheticVideos(num_videos=4, frames=12, resolution=resolution)
    item = dataset[1]
    assert item["video"].shape == (3, 12, resolution, resolution)
    assert item["video"].dtype == torch.float32
    assert item["video"].min() >= -1.0 and item["video"].max() <= 1.0
    assert item["video"].std() > 0.1  # not blank
    assert set(item["labels"]) == set(ATTRIBUTES)
    assert item["caption"] == caption_for(item["labels"])


def test_synthetic_is_deterministic_by_seed() -> None:
    first, again = SyntheticVideos(num_videos=8, seed=3), SyntheticVideos(num_videos=8, seed=3)
    other = SyntheticVideos(num_videos=8, seed=4)
    for i in (0, 5, 7):
        assert torch.equal(first[i]["video"], again[i]["video"])
        assert first[i]["caption"] == again[i]["caption"]
    assert not any(torch.equal(first[i]["video"], other[i]["video"]) for i in range(8))


def test_synthetic_splits_are_disjoint() -> None:
    train = SyntheticVideos("train", num_videos=24)
    heldout = SyntheticVideos("heldout", num_videos=24)
    train_videos = [train[i]["video"] for i in range(24)]
    for j in range(24):
        assert not any(torch.equal(heldout[j]["video"], video) for video in train_videos)


def test_synthetic_same_caption_different_videos_and_balanced_labels() -> None:
    dataset = SyntheticVideos(num_videos=256)
    captions = [dataset.caption_at(i) for i in range(256)]
    assert sorted(captions[:128]) == sorted(all_captions())  # every combination once per block
    later = captions.index(captions[0], 1)
    assert not torch.equal(dataset[0]["video"], dataset[later]["video"])


def test_caption_labels_round_trip() -> None:
    captions = all_captions()
    assert len(captions) == np.prod([len(v) for v in ATTRIBUTES.values()])
    for caption in captions:
        assert caption_for(labels_for(caption)) == caption
    assert labels_for("A  Large RED square moving left") == {
        "colour": 0,
        "shape": 0,
        "direction": 0,
        "size": 1,
    }
    item = SyntheticVideos(num_videos=3)[2]
    assert labels_for(item["caption"]) == item["labels"]
    for bad in [
        "a red square moving left",
        "a large purple square moving left",
        "",
        "a large red square going left",
    ]:
        with pytest.raises(DataError, match="expected"):
            labels_for(bad)
    with pytest.raises(DataError, match="out of range"):
        caption_for({"colour": 9, "shape": 0, "direction": 0, "size": 0})


def test_synthetic_resolutions_come_from_one_master_with_antialiasing() -> None:
    dataset = SyntheticVideos(num_videos=2, resolution=16)
    master = dataset.master(1)  # (3, T, 128, 128)
    flat = master.reshape(1, -1, 128, 128)
    smooth = F.interpolate(flat, size=(16, 16), mode="bilinear", antialias=True).reshape(3, 12, 16, 16)
    aliased = F.interpolate(flat, size=(16, 16), mode="bilinear", antialias=False).reshape(3, 12, 16, 16)
    expected = quantize_to_uint8(smooth).float() / 127.5 - 1.0
    assert torch.equal(dataset.video_at(1, 16), expected)
    assert torch.equal(dataset[1]["video"], expected)
    assert (dataset.video_at(1, 16) - aliased).abs().max() > 0.05
    # Higher resolutions of the same clip agree with the low one after downsampling.
    high = dataset.video_at(1, 64)
    assert (resize_video(high, 16) - dataset.video_at(1, 16)).abs().mean() < 0.02


def test_synthetic_is_fast_and_collates() -> None:
    dataset = SyntheticVideos(num_videos=64, frames=12, resolution=16, cache_mb=0)
    start = time.perf_counter()
    for i in range(64):
        dataset[i]
    assert time.perf_counter() - start < 5.0  # ~0.2 s on an idle core
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["video"].shape == (4, 3, 12, 16, 16)
    assert len(batch["caption"]) == 4 and batch["labels"]["colour"].shape == (4,)


def test_synthetic_bad_arguments() -> None:
    with pytest.raises(DataError, match="split"):
        SyntheticVideos("test")
    with pytest.raises(DataError, match="resolution"):
        SyntheticVideos(resolution=0)
    with pytest.raises(IndexError):
        SyntheticVideos(num_videos=2)[2]


# ----------------------------------------------------------------------------------------------------------
# Folders: fixtures.


def _write_frames(
    folder: Path, video: str, count: int, size: tuple[int, int] = (48, 32), step: int = 20
) -> None:
    """Sky-style clip: solid grey frames whose level rises by ``step`` per frame."""
    folder.mkdir(parents=True)
    for k in range(count):
        image = Image.new("RGB", size, (k * step % 256,) * 3)
        image.save(folder / f"{video}_frames_{k + 1:08d}.jpg", quality=95)


def _write_mp4(path: Path, count: int, size: tuple[int, int] = (32, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for k in range(count):
            array = np.full((size[1], size[0], 3), k * 20, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture()
def sky(tmp_path: Path) -> Path:
    """``<root>/train/vidA/{vidA_1 (10 frames), vidA_2 (6 frames)}``, ``train/webm/abc.mp4`` (10 frames),
    ``test/vidB/vidB_1`` (8 frames)."""
    root = tmp_path / "sky"
    _write_frames(root / "train" / "vidA" / "vidA_1", "vidA", 10)
    _write_frames(root / "train" / "vidA" / "vidA_2", "vidA", 6)
    _write_mp4(root / "train" / "webm" / "abc.mp4", 10)
    _write_frames(root / "test" / "vidB" / "vidB_1", "vidB", 8)
    return root


def _levels(video: torch.Tensor) -> list[float]:
    """Mean grey level (0..255) of each frame of a ``(3, T, R, R)`` video."""
    return [round(float((frame.mean() + 1) * 127.5)) for frame in video.unbind(1)]


# ----------------------------------------------------------------------------------------------------------
# Folders: reading.


def test_sky_frame_folders_and_mp4(sky: Path) -> None:
    dataset = VideoFolderDataset(sky, "train", frames=4, resolution=16)
    assert len(dataset) == 3 and not dataset.skipped
    assert [clip.clip_id for clip in dataset.clips] == ["vidA_1", "vidA_2", "abc"]
    for i in range(3):
        item = dataset[i]
        assert item["video"].shape == (3, 4, 16, 16) and item["video"].dtype == torch.float32
        assert item["video"].min() >= -1.0 and item["video"].max() <= 1.0
        assert item["caption"] == "" and item["labels"] == {}
        assert _levels(item["video"]) == pytest.approx([0, 20, 40, 60], abs=4)


def test_stride_windows_and_heldout_folder(sky: Path) -> None:
    strided = VideoFolderDataset(sky, "train", frames=3, stride=2, resolution=8)
    assert _levels(strided[0]["video"]) == pytest.approx([0, 40, 80], abs=4)
    windows = VideoFolderDataset(sky, "train", frames=4, resolution=8, windows="all")
    assert len(windows) == 2 + 1 + 2  # 10-frame clips hold two 4-frame windows, the 6-frame clip one
    assert _levels(windows[1]["video"]) == pytest.approx([80, 100, 120, 140], abs=4)
    heldout = VideoFolderDataset(sky, "heldout", frames=4, resolution=8)  # reads <root>/test
    assert [clip.clip_id for clip in heldout.clips] == ["vidB_1"]


def test_large_frames_are_resized_and_centre_cropped(tmp_path: Path) -> None:
    root = tmp_path / "wide"
    (root / "clip").mkdir(parents=True)
    for k in range(3):  # left third red, middle green, right third blue: the crop keeps the green
        array = np.zeros((360, 640, 3), np.uint8)
        array[:, :213, 0], array[:, 213:427, 1], array[:, 427:, 2] = 255, 255, 255
        Image.fromarray(array).save(root / "clip" / f"f_{k}.jpg", quality=95)
    video = VideoFolderDataset(root, None, frames=3, resolution=16)[0]["video"]
    assert video.shape == (3, 3, 16, 16)
    centre = video[:, :, 4:12, 6:10].mean(dim=(1, 2, 3))
    assert centre[1] > 0.9 and centre[0] < -0.9 and centre[2] < -0.9


def test_captions_csv(sky: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        "vidA_1,http://x,PT00H00M10S,dir,clouds rolling over a hill\n"
        'abc,http://y,PT00H00M05S,dir,"a sunset, timelapse"\n'
    )
    dataset = VideoFolderDataset(sky, "train", frames=4, resolution=8, captions=csv_path)
    assert [dataset[i]["caption"] for i in range(len(dataset))] == [
        "clouds rolling over a hill",
        "a sunset, timelapse",
    ]
    assert len(dataset.skipped) == 1 and dataset.skipped[0].reason.startswith("no caption:")
    csv_path.write_text("videoid,name\nvidA,stars at night\n")  # a Sky video id captions all its clips
    dataset = VideoFolderDataset(sky, "train", frames=4, resolution=8, captions=csv_path)
    assert [clip.caption for clip in dataset.clips] == ["stars at night", "stars at night"]


# ----------------------------------------------------------------------------------------------------------
# Folders: errors and skipped files.


def test_folder_errors(sky: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        VideoFolderDataset(tmp_path / "nowhere", "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no clips found"):
        VideoFolderDataset(tmp_path / "empty", "train")
    with pytest.raises(DataError, match=r"longest has 10 frames.*--frames"):
        VideoFolderDataset(sky, "train", frames=8, stride=2)
    with pytest.raises(DataError, match="no folder for split"):
        VideoFolderDataset(sky, "validation_2")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("id,caption\nvidA_1,x\n")
    with pytest.raises(DataError, match="videoid"):
        VideoFolderDataset(sky, "train", frames=4, captions=bad_csv)
    with pytest.raises(DataError, match="does not exist"):
        VideoFolderDataset(sky, "train", frames=4, captions=tmp_path / "missing.csv")
    unmatched = tmp_path / "unmatched.csv"
    unmatched.write_text("videoid,name\n123,x\n")
    with pytest.raises(DataError, match="videoid values match"):
        VideoFolderDataset(sky, "train", frames=4, captions=unmatched)


def test_short_clips_are_skipped_when_others_are_long_enough(sky: Path) -> None:
    dataset = VideoFolderDataset(sky, "train", frames=8, resolution=8)
    assert [clip.clip_id for clip in dataset.clips] == ["vidA_1", "abc"]
    assert [s.reason for s in dataset.skipped] == ["too short: 6 < 8 frames"]


def test_corrupt_files_are_skipped_and_counted(sky: Path) -> None:
    (sky / "train" / "broken.mp4").write_bytes(b"not a video at all" * 10)
    corrupt = sky / "train" / "vidA" / "vidA_1" / "vidA_frames_00000002.jpg"
    corrupt.write_bytes(b"\xff\xd8 garbage")
    dataset = VideoFolderDataset(sky, "train", frames=4, resolution=8)
    assert len(dataset) == 3
    assert [Path(s.path).name for s in dataset.skipped] == ["broken.mp4"]
    first = dataset[0]  # vidA_1 cannot be decoded: the next clip (vidA_2) stands in
    assert _levels(first["video"]) == pytest.approx([0, 20, 40, 60], abs=4)
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 3
    assert [Path(s.path).name for s in dataset.skipped] == ["broken.mp4", corrupt.name]


def test_root_without_split_folders_is_hash_split(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for name in "abcdefghij":
        _write_frames(root / name, name, 4, size=(8, 8))
    train = VideoFolderDataset(root, "train", frames=2, resolution=8, heldout_fraction=0.5)
    heldout = VideoFolderDataset(root, "heldout", frames=2, resolution=8, heldout_fraction=0.5)
    everything = VideoFolderDataset(root, None, frames=2, resolution=8)
    train_ids = {c.clip_id for c in train.clips}
    heldout_ids = {c.clip_id for c in heldout.clips}
    assert train_ids and heldout_ids and not train_ids & heldout_ids
    assert train_ids | heldout_ids == {c.clip_id for c in everything.clips}


def test_build_dataset(sky: Path) -> None:
    synthetic = build_dataset("synthetic", "heldout", frames=6, resolution=32, seed=1)
    assert isinstance(synthetic, SyntheticVideos) and len(synthetic) == 256
    assert synthetic[0]["video"].shape == (3, 6, 32, 32)
    assert len(build_dataset("synthetic", "train", num_videos=10)) == 10
    folder = build_dataset(str(sky), "train", frames=4, resolution=16)
    assert isinstance(folder, VideoFolderDataset) and folder[0]["video"].shape == (3, 4, 16, 16)
    with pytest.raises(DataError, match="neither 'synthetic' nor an existing folder"):
        build_dataset(str(sky / "nope"))
