"""The FVD / KVD protocol: feature extractors, cached real-video features, repeated evaluation.

Conventions follow the reference implementations (see ``shared/reference/fvd.md``): features of
``num_real`` real and ``num_fake`` generated clips of ``frames`` frames, Frechet distance of their
Gaussian fits (:func:`harness.metrics.frechet.frechet_distance`, pytorch-fid formula, covariance with
N - 1) and the unbiased cubic-polynomial MMD^2 on the full sets (:func:`kernel_distance`, TATS / LVDM
``polynomial_mmd``); repeated ``repeats`` times with different fake seeds and reported as mean and
std, as LVDM and the SNED paper average 10 runs.

Real videos: one fixed set of ``num_real`` clips per protocol, the same for every repeat (only the
generated set changes between repeats, so the std measures sampler variance, not real-subset
variance). For the synthetic dataset it is the first ``num_real`` items of the split built with
``num_videos=num_real`` and seed ``real_seed`` (label-balanced blocks of 128); for a folder dataset a
subset of ``num_real`` clips drawn without replacement by ``numpy.random.default_rng(real_seed)``.
Their features are cached on disk (``<cache_dir>/<key>.safetensors``, the protocol fields in the
header metadata), so both FVD and KVD are computed from them without re-running the extractor.

Extractors: the offline default ``proxy-v1`` (:mod:`harness.metrics.extractor`, not I3D) or I3D
Kinetics-400 (``i3d-k400``) when a weights file is given. The extractor name is part of the protocol
name (``fvd512_12f_16px@proxy-v1``); numbers under different protocols are never comparable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from harness.data import DataError, build_dataset, labels_for
from harness.metrics.extractor import PROXY_NAME, REPO_ROOT, ProxyExtractor, load_extractor
from harness.metrics.frechet import frechet_distance, kernel_distance
from harness.metrics.i3d import load_i3d

I3D_NAME = "i3d-k400"
DEFAULT_CACHE_DIR = REPO_ROOT / "results" / "cache" / "real_stats"
GenerateFn = Callable[[int, int], torch.Tensor]  # (n, seed) -> (n, 3, T, R, R) in [-1, 1]


# ---------------------------------------------------------------------------------------------------
# Feature extractors.


class FeatureExtractor(ABC):
    """A video feature network for FVD / KVD.

    Contract: ``extract(videos)`` takes ``(B, 3, T, H, W)`` in [-1, 1] (any H, W; the extractor does
    its own resizing) and returns float32 CPU features ``(B, feature_dim)``, deterministically and
    independently of how the videos are batched. ``name`` identifies network and weights
    (``proxy-v1``, ``i3d-k400``) and is recorded with every result.
    """

    name: str
    feature_dim: int

    @abstractmethod
    def extract(self, videos: torch.Tensor) -> torch.Tensor:
        """Videos ``(B, 3, T, H, W)`` in [-1, 1] -> features ``(B, feature_dim)`` float32 on the CPU."""


class ProxyFeatures(FeatureExtractor):
    """The offline default: penultimate-layer features ``(B, 128)`` of ``proxy-v1``."""

    def __init__(
        self, path: str | os.PathLike[str] | None = None, extractor: ProxyExtractor | None = None
    ) -> None:
        self.extractor = (
            extractor if extractor is not None else load_extractor(path)
        )  # None: shipped proxy-v1
        self.name = self.extractor.name
        self.feature_dim = self.extractor.feature_dim

    def extract(self, videos: torch.Tensor) -> torch.Tensor:
        return self.extractor.extract(videos)

    def predict_attributes(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Videos ``(B, 3, T, H, W)`` -> ``{attribute: (B,) int64}`` (see ``ProxyExtractor``)."""
        return self.extractor.predict_attributes(videos)


class I3DFeatures(FeatureExtractor):
    """I3D Kinetics-400 logits ``(B, 400)`` averaged over time (the reference FVD features)."""

    def __init__(self, path: str | os.PathLike[str], bn_eps: float = 1e-3) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"FVD weights file {path} does not exist; pass an existing i3d_pretrained_400.pt "
                f"(or i3d_torchscript.pt), or omit it to use the offline {PROXY_NAME} extractor"
            )
        self.extractor = load_i3d(path, bn_eps=bn_eps)
        self.name = I3D_NAME
        self.feature_dim = 400

    def extract(self, videos: torch.Tensor) -> torch.Tensor:
        return self.extractor.extract(videos, input_range=(-1.0, 1.0))


def resolve_extractor(fvd_weights: str | os.PathLike[str] | None) -> FeatureExtractor:
    """I3D (``i3d-k400``) from ``fvd_weights`` when given (one-line error if the file is missing), else
    the shipped offline ``proxy-v1``."""
    return I3DFeatures(fvd_weights) if fvd_weights is not None else ProxyFeatures()


# ---------------------------------------------------------------------------------------------------
# Protocol and result records.


@dataclass(frozen=True)
class FVDProtocol:
    """Everything that determines an FVD / KVD number; recorded with every result."""

    num_real: int = 512  # real clips (one fixed set for all repeats)
    num_fake: int = 512  # generated clips per repeat
    frames: int = 12  # frames per clip T
    resolution: int = 16  # side length R of real and generated clips, pixels
    extractor: str = PROXY_NAME  # feature network name, e.g. "proxy-v1" or "i3d-k400"
    dataset: str = "synthetic"  # dataset spec for build_dataset: "synthetic" or a folder path
    split: str = "heldout"  # split of the real clips
    real_seed: int = 0  # seed of the synthetic dataset / of the real subset of a folder dataset
    seed: int = 0  # fake seed of the first repeat; repeat r uses seed + r
    repeats: int = 1  # independent generated sets; FVD / KVD reported as mean and std over them

    def __post_init__(self) -> None:
        for name in ("num_real", "num_fake"):
            if getattr(self, name) < 2:
                raise ValueError(
                    f"{name} must be at least 2 (a covariance needs two samples), got {getattr(self, name)}"
                )
        for name in ("frames", "resolution", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def name(self) -> str:
        """E.g. ``fvd512_12f_16px@proxy-v1`` (StyleGAN-V's ``fvd2048_16f`` plus resolution and extractor)."""
        return f"fvd{self.num_fake}_{self.frames}f_{self.resolution}px@{self.extractor}"

    @property
    def fake_seeds(self) -> list[int]:
        return [self.seed + r for r in range(self.repeats)]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name, "fake_seeds": self.fake_seeds}


@dataclass(frozen=True)
class FVDResult:
    """FVD / KVD of one protocol: mean and population std (``ddof=0``) over the repeats."""

    fvd_mean: float
    fvd_std: float
    kvd_mean: float
    kvd_std: float
    fvd_runs: list[float]  # one value per repeat, in fake-seed order
    kvd_runs: list[float]
    protocol: dict[str, Any]  # FVDProtocol.to_dict()
    extractor: str  # feature network name
    wall_time_s: float  # generation + feature extraction + distances, seconds
    real_cache_hit: bool = False  # real features came from the on-disk cache
    real_stats_key: str = ""  # cache key of the real features
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Real-video features, cached on disk.


def real_stats_key(protocol: FVDProtocol) -> str:
    """Cache key of the real features: readable fields plus a hash of everything that defines them."""
    identity = real_stats_identity(protocol)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    dataset = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(protocol.dataset).name)[:32] or "dataset"
    return (
        f"{protocol.extractor}_{dataset}_{protocol.split}_{protocol.resolution}px_{protocol.frames}f_"
        f"n{protocol.num_real}_s{protocol.real_seed}_{digest}"
    )


def real_stats_identity(protocol: FVDProtocol) -> dict[str, Any]:
    """The protocol fields the real features depend on (folder datasets by absolute path)."""
    dataset = protocol.dataset if protocol.dataset == "synthetic" else str(Path(protocol.dataset).resolve())
    return {
        "dataset": dataset,
        "split": protocol.split,
        "resolution": protocol.resolution,
        "frames": protocol.frames,
        "num_real": protocol.num_real,
        "real_seed": protocol.real_seed,
        "extractor": protocol.extractor,
    }


def real_indices(protocol: FVDProtocol, dataset_size: int) -> list[int]:
    """Items of the real set: all of a synthetic split built with ``num_real`` videos, else a seeded
    subset without replacement (sorted)."""
    if dataset_size < protocol.num_real:
        raise DataError(
            f"{protocol.dataset} ({protocol.split}) has {dataset_size} clips, fewer than num_real={protocol.num_real}"
        )
    if dataset_size == protocol.num_real:
        return list(range(dataset_size))
    rng = np.random.default_rng(protocol.real_seed)
    return sorted(int(i) for i in rng.choice(dataset_size, protocol.num_real, replace=False))


def _extract_real(
    protocol: FVDProtocol, extractor: FeatureExtractor, progress: bool, chunk: int = 64
) -> torch.Tensor:
    """Load the real clips in chunks and extract their features ``(num_real, D)``."""
    dataset = build_dataset(
        protocol.dataset,
        protocol.split,
        frames=protocol.frames,
        resolution=protocol.resolution,
        seed=protocol.real_seed,
        num_videos=protocol.num_real,
    )
    indices = real_indices(protocol, len(dataset))
    features = []
    for start in tqdm(range(0, len(indices), chunk), desc="real features", disable=not progress, leave=False):
        videos = torch.stack([dataset[i]["video"] for i in indices[start : start + chunk]])  # (b, 3, T, R, R)
        features.append(extractor.extract(videos).float())
    return torch.cat(features, dim=0)


def _read_cache(path: Path, identity: dict[str, Any]) -> torch.Tensor | None:
    """Cached features ``(N, D)`` when the file exists, is readable and its metadata matches ``identity``
    (an unreadable or mismatching file is treated as a miss and overwritten)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("protocol", "{}"))
            return handle.get_tensor("features") if metadata == identity else None
    except (OSError, ValueError, SafetensorError):  # json.JSONDecodeError is a ValueError
        return None


def _write_cache(path: Path, features: torch.Tensor, identity: dict[str, Any]) -> None:
    """Write ``features`` with ``identity`` as JSON header metadata: temporary file, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({"features": features.contiguous()}, temp_name, metadata={"protocol": json.dumps(identity)})
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)


def real_features(
    protocol: FVDProtocol,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE_DIR,  # None: no cache
    progress: bool = True,
) -> tuple[torch.Tensor, bool]:
    """Features ``(num_real, D)`` of the protocol's real clips and whether they came from the cache."""
    _check_extractor(protocol, extractor)
    identity = real_stats_identity(protocol)
    path = Path(cache_dir) / f"{real_stats_key(protocol)}.safetensors" if cache_dir is not None else None
    cached = _read_cache(path, identity) if path is not None else None
    if cached is not None:
        return cached, True
    features = _extract_real(protocol, extractor, progress)
    if path is not None:
        _write_cache(path, features, identity)
    return features, False


# ---------------------------------------------------------------------------------------------------
# Evaluation.


def _check_extractor(protocol: FVDProtocol, extractor: FeatureExtractor) -> None:
    if extractor.name != protocol.extractor:
        raise ValueError(
            f"protocol {protocol.name} names extractor {protocol.extractor!r}, got {extractor.name!r}"
        )


def _check_fake(videos: torch.Tensor, protocol: FVDProtocol) -> None:
    expected = (protocol.num_fake, 3, protocol.frames, protocol.resolution, protocol.resolution)
    if tuple(videos.shape) != expected:
        raise ValueError(f"generate_fn returned videos of shape {tuple(videos.shape)}, expected {expected}")


def _extract_chunked(extractor: FeatureExtractor, videos: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Features ``(N, D)`` of videos ``(N, 3, T, R, R)``, ``chunk`` videos at a time."""
    return torch.cat(
        [extractor.extract(videos[s : s + chunk]).float() for s in range(0, videos.shape[0], chunk)]
    )


def evaluate_fvd(
    protocol: FVDProtocol,
    generate_fn: GenerateFn,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE_DIR,  # real-feature cache; None: no cache
    progress: bool = True,
) -> FVDResult:
    """FVD and KVD of ``generate_fn``'s videos against the protocol's real clips, over ``repeats`` seeds.

    ``generate_fn(num_fake, seed)`` must return ``(num_fake, 3, frames, resolution, resolution)`` in
    [-1, 1]; repeat r calls it with ``seed = protocol.seed + r``. Every repeat compares against the
    same cached real features. FVD: Frechet distance (pytorch-fid formula); KVD: unbiased cubic
    polynomial MMD^2 on the full sets (TATS / LVDM). Mean and population std over the repeats.
    """
    start = time.perf_counter()
    real, cache_hit = real_features(protocol, extractor, cache_dir, progress)
    fvd_runs, kvd_runs = [], []
    for seed in tqdm(protocol.fake_seeds, desc=protocol.name, disable=not progress, leave=False):
        videos = generate_fn(protocol.num_fake, seed)
        _check_fake(videos, protocol)
        fake = _extract_chunked(extractor, videos)
        fvd_runs.append(frechet_distance(real, fake))
        kvd_runs.append(float(kernel_distance(real, fake)))
    return FVDResult(
        fvd_mean=float(np.mean(fvd_runs)),
        fvd_std=float(np.std(fvd_runs)),
        kvd_mean=float(np.mean(kvd_runs)),
        kvd_std=float(np.std(kvd_runs)),
        fvd_runs=fvd_runs,
        kvd_runs=kvd_runs,
        protocol=protocol.to_dict(),
        extractor=extractor.name,
        wall_time_s=time.perf_counter() - start,
        real_cache_hit=cache_hit,
        real_stats_key=real_stats_key(protocol),
    )


def text_alignment(videos: torch.Tensor, prompts: Sequence[str], extractor: Any) -> float:
    """Fraction of the prompts' attributes the proxy extractor recognises in ``videos`` ``(B, 3, T, H, W)``.

    Each prompt is parsed with :func:`harness.data.labels_for`; prompts that do not parse are
    skipped. The score is the mean over parsed videos and attributes of ``predicted == prompted``
    (a CLIP-score-like alignment for the synthetic captions); NaN when no prompt parses.
    ``extractor`` needs ``predict_attributes`` (``ProxyExtractor`` or ``ProxyFeatures``).
    """
    hits = _attribute_hits(videos, prompts, extractor)
    flat = [hit for values in hits.values() for hit in values]
    return float(np.mean(flat)) if flat else math.nan


def _attribute_hits(videos: torch.Tensor, prompts: Sequence[str], extractor: Any) -> dict[str, list[bool]]:
    """Per attribute, whether the extractor's prediction matches each parsable prompt (unparsable skipped)."""
    if videos.shape[0] != len(prompts):
        raise ValueError(f"got {videos.shape[0]} videos but {len(prompts)} prompts")
    if not hasattr(extractor, "predict_attributes"):
        raise TypeError(
            f"text_alignment needs the {PROXY_NAME} extractor (predict_attributes), got {type(extractor).__name__}"
        )
    parsed = []
    for index, prompt in enumerate(prompts):
        try:
            parsed.append((index, labels_for(prompt)))
        except DataError:
            continue
    if not parsed:
        return {}
    predicted = extractor.predict_attributes(videos[[index for index, _ in parsed]])
    hits: dict[str, list[bool]] = {}
    for k, (_, labels) in enumerate(parsed):
        for name, label in labels.items():
            hits.setdefault(name, []).append(int(predicted[name][k]) == label)
    return hits


def text_alignment_by_attribute(
    videos: torch.Tensor, prompts: Sequence[str], extractor: Any
) -> dict[str, float]:
    """``text_alignment`` per attribute (e.g. ``{"colour": 0.9, "shape": 0.4, ...}``): which parts of the
    prompts a generator follows. Chance level is ``1 / classes`` of each attribute. Empty when no prompt
    parses."""
    return {
        name: float(np.mean(values)) for name, values in _attribute_hits(videos, prompts, extractor).items()
    }
