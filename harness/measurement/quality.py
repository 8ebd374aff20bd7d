"""Quality metrics of a candidate: FVD / KVD against real clips and text alignment, from one set of
generated videos; plus any checks the real videos' dataset provides (opt-in, ``MeasureSettings.checks``).

``compute`` records nothing (the recorder does); ``protocol(cand)`` and ``identity(cand)`` (the extractor's
weights hash, a folder real set's content hash) name everything the values depend on.

Generated set (common random numbers): video i of a run seeded s has prompt i of
``harness.metrics.fvd.protocol_prompts(protocol, s, ...)`` (balanced over the captions' strata
where the dataset has them) and its own noise
(``harness.pipeline.video_seed(s, i)``), for every candidate and whatever the number of videos, so two
candidates' FVDs differ by the candidates, not by the draw, and a larger protocol's videos start with a
smaller one's (``GeneratedVideoCache`` reuses them). Videos are quantised to 8 bits before every metric.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch

from harness.candidates import Candidate
from harness.measurement.generation import Generation
from harness.measurement.recorder import Computed, MetricGroup
from harness.measurement.settings import MeasureSettings
from harness.metric_names import NOT_APPLICABLE
from harness.metrics.latency import device_description
from harness.pipeline import generate, video_seeds

# Videos generated per call, in chunks aligned to multiples of it: video i is always made in the same
# batch (i // 8) of the same size when N is a multiple of 8, so a screen of 8 or 16 videos and a full run
# of 32 share their first videos bit for bit (batched kernels round differently per batch size: ~2e-6,
# which moves a handful of pixels by one 8-bit level).
GENERATION_BATCH = 8
QUALITY_VERSION = (
    "q2"  # bump when generated sets or estimators change (q2: CRN prompts/noise, 8-bit, bootstrap)
)


class QualityMetric(MetricGroup):
    """How good a candidate's samples are (``MetricGroup``'s contract): computed from generated videos."""


def _file_sha256(path: str | os.PathLike[str], digest=None) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (into ``digest`` when given)."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensors_sha256(module: torch.nn.Module) -> str:
    """Hex SHA-256 of a module's state (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def extractor_weights_sha256(extractor) -> str:
    """The SHA-256 naming an FVD feature extractor's weights, never its name (two I3D files must not share
    store rows): an explicit ``weights_sha256`` attribute; else the weights file's hash the extractor
    knows (proxy-v1: ``extractor.json``'s ``weights_sha256``, checked when loaded; I3D: its source
    file); else a hash of its network's tensors (an extractor built in memory). One-line ``ValueError``
    when none is there."""
    explicit = getattr(extractor, "weights_sha256", None)
    if explicit:
        return str(explicit)
    inner = getattr(extractor, "extractor", extractor)  # ProxyFeatures / I3DFeatures wrap the network's owner
    recorded = (getattr(inner, "metadata", None) or {}).get("weights_sha256")
    if recorded:
        return str(recorded)
    source = getattr(inner, "source", "")
    if source and Path(source).is_file():
        return _file_sha256(source)
    network = getattr(inner, "network", None)
    if isinstance(network, torch.nn.Module):
        return _tensors_sha256(network)
    raise ValueError(
        f"cannot tell the weights of FVD extractor {getattr(extractor, 'name', extractor)!r} apart: "
        "give it a weights_sha256 attribute"
    )


def real_set_sha256(protocol) -> str | None:
    """Content hash of a folder dataset's real set (``FVDProtocol``), None for the built-in synthetic
    set (its code defines it). Hashes every clip of the split the real clips are drawn from (their paths
    relative to the split folder and their bytes; the draw itself is fixed by the protocol's seed), so
    replaced, edited, added or removed videos change it."""
    if protocol.dataset == "synthetic":
        return None
    from harness.data import build_dataset

    dataset = build_dataset(protocol.dataset, protocol.split, frames=protocol.frames,
                            resolution=protocol.resolution, seed=protocol.real_seed,
                            num_videos=protocol.num_real)  # fmt: skip
    digest = hashlib.sha256()
    for path in (path for clip in dataset.clips for path in (clip.frame_paths or (clip.path,))):
        digest.update(f"{path.relative_to(dataset.base).as_posix()}\0".encode())
        _file_sha256(path, digest)
    return digest.hexdigest()


def heldout_prompts(protocol) -> list[str]:
    """Captions of the protocol's real clips (the distribution generated videos follow)."""
    from harness.metrics.fvd import real_captions

    return real_captions(protocol)


def fvd_protocol(settings: MeasureSettings, frames: int, resolution: int, extractor: str):
    """The ``harness.metrics.fvd.FVDProtocol`` of ``settings`` for videos of ``frames`` x ``resolution``."""
    from harness.metrics.fvd import FVDProtocol

    s = settings
    return FVDProtocol(num_real=s.real_videos, num_fake=s.fvd_videos, frames=frames, resolution=resolution,
                       extractor=extractor, dataset=s.fvd_data, split=s.fvd_split, real_seed=0, seed=s.seed,
                       repeats=s.fvd_repeats)  # fmt: skip


def settings_floor(
    settings: MeasureSettings | None = None, frames: int = 12, resolution: int = 16, cache_dir=None
):
    """The floor (``FloorResult``: value, SE, ``wall_time_s``) of the quality protocol of ``settings``
    (default: ``MeasureSettings()``, the main job's) at ``frames`` x ``resolution`` (the shipped base's
    12 x 16), with the extractor ``settings.fvd_weights`` names. ``cache_dir=None`` measures it from
    scratch, real features included (what the bench times); pass a folder to read / fill a cache."""
    from harness.metrics.fvd import protocol_floor, resolve_extractor

    settings = settings or MeasureSettings()
    extractor = resolve_extractor(settings.fvd_weights)
    return protocol_floor(fvd_protocol(settings, frames, resolution, extractor.name), extractor, cache_dir)


class GeneratedVideoCache:
    """A bounded in-memory LRU of candidates' generated videos (8-bit, ``uint8``), by index prefix.

    Shared between ``FrechetQuality`` objects that differ only in ``fvd_videos`` (a multi-fidelity
    search's screen and full protocols): the full measurement generates only the videos the screen did
    not. Keys name everything the videos depend on except their number (the candidate, the models'
    files, steps, guidance, the real set the prompts follow, the seed), so a wrong hit cannot happen;
    ``generated`` and ``reused`` count videos."""

    def __init__(self, max_candidates: int = 4):
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be at least 1, got {max_candidates}")
        self.max_candidates = max_candidates
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.generated = self.reused = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        """The cached prefix ``(n, 3, T, R, R)`` uint8 of ``key``, or None."""
        videos = self._entries.get(key)
        if videos is not None:
            self._entries.move_to_end(key)
        return videos

    def put(self, key: tuple, videos: torch.Tensor) -> None:
        """Keep ``videos`` (a prefix, uint8) unless a longer prefix is cached already."""
        held = self._entries.get(key)
        if held is None or held.shape[0] < videos.shape[0]:
            self._entries[key] = videos
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_candidates:
            self._entries.popitem(last=False)


class FrechetQuality(QualityMetric):
    """FVD and KVD (``harness.metrics.fvd``) and the extractor's text alignment of the same videos, with
    bootstrap standard errors and the protocol's floor (``extra["bootstrap"]``, ``extra["floor"]``)."""

    metrics = ("fvd", "kvd", "text_alignment")
    # MetricGroup.versions: bump one when its code changes meaning (QUALITY_VERSION in the protocol names
    # the protocol's design, a study's identity; these name the implementation, the cache's only).
    versions: ClassVar[Mapping[str, int]] = {"fvd": 1, "kvd": 1, "text_alignment": 1}

    def __init__(
        self,
        generation: Generation,
        text_encoder,
        settings: MeasureSettings,
        extractor=None,
        video_cache: GeneratedVideoCache | None = None,
        cache_dir=None,
    ):
        """``extractor``: the FVD feature extractor, when the caller resolved it already (else on first use);
        ``video_cache``: generated videos shared with another fidelity (None: none kept); ``cache_dir``:
        real-feature and floor cache (None: ``harness.metrics.fvd.DEFAULT_CACHE_DIR``)."""
        from harness.data import dataset_checks
        from harness.metrics.fvd import DEFAULT_CACHE_DIR

        self.generation, self.text, self.settings, self._extractor = (
            generation,
            text_encoder,
            settings,
            extractor,
        )
        self.video_cache, self.cache_dir = (
            video_cache,
            cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR,
        )
        self.device = device_description(settings.device)
        available = dataset_checks(settings.fvd_data)
        unknown = [c for c in settings.checks if c not in available]
        if unknown:
            raise ValueError(
                f"dataset {settings.fvd_data!r} provides no check {unknown[0]!r} (it provides: "
                f"{', '.join(available) or 'none'})"
            )
        self.checks = {name: available[name] for name in settings.checks}
        self._captions: dict[
            str, list[str]
        ] = {}  # real-set key -> its captions (prompts are drawn from them)
        self._weights_sha256: str | None = None  # of the extractor, on first use
        # real-set key -> real_set_sha256, once per process (a large folder takes seconds to hash)
        self._real_sha256: dict[str, str | None] = {}

    @property
    def extractor(self):
        """The FVD feature extractor, on the settings' device (one given by the caller is moved there:
        an extractor is this measurement's own instrument, in float32 whatever the precision)."""
        if self._extractor is None:
            from harness.metrics.fvd import resolve_extractor

            self._extractor = resolve_extractor(self.settings.fvd_weights, self.settings.device)
        elif hasattr(self._extractor, "to"):
            self._extractor = self._extractor.to(self.settings.device)
        return self._extractor

    def identity(self, cand: Candidate) -> dict[str, Any]:
        """The versions, the extractor's weights hash and, for a folder dataset, the real set's content
        hash (``real_set_sha256``): what the values depend on beyond the protocol string."""
        from harness.metrics.fvd import real_stats_key

        if self._weights_sha256 is None:
            self._weights_sha256 = extractor_weights_sha256(self.extractor)
        out = {**super().identity(cand), "extractor_sha256": self._weights_sha256}
        out.update(self.settings.policy.identity())  # nothing for fp32 on the CPU: older keys stay valid
        text_dtype = getattr(self.text, "dtype", "fp32")
        if text_dtype != "fp32":  # half-precision text embeddings move every generated video
            out["text_dtype"] = text_dtype
        protocol = self.fvd_protocol(cand)
        key = real_stats_key(protocol)
        if key not in self._real_sha256:
            self._real_sha256[key] = real_set_sha256(protocol)
        real = self._real_sha256[key]
        if real is not None:
            out["real_sha256"] = real
        return out

    def fvd_protocol(self, cand: Candidate):
        g = self.generation
        return fvd_protocol(self.settings, g.pixel_frames, g.pixel_resolution(cand), self.extractor.name)

    def protocol(self, cand: Candidate) -> str:
        """E.g. ``fvd32_12f_16px@proxy-v1:real256:x1:ddim8:g3:q2-crn-bal-u8-jk:seed0`` (+ a hash of a
        folder's real set, + the opted-in checks). ``q2-crn-bal-u8-jk`` names the generated set's design
        (common random numbers, balanced prompts where the captions have strata: ``harness.metrics.prompts``),
        8-bit videos and the SE's resampling (jackknife), so rows of older protocols are never reused."""
        from harness.metrics.fvd import prompt_design, real_stats_key

        s = self.settings
        p = self.fvd_protocol(cand)
        real = (
            "" if (p.dataset, p.split) == ("synthetic", "heldout") else f":{real_stats_key(p).split('_')[-1]}"
        )
        checks = f":checks={'+'.join(sorted(self.checks))}" if self.checks else ""
        # The balanced prompt design names itself; datasets without caption strata keep the older name.
        design = prompt_design(p)
        design = "" if design == "rounds" else f"-{design[:3]}"
        version = f":{QUALITY_VERSION}-crn{design}-u8-{p.uncertainty_tag}"
        # The candidates' precision changes their videos, so it names another study (fp32: as before).
        precision = "" if s.precision == "fp32" else f":{s.precision}"
        return (
            f"{p.name}:real{p.num_real}{real}:x{p.repeats}:ddim{s.steps}:g{s.guidance:g}{version}"
            f":seed{s.seed}{precision}{checks}"
        )

    def prompts(self, protocol, seed: int, n: int) -> list[str]:
        """Prompts of videos ``0 .. n - 1`` of run ``seed`` (``protocol_prompts``; captions read once)."""
        from harness.metrics.fvd import protocol_prompts, real_captions, real_stats_key

        key = real_stats_key(protocol)
        if key not in self._captions:
            self._captions[key] = real_captions(protocol)
        return protocol_prompts(protocol, seed, n, captions=self._captions[key])

    def _video_key(self, cand: Candidate, protocol, seed: int) -> tuple:
        from harness.metrics.fvd import real_stats_key

        g = self.generation
        # A bundle built in memory has no file hash: the network object itself then names it.
        models = tuple(b.checkpoint_hash or id(b.network) for b in (g.base, g.ssr) if b is not None)
        return (cand.key, cand.to_json(), models, g.steps, g.guidance, self.settings.steps,
                self.settings.guidance, self.text is not None, real_stats_key(protocol), seed)  # fmt: skip

    def videos(self, cand: Candidate, seed: int, n: int) -> torch.Tensor:
        """Generated videos ``0 .. n - 1`` of run ``seed``, 8-bit ``(n, 3, T, R, R)`` in [-1, 1]: read
        from the video cache where a shorter (or equal) run made them, the rest generated."""
        from harness.data._common import quantize_to_uint8, uint8_to_unit_range

        protocol = self.fvd_protocol(cand)
        key = self._video_key(cand, protocol, seed)
        held = self.video_cache.get(key) if self.video_cache is not None else None
        have = 0 if held is None else min(held.shape[0], n)
        parts = [held[:have]] if have else []
        if have < n:
            s, chain = self.settings, self.generation.chain(cand, self.text)
            chain.policy = s.policy  # the settings' device and precision, whatever the Generation's
            prompts = self.prompts(protocol, seed, n)
            start = have
            while start < n:  # chunks end on multiples of GENERATION_BATCH (see there)
                stop = min(n, (start // GENERATION_BATCH + 1) * GENERATION_BATCH)
                video = generate(chain, prompts[start:stop], cand.resolution,
                                 steps=cand.steps or s.steps, ssr_steps=s.steps,
                                 guidance=s.guidance, video_seeds=video_seeds(seed, start, stop))  # fmt: skip
                parts.append(quantize_to_uint8(video))
                start = stop
        out = torch.cat(parts)
        if self.video_cache is not None:
            self.video_cache.generated += n - have
            self.video_cache.reused += have
            self.video_cache.put(key, out)
        return uint8_to_unit_range(out)

    def floor(self, cand: Candidate):
        """The protocol's floor (``harness.metrics.fvd.FloorResult``), measured once and cached on disk."""
        from harness.metrics.fvd import protocol_floor

        return protocol_floor(self.fvd_protocol(cand), self.extractor, self.cache_dir)

    def _floor_record(self, cand: Candidate) -> dict:
        """``extra["floor"]``; a real set that leaves too few clips for a floor (a folder whose split is the
        real set) records why instead of failing the measurement (tables then print no floor)."""
        from harness.data import DataError
        from harness.metrics.fvd import FLOOR_METHOD

        try:
            return self.floor(cand).to_extra()
        except DataError as error:
            return {"n": self.settings.fvd_videos, "method": FLOOR_METHOD, "unavailable": str(error)}

    def compute(self, cand: Candidate) -> Computed:
        """``({"fvd", "kvd", "text_alignment" and SEs}, provenance with bootstrap, floor and checks)``."""
        from harness.metrics.fvd import evaluate_fvd, text_alignment_by_attribute

        s, extractor = self.settings, self.extractor
        protocol = self.fvd_protocol(cand)
        videos_seen: list[tuple[torch.Tensor, list[str]]] = []

        def generate_fn(n: int, seed: int) -> torch.Tensor:
            videos = self.videos(cand, seed, n)
            videos_seen.append((videos, self.prompts(protocol, seed, n)))
            return videos

        result = evaluate_fvd(protocol, generate_fn, extractor, cache_dir=self.cache_dir, progress=False)
        videos, captions = torch.cat([v for v, _ in videos_seen]), [p for _, ps in videos_seen for p in ps]
        conditioned = self.text is not None and hasattr(extractor, "predict_attributes")
        by_attribute = text_alignment_by_attribute(videos, captions, extractor) if conditioned else {}
        # Every parsed caption names every attribute, so the overall score is the mean of the per-attribute ones.
        align = sum(by_attribute.values()) / len(by_attribute) if by_attribute else NOT_APPLICABLE
        values = {
            "fvd": result.fvd_mean,
            "fvd_std": result.fvd_se,  # contract: <metric>_std is the standard error of the value
            "kvd": result.kvd_mean,
            "kvd_std": result.kvd_se,
            "text_alignment": align,
        }
        runs = {k: v for k, v in result.to_dict().items() if k not in ("bootstrap", "protocol")}
        extra = {
            "protocol": protocol.to_dict(),
            "extractor": extractor.name,
            "runs": runs,
            "bootstrap": result.bootstrap,
            "floor": self._floor_record(cand),
            "settings": asdict(s),
            "policy": s.policy.provenance(),
            "text_encoder": {
                "device": str(getattr(self.text, "device", "n/a")),
                "dtype": getattr(self.text, "dtype", "n/a"),
            }
            if self.text is not None
            else None,
            "text_alignment_by_attribute": by_attribute,
            "checks": {name: check(videos, captions) for name, check in self.checks.items()},
        }
        return values, extra
