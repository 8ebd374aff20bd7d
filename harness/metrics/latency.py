"""Measured latency with ``torch.utils.benchmark.Timer`` (median and interquartile range, in ms).

Protocol: the target is called ``warmup`` times, then timed by ``Timer.blocked_autorange`` (blocks of
calls until ``min_run_time`` seconds have elapsed) or ``Timer.adaptive_autorange`` (until the IQR / median
falls below ``threshold``), with an explicit ``num_threads`` (the Timer's default is 1 thread), all under
``torch.inference_mode``. On an accelerator the Timer's clock synchronises the measured device (not the
current one, which the Timer's default clock would) before every reading, and warm-up is followed by an
explicit synchronise, so asynchronous kernels are counted. With a ``policy``
(``harness.device_policy.DevicePolicy``) a module is timed as deployed: under its precision's autocast,
optionally compiled and replayed from CUDA graphs. Every result carries its provenance: device name,
threads, torch version, dtype / precision, compilation and input sizes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.device_policy import DevicePolicy, deployed, device_description, synchronize

Inputs = dict[str, Any] | tuple[Any, ...]


@dataclass(frozen=True)
class LatencyResult:
    """One latency measurement. Times in milliseconds per call; ``n_runs`` = calls timed in total."""

    median_ms: float
    iqr_ms: float
    n_runs: int
    device: str  # torch device string, e.g. "cpu", "cuda:0"
    device_name: str  # e.g. the CPU model or torch.cuda.get_device_name
    threads: int  # intra-op threads the Timer ran with
    torch_version: str
    dtype: str  # parameter dtype of the module, or "n/a" for a plain callable
    batch: int | None  # input sizes; None when unknown (plain callable, no "sample" input)
    frames: int | None
    resolution: int | None
    clock: str = "wall"  # "wall": elapsed time; "process": CPU time of this process (see measure_latency)
    precision: str = "fp32"  # harness.device_policy.PRECISIONS: autocast of the timed calls
    compiled: bool = False  # timed through torch.compile
    cuda_graphs: bool = False  # replayed from a CUDA graph

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _synchronize(device: torch.device) -> None:
    synchronize(device)


def _synced_clock(device: torch.device):
    """A wall clock that first waits for ``device``'s kernels (the Timer's default one synchronises the
    *current* accelerator device, which need not be the measured one)."""

    def clock() -> float:
        synchronize(device)
        return time.perf_counter()

    return clock


def _sizes(inputs: Inputs) -> tuple[int | None, int | None, int | None]:
    """``(batch, frames, resolution)`` read from a video ``sample (B, C, T, H, W)`` input, if present."""
    sample = inputs.get("sample") if isinstance(inputs, dict) else (inputs[0] if inputs else None)
    if isinstance(sample, torch.Tensor) and sample.dim() == 5:
        return int(sample.shape[0]), int(sample.shape[2]), int(sample.shape[-1])
    return None, None, None


def _move(inputs: Inputs, device: torch.device, dtype: torch.dtype | None) -> Inputs:
    def move(x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)

    if isinstance(inputs, dict):
        return {k: move(v) for k, v in inputs.items()}
    return tuple(move(x) for x in inputs)


def _as_callable(
    target: Callable[[], Any] | nn.Module,
    inputs: Inputs | None,
    device: torch.device,
    dtype: torch.dtype | None,
    policy: DevicePolicy | None = None,
) -> tuple[Callable[[], Any], str, Inputs | None]:
    if isinstance(target, nn.Module):
        if inputs is None:
            raise ValueError("measuring a module needs its inputs (a dict of keyword inputs or a tuple)")
        module = target.to(device=device, dtype=dtype).eval()
        inputs = _move(inputs, device, dtype)
        param = next(module.parameters(), None)
        dtype_name = str(param.dtype).removeprefix("torch.") if param is not None else "n/a"
        if policy is not None and not isinstance(inputs, dict):
            raise ValueError("a policy's deployed forward takes keyword inputs; pass a dict")
        if policy is not None:
            if policy.precision != "fp32":
                dtype_name = policy.precision
            return deployed(module, inputs, policy), dtype_name, inputs
        if isinstance(inputs, dict):
            return (lambda: module(**inputs)), dtype_name, inputs
        return (lambda: module(*inputs)), dtype_name, inputs
    if not callable(target):
        raise TypeError(f"target must be a callable or an nn.Module, got {type(target).__name__}")
    if inputs is not None:
        raise ValueError("inputs are only for an nn.Module target; close over them in the callable")
    if policy is not None and (policy.compile or policy.cuda_graphs):
        raise ValueError("compile / CUDA graphs apply to an nn.Module target; pass the module and its inputs")
    if policy is not None and policy.precision != "fp32":
        call = target

        def target():
            with policy.autocast():
                return call()

    return target, "n/a" if policy is None or policy.precision == "fp32" else policy.precision, None


def measure_latency(
    target: Callable[[], Any] | nn.Module,
    inputs: Inputs | None = None,
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    min_run_time: float = 1.0,
    warmup: int = 3,
    adaptive: bool = False,
    threshold: float = 0.1,
    max_run_time: float = 10.0,
    dtype: torch.dtype | None = None,
    clock: str = "wall",
    label: str = "latency",
    policy: DevicePolicy | None = None,
) -> LatencyResult:
    """Time one call of ``target`` (a no-argument callable, or ``module(**inputs)``) on ``device``.

    ``threads``: intra-op threads (``None`` = ``torch.get_num_threads()``, recorded either way).
    ``min_run_time`` (s): minimum timed duration. ``adaptive``: use ``adaptive_autorange(threshold,
    max_run_time=max_run_time)`` instead of ``blocked_autorange(min_run_time)``. ``dtype``: cast the
    module's parameters and floating inputs (``None`` keeps them). A module is moved to ``device`` / ``dtype``
    in place (``nn.Module.to``) and put in eval mode. ``clock``: ``"wall"`` (elapsed time, the Timer's
    accelerator-synchronised default) or ``"process"`` (``time.process_time``, CPU only: CPU seconds of
    this process, which excludes the time other jobs hold the cores - a contention-robust stand-in for
    single-threaded latency on a shared machine; with several threads it also counts their spin-waits).
    ``policy``: time the call as deployed (precision, ``torch.compile``, CUDA graphs; its device must be
    ``device``); ``None``: eager, in the module's dtype.
    """
    device = torch.device(device)
    if policy is not None and policy.torch_device != device:
        raise ValueError(f"the policy's device {policy.device} is not the measured device {device}")
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1 or min_run_time <= 0 or warmup < 0:
        raise ValueError(
            f"need threads >= 1, min_run_time > 0, warmup >= 0 (got {threads}, {min_run_time}, {warmup})"
        )
    if clock not in ("wall", "process") or (clock == "process" and device.type != "cpu"):
        raise ValueError(f"clock must be 'wall', or 'process' on the CPU (got {clock!r} on {device.type})")
    # Imported here: torch.utils.benchmark imports cpp_extension, which logs a warning on a machine
    # without a CUDA runtime, before a command could say in one line that --device cuda is unavailable.
    from torch.utils.benchmark import Timer

    fn, dtype_name, moved = _as_callable(target, inputs, device, dtype, policy)
    batch, frames, resolution = _sizes(moved) if moved is not None else (None, None, None)
    wall = {} if device.type == "cpu" else {"timer": _synced_clock(device)}
    timer_fn = {"process": {"timer": time.process_time}, "wall": wall}[clock]
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label, **timer_fn)
    previous = torch.get_num_threads()
    with torch.inference_mode():
        torch.set_num_threads(threads)  # warm-up under the same thread count as the timed runs
        try:
            for _ in range(warmup):
                fn()
            _synchronize(device)
        finally:
            torch.set_num_threads(previous)
        if adaptive:
            m = timer.adaptive_autorange(
                threshold=threshold, min_run_time=min_run_time, max_run_time=max_run_time
            )
        else:
            m = timer.blocked_autorange(min_run_time=min_run_time)
    return LatencyResult(
        median_ms=m.median * 1e3,
        iqr_ms=m.iqr * 1e3,
        n_runs=len(m.times) * m.number_per_run,
        device=str(device),
        device_name=device_description(device),
        threads=threads,
        torch_version=torch.__version__,
        dtype=dtype_name,
        batch=batch,
        frames=frames,
        resolution=resolution,
        clock=clock,
        precision=policy.precision if policy is not None else "fp32",
        compiled=bool(policy and policy.compile),
        cuda_graphs=bool(policy and policy.cuda_graphs),
    )
