"""Cost metrics of a candidate: parameters, FLOPs and latency of one generated video.

Each ``CostMetric`` names the figures it produces, the protocol and device they are recorded under, and
computes them (``compute`` records nothing: the recorder does). A figure is per generated video, summed
the way a user's generation runs: every denoiser stage ``steps`` times (the guidance pair batched), then
the once-per-video work.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from harness.candidates import Candidate
from harness.measurement.generation import Generation
from harness.measurement.predictors import predictor_identity
from harness.measurement.recorder import Computed, MeasurementFailed, MetricGroup
from harness.measurement.settings import MeasureSettings
from harness.measurement.timing import Probe, Reading, TimingProtocol, probe_for, robust_reading
from harness.metric_names import ANY_DEVICE
from harness.metrics.flops import GenerationStage, generation_flops
from harness.metrics.latency import device_description
from harness.metrics.latency_predictor import check_predictor_conditions


class CostMetric(MetricGroup):
    """What a candidate costs to run (``MetricGroup``'s contract); independent of sample quality."""


class ParamCount(CostMetric):
    """Exact parameters of the candidate's subnets (base + SSR)."""

    metrics, device = ("params",), ANY_DEVICE
    versions: ClassVar[Mapping[str, int]] = {
        "params": 1
    }  # MetricGroup.versions: bump when the count changes meaning

    def __init__(self, generation: Generation):
        self.generation = generation

    def protocol(self, cand: Candidate) -> str:
        return "exact"

    def compute(self, cand: Candidate) -> Computed:
        g = self.generation
        return {"params": float(cand.params(g.base.supernet, g.ssr.supernet if g.ssr else None))}, {}


class FlopCount(CostMetric):
    """fvcore FLOPs of one generated video (1 multiply-add = 1 FLOP)."""

    metrics, device = ("flops",), ANY_DEVICE
    versions: ClassVar[Mapping[str, int]] = {
        "flops": 1
    }  # MetricGroup.versions: bump when the count changes meaning

    def __init__(self, generation: Generation):
        self.generation = generation

    def protocol(self, cand: Candidate) -> str:
        return f"fvcore:gen:{self.generation.suffix(cand)}"

    def identity(self, cand: Candidate) -> dict[str, Any]:
        """The versions and fvcore's: its op handles decide what a FLOP of each operator is."""
        return {**super().identity(cand), "fvcore": _distribution_version("fvcore")}

    def compute(self, cand: Candidate) -> Computed:
        g = self.generation
        stages = []
        for stage in g.denoisers(cand):
            static = stage.supernet.extract(stage.subnet)
            stages.append(
                GenerationStage(
                    static, g.stage_inputs(static, stage.resolution, 1), g.steps, g.guided, name=stage.name
                )
            )
        stages += [GenerationStage(w.module, w.inputs, 1, False, name=w.name) for w in g.once_per_video(cand)]
        return {"flops": float(generation_flops(stages))}, {"convention": "1 multiply-add = 1 FLOP"}


class Latency(CostMetric):
    """Milliseconds per generated video: each stage's per-forward latency (measured on the extracted
    static subnet, or predicted) times the steps, plus the once-per-video work (always measured).

    A measured forward is a robust reading (``harness.measurement.timing``: timed rounds, estimator,
    contention probe on the stage supernet's smallest subnet under the same inputs, retries); when no clean
    reading can be taken it raises ``MachineBusy`` and nothing is cached. ``latency_ms_std`` is the
    standard error against a fresh quiet re-reading: the stages' SEs times the steps, summed (the
    between-reading part is machine state shared by the stages, so they are not independent).
    Predicted mode uses predictors fitted under the same per-forward conditions (batch, threads, frames,
    device, dtype), checked when the metric is built."""

    metrics = ("latency_ms",)
    versions: ClassVar[Mapping[str, int]] = {
        "latency_ms": 1
    }  # MetricGroup.versions: bump when the reading's meaning changes

    def __init__(
        self,
        generation: Generation,
        mode: str,
        threads: int,
        device: str,
        min_run_time: float,
        predictors: dict | None = None,
        timing: TimingProtocol | None = None,
        rerun: int = 0,
    ):
        """``min_run_time``: seconds timed per reading (split into ``timing.rounds`` rounds); ``timing``:
        the reading's protocol (``None``: :class:`MeasureSettings`' defaults); ``rerun`` > 0 names a
        re-measurement (contract item 4)."""
        self.generation, self.mode, self.threads = generation, mode, threads
        self.target, self.min_run_time, self.predictors = device, min_run_time, predictors or {}
        base = timing or MeasureSettings().timing
        self.timing = dataclasses.replace(base, round_s=min_run_time / base.rounds)
        self.rerun = rerun
        self.device = device_description(device)
        if mode == "predicted":
            for predictor in self.predictors.values():
                check_predictor_conditions(predictor, self.conditions())

    @classmethod
    def from_settings(
        cls, generation: Generation, settings: MeasureSettings, predictors: dict | None = None
    ) -> Latency:
        return cls(
            generation,
            settings.latency,
            settings.threads,
            settings.device,
            settings.min_run_time,
            predictors,
            timing=settings.timing,
            rerun=settings.rerun,
        )

    def conditions(self) -> dict:
        """Per-forward conditions a latency figure holds under (what a predictor must be fitted at)."""
        g = self.generation
        return {
            "batch": g.batch_per_forward,
            "threads": self.threads,
            "frames": g.frames,
            "device": str(torch.device(self.target)),
            "dtype": _dtype(g.base.supernet),
        }

    def protocol(self, cand: Candidate) -> str:
        g = self.generation
        if self.mode == "measured":
            kind = f"measured-static:{_dtype(g.base.supernet)}:{self.timing.name}"
        else:
            kind = "predicted"
        rerun = f":rerun{self.rerun}" if self.rerun > 0 else ""
        return f"gen:{g.suffix(cand)}:b1:threads{self.threads}:{kind}{rerun}"

    def identity(self, cand: Candidate) -> dict[str, Any]:
        """The versions and, when predicted, each stage's predictor: its content hash and the device it
        was fitted on (a predicted value depends on them, not on the machine that computes it); a stage
        without a predictor is named with None (its measurement fails)."""
        out = super().identity(cand)
        if self.mode == "predicted":
            stages = {(s.supernet.family, s.resolution) for s in self.generation.denoisers(cand)}
            out["predictors"] = {
                f"{family}@{resolution}px": (
                    predictor_identity(self.predictors[(family, resolution)])
                    if (family, resolution) in self.predictors
                    else None
                )
                for family, resolution in sorted(stages)
            }
        return out

    def _probe(self, supernet, resolution: int, batch: int) -> Probe:
        """This process's contention probe for a stage: the supernet's smallest subnet on the stage's
        inputs, timed around every reading (one per family, size and thread count)."""
        key = (supernet.family, supernet.preset, resolution, batch, self.generation.frames)
        key += (str(self.target), self.threads)

        def make():
            ref = supernet.extract(supernet.space.smallest(resolution)).to(self.target).eval()
            inputs = _on(self.generation.stage_inputs(ref, resolution, batch), self.target)
            return lambda: ref(**inputs)

        calibration = f"{self.device}|torch {torch.__version__}|" + "|".join(map(str, key))
        return probe_for(key, make, torch.device(self.target), calibration)

    def _read(self, fn, probe: Probe) -> Reading:
        return robust_reading(fn, probe, self.timing, self.threads, self.target)

    def _forward(self, stage) -> dict:
        g = self.generation
        if self.mode == "predicted":
            predictor = self.predictors.get((stage.supernet.family, stage.resolution))
            if predictor is None:
                raise MeasurementFailed(
                    f"no latency predictor for {stage.supernet.family} at {stage.resolution}px"
                )
            ms = float(predictor.predict(stage.supernet, stage.subnet))
            return {"stage": stage.name, "forward_ms": ms, "se_ms": ms * predictor.relative_error()}
        static = stage.supernet.extract(stage.subnet).to(self.target).eval()
        inputs = _on(g.stage_inputs(static, stage.resolution, g.batch_per_forward), self.target)
        probe = self._probe(stage.supernet, stage.resolution, g.batch_per_forward)
        reading = self._read(lambda: static(**inputs), probe)
        return {
            "stage": stage.name,
            "forward_ms": reading.value_ms,
            "se_ms": reading.se_ms,
            **reading.extra(),
        }

    def compute(self, cand: Candidate) -> Computed:
        g = self.generation
        per_stage = [self._forward(stage) for stage in g.denoisers(cand)]
        total = sum(s["forward_ms"] for s in per_stage) * g.steps
        se = sum(s["se_ms"] for s in per_stage) * g.steps
        once = g.once_per_video(cand, self.target)
        for work in once:
            module = work.module.to(self.target).eval()
            probe = self._probe(g.base.supernet, cand.base.resolution, g.batch_per_forward)
            reading = self._read(lambda module=module, work=work: module(**work.inputs), probe)
            per_stage.append(
                {
                    "stage": work.name,
                    "forward_ms": reading.value_ms,
                    "se_ms": reading.se_ms,
                    **reading.extra(),
                }
            )
            total += reading.value_ms
            se += reading.se_ms
        measured = [s for s in per_stage if "rounds" in s]
        extra = {
            "stages": per_stage,
            "threads": self.threads,
            "dtype": _dtype(g.base.supernet),
            "batch_per_forward": g.batch_per_forward,
            "frames": g.pixel_frames,
            "resolution": g.pixel_resolution(cand),
            "steps": g.steps,
            "definition": "sum over stages of steps x per-forward latency (CFG pair batched)"
            + "".join(f" + one {w.name}" for w in once),
            "std_definition": "standard error against a fresh quiet re-reading (rounds + between-reading floor)",
        }
        if measured:  # contract item 3, at the top level; per stage in "stages"
            extra.update(
                timing=dataclasses.asdict(self.timing),
                estimator=self.timing.estimator,
                rounds=min(s["rounds"] for s in measured),
                spread=max(s["spread"] for s in measured),
                retries=sum(s["retries"] for s in measured),
                probe=[s["probe"] for s in measured],
                rerun=self.rerun,
            )
        else:
            extra["predictors"] = {f"{f}@{r}": p.provenance for (f, r), p in self.predictors.items()}
        return {"latency_ms": total, "latency_ms_std": se}, extra


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _dtype(net) -> str:
    param = next(net.parameters(), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else "float32"


def _on(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}
