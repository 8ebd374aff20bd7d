"""Cost metrics of a candidate: parameters, FLOPs and latency of one generated video.

Each ``CostMetric`` names the figures it produces, the protocol and device they are recorded under, and
computes them (``compute`` records nothing: the recorder does). A figure is per generated video, summed
the way a user's generation runs: every denoiser stage ``steps`` times (the guidance pair batched), then
the once-per-video work.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from harness.candidates import Candidate
from harness.device_policy import DevicePolicy, deployed
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
            static = stage.supernet.extract(stage.subnet)  # on the supernet's device: inputs go there
            inputs = g.stage_inputs(static, stage.resolution, 1, _device_of(static))
            stages.append(GenerationStage(static, inputs, stage.steps, g.guided, name=stage.name))
        codec = g.base.codec
        once = g.once_per_video(cand, _device_of(codec.autoencoder)) if codec is not None else []
        stages += [GenerationStage(w.module, w.inputs, 1, False, name=w.name) for w in once]
        return {"flops": float(generation_flops(stages))}, {"convention": "1 multiply-add = 1 FLOP"}


class Latency(CostMetric):
    """Milliseconds per generated video: each stage's per-forward latency (measured on the extracted
    static subnet, or predicted) times its steps (a trajectory candidate's segments each over their own
    steps), plus the once-per-video work (always measured).

    A measured forward is a robust reading (``harness.measurement.timing``: timed rounds, estimator,
    contention probe on the stage supernet's smallest subnet under the same inputs, retries); when no clean
    reading can be taken it raises ``MachineBusy`` and nothing is cached. ``latency_ms_std`` is the
    standard error against a fresh quiet re-reading: the stages' SEs times the steps, summed (the
    between-reading part is machine state shared by the stages, so they are not independent).
    Predicted mode uses predictors fitted under the same per-forward conditions (batch, threads, frames,
    device, dtype), checked when the metric is built.

    What is timed is the forward as deployed under the device policy (``harness.device_policy.deployed``:
    the precision's autocast, optionally ``torch.compile`` and CUDA graphs), the policy's device
    synchronised around every timed block; the reference of the contention probe runs the same way. The
    protocol names the precision (``float32`` as before for fp32) and ``:compiled`` / ``:cudagraphs``;
    ``extra["policy"]`` records device, precision, torch / CUDA versions and the matmul settings."""

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
        policy: DevicePolicy | None = None,
    ):
        """``min_run_time``: seconds timed per reading (split into ``timing.rounds`` rounds); ``timing``:
        the reading's protocol (``None``: :class:`MeasureSettings`' defaults); ``rerun`` > 0 names a
        re-measurement (contract item 4); ``policy``: precision, compile and CUDA graphs of the timed
        forwards (``None``: fp32, eager, on ``device``)."""
        self.policy = policy if policy is not None else DevicePolicy(device)
        if torch.device(self.policy.device) != torch.device(device):
            raise ValueError(f"latency device {device} differs from the policy's {self.policy.device}")
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
            policy=settings.policy,
        )

    def conditions(self) -> dict:
        """Per-forward conditions a latency figure holds under (what a predictor must be fitted at)."""
        g = self.generation
        return {
            "batch": g.batch_per_forward,
            "threads": self.threads,
            "frames": g.frames,
            "device": str(torch.device(self.target)),
            "dtype": self._precision(),
        }

    def _precision(self) -> str:
        """The forwards' precision as protocols name it: the weights' dtype under fp32 (``float32``, as
        before precisions existed), else the autocast precision."""
        return (
            _dtype(self.generation.base.supernet)
            if self.policy.precision == "fp32"
            else self.policy.precision
        )

    def _deployment(self) -> str:
        return (":compiled" if self.policy.compile else "") + (
            ":cudagraphs" if self.policy.cuda_graphs else ""
        )

    def protocol(self, cand: Candidate) -> str:
        g = self.generation
        if self.mode == "measured":
            kind = f"measured-static:{self._precision()}{self._deployment()}:{self.timing.name}"
        else:
            kind = "predicted"
        rerun = f":rerun{self.rerun}" if self.rerun > 0 else ""
        return f"gen:{g.suffix(cand)}:b1:threads{self.threads}:{kind}{rerun}"

    def identity(self, cand: Candidate) -> dict[str, Any]:
        """The versions and, when predicted, each stage's predictor: its content hash and the device it
        was fitted on (a predicted value depends on them, not on the machine that computes it); a stage
        without a predictor is named with None (its measurement fails)."""
        out = {**super().identity(cand), **self.policy.identity()}  # nothing added for fp32 on the CPU
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
        if not self.policy.is_default:  # the reference runs as the candidates do (fp32 keys unchanged)
            key += (self.policy.precision, self.policy.compile, self.policy.cuda_graphs)

        def make():
            ref = supernet.extract(supernet.space.smallest(resolution)).to(self.target).eval()
            inputs = self.generation.stage_inputs(ref, resolution, batch, self.target)
            return deployed(ref, inputs, self.policy)

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
        static = stage.supernet.extract(stage.subnet).to(self.target).eval()  # its own weights
        inputs = g.stage_inputs(static, stage.resolution, g.batch_per_forward, self.target)
        probe = self._probe(stage.supernet, stage.resolution, g.batch_per_forward)
        reading = self._read(deployed(static, inputs, self.policy), probe)
        return {
            "stage": stage.name,
            "forward_ms": reading.value_ms,
            "se_ms": reading.se_ms,
            **reading.extra(),
        }

    def compute(self, cand: Candidate) -> Computed:
        g = self.generation
        stages = g.denoisers(cand)
        per_stage = [{**self._forward(stage), "steps": stage.steps} for stage in stages]
        total = sum(s["forward_ms"] * s["steps"] for s in per_stage)
        se = sum(s["se_ms"] * s["steps"] for s in per_stage)
        once = g.once_per_video(cand, self.target)
        for work in once:
            module = _on_device(work.module, self.target)
            probe = self._probe(g.base.supernet, cand.base.resolution, g.batch_per_forward)
            reading = self._read(deployed(module, work.inputs, self.policy), probe)
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
            "dtype": self._precision(),
            "policy": self.policy.provenance(),
            "timed": (
                f"{'torch.compile' if self.policy.compile else 'eager'} forwards"
                f"{' replayed from CUDA graphs' if self.policy.cuda_graphs else ''} under {self.policy.precision}"
                f", {self.policy.device} synchronised around every timed block"
            ),
            "batch_per_forward": g.batch_per_forward,
            "frames": g.pixel_frames,
            "resolution": g.pixel_resolution(cand),
            "steps": g.steps_of(cand),
            "definition": "sum over stages (a trajectory's segments) of their steps x per-forward latency"
            " (CFG pair batched)" + "".join(f" + one {w.name}" for w in once),
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


def _device_of(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _on_device(module: torch.nn.Module, device) -> torch.nn.Module:
    """``module`` when its weights are on ``device``, else a copy there: the once-per-video module is
    the bundle's own (the codec generation decodes with), and moving it in place would strand the
    generation on the other device (the latent-family failure of issue 18)."""
    param = next(module.parameters(), None)
    if param is None or param.device == torch.device(device):
        return module.eval()
    return copy.deepcopy(module).to(device).eval()
