"""Calibration: time subnets on the device, fit the model's efficiencies and overheads, save the record.

``python -m harness.roofline calibrate --device cuda --target a100-sxm4-80gb --precision bf16
--checkpoint DIR`` draws ``--fit + --holdout`` subnets (the latency predictor's draw), times each in
``--rounds`` robust readings on the device at the precision (``harness.roofline.timed``; bf16: weights
and inputs cast; fp32 / tf32: PyTorch's TF32 switches set as the catalogue's units assume), fits
``fit_efficiencies`` on the fit subnets from the uncalibrated model, reports both models on the held-out
ones, and writes ``roofline-<target>-<precision>.json`` beside the checkpoint
(``harness.roofline.fit.calibration_record``), which ``--latency modelled:<target>`` then prefers.

``--device cpu --target host`` calibrates the host CPU the same way (its peak and bandwidth from the
micro-benchmarks of ``harness.roofline.host``): how the fitting is tested without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.metrics.latency import device_description
from harness.metrics.latency_predictor import _draw_subnets, calibration_report
from harness.roofline.catalogue import get_device
from harness.roofline.fit import calibration_record, fit_efficiencies, predict_seconds, save_calibration
from harness.roofline.model import TORCH_DTYPES, RooflineModel, denoiser_ops
from harness.roofline.timed import time_subnets
from search_spaces import Supernet, build_supernet, load_supernet


@contextlib.contextmanager
def tf32_switches(precision: str) -> Iterator[None]:
    """PyTorch's TF32 switches as ``catalogue.compute_unit`` assumes for ``precision``, restored after."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def _start_model(args: argparse.Namespace) -> RooflineModel:
    """The uncalibrated model of ``--target`` on ``--device`` (refusing a GPU that is not the target)."""
    device = torch.device(args.device)
    if args.target == "host":
        if device.type != "cpu":
            raise ValueError("--target host calibrates the CPU: pass --device cpu")
        if args.precision != "fp32":
            raise ValueError("the host is calibrated at fp32 only (its peak is an fp32 GEMM's)")
        from harness.roofline.host import host_device

        return RooflineModel(host_device(args.threads), "fp32", {k: (1.0, 1.0) for k in _kinds()})
    spec = get_device(args.target)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"--target {args.target} is a GPU: run on it with --device cuda")
    name = torch.cuda.get_device_name(device).upper()
    if not all(part.upper() in name for part in spec.cuda_names):
        raise ValueError(f"this GPU is {name!r}, not {spec.name}; pass the --target that it is")
    return RooflineModel(spec, args.precision)


def _kinds() -> list[str]:
    from harness.metrics._cost_trace import KINDS

    return [k for k in KINDS if k != "view"]


def _net(args: argparse.Namespace) -> Supernet:
    if args.checkpoint is not None:
        return load_supernet(args.checkpoint)
    return build_supernet(args.family, args.preset)  # weights do not change latency


def calibrate(args: argparse.Namespace, timing, command: str) -> tuple[dict[str, Any], Path]:
    """Time, fit, report and save (module docstring); returns the record and its path."""
    if args.fit < 4 or args.holdout < 3 or args.rounds < 1:
        raise ValueError("calibrate needs --fit >= 4, --holdout >= 3 and --rounds >= 1")
    start = _start_model(args)
    net = _net(args)
    frames = args.frames or net.hyper.frames
    resolution = net.space.default_resolution
    cfgs = _draw_subnets(net, resolution, args.fit + args.holdout, np.random.default_rng(args.seed))
    dtype = TORCH_DTYPES[args.precision]
    with tf32_switches(args.precision):
        timings = time_subnets(
            net, cfgs, frames, args.batch, args.threads, timing, args.rounds, args.seed,
            device=args.device, dtype=dtype, progress=not args.no_progress,
        )  # fmt: skip
    y = np.median(timings.ms, axis=0) / 1e3
    arrays = [denoiser_ops(net, c, frames, args.batch, dtype) for c in cfgs]
    fit, held = slice(0, args.fit), slice(args.fit, None)
    fitted = fit_efficiencies(start, arrays[fit], y[fit])
    report = {
        "heldout": calibration_report(y[held], predict_seconds(fitted, arrays[held])),
        "fit": calibration_report(y[fit], predict_seconds(fitted, arrays[fit])),
        "uncalibrated_heldout": calibration_report(y[held], predict_seconds(start, arrays[held])),
        "noise": timings.noise(),
        "subnets": [
            {"set": "fit" if i < args.fit else "heldout", "measured_ms": float(y[i] * 1e3)}
            for i in range(len(cfgs))
        ],
    }
    provenance = {
        "command": command,
        "device": args.device,
        "device_name": device_description(args.device),
        "torch": torch.__version__,
        "family": net.family,
        "preset": net.preset,
        "resolution": resolution,
        "frames": frames,
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "timing": timing.name,
    }
    record = calibration_record(fitted, report, provenance)
    return record, save_calibration(record, args.checkpoint or args.out_dir)
