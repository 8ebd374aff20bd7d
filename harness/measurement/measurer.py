"""``Measurer``: the figures a search asks of a candidate, through one recorder.

It composes the pieces of this package: the candidate's generation (``generation``), cost metrics
(``cost``), quality metrics (``quality``) and the store's cache and claims (``recorder``). Parameters are
always measured (every trial records its size); the others on request.
"""

from __future__ import annotations

from harness.candidates import Candidate
from harness.measurement.cost import CostMetric, FlopCount, Latency, ParamCount
from harness.measurement.generation import Generation
from harness.measurement.host_lock import host_timing_lock
from harness.measurement.quality import FrechetQuality, GeneratedVideoCache
from harness.measurement.recorder import Recorder, register_models
from harness.measurement.settings import MeasureSettings
from harness.models import ModelBundle
from harness.roofline import metric as modelled  # the module: harness.roofline.metric imports this package
from harness.store import Store


def cost_metrics(
    generation: Generation, settings: MeasureSettings, predictors: dict | None = None
) -> dict[str, CostMetric]:
    """The cost metrics of ``generation`` under ``settings``, by metric name."""
    if modelled.is_modelled(settings.latency):  # a named device's roofline model, not timed here
        latency = modelled.ModelledLatency.from_mode(generation, settings.latency, settings.precision)
    else:
        latency = Latency.from_settings(generation, settings, predictors)
    return {"params": ParamCount(generation), "flops": FlopCount(generation), "latency_ms": latency}


LIMIT_FLAGS = {"params": "--max-params", "flops": "--max-flops", "latency_ms": "--max-latency"}


def check_limits_reachable(
    generation: Generation,
    settings: MeasureSettings,
    smallest: Candidate,
    limits: dict[str, float | None],
    predictors: dict | None = None,
) -> None:
    """Fail before a search starts when even the search's cheapest candidate (``smallest``: the space's
    smallest subnet, at the fewest steps of a trajectory search) breaks a limit (no candidate can meet
    it); computes only the limited figures and records nothing."""
    metrics = cost_metrics(generation, settings, predictors)
    for metric, limit in limits.items():
        if limit is None:
            continue
        value = metrics[metric].compute(smallest)[0][metric]
        if value > limit:
            raise ValueError(
                f"{LIMIT_FLAGS[metric]} {limit:g} is below the cheapest candidate's {metric} "
                f"({value:.4g}, the smallest subnet{f' at {smallest.steps} steps' if smallest.steps else ''}): "
                "no candidate can meet it; raise the limit"
            )


class Measurer:
    """Measures candidates of one (base [, SSR]) pipeline and records everything in ``store``."""

    def __init__(
        self,
        base: ModelBundle,
        ssr: ModelBundle | None,
        text_encoder,
        settings: MeasureSettings,
        store: Store,
        worker: str = "main",
        predictors: dict | None = None,
        extractor=None,
        video_cache: GeneratedVideoCache | None = None,
    ):
        """``text_encoder``: the loaded encoder (``None`` when unconditional); ``predictors``: latency
        predictors by ``(family, resolution)`` for ``settings.latency == "predicted"``; ``extractor``:
        the FVD feature extractor when the caller resolved it already; ``video_cache``: generated videos
        shared with measurers of other fidelities (a screen's videos are the full protocol's first ones).

        The models are put on ``settings.device`` here, once, before any metric uses them (they are
        shared by generation and timing), and the process's float32 numerics are set explicitly
        (``harness.device_policy.DevicePolicy``)."""
        self.base, self.ssr, self.settings = base, ssr, settings
        policy = settings.policy
        policy.apply()
        policy.place(base)
        policy.place(ssr)
        self.generation = Generation(base, ssr, settings.steps, settings.guidance, policy)
        self.cost = cost_metrics(self.generation, settings, predictors)
        self.quality = FrechetQuality(
            self.generation, text_encoder, settings, extractor, video_cache=video_cache
        )
        self.device_name = self.cost["latency_ms"].device
        self.recorder = Recorder(
            store, register_models(store, base, ssr), worker, settings.seed, settings.claim_timeout_s
        )

    def candidate_id(self, cand: Candidate) -> int:
        base, ssr = self.base.supernet, self.ssr.supernet if self.ssr else None
        return self.recorder.candidate_id(cand, cand.params(base, ssr), cand.describe(base, ssr))

    def protocols(self, cand: Candidate) -> dict[str, str]:
        """The protocol string each metric of ``cand`` is recorded under (a study's identity)."""
        out = {m: group.protocol(cand) for m, group in self.cost.items()}
        out.update({m: self.quality.protocol(cand) for m in self.quality.metrics})
        return out

    def measure(self, cand: Candidate, metrics: list[str]) -> dict[str, float]:
        """Values of ``metrics`` (names of ``harness.metric_names.METRICS``) for ``cand``, with their
        ``<metric>_std`` where known; raises ``MeasurementFailed``."""
        cid = self.candidate_id(cand)
        values: dict[str, float] = {}
        groups = [self.cost["params"], *(self.cost[m] for m in ("flops", "latency_ms") if m in metrics)]
        if any(m in self.quality.metrics for m in metrics):
            groups.append(self.quality)
        for metric in groups:
            values.update(
                self.recorder.measure_group(
                    cid, metric, cand, lambda metric=metric: self._compute(metric, cand)
                )
            )
        return values

    def _compute(self, metric, cand: Candidate):
        """``metric.compute(cand)`` in its turn on this host (``harness.measurement.host_lock``): a timed
        reading alone, other heavy work beside other workers' work. Only the computation holds the lock,
        never the wait for another worker's claim (which could wait on this very reading)."""
        if metric is self.cost["params"] or (
            metric is self.cost["latency_ms"] and metric.mode in ("predicted", "modelled")
        ):
            return metric.compute(cand)
        lock = host_timing_lock()
        with lock.timing() if metric is self.cost["latency_ms"] else lock.working():
            return metric.compute(cand)
