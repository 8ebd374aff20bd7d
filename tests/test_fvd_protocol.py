"""FVD / KVD protocol with the shipped offline extractor ``proxy-v1`` (results/extractor/proxy-v1).

Sanity properties on real synthetic clips at 16 px, 12 frames: two disjoint samples of 128 clips of
one distribution are close; Gaussian noise, blur and frame shuffling push FVD / KVD up monotonically.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from harness.data import ATTRIBUTES, SyntheticVideos
from harness.metrics import (
    DEFAULT_EXTRACTOR_DIR,
    FeatureExtractor,
    FVDProtocol,
    FVDResult,
    ProxyFeatures,
    evaluate_fvd,
    frechet_distance,
    kernel_distance,
    load_extractor,
    real_features,
    resolve_extractor,
    text_alignment,
    text_alignment_by_attribute,
)
from harness.metrics.fvd import real_stats_identity

FRAMES, RESOLUTION = 12, 16
HALF, EXTRA = 128, 64  # clips per compared set; further clips for the accuracy test


@pytest.fixture(scope="module")
def extractor() -> ProxyFeatures:
    return ProxyFeatures()


@pytest.fixture(scope="module")
def heldout() -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
    """320 heldout clips ``(320, 3, 12, 16, 16)``, their captions and labels."""
    num_videos = 2 * HALF + EXTRA
    dataset = SyntheticVideos("heldout", num_videos=num_videos, frames=FRAMES, resolution=RESOLUTION, seed=0)
    items = [dataset[i] for i in range(len(dataset))]
    videos = torch.stack([item["video"] for item in items])
    labels = {name: torch.tensor([item["labels"][name] for item in items]) for name in ATTRIBUTES}
    return videos, [item["caption"] for item in items], labels


@pytest.fixture(scope="module")
def reference(extractor: ProxyFeatures, heldout: tuple) -> torch.Tensor:
    """Features of the first 128 heldout clips (the 'real' set)."""
    return extractor.extract(heldout[0][:HALF])


def _sample_b(heldout: tuple) -> torch.Tensor:
    """The second, disjoint 128 clips: an independent sample of the same distribution."""
    return heldout[0][HALF : 2 * HALF]


def _distances(
    extractor: ProxyFeatures, reference: torch.Tensor, videos: torch.Tensor
) -> tuple[float, float]:
    fake = extractor.extract(videos)
    return frechet_distance(reference, fake), float(kernel_distance(reference, fake))


def _blur(videos: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of every frame of ``(B, 3, T, R, R)`` (separable, reflect padding)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    taps = taps / taps.sum()
    batch, channels, frames, height, width = videos.shape
    flat = videos.reshape(batch * channels * frames, 1, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), taps.view(1, 1, -1, 1))
    return flat.reshape(batch, channels, frames, height, width)


def _increasing(values: list[float]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


# ---------------------------------------------------------------------------------------------------
# The shipped extractor.


def test_shipped_extractor_files_and_metadata() -> None:
    files = list(DEFAULT_EXTRACTOR_DIR.iterdir())
    assert sum(f.stat().st_size for f in files) <= 5 * 2**20
    meta = json.loads((DEFAULT_EXTRACTOR_DIR / "extractor.json").read_text())
    assert meta["name"] == "proxy-v1" and len(meta["weights_sha256"]) == 64
    assert set(meta["heldout_accuracy"]["mean"]) == set(ATTRIBUTES)
    assert "train_extractor" in meta["training"]["command"]
    assert (DEFAULT_EXTRACTOR_DIR / "command.txt").is_file()
    assert (DEFAULT_EXTRACTOR_DIR / "train_log.jsonl").is_file()


def test_heldout_attribute_accuracy(extractor: ProxyFeatures, heldout: tuple) -> None:
    videos, _, labels = heldout
    rows = slice(2 * HALF, 2 * HALF + EXTRA)  # 64 clips not used elsewhere in this file
    predicted = extractor.predict_attributes(videos[rows])
    accuracy = {k: float((predicted[k] == labels[k][rows]).float().mean()) for k in ATTRIBUTES}
    assert accuracy["colour"] >= 0.9 and accuracy["direction"] >= 0.9 and accuracy["size"] >= 0.85, accuracy
    assert accuracy["shape"] >= 0.8, accuracy


def test_extract_shape_and_batch_independence(
    extractor: ProxyFeatures, heldout: tuple, reference: torch.Tensor
) -> None:
    assert reference.shape == (HALF, extractor.feature_dim) and reference.dtype == torch.float32
    torch.testing.assert_close(extractor.extract(heldout[0][:5]), reference[:5], rtol=1e-4, atol=1e-5)
    # Any input resolution works (resized to 32 inside).
    assert extractor.extract(torch.zeros(2, 3, 9, 64, 64)).shape == (2, extractor.feature_dim)


def test_extractor_refuses_too_few_frames(extractor: ProxyFeatures) -> None:
    with pytest.raises(ValueError, match="at least 8 frames") as error:
        extractor.extract(torch.zeros(2, 3, 7, 16, 16))
    assert "\n" not in str(error.value)


def test_load_extractor_default_path() -> None:
    loaded = load_extractor()
    assert loaded.name == "proxy-v1" and loaded.feature_dim == 128


# ---------------------------------------------------------------------------------------------------
# FVD / KVD sanity: same distribution small, perturbations monotone.


def test_noise_raises_fvd_and_kvd_monotonically(
    extractor: ProxyFeatures, heldout: tuple, reference: torch.Tensor
) -> None:
    clean = _sample_b(heldout)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=generator)
    results = [_distances(extractor, reference, clean)]
    results += [
        _distances(extractor, reference, (clean + std * noise).clamp(-1, 1)) for std in (0.15, 0.3, 0.6)
    ]
    fvds, kvds = [r[0] for r in results], [r[1] for r in results]
    assert _increasing(fvds), fvds
    assert _increasing(kvds), kvds
    assert fvds[-1] > 5 * fvds[0], fvds


def test_blur_raises_fvd_and_kvd_monotonically(
    extractor: ProxyFeatures, heldout: tuple, reference: torch.Tensor
) -> None:
    clean = _sample_b(heldout)
    results = [_distances(extractor, reference, clean)]
    results += [_distances(extractor, reference, _blur(clean, sigma)) for sigma in (0.6, 1.2, 2.4)]
    fvds, kvds = [r[0] for r in results], [r[1] for r in results]
    assert _increasing(fvds), fvds
    assert _increasing(kvds), kvds
    assert fvds[-1] > 5 * fvds[0], fvds


def test_frame_shuffling_raises_fvd(
    extractor: ProxyFeatures, heldout: tuple, reference: torch.Tensor
) -> None:
    clean = _sample_b(heldout)
    generator = torch.Generator().manual_seed(0)
    order = torch.stack(
        [torch.randperm(FRAMES, generator=generator) for _ in range(clean.shape[0])]
    )  # (B, T)
    shuffled = torch.stack([video[:, frames] for video, frames in zip(clean, order)])
    fvd_clean, kvd_clean = _distances(extractor, reference, clean)
    fvd_shuffled, kvd_shuffled = _distances(extractor, reference, shuffled)
    assert fvd_shuffled > 5 * fvd_clean, (fvd_clean, fvd_shuffled)
    assert kvd_shuffled > kvd_clean, (kvd_clean, kvd_shuffled)


# ---------------------------------------------------------------------------------------------------
# Protocol, cache and evaluation.


def test_protocol_name_and_record() -> None:
    protocol = FVDProtocol(num_real=64, num_fake=64, frames=12, resolution=16, repeats=3, seed=5)
    assert protocol.name == "fvd64_12f_16px@proxy-v1"
    record = protocol.to_dict()
    assert record["name"] == protocol.name and record["fake_seeds"] == [5, 6, 7]
    assert record["extractor"] == "proxy-v1" and record["split"] == "heldout"
    assert (
        FVDProtocol(extractor="i3d-k400", num_fake=2048, frames=16, resolution=64).name
        == "fvd2048_16f_64px@i3d-k400"
    )
    with pytest.raises(ValueError, match="num_fake"):
        FVDProtocol(num_fake=1)


class _CountingExtractor(FeatureExtractor):
    """Counts extract calls of a wrapped extractor."""

    def __init__(self, inner: FeatureExtractor) -> None:
        self.inner, self.name, self.feature_dim, self.calls = inner, inner.name, inner.feature_dim, 0

    def extract(self, videos: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner.extract(videos)


def test_real_stats_cache_hit_skips_the_extractor(extractor: ProxyFeatures, tmp_path) -> None:
    protocol = FVDProtocol(num_real=16, num_fake=16, frames=FRAMES, resolution=RESOLUTION)
    counting = _CountingExtractor(extractor)
    first, hit_first = real_features(protocol, counting, cache_dir=tmp_path, progress=False)
    calls = counting.calls
    second, hit_second = real_features(protocol, counting, cache_dir=tmp_path, progress=False)
    assert calls > 0 and counting.calls == calls
    assert (hit_first, hit_second) == (False, True)
    assert torch.equal(first, second) and first.shape == (16, 128)
    (cache_file,) = tmp_path.glob("*.safetensors")
    # A corrupt cache file is a miss: recomputed and rewritten.
    cache_file.write_bytes(b"not a safetensors file")
    third, hit_third = real_features(protocol, counting, cache_dir=tmp_path, progress=False)
    assert not hit_third and counting.calls == 2 * calls and torch.equal(third, first)
    # A different protocol field is a different cache entry.
    real_features(
        FVDProtocol(num_real=16, num_fake=16, frames=FRAMES, resolution=RESOLUTION, real_seed=1),
        counting,
        tmp_path,
        False,
    )
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    # Features of 8-bit clips: the identity names the levels, so features cached before quantisation
    # (an identity without "levels") are a miss.
    assert real_stats_identity(protocol)["levels"] == "uint8"


def test_evaluate_fvd_repeats_and_record(extractor: ProxyFeatures, tmp_path) -> None:
    protocol = FVDProtocol(num_real=32, num_fake=32, frames=FRAMES, resolution=RESOLUTION, repeats=2, seed=3)
    seeds: list[int] = []

    def generate(n: int, seed: int) -> torch.Tensor:  # stands in for the diffusion sampler
        seeds.append(seed)
        dataset = SyntheticVideos("train", num_videos=n, frames=FRAMES, resolution=RESOLUTION, seed=seed)
        return torch.stack([dataset[i]["video"] for i in range(n)])

    result = evaluate_fvd(protocol, generate, extractor, cache_dir=tmp_path, progress=False)
    assert isinstance(result, FVDResult) and seeds == [3, 4]
    assert len(result.fvd_runs) == len(result.kvd_runs) == 2 and result.extractor == "proxy-v1"
    assert result.fvd_mean == pytest.approx(sum(result.fvd_runs) / 2) and result.fvd_std >= 0
    assert result.fvd_se > 0 and result.kvd_se > 0 and result.bootstrap["seeds"] == [3, 4]
    assert result.to_dict()["protocol"]["name"] == "fvd32_12f_16px@proxy-v1"
    again = evaluate_fvd(protocol, generate, extractor, cache_dir=tmp_path, progress=False)
    assert again.real_cache_hit and again.fvd_runs == result.fvd_runs
    with pytest.raises(ValueError, match="expected"):
        evaluate_fvd(
            protocol, lambda n, s: torch.zeros(n, 3, FRAMES, 8, 8), extractor, tmp_path, progress=False
        )


def test_text_alignment(extractor: ProxyFeatures, heldout: tuple) -> None:
    videos, captions, _ = heldout
    videos, captions = videos[:64], captions[:64]
    aligned = text_alignment(videos, captions, extractor)
    shuffled = text_alignment(videos, captions[1:] + captions[:1], extractor)
    assert aligned > 0.8 and shuffled < aligned - 0.2, (aligned, shuffled)
    # Prompts that do not parse are skipped; none parsing gives NaN.
    mixed = text_alignment(videos[:4], ["a photo of a cat", *captions[1:4]], extractor)
    assert mixed == pytest.approx(text_alignment(videos[1:4], captions[1:4], extractor))
    assert math.isnan(text_alignment(videos[:2], ["sky", "clouds"], extractor))
    by_attribute = text_alignment_by_attribute(videos, captions, extractor)
    assert set(by_attribute) == {"colour", "shape", "direction", "size"}
    assert aligned == pytest.approx(sum(by_attribute.values()) / 4)  # every caption names all four
    reversed_motion = [
        c.replace("left", "@").replace("right", "left").replace("@", "right") for c in captions
    ]
    assert (
        text_alignment_by_attribute(videos, reversed_motion, extractor)["direction"]
        < by_attribute["direction"]
    )
    assert text_alignment_by_attribute(videos[:2], ["sky", "clouds"], extractor) == {}


def test_resolve_extractor(tmp_path) -> None:
    assert resolve_extractor(None).name == "proxy-v1"
    missing = tmp_path / "i3d_pretrained_400.pt"
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        resolve_extractor(str(missing))
    assert "\n" not in str(error.value) and str(missing) in str(error.value)
