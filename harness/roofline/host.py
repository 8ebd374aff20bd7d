"""The host CPU as a roofline device: its peak from a GEMM micro-benchmark, its bandwidth from a copy
benchmark, under the thread count latency is measured with.

Both run inside the host's timing lock (``harness.measurement.host_lock``: no other worker's heavy work
meanwhile) and report the fastest of their repeats: contention only ever slows a repeat down (on the
shared 2-core development host the median of 7 swung 10x between two runs 10 minutes apart). The per-op overheads are not benchmarked: they are fitted to timed
subnets (``harness.roofline.fit``), since PyTorch's dispatch cost per call depends on the op mix.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from harness.measurement.host_lock import host_timing_lock
from harness.metrics.latency import device_description
from harness.roofline.catalogue import DeviceSpec, Figure

GEMM_SIZE = 1024  # (n, n) @ (n, n) fp32: 4 MiB per operand, oneDNN's / MKL's efficient regime
COPY_MIB = 256  # per buffer: well beyond any host's last-level cache, so DRAM is what is timed


def _fastest_seconds(fn: Callable[[], object], repeats: int, min_s: float) -> float:
    """Seconds per call of the fastest of ``repeats`` timed blocks of at least ``min_s`` each."""
    fn()  # warm (thread pool, allocator, primitives)
    start = time.perf_counter()
    fn()
    calls = max(1, round(min_s / max(time.perf_counter() - start, 1e-6)))
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        blocks.append((time.perf_counter() - start) / calls)
    return min(blocks)


def gemm_tflops(threads: int, size: int = GEMM_SIZE, repeats: int = 7, min_s: float = 0.15) -> float:
    """Dense fp32 GEMM throughput (TFLOP/s, 2 FLOPs per multiply-add) with ``threads`` threads."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    out = torch.empty(size, size)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = _fastest_seconds(lambda: torch.mm(a, b, out=out), repeats, min_s)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / seconds / 1e12


def copy_gbs(threads: int, mib: int = COPY_MIB, repeats: int = 7, min_s: float = 0.15) -> float:
    """Memory bandwidth (GB/s, 1e9 bytes) of ``dst.copy_(src)`` on ``mib`` MiB buffers: one read and
    one write per byte (STREAM's "copy" counts both)."""
    n = mib * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = _fastest_seconds(lambda: dst.copy_(src), repeats, min_s)
    finally:
        torch.set_num_threads(previous)
    return 2 * n * 4 / seconds / 1e9


def host_device(threads: int, launch_us: float = 10.0, view_us: float = 3.0) -> DeviceSpec:
    """The host CPU as a :class:`DeviceSpec`, benchmarked now (inside the host timing lock). The
    overheads given are starting points for the fit (a CPU has no catalogue figure for them)."""
    with host_timing_lock().timing():
        peak, bandwidth = gemm_tflops(threads), copy_gbs(threads)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return DeviceSpec(
        key="host",
        name=f"{device_description('cpu')}, {threads} threads",
        peak_tflops={
            "fp32": Figure(
                peak,
                f"measured {stamp}: fastest of 7 fp32 torch.mm {GEMM_SIZE}x{GEMM_SIZE}, {threads} threads",
            )
        },
        bandwidth_gbs=Figure(
            bandwidth,
            f"measured {stamp}: fastest of 7 copy_ of {COPY_MIB} MiB fp32 (read + write), {threads} threads",
        ),
        launch_us=Figure(launch_us, "starting value; fitted per op to timed subnets"),
        view_us=Figure(view_us, "starting value; fitted per call to timed subnets"),
    )
