"""Measuring candidates: a recorder (claims, cache, protocol identity), cost metrics (parameters, FLOPs,
latency), quality metrics (FVD / KVD, text alignment, dataset checks) and the ``Measurer`` that composes
them. Every figure is recorded in the store with its provenance and reused from there."""

from harness.measurement.cost import CostMetric, FlopCount, Latency, ParamCount
from harness.measurement.generation import Generation
from harness.measurement.measurer import Measurer, check_limits_reachable, cost_metrics
from harness.measurement.quality import FrechetQuality, QualityMetric, heldout_prompts
from harness.measurement.recorder import MeasurementDeferred, MeasurementFailed, Recorder, register_models
from harness.measurement.settings import MeasureSettings, add_measure_arguments, settings_from_args

__all__ = [
    "CostMetric",
    "FlopCount",
    "FrechetQuality",
    "Generation",
    "Latency",
    "MeasureSettings",
    "MeasurementDeferred",
    "MeasurementFailed",
    "Measurer",
    "ParamCount",
    "QualityMetric",
    "Recorder",
    "add_measure_arguments",
    "check_limits_reachable",
    "cost_metrics",
    "heldout_prompts",
    "register_models",
    "settings_from_args",
]
