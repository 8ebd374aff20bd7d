"""Validation on the host: the roofline model of the host CPU against measured host latency.

Protocol (:func:`validate`): ``n_fit + n_holdout`` distinct subnets spanning the space (the latency
predictor's draw, ``latency_predictor._draw_subnets``) are timed in ``rounds`` interleaved robust
readings each (``harness.roofline.timed``); the ground truth of a subnet is the median over its rounds.
The host device's peak and bandwidth come from micro-benchmarks (``harness.roofline.host``), run before
and after the timings; the model uses the faster of the two (contention only slows a benchmark down). Compared on the held-out subnets only:

- ``roofline (micro-benchmarks, overheads fitted)``: efficiencies 1 (the peak *is* a GEMM's, the bandwidth
  a copy's), only ``launch_us`` / ``view_us`` fitted on the fit subnets - the uncalibrated model's shape
  with the host's own figures;
- ``roofline (calibrated)``: every kind's efficiencies and the overheads fitted on the fit subnets
  (``fit_efficiencies``, what ``python -m harness.roofline calibrate`` does on a GPU);
- ``regression predictor``: ``harness.metrics.latency_predictor``'s NNLS on its cost features, fitted on
  the same fit subnets and timings;
- ``FLOPs``: the trace's FLOPs (rank correlation only; its MAPE after one scale fitted on the fit set);
- ``repeat (noise floor)``: the median of the even rounds against that of the odd rounds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.measurement.timing import TimingProtocol
from harness.metrics._cost_trace import FEATURES, KINDS
from harness.metrics.latency import device_description
from harness.metrics.latency_predictor import _draw_subnets, calibration_report, fit_nnls, subnet_features
from harness.roofline.catalogue import DeviceSpec
from harness.roofline.fit import fit_efficiencies, fit_overheads, predict_seconds
from harness.roofline.host import host_device
from harness.roofline.model import RooflineModel, denoiser_ops
from harness.roofline.timed import Timings, time_subnets
from search_spaces import Supernet

UNIT_EFFICIENCIES = {kind: (1.0, 1.0) for kind in KINDS if kind != "view"}


def _report(measured: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in calibration_report(measured, predicted).items()}


def validate(
    net: Supernet,
    n_fit: int = 20,
    n_holdout: int = 30,
    rounds: int = 5,
    threads: int = 2,
    batch: int = 2,
    frames: int | None = None,
    seed: int = 0,
    min_run_time: float = 0.3,
    progress: bool = True,
    timing: TimingProtocol | None = None,
) -> dict[str, Any]:
    """Time, fit and compare (module docstring); returns the report (JSON-able). ``timing``: the
    readings' protocol (default: ``MeasureSettings``' acceptance limits, 3 rounds of
    ``min_run_time / 3`` s, as the latency predictor's fit)."""
    from harness.measurement.settings import MeasureSettings

    if n_fit < len(FEATURES) + 1 or n_holdout < 3 or rounds < 2:
        raise ValueError(f"need --fit >= {len(FEATURES) + 1}, --holdout >= 3 and --rounds >= 2")
    frames = frames or net.hyper.frames
    resolution = net.space.default_resolution
    timing = timing or dataclasses.replace(MeasureSettings().timing, rounds=3, round_s=min_run_time / 3)
    cfgs = _draw_subnets(net, resolution, n_fit + n_holdout, np.random.default_rng(seed))
    started = time.time()
    host = host_device(threads)
    timings = time_subnets(net, cfgs, frames, batch, threads, timing, rounds, seed, progress=progress)
    host_after = host_device(threads)
    # The faster of the two benchmarks: contention only slows one down (before / after both reported).
    fastest = max((host, host_after), key=lambda h: h.peak_tflops["fp32"].value)
    fastest = dataclasses.replace(
        fastest, bandwidth_gbs=max(host.bandwidth_gbs, host_after.bandwidth_gbs, key=lambda f: f.value)
    )
    report = analyse(net, cfgs, timings, fastest, n_fit, frames, batch)
    report["host_before"] = host.to_dict()
    report["protocol"].update(
        threads=threads,
        timing=dataclasses.asdict(timing),
        seed=seed,
        started_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        wall_s=round(time.time() - started, 1),
    )
    report["host_after"] = host_after.to_dict()
    return report


def analyse(
    net: Supernet,
    cfgs: list,
    timings: Timings,
    host: DeviceSpec,
    n_fit: int,
    frames: int,
    batch: int,
) -> dict[str, Any]:
    """Fit every model on the first ``n_fit`` subnets' timings and report all on the rest."""
    rounds = len(timings.ms)
    y = np.median(timings.ms, axis=0) / 1e3  # seconds per forward, (n,)
    fit, held = slice(0, n_fit), slice(n_fit, None)
    arrays = [denoiser_ops(net, c, frames, batch) for c in cfgs]
    micro = fit_overheads(RooflineModel(host, "fp32", dict(UNIT_EFFICIENCIES)), arrays[fit], y[fit])
    calibrated = fit_efficiencies(micro, arrays[fit], y[fit])
    features = np.array([[subnet_features(net, c, frames, batch)[f] for f in FEATURES] for c in cfgs])
    intercept, weights = fit_nnls(features[fit], y[fit] * 1e3)
    flops = np.array([a.flops.sum() for a in arrays])
    flops_scale = float(np.median(y[fit] / flops[fit]))
    even, odd = np.median(timings.ms[0::2], axis=0), np.median(timings.ms[1::2], axis=0)

    predictions = {
        "roofline (micro-benchmarks, overheads fitted)": predict_seconds(micro, arrays),
        "roofline (calibrated)": predict_seconds(calibrated, arrays),
        "regression predictor": (features @ weights + intercept) / 1e3,
        "FLOPs (one scale fitted)": flops * flops_scale,
    }
    results = {name: _report(y[held], p[held]) for name, p in predictions.items()}
    results["repeat (noise floor): even vs odd rounds"] = _report(odd[held], even[held])
    return {
        "protocol": {
            "family": net.family,
            "preset": net.preset,
            "resolution": cfgs[0].resolution,
            "frames": frames,
            "batch": batch,
            "n_fit": n_fit,
            "n_holdout": len(cfgs) - n_fit,
            "rounds": rounds,
            "ground_truth": f"median over {rounds} interleaved robust readings per subnet",
            "torch": torch.__version__,
            "device": device_description("cpu"),
        },
        "host_before": host.to_dict(),
        "host_after": host.to_dict(),
        "noise": timings.noise(),
        "heldout": results,
        "models": {
            "micro": {"launch_us": micro.launch_us, "view_us": micro.view_us},
            "calibrated": {
                "launch_us": calibrated.launch_us,
                "view_us": calibrated.view_us,
                "efficiencies": {k: list(v) for k, v in calibrated.efficiencies.items()},
            },
            "regression": {"intercept_ms": intercept, "weights": dict(zip(FEATURES, weights.tolist()))},
            "flops_scale_s_per_flop": flops_scale,
        },
        "subnets": [
            {
                "set": "fit" if i < n_fit else "heldout",
                "measured_ms": float(y[i] * 1e3),
                "rounds_ms": timings.ms[:, i].tolist(),
                "flops": float(flops[i]),
                **{name: float(p[i] * 1e3) for name, p in predictions.items()},
            }
            for i in range(len(cfgs))
        ],
    }


def format_report(report: dict[str, Any], command: str) -> str:
    """The report as Markdown: held-out accuracy of each model, the host figures and the noise."""
    p, noise = report["protocol"], report["noise"]
    hb, ha = report["host_before"], report["host_after"]
    lines = [
        "# Roofline model of the host CPU vs measured host latency",
        "",
        f"Command: `{command}`",
        "",
        (
            f"{p['family']}/{p['preset']} at {p['resolution']} px x {p['frames']} frames, batch {p['batch']} "
            f"(the guidance pair), {p.get('threads')} threads, {p['device']}, torch {p['torch']}; "
            f"{p['n_fit']} fit + {p['n_holdout']} held-out subnets, ground truth the {p['ground_truth']}; "
            f"started {p.get('started_utc')} UTC, {p.get('wall_s')} s; timing {p.get('timing')}."
        ),
        "",
        "| held-out subnets | MAPE % | max error % | Spearman |",
        "|---|---|---|---|",
    ]
    for name, r in report["heldout"].items():
        lines.append(f"| {name} | {r['mape_pct']:.1f} | {r['max_error_pct']:.1f} | {r['spearman']:.3f} |")
    m = report["models"]
    lines += [
        "",
        (
            f"Host figures (before / after the timings): GEMM peak "
            f"{hb['peak_fp32_tflops']['value'] * 1e3:.1f} / {ha['peak_fp32_tflops']['value'] * 1e3:.1f} "
            f"GFLOP/s, copy bandwidth {hb['bandwidth_gbs']['value']:.1f} / "
            f"{ha['bandwidth_gbs']['value']:.1f} GB/s. Fitted overheads: micro-benchmark model "
            f"{m['micro']['launch_us']:.1f} us per launching op, {m['micro']['view_us']:.1f} us per view; "
            f"calibrated {m['calibrated']['launch_us']:.1f} / {m['calibrated']['view_us']:.1f} us."
        ),
        "",
        "Calibrated efficiencies (compute, memory): "
        + ", ".join(f"{k} ({c:.2f}, {b:.2f})" for k, (c, b) in m["calibrated"]["efficiencies"].items()),
        "",
        (
            f"Machine noise: {noise['readings']} readings, {noise['rejected_attempts']} rejected attempts, "
            f"{noise['busy_requeues']} busy requeues; other processes' CPU during readings median "
            f"{noise['other_cpu_cores_median']} cores (max {noise['other_cpu_cores_max']}); rounds' spread "
            f"across readings {noise['rounds_spread_pct_mean']:.1f} % (mean of (max - min) / min); load "
            f"average {noise['load_average_1_5_15']}."
        ),
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path, command: str) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, **report}, indent=1))
    md = out.with_suffix(".md")
    md.write_text(format_report(report, command))
    return out, md
