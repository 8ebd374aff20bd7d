"""Modelled latency as a measurement: ``--latency modelled:<device>[:<precision>]``.

:class:`ModelledLatency` is a cost metric (a ``harness.measurement.cost.CostMetric``: ``MetricGroup``'s contract) whose
``latency_ms`` is the roofline model's milliseconds per generated video on a named device. Its rows are
stored under the model's label as device - e.g. ``A100-SXM4-80GB (roofline v1, uncalibrated, fp32)`` -
and a ``modelled-roofline-v1`` protocol, so they are never read back as (or mixed with) measured values,
which carry the measuring machine's device name and a ``measured-static`` protocol; the identity names
the device's figures, the efficiencies and the calibration file's hash, so a new calibration is a new
cache key. The value is deterministic (no standard error: like FLOPs it has no sampling noise; its
systematic error is the calibration report's, kept in the provenance).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from harness.candidates import Candidate
from harness.measurement.cost import CostMetric
from harness.measurement.generation import Generation
from harness.measurement.recorder import Computed
from harness.roofline.catalogue import PRECISIONS
from harness.roofline.fit import load_model
from harness.roofline.model import MODEL_VERSION, RooflineModel, modelled_generation

PREFIX = "modelled:"
# The run's --precision (harness.device_policy) -> the model's: fp16 runs on the same tensor-core peak as
# bf16 on every catalogued GPU. Autocast keeps fp32 weights and casts them per op; that extra traffic is
# not modelled (weights are a small part of a video UNet's bytes).
_PRECISION_ALIASES = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "bf16",
    "fp16": "bf16",
    "bf16-autocast": "bf16",
    "fp16-autocast": "bf16",
}


def is_modelled(mode: str) -> bool:
    return mode.startswith(PREFIX)


def parse_modelled(mode: str, precision: str | None = None) -> tuple[str, str]:
    """``"modelled:<device>[:<precision>]"`` -> ``(device key, precision)``; ``precision`` (e.g. the run's
    ``--precision``) is the default when the mode names none. One-line ``ValueError`` on bad input."""
    from harness.roofline.catalogue import get_device

    parts = mode.removeprefix(PREFIX).split(":")
    if not mode.startswith(PREFIX) or not parts[0] or len(parts) > 2:
        raise ValueError(
            f"bad latency mode {mode!r}; use modelled:<device>[:<precision>], e.g. modelled:a100-sxm4-80gb:bf16"
        )
    chosen = parts[1] if len(parts) == 2 else (precision or "fp32")
    chosen = _PRECISION_ALIASES.get(chosen.lower(), chosen.lower())
    if chosen not in PRECISIONS:
        raise ValueError(
            f"unknown precision {chosen!r} in --latency {mode}; use one of {', '.join(PRECISIONS)}"
        )
    key = parts[0].strip().lower()
    return (key if key == "host" else get_device(key).key), chosen


class ModelledLatency(CostMetric):
    """Roofline-modelled milliseconds per generated video on a named device (module docstring)."""

    metrics = ("latency_ms",)
    versions: ClassVar[Mapping[str, int]] = {"latency_ms": 1}  # bump when the model changes meaning
    mode = "modelled"

    def __init__(self, generation: Generation, model: RooflineModel):
        self.generation, self.model = generation, model
        self.device = model.label

    @classmethod
    def from_mode(cls, generation: Generation, mode: str, precision: str | None = None) -> ModelledLatency:
        """The metric of ``--latency mode``; a calibration beside the base checkpoint is preferred."""
        key, chosen = parse_modelled(mode, precision)
        return cls(generation, load_model(key, chosen, generation.base.directory))

    def protocol(self, cand: Candidate) -> str:
        g = self.generation
        return f"gen:{g.suffix(cand)}:b1:modelled-roofline-v{MODEL_VERSION}:{self.model.precision}"

    def identity(self, cand: Candidate) -> dict[str, Any]:
        return {**super().identity(cand), "model": self.model.identity()}

    def compute(self, cand: Candidate) -> Computed:
        modelled = modelled_generation(self.model, self.generation, cand)
        calibration = self.model.calibration or {}
        extra = {
            **modelled.to_dict(),
            "definition": "roofline: sum over stages of steps x modelled forward (CFG pair batched)"
            + " + once-per-video work",
            "precision": self.model.precision,
            "batch_per_forward": self.generation.batch_per_forward,
            "steps": self.generation.steps_of(cand),
            "calibration_report": calibration.get("report"),
            "model": self.model.identity(),
        }
        return {"latency_ms": modelled.seconds * 1e3}, extra
