"""The roofline latency model: per op ``max(FLOPs / (peak x compute eff), bytes / (bandwidth x memory
eff)) + overhead``, summed over a forward, then over a generation the way measured latency is.

A forward's ops come from the meta-device cost trace (``harness.metrics._cost_trace.forward_ops``):
every top-level torch call with its kind, FLOPs and bytes at the run's dtype. An op that launches work
(every kind but ``view``) adds the device's ``launch_us``; a view adds ``view_us`` (zero on a GPU, the
dispatcher's time on a CPU). The peak an op runs at is its kind's unit under the run's precision
(``catalogue.compute_unit``); the efficiencies are per kind (``catalogue.DEFAULT_EFFICIENCIES`` unless
calibrated, ``harness.roofline.fit``).

A generated video is, as ``harness.measurement.cost.Latency`` times it: every denoiser stage (base,
then each SSR stage) ``steps`` forwards at the guidance pair's batch, plus the once-per-video work (a
latent model's decoder) once.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from harness.metrics._cost_trace import KINDS, OpCost, forward_ops
from harness.roofline.catalogue import (
    DEFAULT_EFFICIENCIES,
    PRECISIONS,
    DeviceSpec,
    compute_unit,
)
from search_spaces import SubnetConfig, Supernet, VideoUNet, make_dummy_inputs

if TYPE_CHECKING:
    from harness.candidates import Candidate
    from harness.measurement.generation import Generation

MODEL_VERSION = 1
TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
_KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
_CACHE_SIZE = 512


@dataclass(frozen=True)
class OpArrays:
    """A forward's ops as arrays (what the model and the fit evaluate): per op its kind index into
    ``KINDS``, FLOPs and bytes; and the number of launching ops and of views."""

    kind: np.ndarray  # (n_ops,) int
    flops: np.ndarray  # (n_ops,) float
    bytes: np.ndarray  # (n_ops,) float
    launches: int
    views: int

    @classmethod
    def from_ops(cls, ops: Sequence[OpCost]) -> OpArrays:
        work = [op for op in ops if op.kind != "view"]
        return cls(
            kind=np.array([_KIND_INDEX[op.kind] for op in work], dtype=np.int64),
            flops=np.array([op.flops for op in work], dtype=np.float64),
            bytes=np.array([op.bytes for op in work], dtype=np.float64),
            launches=len(work),
            views=len(ops) - len(work),
        )


@dataclass(frozen=True)
class ForwardTime:
    """Modelled seconds of one forward and their parts (``by_kind``: roofline seconds per op kind)."""

    seconds: float
    roofline_s: float
    overhead_s: float
    compute_bound_ops: int
    memory_bound_ops: int
    by_kind: dict[str, float]


@dataclass
class RooflineModel:
    """The model of one device at one precision. ``efficiencies``: kind -> (compute, memory) fractions;
    ``launch_us`` / ``view_us``: ``None`` = the device's catalogue figures; ``calibration``: the
    calibration record it was loaded from (``None``: uncalibrated)."""

    device: DeviceSpec
    precision: str = "fp32"
    efficiencies: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_EFFICIENCIES))
    launch_us: float | None = None
    view_us: float | None = None
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        missing = set(KINDS) - {"view"} - set(self.efficiencies)
        if missing:
            raise ValueError(f"efficiencies lack op kind(s) {sorted(missing)}")

    @property
    def label(self) -> str:
        """The device name modelled values are stored under: never a measured device's name."""
        state = "calibrated" if self.calibration else "uncalibrated"
        return f"{self.device.name} (roofline v{MODEL_VERSION}, {state}, {self.precision})"

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.precision]

    def overheads_us(self) -> tuple[float, float]:
        launch = self.device.launch_us.value if self.launch_us is None else self.launch_us
        view = self.device.view_us.value if self.view_us is None else self.view_us
        return launch, view

    def unit_seconds(self, arrays: OpArrays) -> tuple[np.ndarray, np.ndarray]:
        """Per op ``(FLOPs / peak, bytes / bandwidth)`` in seconds at efficiency 1."""
        peaks = np.array([self._peak_flops(kind) for kind in KINDS])
        bandwidth = self.device.bandwidth_gbs.value * 1e9
        return arrays.flops / peaks[arrays.kind], arrays.bytes / bandwidth

    def _peak_flops(self, kind: str) -> float:
        peaks = self.device.peak_tflops
        unit = compute_unit(kind, self.precision)
        return (peaks[unit] if unit in peaks else peaks["fp32"]).value * 1e12  # a CPU has one peak

    def efficiency_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Per kind (index of ``KINDS``) compute and memory efficiency (a view's are unused: 1)."""
        eff = [self.efficiencies.get(kind, (1.0, 1.0)) for kind in KINDS]
        return np.array([e[0] for e in eff]), np.array([e[1] for e in eff])

    def forward(self, arrays: OpArrays) -> ForwardTime:
        """Modelled time of one forward (see the module docstring)."""
        compute_s, memory_s = self.unit_seconds(arrays)
        compute_eff, memory_eff = self.efficiency_arrays()
        compute_s = compute_s / compute_eff[arrays.kind]
        memory_s = memory_s / memory_eff[arrays.kind]
        per_op = np.maximum(compute_s, memory_s)
        launch, view = self.overheads_us()
        overhead = (arrays.launches * launch + arrays.views * view) * 1e-6
        by_kind = {
            kind: float(per_op[arrays.kind == i].sum()) for i, kind in enumerate(KINDS) if kind != "view"
        }
        bound = compute_s >= memory_s
        return ForwardTime(
            seconds=float(per_op.sum()) + overhead,
            roofline_s=float(per_op.sum()),
            overhead_s=overhead,
            compute_bound_ops=int(bound.sum()),
            memory_bound_ops=int((~bound).sum()),
            by_kind=by_kind,
        )

    def identity(self) -> dict[str, Any]:
        """What a modelled value depends on (a cache key's part): version, figures, efficiencies."""
        launch, view = self.overheads_us()
        return {
            "roofline": MODEL_VERSION,
            "device": self.device.to_dict(),
            "precision": self.precision,
            "efficiencies": {k: list(v) for k, v in sorted(self.efficiencies.items())},
            "launch_us": launch,
            "view_us": view,
            "calibration": (self.calibration or {}).get("sha256"),
        }


# -- tracing ---------------------------------------------------------------------------------------
_TRACES: OrderedDict[tuple, OpArrays] = OrderedDict()


def _cached(key: tuple, make) -> OpArrays:
    if key not in _TRACES:
        if len(_TRACES) >= _CACHE_SIZE:
            _TRACES.popitem(last=False)
        _TRACES[key] = OpArrays.from_ops(make())
    return _TRACES[key]


def denoiser_ops(
    net: Supernet, cfg: SubnetConfig, frames: int, batch: int, dtype: torch.dtype = torch.float32
) -> OpArrays:
    """The ops of one forward of ``cfg``'s static subnet (as ``Supernet.extract`` builds it) on inputs
    ``sample (batch, C, frames, R, R)`` at ``R = cfg.resolution``, traced on the meta device."""
    cfg = net.space.validate(cfg)

    def make() -> list[OpCost]:
        with torch.device("meta"):
            model = VideoUNet(net.unet_plan.resolve(cfg), frames=net.frames, subnet=cfg)
        inputs = make_dummy_inputs(model.spec, cfg.resolution, frames, batch, seed=0, device="meta")
        return forward_ops(model, inputs, dtype)

    return _cached((net.family, net.preset, cfg.key, frames, batch, str(dtype)), make)


def module_ops(module: nn.Module, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> OpArrays:
    """The ops of one ``module(**inputs)`` call, traced on a meta copy (nothing computed, the module kept)."""
    meta = copy.deepcopy(module).to("meta")
    return OpArrays.from_ops(forward_ops(meta, {k: v.to("meta") for k, v in inputs.items()}, dtype))


# -- a generation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageTime:
    """One stage of a generation: ``forwards`` forwards of ``forward_s`` each."""

    name: str
    forwards: int
    forward_s: float
    roofline_s: float
    overhead_s: float

    @property
    def seconds(self) -> float:
        return self.forwards * self.forward_s


@dataclass(frozen=True)
class ModelledLatency:
    """Modelled seconds of one generated video on ``label``'s device, stage by stage."""

    seconds: float
    label: str
    stages: list[StageTime]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "label": self.label,
            "stages": [{**s.__dict__, "seconds": s.seconds} for s in self.stages],
        }


def stage_time(model: RooflineModel, name: str, arrays: OpArrays, forwards: int) -> StageTime:
    t = model.forward(arrays)
    return StageTime(name, forwards, t.seconds, t.roofline_s, t.overhead_s)


def modelled_generation(model: RooflineModel, generation: Generation, cand: Candidate) -> ModelledLatency:
    """Modelled seconds of generating one video of ``cand`` under ``generation`` (its steps, the
    guidance pair batched per forward, its SSR stages and its once-per-video decode), as measured
    latency sums them (``harness.measurement.cost.Latency``)."""
    g = generation
    stages = [
        stage_time(
            model,
            stage.name,
            denoiser_ops(stage.supernet, stage.subnet, g.frames, g.batch_per_forward, model.dtype),
            stage.steps,  # a trajectory candidate's segments: each over its own steps
        )
        for stage in g.denoisers(cand)
    ]
    for work in g.once_per_video(cand):
        stages.append(stage_time(model, work.name, module_ops(work.module, work.inputs, model.dtype), 1))
    return ModelledLatency(sum(s.seconds for s in stages), model.label, stages)
