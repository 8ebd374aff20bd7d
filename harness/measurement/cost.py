"""Cost metrics of a candidate: parameters, FLOPs and latency of one generated video.

Each ``CostMetric`` names the figures it produces, the protocol and device they are recorded under, and
computes them (``compute`` records nothing: the recorder does). A figure is per generated video, summed
the way a user's generation runs: every denoiser stage ``steps`` times (the guidance pair batched), then
the once-per-video work.
"""

from __future__ import annotations

from harness.candidates import Candidate
from harness.measurement.generation import Generation
from harness.measurement.recorder import Computed, MeasurementFailed, MetricGroup
from harness.metric_names import ANY_DEVICE
from harness.metrics.flops import GenerationStage, generation_flops
from harness.metrics.latency import device_description, measure_latency


class CostMetric(MetricGroup):
    """What a candidate costs to run (``MetricGroup``'s contract); independent of sample quality."""


class ParamCount(CostMetric):
    """Exact parameters of the candidate's subnets (base + SSR)."""

    metrics, device = ("params",), ANY_DEVICE

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

    def __init__(self, generation: Generation):
        self.generation = generation

    def protocol(self, cand: Candidate) -> str:
        return f"fvcore:gen:{self.generation.suffix(cand)}"

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
    static subnet, or predicted) times the steps, plus the once-per-video work (always measured)."""

    metrics = ("latency_ms",)

    def __init__(
        self,
        generation: Generation,
        mode: str,
        threads: int,
        device: str,
        min_run_time: float,
        predictors: dict | None = None,
    ):
        self.generation, self.mode, self.threads = generation, mode, threads
        self.target, self.min_run_time, self.predictors = device, min_run_time, predictors or {}
        self.device = device_description(device)

    def protocol(self, cand: Candidate) -> str:
        kind = "measured-static" if self.mode == "measured" else "predicted"
        return f"gen:{self.generation.suffix(cand)}:b1:threads{self.threads}:{kind}"

    def _forward_ms(self, stage) -> dict:
        g = self.generation
        if self.mode == "predicted":
            predictor = self.predictors.get((stage.supernet.family, stage.resolution))
            if predictor is None:
                raise MeasurementFailed(
                    f"no latency predictor for {stage.supernet.family} at {stage.resolution}px"
                )
            return {"stage": stage.name, "forward_ms": float(predictor.predict(stage.supernet, stage.subnet))}
        static = stage.supernet.extract(stage.subnet).to(self.target)
        res = measure_latency(
            static,
            g.stage_inputs(static, stage.resolution, g.batch_per_forward),
            device=self.target,
            threads=self.threads,
            min_run_time=self.min_run_time,
        )
        return {
            "stage": stage.name,
            "forward_ms": res.median_ms,
            "iqr_ms": res.iqr_ms,
            "n_runs": res.n_runs,
            "device_name": res.device_name,
        }

    def compute(self, cand: Candidate) -> Computed:
        g = self.generation
        per_stage = [self._forward_ms(stage) for stage in g.denoisers(cand)]
        total = sum(s["forward_ms"] for s in per_stage) * g.steps
        once = g.once_per_video(cand, self.target)
        for work in once:
            res = measure_latency(
                work.module.to(self.target),
                work.inputs,
                device=self.target,
                threads=self.threads,
                min_run_time=self.min_run_time,
            )
            per_stage.append({"stage": work.name, "forward_ms": res.median_ms, "iqr_ms": res.iqr_ms})
            total += res.median_ms
        extra = {
            "stages": per_stage,
            "threads": self.threads,
            "dtype": "float32",
            "batch_per_forward": g.batch_per_forward,
            "frames": g.pixel_frames,
            "resolution": g.pixel_resolution(cand),
            "steps": g.steps,
            "definition": "sum over stages of steps x median forward latency (CFG pair batched)"
            + "".join(f" + one {w.name}" for w in once),
        }
        return {"latency_ms": total}, extra
