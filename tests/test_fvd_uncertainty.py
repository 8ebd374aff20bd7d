"""Uncertainty of the FVD / KVD protocol: bootstrap standard errors of one run, paired resamples across
candidates, the protocol's floor (measured once, cached), the generated set's prompts (caption
distribution, prefix-stable), 8-bit quantisation, per-video noise (prefix property, batch independence)
and the reuse of generated videos between fidelities."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from harness.candidates import Candidate
from harness.data import SyntheticVideos, labels_for
from harness.measurement import Generation, MeasureSettings
from harness.measurement.quality import FrechetQuality, GeneratedVideoCache
from harness.metrics.frechet import bootstrap_indices
from harness.metrics.fvd import (
    FeatureExtractor,
    FVDProtocol,
    ProxyFeatures,
    evaluate_fvd,
    floor_clips,
    generation_prompts,
    paired_se,
    protocol_floor,
    protocol_prompts,
    quantize_8bit,
    real_captions,
)
from harness.models import load_bundle
from harness.paths import DEFAULT_BASE
from harness.pipeline import Chain, generate, video_seeds

FRAMES, RESOLUTION = 12, 16


@pytest.fixture(scope="module")
def extractor() -> ProxyFeatures:
    return ProxyFeatures()


class _CountingExtractor(FeatureExtractor):
    """Counts the videos a wrapped extractor is given."""

    def __init__(self, inner: FeatureExtractor) -> None:
        self.inner, self.name, self.feature_dim, self.videos = inner, inner.name, inner.feature_dim, 0

    def extract(self, videos: torch.Tensor) -> torch.Tensor:
        self.videos += videos.shape[0]
        return self.inner.extract(videos)


def _train_clips(seed: int):
    """A stand-in generator: ``(n, seed) -> `` n training clips of the synthetic data (real videos)."""

    def generate_fn(n: int, _: int) -> torch.Tensor:
        dataset = SyntheticVideos("train", num_videos=n, frames=FRAMES, resolution=RESOLUTION, seed=seed)
        return torch.stack([dataset[i]["video"] for i in range(n)])

    return generate_fn


# ---------------------------------------------------------------------------------------------------
# Bootstrap standard errors.


@pytest.mark.parametrize(("uncertainty", "replicates"), [("jackknife", 16), ("bootstrap", 50)])
def test_single_run_fvd_has_a_positive_standard_error(extractor, tmp_path, uncertainty, replicates) -> None:
    protocol = FVDProtocol(num_real=64, num_fake=16, frames=FRAMES, resolution=RESOLUTION,
                           uncertainty=uncertainty, bootstrap=50)  # fmt: skip
    result = evaluate_fvd(protocol, _train_clips(0), extractor, cache_dir=tmp_path, progress=False)
    assert result.fvd_std == 0.0  # one repeat has no spread ...
    assert result.fvd_se > 0.05 * result.fvd_mean and result.kvd_se > 0  # ... but an uncertainty
    boot = result.bootstrap
    assert (boot["B"], boot["n"], boot["seed"], boot["seeds"]) == (replicates, 16, 0, [0])
    assert len(boot["fvd"]) == len(boot["kvd"]) == replicates and boot["method"].startswith(uncertainty)
    assert np.std(boot["fvd"], ddof=1) == pytest.approx(result.fvd_se, rel=1e-4)


def test_repeats_combine_replicate_wise(extractor, tmp_path) -> None:
    """With repeats the SE is that of the mean: smaller than one run's, replicates are the runs' mean."""
    one = FVDProtocol(num_real=64, num_fake=16, frames=FRAMES, resolution=RESOLUTION)
    two = FVDProtocol(num_real=64, num_fake=16, frames=FRAMES, resolution=RESOLUTION, repeats=2)
    single = evaluate_fvd(one, _train_clips(0), extractor, cache_dir=tmp_path, progress=False)
    seen: list[int] = []

    def generate_fn(n: int, seed: int) -> torch.Tensor:
        seen.append(seed)
        return _train_clips(seed)(n, seed)

    double = evaluate_fvd(two, generate_fn, extractor, cache_dir=tmp_path, progress=False)
    assert seen == [0, 1] and double.fvd_runs[0] == single.fvd_runs[0]
    assert double.bootstrap["method"].endswith("mean-of-2") and double.fvd_se < single.fvd_se


@pytest.mark.parametrize("uncertainty", ["bootstrap", "jackknife"])
def test_two_candidates_share_their_resamples(extractor, tmp_path, uncertainty) -> None:
    """Two generated sets that differ only in video 5: every bootstrap replicate that did not draw video
    5 is the same for both (the resamples are common). A close candidate's paired SE is far below the
    unpaired one."""
    protocol = FVDProtocol(num_real=64, num_fake=16, frames=FRAMES, resolution=RESOLUTION,
                           uncertainty=uncertainty, bootstrap=60)  # fmt: skip
    videos = _train_clips(0)(16, 0)
    other = videos.clone()
    other[5] = _train_clips(1)(6, 0)[5]
    a = evaluate_fvd(protocol, lambda n, s: videos, extractor, cache_dir=tmp_path, progress=False)
    b = evaluate_fvd(protocol, lambda n, s: other, extractor, cache_dir=tmp_path, progress=False)
    if uncertainty == "bootstrap":
        without = ~(bootstrap_indices(16, 60, 0) == 5).any(axis=1)
        assert 0 < without.sum() < 60
        fvd_a, fvd_b = np.array(a.bootstrap["fvd"]), np.array(b.bootstrap["fvd"])
        np.testing.assert_array_equal(fvd_a[without], fvd_b[without])
        assert not np.array_equal(fvd_a, fvd_b)
    # A close candidate (every video slightly changed, as a neighbouring subnet's): pairing tightens.
    noise = 0.05 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))
    near = evaluate_fvd(protocol, lambda n, s: (videos + noise).clamp(-1, 1), extractor, cache_dir=tmp_path,
                        progress=False)  # fmt: skip
    assert paired_se(a.bootstrap, near.bootstrap) < 0.3 * np.hypot(a.fvd_se, near.fvd_se)
    with pytest.raises(ValueError, match="differ in"):
        paired_se(a.bootstrap, {**b.bootstrap, "seeds": [1]})


def test_generated_videos_are_quantised_to_8_bits(extractor, tmp_path) -> None:
    protocol = FVDProtocol(num_real=32, num_fake=8, frames=FRAMES, resolution=RESOLUTION)
    clips = _train_clips(0)(8, 0)
    off_levels = (clips + 0.3 / 127.5).clamp(-1, 1)  # between two uint8 levels
    assert not torch.equal(quantize_8bit(off_levels), off_levels)
    assert torch.equal(quantize_8bit(quantize_8bit(off_levels)), quantize_8bit(off_levels))
    raw = evaluate_fvd(protocol, lambda n, s: off_levels, extractor, cache_dir=tmp_path, progress=False)
    snapped = evaluate_fvd(
        protocol, lambda n, s: quantize_8bit(off_levels), extractor, cache_dir=tmp_path, progress=False
    )
    unquantised = extractor.extract(off_levels)
    assert not torch.equal(unquantised, extractor.extract(quantize_8bit(off_levels)))
    assert raw.fvd_mean == snapped.fvd_mean and raw.bootstrap == snapped.bootstrap


# ---------------------------------------------------------------------------------------------------
# Prompts and the floor.


def test_prompts_follow_the_real_caption_distribution() -> None:
    protocol = FVDProtocol(num_real=256, num_fake=32, frames=FRAMES, resolution=RESOLUTION)
    captions = real_captions(protocol)
    assert len(set(captions)) == 128 and set(Counter(captions).values()) == {2}
    first = generation_prompts(captions, seed=0, stop=32)
    assert first == generation_prompts(captions, seed=0, stop=300)[:32]  # prefix-stable
    assert generation_prompts(captions, seed=0, stop=40, start=8) == generation_prompts(captions, 0, 40)[8:]
    assert first != generation_prompts(captions, seed=1, stop=32)
    cycle = generation_prompts(captions, seed=0, stop=256)
    assert len(set(cycle[:128])) == 128 and Counter(cycle) == Counter(captions)  # stratified, exact counts
    colours = Counter(labels_for(p)["colour"] for p in generation_prompts(captions, 3, 128 * 4))
    assert set(colours.values()) == {128}


def test_floor_clips_are_heldout_and_caption_matched() -> None:
    protocol = FVDProtocol(num_real=64, num_fake=12, frames=FRAMES, resolution=RESOLUTION, seed=2)
    clips = floor_clips(protocol, seed=2)
    prompts = protocol_prompts(protocol, 2, 12)
    real = SyntheticVideos("heldout", num_videos=64, frames=FRAMES, resolution=RESOLUTION, seed=0)
    real_videos = torch.stack([real[i]["video"] for i in range(64)])
    assert clips.shape == (12, 3, FRAMES, RESOLUTION, RESOLUTION)
    assert not any(torch.equal(clip, video) for clip in clips for video in real_videos)
    assert torch.equal(clips, quantize_8bit(clips))
    # Caption matched: the extractor recognises each clip's prompt as it does real clips'.
    predicted = ProxyFeatures().predict_attributes(clips)
    hits = [predicted[k][i].item() == v for i, p in enumerate(prompts) for k, v in labels_for(p).items()]
    assert np.mean(hits) > 0.85


def test_floor_is_measured_once_then_read_from_the_cache(extractor, tmp_path) -> None:
    protocol = FVDProtocol(num_real=32, num_fake=8, frames=FRAMES, resolution=RESOLUTION)
    counting = _CountingExtractor(extractor)
    first = protocol_floor(protocol, counting, cache_dir=tmp_path)
    assert not first.cache_hit and counting.videos == 32 + 8  # the real set, then the floor's clips
    assert first.fvd > 0 and first.fvd_se > 0 and first.n == 8 and first.seeds == [0]
    second = protocol_floor(protocol, counting, cache_dir=tmp_path)
    assert second.cache_hit and counting.videos == 40  # nothing extracted again
    assert second.to_extra() == first.to_extra() and second.bootstrap == first.bootstrap
    assert set(first.to_extra()) == {"fvd", "fvd_se", "kvd", "kvd_se", "n", "method", "seeds"}
    # Another N or another seed is another entry.
    other_seed = FVDProtocol(num_real=32, num_fake=8, frames=FRAMES, resolution=RESOLUTION, seed=1)
    protocol_floor(other_seed, counting, cache_dir=tmp_path)
    assert counting.videos == 48 and len(list(tmp_path.glob("*_floor_*.safetensors"))) == 2


def _write_folder(root, clips: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(clips):
        folder = root / "heldout" / f"clip{c}"
        folder.mkdir(parents=True)
        for t in range(FRAMES):
            pixels = rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"f{t:03d}.png")


def test_floor_of_a_folder_uses_clips_outside_the_real_set(extractor, tmp_path) -> None:
    _write_folder(tmp_path / "folder", 10)
    protocol = FVDProtocol(num_real=6, num_fake=3, frames=FRAMES, resolution=RESOLUTION,
                           dataset=str(tmp_path / "folder"))  # fmt: skip
    floor = protocol_floor(protocol, extractor, cache_dir=tmp_path / "cache")
    assert floor.fvd_se > 0 and floor.n == 3
    too_many = FVDProtocol(num_real=8, num_fake=3, frames=FRAMES, resolution=RESOLUTION,
                           dataset=str(tmp_path / "folder"))  # fmt: skip
    with pytest.raises(ValueError, match="lower --real-videos") as error:
        protocol_floor(too_many, extractor, cache_dir=tmp_path / "cache")
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------
# Per-video noise, the prefix property and reuse between fidelities (the shipped tiny base).


@pytest.fixture(scope="module")
def base():
    bundle = load_bundle(DEFAULT_BASE)
    return bundle, bundle.text_encoder.load()


def test_per_video_noise_is_independent_of_batching(base) -> None:
    bundle, text = base
    chain = Chain(bundle, None, text, bundle.network.space.smallest())
    prompts = [
        "a large red square moving left",
        "a small blue circle moving up",
        "a large green cross moving down",
    ]
    seeds = video_seeds(4, 0, 3)
    together = generate(chain, prompts, steps=2, video_seeds=seeds)
    alone = torch.cat(
        [generate(chain, prompts[i : i + 1], steps=2, video_seeds=seeds[i : i + 1]) for i in range(3)]
    )
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)  # float round-off of batched kernels only
    assert not torch.allclose(
        together[0], generate(chain, prompts[:1], steps=2, video_seeds=video_seeds(5, 0, 1))[0]
    )
    with pytest.raises(ValueError, match="one per prompt"):
        generate(chain, prompts, steps=2, video_seeds=seeds[:2])


def _quality(base, fvd_videos: int, tmp_path, cache: GeneratedVideoCache | None) -> FrechetQuality:
    bundle, text = base
    settings = MeasureSettings(steps=2, fvd_videos=fvd_videos, real_videos=32)
    return FrechetQuality(Generation(bundle, None, settings.steps, settings.guidance), text, settings,
                          video_cache=cache, cache_dir=tmp_path)  # fmt: skip


@pytest.mark.slow
def test_prefix_property_and_reuse_between_fidelities(base, tmp_path) -> None:
    """A screen of 8 videos and a full run of 16 share their first 8; the full run after the screen
    generates only 8 more and equals a from-scratch full run exactly (chunks aligned to 8)."""
    cand = Candidate(base[0].network.space.smallest())
    cache = GeneratedVideoCache(max_candidates=2)
    screen, full = _quality(base, 8, tmp_path, cache), _quality(base, 16, tmp_path, cache)
    screen_values, _ = screen.compute(cand)
    assert cache.generated == 8
    values, extra = full.compute(cand)
    assert (cache.generated, cache.reused) == (16, 8)
    fresh = _quality(base, 16, tmp_path, None)
    assert torch.equal(fresh.videos(cand, 0, 16)[:8], screen.videos(cand, 0, 8))  # prefix property
    fresh_values, fresh_extra = fresh.compute(cand)
    assert fresh_values == values and fresh_extra["bootstrap"] == extra["bootstrap"]
    # The record: SEs, the bootstrap and the floor (contract item 2), a protocol naming its version.
    assert values["fvd_std"] > 0 and values["kvd_std"] > 0 and screen_values["fvd_std"] > 0
    assert extra["bootstrap"]["n"] == 16 and len(extra["bootstrap"]["fvd"]) == extra["bootstrap"]["B"]
    assert extra["floor"]["n"] == 16 and extra["floor"]["fvd_se"] > 0
    assert full.protocol(cand) == "fvd16_12f_16px@proxy-v1:real32:x1:ddim2:g3:q2-crn-bal-u8-jk:seed0"
    videos = full.videos(cand, 0, 16)
    assert torch.equal(videos, quantize_8bit(videos))
    prompts = full.prompts(full.fvd_protocol(cand), 0, 16)
    assert prompts == protocol_prompts(full.fvd_protocol(cand), 0, 16)
