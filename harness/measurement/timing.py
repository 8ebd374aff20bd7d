"""Latency readings that survive a shared machine: timed rounds against a reference, a robust estimator,
a contention check, retries.

A *reading* of one forward is ``rounds`` rounds; a round is a fixed number of calls of the candidate (set
from its warm-up so the round lasts about ``round_s``) followed by one call of a fixed *reference*
forward (the smallest subnet of the same supernet on the same inputs, see :class:`Probe`). Its value is
the ``estimator`` over the rounds' ratios candidate / reference, times the reference's scale (its quiet
time: the machine's recorded one, ``harness.measurement.calibration``, else this process's warm-up), so
the machine's drifts cancel; its ``spread`` is the ratios'
(max - min) / median. The reading is *clean* when the spread is at most ``max_spread``, the reference
(before and after the rounds, each the faster of two back-to-back calls) is within ``probe_tolerance`` of
its recent quiet time, and other
processes used less than ``other_cpu`` cores meanwhile (Linux: ``/proc/stat`` minus ``/proc/self/stat``;
skipped elsewhere). Otherwise it is retried after a back-off (doubling) and, after ``retries`` retries,
:class:`MachineBusy` is raised, so nothing is cached.

Warm-up that really warms: the first reading of a process (per reference: device, threads, inputs)
first runs the reference for ``PROCESS_WARMUP_S`` (thread pool start, allocator, oneDNN primitives) and
takes its scale; every reading then calls its own module ``WARMUP_CALLS`` times (the first call of a
freshly extracted module creates its shapes' primitives) before the call count is set.

The defaults of :class:`TimingProtocol` were measured on this repository's 2-core machine; the figures
are beside each field. ``MeasureSettings`` exposes them as options.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from harness.device_policy import synchronize
from harness.measurement.calibration import calibrated_scale
from harness.measurement.recorder import MeasurementDeferred

ESTIMATORS = ("median", "min", "trimmed", "fastest-half")
PROCESS_WARMUP_S = 0.6  # reference forwards run once per process before the first reading (see module doc)
PROBE_CALLS = 2  # reference calls per probe; the probe is their minimum
PROBE_WINDOW = 12  # recent probes whose fastest is the contention check's baseline (see Probe.baseline_ms)
SCALE_CALLS = 15  # reference calls after the process warm-up whose median is the reference's scale
OTHER_CPU_MIN_S = 0.2  # rounds' duration from which other processes' CPU time is checked between rounds
ABORT_FACTOR = 3.0  # an attempt whose rounds take this many times their plan is abandoned as busy
WARMUP_CALLS = 2  # calls of a fresh module before its call count is set (first call: primitive creation)


class MachineBusy(MeasurementDeferred):
    """No clean latency reading could be taken after the retries (other processes held the cores);
    nothing is cached, and a search may requeue the candidate."""


@dataclass(frozen=True)
class TimingProtocol:
    """How a reading is taken and when it is clean (see the module docstring)."""

    rounds: int = 7
    round_s: float = 0.12
    estimator: str = "median"
    # 0.25 refused most readings of a quiet 10-minute search on a noisy Intel host; 0.5 refused every
    # reading of the bench's latency group on a quiet 2-core AMD EPYC VM (spreads 71-81 %: one reference
    # call per round varies 0.6-1.9x its median there). The value is the median of the ratios, which
    # such single-call outliers do not move; competing processes are caught by the other-CPU check.
    max_spread: float = 1.0
    probe_tolerance: float = (
        0.5  # 0.2: the same; a competing process shows +100 % and more, and in the other-CPU check
    )
    other_cpu: float = 0.3
    retries: int = 3
    backoff_s: float = 0.5
    se_floor: float = 0.03

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown latency estimator {self.estimator!r}; use one of {', '.join(ESTIMATORS)}"
            )
        for name, value, least in (
            ("--latency-rounds", self.rounds, 1),
            ("--latency-retries", self.retries, 0),
        ):
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        for name, value in (
            ("--latency-time", self.round_s),
            ("--latency-max-spread", self.max_spread),
            ("--latency-probe-tolerance", self.probe_tolerance),
            ("--latency-other-cpu", self.other_cpu),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.backoff_s < 0 or self.se_floor < 0:
            raise ValueError(f"back-off and SE floor must be >= 0 (got {self.backoff_s}, {self.se_floor})")

    @property
    def name(self) -> str:
        """What defines the value (part of the protocol string): estimator, rounds and round time.
        The acceptance limits are not in it: they decide which readings are kept, not what is measured."""
        return f"{self.estimator}{self.rounds}x{round(self.round_s * 1e3)}ms"


# -- estimators ----------------------------------------------------------------------------------------
def estimate(values: list[float], estimator: str) -> float:
    """The ``estimator`` over per-round times: ``median``; ``min``; ``trimmed`` (mean without the lowest
    and highest 20 %, at least one each side from 3 rounds); ``fastest-half`` (mean of the faster half:
    contention only ever slows a round down)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no rounds to estimate from")
    if estimator == "median":
        return statistics.median(xs)
    if estimator == "min":
        return xs[0]
    if estimator == "trimmed":
        cut = max(1, int(0.2 * len(xs))) if len(xs) >= 3 else 0
        return statistics.fmean(xs[cut : len(xs) - cut])
    if estimator == "fastest-half":
        return statistics.fmean(xs[: max(1, (len(xs) + 1) // 2)])
    raise ValueError(f"unknown latency estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")


def standard_error(value: float, rounds: list[float], se_floor: float) -> float:
    """SE of a reading as an estimate of a fresh quiet re-reading (contract item 1): the rounds' standard
    error of the mean (times the median's efficiency factor 1.2533) and the between-reading floor
    ``se_floor * value`` measured on this machine (what the rounds of one reading cannot see: a fresh
    extraction, another process, the machine's state), added in quadrature."""
    k = len(rounds)
    within = 1.2533 * statistics.stdev(rounds) / math.sqrt(k) if k >= 2 else 0.0
    return math.hypot(within, se_floor * value)


# -- other processes' CPU time -------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_ticks() -> tuple[int, int] | None:
    """(ticks all CPUs were busy, ticks of this process) from ``/proc``; ``None`` off Linux."""
    try:
        with open("/proc/stat") as f:
            cpu = f.readline().split()
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy (steal: the
    # hypervisor gave the core to someone else, contention too).
    vals = [int(v) for v in cpu[1:9]]
    busy = sum(vals) - vals[3] - vals[4]
    return busy, int(own[11]) + int(own[12])  # utime, stime (all threads of this process)


class OtherCpu:
    """Cores' worth of CPU time other processes used between ``start()`` and ``stop()`` (None off Linux)."""

    def start(self) -> OtherCpu:
        self._t0, self._ticks0 = time.perf_counter(), _busy_ticks()
        return self

    def peek(self) -> float | None:
        """Cores' worth used by other processes so far (the interval goes on)."""
        return self.stop()

    def stop(self) -> float | None:
        ticks, wall = _busy_ticks(), time.perf_counter() - self._t0
        if ticks is None or self._ticks0 is None or wall <= 0:
            return None
        others = (ticks[0] - self._ticks0[0]) - (ticks[1] - self._ticks0[1])
        return max(0.0, others / _TICK / wall)


# -- timing --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    synchronize(device)  # the reading's device, not the current one


def time_calls(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Milliseconds per call of ``calls`` back-to-back calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3 / calls


class Probe:
    """The reference: a fixed forward (the smallest subnet of the same supernet, same inputs) timed once
    per round of every reading, and its *scale*, the median of its calls over the process warm-up.

    A reading's value is the estimator over the rounds' ratios candidate / reference, times the scale:
    the machine's slow drifts (measured here: +-10 % over tens of seconds with no other process running,
    shared by the reference with correlation 0.6-0.8) cancel in the ratio, so within a process readings
    repeat to ~2.5 % instead of ~5 %. The scale is fixed for the process's life (a running one would let
    the drift back in); the drift at warm-up time shifts all of a process's values alike (ranks are kept;
    the between-process part is in the SE floor). The reference is also the contention probe: the median
    of a reading's reference calls more than ``probe_tolerance`` over the scale means the machine was
    busy."""

    def __init__(self, fn: Callable[[], Any], device: torch.device, calibration_key: str | None = None):
        self.fn, self.device, self.calibration_key = fn, device, calibration_key
        self.scale_ms: float | None = None
        self.calibration: dict[str, Any] = {}  # where the scale came from (harness.measurement.calibration)
        self.recent: deque[float] = deque(maxlen=PROBE_WINDOW)

    def read(self) -> float:
        """One probe: the faster of ``PROBE_CALLS`` reference calls, in ms."""
        value = min(time_calls(self.fn, 1, self.device) for _ in range(PROBE_CALLS))
        self.recent.append(value)
        return value

    @property
    def baseline_ms(self) -> float:
        """What the contention check compares against: the median of the last ``PROBE_WINDOW`` probes
        (the warm-up scale before there are any). The machine's slow drift moves it (a process-long
        search saw the reference drift 20-30 % above its warm-up time with nothing else running, and a
        fixed baseline then refused every reading), while a busy spell shorter than half the window does
        not; competing processes are caught directly by the other-CPU check. The median, not the fastest:
        on a quiet 2-core AMD EPYC VM (2026-12-02) 60 probes of the tiny base's reference ranged 13.6-41
        ms around a median of 19-22 ms, so the fastest sat 35 % under a typical probe and the 50 %
        tolerance refused most quiet readings (the bench's latency group could not finish)."""
        return statistics.median(self.recent) if self.recent else self.scale_ms

    def warm_up(self, other_cpu: float) -> None:
        """Once per process: run the reference for ``PROCESS_WARMUP_S`` (thread pool, allocator, oneDNN
        primitives), then take the scale from ``SCALE_CALLS`` calls while other processes leave the cores
        alone; raises :class:`MachineBusy` when they did not in 3 tries (a later reading tries again)."""
        if self.scale_ms is not None:
            return
        end = time.perf_counter() + PROCESS_WARMUP_S
        while time.perf_counter() < end:
            self.fn()
        for _ in range(3):
            cpu = OtherCpu().start()
            calls = [time_calls(self.fn, 1, self.device) for _ in range(SCALE_CALLS)]
            others = cpu.stop()
            if others is None or others <= other_cpu:
                measured = statistics.median(calls)
                if self.calibration_key is None:
                    self.scale_ms = measured
                else:  # the machine's recorded scale: every process's ms on one scale
                    self.scale_ms, self.calibration = calibrated_scale(self.calibration_key, measured)
                return
        raise MachineBusy(
            f"the latency reference could not be timed quietly (other processes used {others:.2f} cores)"
        )


_PROBES: dict[tuple, Probe] = {}


def probe_for(
    key: tuple,
    make: Callable[[], Callable[[], Any]],
    device: torch.device,
    calibration_key: str | None = None,
) -> Probe:
    """This process's reference under ``key`` (what it is, its inputs, device, threads), built by ``make``
    on first use and kept for the process's life (its scale is process state); with ``calibration_key``
    its scale is the machine's recorded one (``harness.measurement.calibration``)."""
    if key not in _PROBES:
        _PROBES[key] = Probe(make(), device, calibration_key)
    return _PROBES[key]


@dataclass
class Reading:
    """One accepted reading: ``value_ms`` per call, ``se_ms`` (contract item 1) and ``se_within_ms`` (its
    part from the rounds alone: what separates two readings of one process), the rounds and everything
    that decided the acceptance (``extra()``: contract item 3)."""

    value_ms: float
    se_ms: float
    se_within_ms: float
    round_ms: list[float]  # candidate, per call, per round
    reference_ms: list[float]  # the reference call of each round
    calls_per_round: int
    estimator: str
    spread: float  # (max - min) / median of the rounds' ratios
    retries: int
    probe: dict[str, Any]
    rejected: list[dict[str, Any]] = field(default_factory=list)
    warmup_ms: list[float] = field(default_factory=list)

    def extra(self) -> dict[str, Any]:
        return {**asdict(self), "rounds": len(self.round_ms)}


def robust_reading(
    fn: Callable[[], Any],
    probe: Probe,
    protocol: TimingProtocol,
    threads: int,
    device: str | torch.device = "cpu",
    sleep: Callable[[float], None] = time.sleep,
) -> Reading:
    """A clean reading of ``fn`` (see the module docstring) under ``threads`` intra-op threads and
    ``torch.inference_mode``; raises :class:`MachineBusy` when no attempt was clean."""
    device = torch.device(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return _reading(fn, probe, protocol, device, sleep)
    finally:
        torch.set_num_threads(previous)


def _attempt(fn, probe: Probe, p: TimingProtocol, device, call_ms: list[float]):
    """One attempt: ``(candidate rounds, reference calls, calls per round, probe info, why not clean)``;
    ``why`` is '' for a clean attempt.

    It stops as soon as the machine is seen busy, so a busy attempt costs little: when the reference is
    already slow before the rounds, when other processes' CPU time over the rounds so far (from
    ``OTHER_CPU_MIN_S`` on: ``/proc/stat`` counts in 10 ms ticks) is over the limit, or when the rounds
    take ``ABORT_FACTOR`` times their plan (under contention a 2-thread forward here took 2-200 times its
    quiet time). ``call_ms``: the module's call times so far (the fastest sets the call count)."""
    scale = probe.scale_ms
    cpu = OtherCpu().start()
    info: dict[str, Any] = {
        "reference_scale_ms": scale,
        **probe.calibration,
        "reference_before_ms": probe.read(),
    }

    def stop(why: str):
        info["other_cpu_cores"] = cpu.stop()
        return [], [], 0, info, why

    baseline = probe.baseline_ms
    info["reference_baseline_ms"] = baseline
    over = info["reference_before_ms"] / baseline - 1
    if over > p.probe_tolerance:
        return stop(f"reference {over:+.0%} over its quiet time before the rounds")
    call_ms.append(time_calls(fn, 1, device))  # warm again (a pause or another module ran since)
    calls = max(1, round(p.round_s * 1e3 / min(call_ms)))
    start = time.perf_counter()
    deadline = start + ABORT_FACTOR * p.rounds * (calls * min(call_ms) + scale) / 1e3
    rounds, refs = [], []
    for _ in range(p.rounds):
        rounds.append(time_calls(fn, calls, device))
        refs.append(time_calls(probe.fn, 1, device))
        now = time.perf_counter()
        if now > deadline:
            return stop(f"rounds took over {ABORT_FACTOR:g}x their plan")
        if now - start >= OTHER_CPU_MIN_S:
            others = cpu.peek()
            if others is not None and others > p.other_cpu:
                return stop(f"other processes used {others:.2f} cores (limit {p.other_cpu:g}) in the rounds")
    info["other_cpu_cores"] = cpu.stop()
    info["reference_median_ms"] = statistics.median(refs)
    ratios = [t / r for t, r in zip(rounds, refs)]
    spread = (max(ratios) - min(ratios)) / statistics.median(ratios)
    why = []
    if spread > p.max_spread:
        why.append(f"spread {spread:.0%} > {p.max_spread:.0%}")
    # The probe after the rounds, like the one before: back-to-back reference calls against the same kind
    # of baseline. The reference calls *between* rounds are not compared with it: right after a heavy module
    # (a latent decoder) they ran 1.28-1.46x the back-to-back time on a quiet machine, and at 1.5x a whole
    # process refused every reading of that stage; competing processes are caught by the other-CPU check.
    info["reference_after_ms"] = probe.read()
    over = info["reference_after_ms"] / baseline - 1
    if over > p.probe_tolerance:
        why.append(
            f"reference {over:+.0%} over its quiet time after the rounds (tolerance {p.probe_tolerance:.0%})"
        )
    if info["other_cpu_cores"] is not None and info["other_cpu_cores"] > p.other_cpu:
        why.append(f"other processes used {info['other_cpu_cores']:.2f} cores (limit {p.other_cpu:g})")
    return rounds, refs, calls, info, "; ".join(why)


def _reading(fn, probe: Probe, p: TimingProtocol, device, sleep) -> Reading:
    probe.warm_up(p.other_cpu)
    warm = [time_calls(fn, 1, device) for _ in range(WARMUP_CALLS)]
    call_ms = list(warm[1:])  # the first call of a fresh module creates its primitives: not a call time
    rejected: list[dict[str, Any]] = []
    for attempt in range(p.retries + 1):
        if attempt:
            sleep(p.backoff_s * 2 ** (attempt - 1))
        rounds, refs, calls, info, why = _attempt(fn, probe, p, device, call_ms)
        if not why:
            ratios = [t / r for t, r in zip(rounds, refs)]
            value = estimate(ratios, p.estimator) * probe.scale_ms
            within = standard_error(value, [q * probe.scale_ms for q in ratios], 0.0)
            return Reading(
                value_ms=value,
                se_ms=math.hypot(within, p.se_floor * value),
                se_within_ms=within,
                round_ms=rounds,
                reference_ms=refs,
                calls_per_round=calls,
                estimator=p.estimator,
                spread=(max(ratios) - min(ratios)) / statistics.median(ratios),
                retries=attempt,
                probe=info,
                rejected=rejected,
                warmup_ms=warm,
            )
        rejected.append(
            {"why": why, **info, **({"round_ms": rounds, "reference_ms": refs} if rounds else {})}
        )
    raise MachineBusy(
        f"no clean latency reading in {p.retries + 1} attempts (last: {rejected[-1]['why']}); "
        "the machine is busy: retry later or raise the limits (--latency-max-spread, "
        "--latency-probe-tolerance, --latency-other-cpu)"
    )
