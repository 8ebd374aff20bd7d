"""Quality metrics of a candidate: FVD / KVD against real clips and text alignment, from one set of
generated videos; plus any checks the real videos' dataset provides (opt-in, ``MeasureSettings.checks``).

``compute`` records nothing (the recorder does); ``protocol(cand)`` names everything the values depend on.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from harness.candidates import Candidate
from harness.measurement.generation import Generation
from harness.measurement.recorder import Computed, MetricGroup
from harness.measurement.settings import MeasureSettings
from harness.metric_names import NOT_APPLICABLE
from harness.metrics.latency import device_description
from harness.pipeline import generate

GENERATION_BATCH = 16  # videos generated per call (bounds memory, not results: seeds are per batch start)


class QualityMetric(MetricGroup):
    """How good a candidate's samples are (``MetricGroup``'s contract): computed from generated videos."""


def heldout_prompts(protocol) -> list[str]:
    """Captions of the protocol's real clips: generated videos follow the same caption distribution."""
    from harness.data import build_dataset
    from harness.metrics.fvd import real_indices

    ds = build_dataset(
        protocol.dataset,
        protocol.split,
        protocol.frames,
        protocol.resolution,
        seed=protocol.real_seed,
        num_videos=protocol.num_real,
    )
    caption = ds.caption_at if hasattr(ds, "caption_at") else (lambda i: ds[i]["caption"])
    return [caption(i) for i in real_indices(protocol, len(ds))]


class FrechetQuality(QualityMetric):
    """FVD and KVD (``harness.metrics.fvd``) and the extractor's text alignment of the same videos."""

    metrics = ("fvd", "kvd", "text_alignment")

    def __init__(self, generation: Generation, text_encoder, settings: MeasureSettings, extractor=None):
        """``extractor``: the FVD feature extractor, when the caller resolved it already (else on first use)."""
        from harness.data import dataset_checks

        self.generation, self.text, self.settings, self._extractor = (
            generation,
            text_encoder,
            settings,
            extractor,
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

    @property
    def extractor(self):
        if self._extractor is None:
            from harness.metrics.fvd import resolve_extractor

            self._extractor = resolve_extractor(self.settings.fvd_weights)
        return self._extractor

    def fvd_protocol(self, cand: Candidate):
        from harness.metrics.fvd import FVDProtocol

        s, g = self.settings, self.generation
        return FVDProtocol(
            num_real=s.real_videos,
            num_fake=s.fvd_videos,
            frames=g.pixel_frames,
            resolution=g.pixel_resolution(cand),
            extractor=self.extractor.name,
            dataset=s.fvd_data,
            split=s.fvd_split,
            real_seed=0,
            seed=s.seed,
            repeats=s.fvd_repeats,
        )

    def protocol(self, cand: Candidate) -> str:
        """E.g. ``fvd32_12f_16px@proxy-v1:real256:x1:ddim8:g3:seed0`` (+ a hash of a folder's real set,
        + the opted-in checks)."""
        from harness.metrics.fvd import real_stats_key

        s = self.settings
        p = self.fvd_protocol(cand)
        real = (
            "" if (p.dataset, p.split) == ("synthetic", "heldout") else f":{real_stats_key(p).split('_')[-1]}"
        )
        checks = f":checks={'+'.join(sorted(self.checks))}" if self.checks else ""
        return (
            f"{p.name}:real{p.num_real}{real}:x{p.repeats}:ddim{s.steps}:g{s.guidance:g}:seed{s.seed}{checks}"
        )

    def compute(self, cand: Candidate) -> Computed:
        """``({"fvd", "kvd", "text_alignment" and stds}, provenance with the checks' results)``."""
        from harness.metrics.fvd import evaluate_fvd, text_alignment_by_attribute

        s, extractor = self.settings, self.extractor
        protocol = self.fvd_protocol(cand)
        chain = self.generation.chain(cand, self.text)
        prompts = heldout_prompts(protocol)
        videos_seen: list[tuple[torch.Tensor, list[str]]] = []

        def generate_fn(n: int, seed: int) -> torch.Tensor:
            out = []
            for start in range(0, n, GENERATION_BATCH):
                batch_prompts = [
                    prompts[i % len(prompts)] for i in range(start, min(n, start + GENERATION_BATCH))
                ]
                video = generate(
                    chain,
                    batch_prompts,
                    cand.resolution,
                    steps=s.steps,
                    guidance=s.guidance,
                    seed=seed * 100003 + start,
                )
                out.append(video)
                videos_seen.append((video, batch_prompts))
            return torch.cat(out)

        result = evaluate_fvd(protocol, generate_fn, extractor, progress=False)
        videos, captions = torch.cat([v for v, _ in videos_seen]), [p for _, ps in videos_seen for p in ps]
        conditioned = self.text is not None and hasattr(extractor, "predict_attributes")
        by_attribute = text_alignment_by_attribute(videos, captions, extractor) if conditioned else {}
        # Every parsed caption names every attribute, so the overall score is the mean of the per-attribute ones.
        align = sum(by_attribute.values()) / len(by_attribute) if by_attribute else NOT_APPLICABLE
        values = {
            "fvd": result.fvd_mean,
            "fvd_std": result.fvd_std,
            "kvd": result.kvd_mean,
            "kvd_std": result.kvd_std,
            "text_alignment": align,
        }
        extra = {
            "protocol": protocol.to_dict(),
            "extractor": extractor.name,
            "runs": result.to_dict(),
            "settings": asdict(s),
            "text_alignment_by_attribute": by_attribute,
            "checks": {name: check(videos, captions) for name, check in self.checks.items()},
        }
        return values, extra
