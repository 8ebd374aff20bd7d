"""The FVD / KVD protocol: feature extractors, cached real-video features, repeated evaluation.

Conventions follow the reference implementations (see ``shared/reference/fvd.md``): features of
``num_real`` real and ``num_fake`` generated clips of ``frames`` frames, Frechet distance of their
Gaussian fits (:func:`harness.metrics.frechet.frechet_distance`, pytorch-fid formula, covariance with
N - 1) and the unbiased cubic-polynomial MMD^2 on the full sets (:func:`kernel_distance`, TATS / LVDM
``polynomial_mmd``); repeated ``repeats`` times with different fake seeds and reported as their mean,
as LVDM and the SNED paper average 10 runs. Every clip, real or generated, is put on the 256 levels of
uint8 before feature extraction (:func:`quantize_8bit`), as the reference implementations read videos.

Uncertainty of one run (``uncertainty``): replicates over resamples of the generated set, the
delete-1 jackknife by default (scaled pseudo-values), or ``bootstrap`` resamples with replacement by
indices that depend only on ``(num_fake, bootstrap, seed)``
(:func:`harness.metrics.frechet.resampled_distances`; why the jackknife: see there); the standard error
is the replicates' std. With repeats, replicate b is the mean over repeats of each repeat's replicate b.
Candidates generated on common random numbers (same prompts and noise per video index) share the
resamples, so their replicate-wise differences give a paired standard error (:func:`paired_se`).

Floor (:func:`protocol_floor`): held-out real clips scored in place of generated ones at the same N,
with the same prompts (caption-matched) and the same resamples: what a perfect generator would score
under the protocol. Cached beside the real features.

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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from harness.data import DataError, SyntheticVideos, build_dataset, caption_strata, labels_for
from harness.data._common import quantize_to_uint8, uint8_to_unit_range
from harness.device_policy import default_device
from harness.metrics.extractor import PROXY_NAME, REPO_ROOT, ProxyExtractor, load_extractor
from harness.metrics.frechet import combine_runs, paired_bootstrap_se, resampled_distances
from harness.metrics.i3d import load_i3d
from harness.metrics.prompts import PROMPT_STREAM, generation_prompts  # noqa: F401 (public here too)

I3D_NAME = "i3d-k400"
DEFAULT_CACHE_DIR = REPO_ROOT / "results" / "cache" / "real_stats"
GenerateFn = Callable[[int, int], torch.Tensor]  # (n, seed) -> (n, 3, T, R, R) in [-1, 1]
# Bootstrap (opt-in): 200 replicates make the SE vary by about 1 / sqrt(2 * 199) = 5 % between seeds.
BOOTSTRAP_REPLICATES = 200
RECORD_METHODS = {"jackknife": "jackknife-delete1-scaled", "bootstrap": "bootstrap-iid"}  # real set fixed
FLOOR_METHOD = "heldout-real-caption-matched"
REAL_LEVELS = "uint8"  # every clip is quantised to 8 bits before extraction (part of the cache identity)
FLOOR_STREAM = 0xF100_5EED  # tag of the floor's seeded draws


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
    extractor: Any  # the network's owner (ProxyExtractor / I3DFeatureExtractor): has .to(device)

    def to(self, device: str | torch.device) -> FeatureExtractor:
        """Move the network to ``device`` (videos are moved there batch by batch; features return to
        the CPU). Extractors run in float32 whatever the candidates' precision: the instrument is fixed."""
        self.extractor.to(device)
        return self

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
        self.extractor = load_i3d(path, bn_eps=bn_eps)  # on the CPU; FeatureExtractor.to moves it
        self.name = I3D_NAME
        self.feature_dim = 400

    def extract(self, videos: torch.Tensor) -> torch.Tensor:
        return self.extractor.extract(videos, input_range=(-1.0, 1.0))


def resolve_extractor(
    fvd_weights: str | os.PathLike[str] | None, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """I3D (``i3d-k400``) from ``fvd_weights`` when given (one-line error if the file is missing), else
    the shipped offline ``proxy-v1``; on ``device``."""
    return (I3DFeatures(fvd_weights) if fvd_weights is not None else ProxyFeatures()).to(device)


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
    repeats: int = 1  # independent generated sets; FVD / KVD reported as their mean
    uncertainty: str = "jackknife"  # resampling of the generated set for the SE: jackknife or bootstrap
    bootstrap: int = BOOTSTRAP_REPLICATES  # resamples per run when uncertainty == "bootstrap"

    def __post_init__(self) -> None:
        for name in ("num_real", "num_fake"):
            if getattr(self, name) < 2:
                raise ValueError(
                    f"{name} must be at least 2 (a covariance needs two samples), got {getattr(self, name)}"
                )
        for name in ("frames", "resolution", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.uncertainty not in RECORD_METHODS:
            raise ValueError(f"unknown uncertainty {self.uncertainty!r}; use one of {list(RECORD_METHODS)}")
        if self.uncertainty == "jackknife" and self.num_fake < 3:
            raise ValueError(
                f"num_fake must be at least 3 for a jackknife SE (n - 1 left), got {self.num_fake}"
            )
        if self.bootstrap < 2:
            raise ValueError(f"bootstrap must be at least 2 replicates, got {self.bootstrap}")

    @property
    def name(self) -> str:
        """E.g. ``fvd512_12f_16px@proxy-v1`` (StyleGAN-V's ``fvd2048_16f`` plus resolution and extractor)."""
        return f"fvd{self.num_fake}_{self.frames}f_{self.resolution}px@{self.extractor}"

    @property
    def replicates(self) -> int:
        """Replicates per run: ``num_fake`` delete-1 values for the jackknife, else ``bootstrap``."""
        return self.num_fake if self.uncertainty == "jackknife" else self.bootstrap

    @property
    def uncertainty_tag(self) -> str:
        """``jk`` or ``boot200``: the resampling, for protocol strings."""
        return "jk" if self.uncertainty == "jackknife" else f"boot{self.bootstrap}"

    @property
    def fake_seeds(self) -> list[int]:
        return [self.seed + r for r in range(self.repeats)]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name, "fake_seeds": self.fake_seeds}


@dataclass(frozen=True)
class FVDResult:
    """FVD / KVD of one protocol: mean over the repeats, standard errors of that mean (resampling)
    (``fvd_se``, ``kvd_se``; what ``<metric>_std`` stores) and the repeats' population std
    (``fvd_std``, ``kvd_std``: 0 for one repeat; a spread, not an uncertainty)."""

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
    fvd_se: float = math.nan  # standard error of fvd_mean (protocol.uncertainty)
    kvd_se: float = math.nan
    bootstrap: dict[str, Any] = field(default_factory=dict)  # see bootstrap_record

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FloorResult:
    """The protocol's floor: held-out real clips scored in place of the generated ones (same N, same
    prompts, same resamples), mean over the repeats' seeds with its standard error."""

    fvd: float
    fvd_se: float
    kvd: float
    kvd_se: float
    n: int  # clips per run (the protocol's num_fake)
    method: str
    seeds: list[int]  # fake seeds (prompts and resamples) of the runs
    bootstrap: dict[str, Any]  # replicates, as FVDResult.bootstrap (paired with a candidate's)
    cache_hit: bool  # every run read back from the cache
    wall_time_s: float

    def to_extra(self) -> dict[str, Any]:
        """The compact record a measurement carries (``extra["floor"]``)."""
        keys = ("fvd", "fvd_se", "kvd", "kvd_se", "n", "method", "seeds")
        return {key: getattr(self, key) for key in keys}


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
        "levels": REAL_LEVELS,
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
    dataset = _real_dataset(protocol)
    indices = real_indices(protocol, len(dataset))
    features = []
    for start in tqdm(range(0, len(indices), chunk), desc="real features", disable=not progress, leave=False):
        with default_device("cpu"):  # clips are the data pipeline's CPU tensors, then the extractor's
            videos = torch.stack(
                [dataset[i]["video"] for i in indices[start : start + chunk]]
            )  # (b, 3, T, R, R)
        features.append(extractor.extract(quantize_8bit(videos)).float())
    return torch.cat(features, dim=0)


def _read_cache(path: Path, identity: dict[str, Any]) -> torch.Tensor | None:
    """Cached features ``(N, D)`` when the file exists, is readable and its metadata matches ``identity``
    (an unreadable or mismatching file is treated as a miss and overwritten)."""
    entry = _read_entry(path, identity)
    return entry[0]["features"] if entry is not None else None


def _read_entry(path: Path, identity: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, values)`` of a cache file whose ``protocol`` metadata matches ``identity``, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if json.loads(metadata.get("protocol", "{}")) != identity:
                return None
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            return tensors, json.loads(metadata.get("values", "{}"))
    except (OSError, ValueError, SafetensorError):  # json.JSONDecodeError is a ValueError
        return None


def _write_cache(
    path: Path,
    features: torch.Tensor,
    identity: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
    values: dict[str, Any] | None = None,
) -> None:
    """Write ``features`` (and ``extra_tensors``) with ``identity`` (and ``values``) as JSON header
    metadata: temporary file, then ``os.replace``, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tensors = {
        "features": features.contiguous(),
        **{k: v.contiguous() for k, v in (extra_tensors or {}).items()},
    }
    metadata = {"protocol": json.dumps(identity), **({"values": json.dumps(values)} if values else {})}
    try:
        save_file(tensors, temp_name, metadata=metadata)
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


def quantize_8bit(videos: torch.Tensor) -> torch.Tensor:
    """Videos in [-1, 1] put on the 256 levels of uint8 (round to nearest), back in [-1, 1] float32: how
    the real clips are stored and how the reference FVD code reads any video. Idempotent."""
    return uint8_to_unit_range(quantize_to_uint8(videos))


def _extract_chunked(extractor: FeatureExtractor, videos: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Features ``(N, D)`` of videos ``(N, 3, T, R, R)`` (quantised to 8 bits first), ``chunk`` at a time."""
    return torch.cat(
        [
            extractor.extract(quantize_8bit(videos[s : s + chunk])).float()
            for s in range(0, videos.shape[0], chunk)
        ]
    )


def _resampled(real: torch.Tensor, fake: torch.Tensor, protocol: FVDProtocol, seed: int) -> dict[str, Any]:
    with default_device("cpu"):  # the statistics are CPU float64 work on CPU features, on every device
        return resampled_distances(real, fake, protocol.uncertainty, protocol.bootstrap, seed)


def _combine(runs: list[dict[str, Any]], protocol: FVDProtocol) -> dict[str, Any]:
    out = combine_runs(runs)
    return {**out, "bootstrap": bootstrap_record(protocol, out["fvd_boot"], out["kvd_boot"])}


def bootstrap_record(protocol: FVDProtocol, fvd_boot: np.ndarray, kvd_boot: np.ndarray) -> dict[str, Any]:
    """The ``extra["bootstrap"]`` record (contract item 2): replicates rounded to 6 significant digits
    (far below their spread; keeps a row a few kB)."""
    method = RECORD_METHODS[protocol.uncertainty]
    return {
        "method": method if protocol.repeats == 1 else f"{method}/mean-of-{protocol.repeats}",
        "B": protocol.replicates,
        "seed": protocol.seed,
        "seeds": protocol.fake_seeds,
        "n": protocol.num_fake,
        "fvd": [float(f"{v:.6g}") for v in fvd_boot],
        "kvd": [float(f"{v:.6g}") for v in kvd_boot],
    }


def paired_se(boot_a: dict[str, Any], boot_b: dict[str, Any], metric: str = "fvd") -> float:
    """Standard error of ``value_a - value_b`` from two ``bootstrap`` records made on the same resamples
    (same method, B, n and seeds: common random numbers): the std of the replicate-wise differences."""
    keys = ("method", "B", "n", "seeds")
    if any(boot_a.get(k) != boot_b.get(k) for k in keys):
        raise ValueError(
            f"bootstrap records differ in {[k for k in keys if boot_a.get(k) != boot_b.get(k)]}; "
            "a paired SE needs two measurements of one protocol and seed"
        )
    return paired_bootstrap_se(boot_a[metric], boot_b[metric])


def evaluate_fvd(
    protocol: FVDProtocol,
    generate_fn: GenerateFn,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE_DIR,  # real-feature cache; None: no cache
    progress: bool = True,
) -> FVDResult:
    """FVD and KVD of ``generate_fn``'s videos against the protocol's real clips, over ``repeats`` seeds.

    ``generate_fn(num_fake, seed)`` must return ``(num_fake, 3, frames, resolution, resolution)`` in
    [-1, 1]; repeat r calls it with ``seed = protocol.seed + r``. Videos are quantised to 8 bits, then
    compared against the same cached real features every repeat. FVD: Frechet distance (pytorch-fid
    formula); KVD: unbiased cubic polynomial MMD^2 on the full sets (TATS / LVDM). Mean over repeats,
    bootstrap standard error (module docstring) and the repeats' population std.
    """
    start = time.perf_counter()
    real, cache_hit = real_features(protocol, extractor, cache_dir, progress)
    runs = []
    for seed in tqdm(protocol.fake_seeds, desc=protocol.name, disable=not progress, leave=False):
        videos = generate_fn(protocol.num_fake, seed)
        _check_fake(videos, protocol)
        runs.append(_resampled(real, _extract_chunked(extractor, videos), protocol, seed))
    combined = _combine(runs, protocol)
    fvd_runs, kvd_runs = [run["fvd"] for run in runs], [run["kvd"] for run in runs]
    return FVDResult(
        fvd_mean=combined["fvd"],
        fvd_std=float(np.std(fvd_runs)),
        kvd_mean=combined["kvd"],
        kvd_std=float(np.std(kvd_runs)),
        fvd_runs=fvd_runs,
        kvd_runs=kvd_runs,
        protocol=protocol.to_dict(),
        extractor=extractor.name,
        wall_time_s=time.perf_counter() - start,
        real_cache_hit=cache_hit,
        real_stats_key=real_stats_key(protocol),
        fvd_se=combined["fvd_se"],
        kvd_se=combined["kvd_se"],
        bootstrap=combined["bootstrap"],
    )


# ---------------------------------------------------------------------------------------------------
# Prompts of the generated set and the floor.


def _real_dataset(protocol: FVDProtocol):
    with default_device("cpu"):
        return build_dataset(
            protocol.dataset,
            protocol.split,
            frames=protocol.frames,
            resolution=protocol.resolution,
            seed=protocol.real_seed,
            num_videos=protocol.num_real,
        )


def _caption(dataset, index: int) -> str:
    return dataset.caption_at(index) if hasattr(dataset, "caption_at") else dataset[index]["caption"]


def real_captions(protocol: FVDProtocol) -> list[str]:
    """Captions of the protocol's real clips, in the order of :func:`real_indices`."""
    dataset = _real_dataset(protocol)
    return [_caption(dataset, i) for i in real_indices(protocol, len(dataset))]


def prompt_design(protocol: FVDProtocol) -> str:
    """``balanced`` where the protocol's dataset gives its captions strata, else ``rounds``
    (``harness.metrics.prompts``)."""
    return "rounds" if caption_strata(protocol.dataset) is None else "balanced"


def protocol_prompts(
    protocol: FVDProtocol, seed: int, stop: int, start: int = 0, captions: Sequence[str] | None = None
) -> list[str]:
    """Prompts ``start .. stop - 1`` of run ``seed`` under the protocol's design; ``captions``: the real
    set's (``real_captions``), when the caller holds them already."""
    captions = real_captions(protocol) if captions is None else captions
    return generation_prompts(captions, seed, stop, start, strata=caption_strata(protocol.dataset))


def _floor_dataset_seed(protocol: FVDProtocol, seed: int) -> int:
    """Seed of the synthetic split the floor's clips come from: never the real set's."""
    derived = int(np.random.SeedSequence([FLOOR_STREAM, protocol.real_seed, seed]).generate_state(1)[0]) >> 1
    return derived if derived != protocol.real_seed else derived + 1


def floor_clips(protocol: FVDProtocol, seed: int) -> torch.Tensor:
    """``num_fake`` held-out real clips ``(N, 3, T, R, R)`` standing in for a generated set of ``seed``:
    clip i has prompt i's caption (``protocol_prompts``), and no clip is in the real set.

    Synthetic data: items of the same split drawn under another dataset seed (independent draws of the
    same generator), the k-th use of a caption taking its k-th occurrence there. A folder: clips
    outside the real subset, in a seeded order, caption-matched where such a clip remains, else the
    next in that order (a folder whose captions are unique per clip, or empty, falls back to a seeded
    sample of the other clips, which follows the same caption distribution). The clips are CPU tensors
    (the data pipeline's), whatever the default device.
    """
    with default_device("cpu"):
        return _floor_clips(protocol, seed)


def _floor_clips(protocol: FVDProtocol, seed: int) -> torch.Tensor:
    prompts = protocol_prompts(protocol, seed, protocol.num_fake)
    if protocol.dataset == "synthetic":  # items are rendered on demand: the size bound costs nothing
        floor_seed = _floor_dataset_seed(protocol, seed)
        pool = SyntheticVideos(protocol.split, num_videos=2**30, frames=protocol.frames,
                               resolution=protocol.resolution, seed=floor_seed)  # fmt: skip
        order: Sequence[int] = range(128 * (protocol.num_fake + 1))  # every caption once per 128 items
    else:
        pool = _real_dataset(protocol)
        reference = set(real_indices(protocol, len(pool)))
        others = [i for i in range(len(pool)) if i not in reference]
        if len(others) < protocol.num_fake:
            raise DataError(
                f"the floor of {protocol.name} needs {protocol.num_fake} clips outside the "
                f"{protocol.num_real} real ones, but {protocol.dataset} ({protocol.split}) has "
                f"{len(others)} more; lower --real-videos"
            )
        order = [
            others[k]
            for k in np.random.default_rng([FLOOR_STREAM, protocol.real_seed, seed]).permutation(len(others))
        ]
    by_caption: dict[str, list[int]] = {}
    needed = Counter(prompts)
    for index in order:  # until every prompt has its clips (synthetic captions need no rendering)
        by_caption.setdefault(_caption(pool, index), []).append(index)
        if all(len(by_caption.get(p, ())) >= k for p, k in needed.items()):
            break
    picked: list[int] = []
    for prompt in prompts:  # the next unused clip of this caption, else of the seeded order
        used = set(picked)
        left = [i for i in by_caption.get(prompt, ()) if i not in used]
        picked.append(left[0] if left else next(i for i in order if i not in used))
    return torch.stack([pool[i]["video"] for i in picked])


def floor_key(protocol: FVDProtocol, seed: int) -> str:
    design = prompt_design(protocol)
    design = "" if design == "rounds" else f"_{design}"  # rounds: the older keys
    return f"{real_stats_key(protocol)}_floor_n{protocol.num_fake}_{protocol.uncertainty_tag}_s{seed}{design}"


def protocol_floor(
    protocol: FVDProtocol,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE_DIR,  # None: no cache
    progress: bool = False,
) -> FloorResult:
    """The protocol's floor (``FloorResult``): ``floor_clips`` of every fake seed scored as a generated
    set would be, against the same real features and with the same resamples. Each seed's run is
    cached on disk beside the real features (key: real set, N, B, seed)."""
    begin = time.perf_counter()
    real, _ = real_features(protocol, extractor, cache_dir, progress)
    runs, hits = [], []
    design = prompt_design(protocol)
    for seed in protocol.fake_seeds:
        identity = {
            **real_stats_identity(protocol),
            "floor": FLOOR_METHOD,
            "n": protocol.num_fake,
            **({} if design == "rounds" else {"prompts": design}),
        }
        identity |= {"uncertainty": [RECORD_METHODS[protocol.uncertainty], protocol.replicates], "seed": seed}
        path = Path(cache_dir) / f"{floor_key(protocol, seed)}.safetensors" if cache_dir is not None else None
        entry = _read_entry(path, identity) if path is not None else None
        if entry is not None:
            tensors, values = entry
            run = {**values, **{k: tensors[k].numpy() for k in ("fvd_boot", "kvd_boot")}}
        else:
            features = _extract_chunked(extractor, floor_clips(protocol, seed))
            run = _resampled(real, features, protocol, seed)
            if path is not None:
                boots = {k: torch.from_numpy(np.asarray(run[k])) for k in ("fvd_boot", "kvd_boot")}
                _write_cache(path, features, identity, boots, {"fvd": run["fvd"], "kvd": run["kvd"]})
        runs.append(run)
        hits.append(entry is not None)
    combined = _combine(runs, protocol)
    return FloorResult(
        fvd=combined["fvd"],
        fvd_se=combined["fvd_se"],
        kvd=combined["kvd"],
        kvd_se=combined["kvd_se"],
        n=protocol.num_fake,
        method=FLOOR_METHOD,
        seeds=protocol.fake_seeds,
        bootstrap=combined["bootstrap"],
        cache_hit=all(hits),
        wall_time_s=time.perf_counter() - begin,
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
