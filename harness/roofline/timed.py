"""Timed subnets for validating and calibrating the roofline model: the measured latency's own readings.

Every (round, subnet) timing is a clean robust reading (``harness.measurement.timing.robust_reading``:
timed rounds against the smallest subnet as reference, contention probe, other-process CPU check,
retries with back-off) of one forward of the extracted static subnet, taken inside the host's timing
lock (``harness.measurement.host_lock``) one reading at a time, so other workers' heavy work pauses only
for a reading, not for the whole run. Rounds visit the subnets in shuffled orders (drift hits all of
them alike); a reading the machine was too busy for is requeued at the end of its round. What the
readings saw (other processes' CPU, retries, spreads) is kept, so a report can say how noisy it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.measurement.host_lock import host_timing_lock
from harness.measurement.timing import MachineBusy, TimingProtocol, probe_for, robust_reading
from search_spaces import SubnetConfig, Supernet, make_dummy_inputs


@dataclass
class Timings:
    """``ms (rounds, n)``: milliseconds per forward; ``notes``: per reading what decided its acceptance."""

    ms: np.ndarray
    notes: list[dict[str, Any]] = field(default_factory=list)
    busy_requeues: int = 0
    reference_ms: float | None = None  # the scale: fastest reference call of the run (module doc)

    def noise(self) -> dict[str, Any]:
        """How noisy the machine was: other processes' cores during readings, retries, rejected
        attempts, rounds' spread, load average, and the repeat agreement of the rounds themselves."""
        cpu = [n["other_cpu_cores"] for n in self.notes if n.get("other_cpu_cores") is not None]
        out: dict[str, Any] = {
            "readings": len(self.notes),
            "rejected_attempts": int(sum(n["rejected"] for n in self.notes)),
            "busy_requeues": self.busy_requeues,
            "other_cpu_cores_median": float(np.median(cpu)) if cpu else None,
            "other_cpu_cores_max": float(np.max(cpu)) if cpu else None,
            "reading_spread_median": (
                float(np.median([n["spread"] for n in self.notes])) if self.notes else None
            ),
            "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }
        ms = self.ms
        out["rounds_spread_pct_mean"] = float(((ms.max(0) - ms.min(0)) / ms.min(0)).mean() * 100)
        return out


def _cast(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def time_subnets(
    net: Supernet,
    cfgs: list[SubnetConfig],
    frames: int,
    batch: int,
    threads: int,
    timing: TimingProtocol,
    rounds: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Timings:
    """Milliseconds per forward of every subnet, ``rounds`` robust readings each (module docstring)."""
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    resolution = cfgs[0].resolution

    def make_reference():
        ref = net.extract(net.space.smallest(resolution)).to(device=device, dtype=dtype).eval()
        ref_inputs = _cast(make_dummy_inputs(ref.spec, resolution, frames, batch, 0, device), dtype)
        return lambda: ref(**ref_inputs)

    key = ("roofline", net.family, net.preset, resolution, batch, frames, str(device), threads, str(dtype))
    probe = probe_for(key, make_reference, device)
    lock = host_timing_lock()
    out = Timings(np.zeros((rounds, len(cfgs))))
    with tqdm(total=rounds * len(cfgs), desc="latency", unit="reading", disable=not progress) as bar:
        for r in range(rounds):
            queue, requeued = [int(i) for i in rng.permutation(len(cfgs))], 0
            while queue:
                i = queue.pop(0)
                static = net.extract(cfgs[i]).to(device=device, dtype=dtype).eval()
                inputs = _cast(make_dummy_inputs(static.spec, resolution, frames, batch, 0, device), dtype)
                try:
                    with lock.timing():
                        fn = lambda static=static, inputs=inputs: static(**inputs)
                        reading = robust_reading(fn, probe, timing, threads, device)
                except MachineBusy:
                    requeued += 1
                    out.busy_requeues += 1
                    if requeued > len(cfgs):
                        raise
                    queue.append(i)
                    continue
                out.ms[r, i] = reading.value_ms / probe.scale_ms  # the ratio; scaled at the end
                fastest = min(reading.reference_ms + [reading.probe["reference_before_ms"]])
                out.reference_ms = min(
                    fastest, out.reference_ms or fastest, reading.probe["reference_after_ms"]
                )
                out.notes.append(
                    {
                        "round": r,
                        "subnet": i,
                        "other_cpu_cores": reading.probe.get("other_cpu_cores"),
                        "spread": reading.spread,
                        "retries": reading.retries,
                        "rejected": len(reading.rejected),
                    }
                )
                bar.update(1)
    out.ms *= out.reference_ms
    return out
