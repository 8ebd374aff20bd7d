"""Motion alignment (harness.metrics.motion): model-free, so it must score real clips perfectly, reversed
clips at zero, and not be fooled by an object that sits where the prompt's motion would start."""

import math

import pytest
import torch

from harness.data.synthetic import SyntheticVideos
from harness.metrics import motion_alignment, object_centroids


@pytest.fixture(scope="module")
def clips():
    data = SyntheticVideos("heldout", num_videos=64, resolution=16)
    items = [data[i] for i in range(len(data))]
    return torch.stack([it["video"] for it in items]), [it["caption"] for it in items]


def test_real_clips_move_the_prompted_way(clips):
    videos, captions = clips
    score = motion_alignment(videos, captions)
    assert score["fraction"] == 1.0 and score["videos"] == 64
    assert 0.35 < score["travel"] < 0.6  # 55-95% of the free range, in frame widths


def test_reversed_and_static_clips_do_not(clips):
    videos, captions = clips
    reversed_ = motion_alignment(videos.flip(2), captions)
    assert reversed_["fraction"] == 0.0 and reversed_["travel"] < -0.35
    # The object placed where the prompted motion starts, but not moving: no credit.
    static = videos[:, :, :1].expand_as(videos)
    assert motion_alignment(static, captions)["fraction"] == 0.0
    # Sideways motion is not "up": a left/right clip captioned with up/down scores zero.
    sideways = [(i, c) for i, c in enumerate(captions) if c.endswith(("left", "right"))]
    recaptioned = [c.rsplit(" ", 1)[0] + " up" for _, c in sideways]
    assert motion_alignment(videos[[i for i, _ in sideways]], recaptioned)["fraction"] == 0.0


def test_centroids_and_edge_cases(clips):
    videos, captions = clips
    centroids = object_centroids(videos)
    assert centroids.shape == (64, 12, 2) and ((centroids > 0) & (centroids < 1)).all()
    dark = torch.full((2, 3, 12, 16, 16), -1.0)
    assert torch.isnan(object_centroids(dark)).all()
    assert motion_alignment(dark, captions[:2])["fraction"] == 0.0  # no object: no motion
    mixed = motion_alignment(videos[:3], ["a photo of a cat", *captions[1:3]])
    assert mixed["videos"] == 2 and mixed == motion_alignment(videos[1:3], captions[1:3])
    assert motion_alignment(videos[:2], ["sky", "clouds"]) == {}
    with pytest.raises(ValueError, match="3 videos but 2 prompts"):
        motion_alignment(videos[:3], captions[:2])
    assert not math.isnan(motion_alignment(videos, captions)["travel"])
