"""Fitting the roofline model to timed subnets, and the calibration record saved beside a checkpoint.

Two fits, both on *relative* residuals ``modelled / measured - 1`` (what MAPE measures):

- :func:`fit_overheads`: only the per-op overheads (``launch_us``, ``view_us``) by non-negative least
  squares, the roofline part fixed - the host model of the validation (peaks from micro-benchmarks,
  efficiencies 1, "overhead per op fitted");
- :func:`fit_efficiencies`: the efficiencies of every op kind and both overheads
  (``scipy.optimize.least_squares``; efficiencies in log space, bounded to [0.01, 2]), with a weak prior
  pulling each log-efficiency toward its starting value (``prior`` per unit of log): kinds the timed
  subnets cannot tell apart (always memory-bound, say) keep their defaults instead of drifting.

A calibration record (:func:`calibration_record`, JSON) holds the device's figures, the precision, the
fitted values, the report on held-out subnets and how the timings were taken; it is saved as
``roofline-<device>-<precision>.json`` in the checkpoint's directory, and :func:`load_model` uses it in
preference to the uncalibrated model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares, nnls

from harness.metrics._cost_trace import KINDS
from harness.roofline.catalogue import DeviceSpec, Figure, get_device
from harness.roofline.model import OpArrays, RooflineModel

FORMAT = "sned-roofline-calibration/1"
FIT_KINDS = tuple(k for k in KINDS if k != "view")


def predict_seconds(model: RooflineModel, arrays: Sequence[OpArrays]) -> np.ndarray:
    """Modelled seconds of each forward in ``arrays``."""
    return np.array([model.forward(a).seconds for a in arrays])


def fit_overheads(model: RooflineModel, arrays: Sequence[OpArrays], measured_s: np.ndarray) -> RooflineModel:
    """``model`` with ``launch_us`` and ``view_us`` fitted (NNLS on relative residuals), all else fixed."""
    y = np.asarray(measured_s, dtype=np.float64)
    roof = np.array([model.forward(a).roofline_s for a in arrays])
    design = np.array([[a.launches, a.views] for a in arrays], dtype=np.float64) / y[:, None]
    scale = design.max(axis=0)
    scale[scale == 0] = 1.0
    solution, _ = nnls(design / scale, 1.0 - roof / y)
    launch_s, view_s = solution / scale
    return replace(model, launch_us=float(launch_s * 1e6), view_us=float(view_s * 1e6))


def fit_efficiencies(
    model: RooflineModel, arrays: Sequence[OpArrays], measured_s: np.ndarray, prior: float = 0.05
) -> RooflineModel:
    """``model`` with every kind's (compute, memory) efficiency and both overheads fitted (module doc)."""
    y = np.asarray(measured_s, dtype=np.float64)
    units = [model.unit_seconds(a) for a in arrays]
    k = len(FIT_KINDS)
    idx = np.array([KINDS.index(kind) for kind in FIT_KINDS])
    start_c, start_m = model.efficiency_arrays()
    launch0, view0 = model.overheads_us()
    x0 = np.concatenate([np.log(start_c[idx]), np.log(start_m[idx]), [launch0, view0]])
    lo = np.concatenate([np.full(2 * k, np.log(0.01)), [0.0, 0.0]])
    hi = np.concatenate([np.full(2 * k, np.log(2.0)), [1e4, 1e4]])
    x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)

    def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        comp, mem = np.ones(len(KINDS)), np.ones(len(KINDS))
        comp[idx], mem[idx] = np.exp(x[:k]), np.exp(x[k : 2 * k])
        return comp, mem

    def residuals(x: np.ndarray) -> np.ndarray:
        comp, mem = unpack(x)
        pred = np.array(
            [
                np.maximum(c / comp[a.kind], m / mem[a.kind]).sum()
                + (a.launches * x[-2] + a.views * x[-1]) * 1e-6
                for a, (c, m) in zip(arrays, units)
            ]
        )
        return np.concatenate([pred / y - 1.0, prior * (x[: 2 * k] - x0[: 2 * k])])

    result = least_squares(residuals, x0, bounds=(lo, hi), x_scale="jac")
    comp, mem = unpack(result.x)
    efficiencies = {
        kind: (float(comp[KINDS.index(kind)]), float(mem[KINDS.index(kind)])) for kind in FIT_KINDS
    }
    return replace(
        model, efficiencies=efficiencies, launch_us=float(result.x[-2]), view_us=float(result.x[-1])
    )


# -- the calibration record ------------------------------------------------------------------------
def calibration_path(directory: str | Path, device_key: str, precision: str) -> Path:
    return Path(directory) / f"roofline-{device_key}-{precision}.json"


def calibration_record(
    model: RooflineModel, report: dict[str, Any], provenance: dict[str, Any]
) -> dict[str, Any]:
    """The JSON record of a fitted ``model``: device figures, precision, fitted values, report."""
    launch, view = model.overheads_us()
    record = {
        "format": FORMAT,
        "device": model.device.to_dict(),
        "precision": model.precision,
        "efficiencies": {kind: list(v) for kind, v in model.efficiencies.items()},
        "launch_us": launch,
        "view_us": view,
        "report": report,
        "provenance": provenance,
    }
    text = json.dumps(record, sort_keys=True, default=str)
    record["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return record


def save_calibration(record: dict[str, Any], directory: str | Path) -> Path:
    path = calibration_path(directory, record["device"]["key"], record["precision"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)
    return path


def _device_from_dict(data: dict[str, Any]) -> DeviceSpec:
    def fig(name: str) -> Figure:
        return Figure(float(data[name]["value"]), str(data[name]["source"]))

    peaks = {
        key.removeprefix("peak_").removesuffix("_tflops"): fig(key) for key in data if key.startswith("peak_")
    }
    return DeviceSpec(
        data["key"], data["name"], peaks, fig("bandwidth_gbs"), fig("launch_us"), fig("view_us")
    )


def model_from_record(record: dict[str, Any]) -> RooflineModel:
    if record.get("format") != FORMAT:
        raise ValueError(f'not a roofline calibration (expected "format": "{FORMAT}")')
    return RooflineModel(
        device=_device_from_dict(record["device"]),
        precision=record["precision"],
        efficiencies={k: (float(v[0]), float(v[1])) for k, v in record["efficiencies"].items()},
        launch_us=float(record["launch_us"]),
        view_us=float(record["view_us"]),
        calibration=record,
    )


def load_model(
    device_key: str, precision: str = "fp32", directory: str | Path | None = None
) -> RooflineModel:
    """The model of device ``device_key`` at ``precision``: calibrated when ``directory`` (a checkpoint's)
    holds its calibration record, else uncalibrated (catalogue figures, default efficiencies). The host
    (``host``) has no catalogue entry: it is modelled only once calibrated."""
    key = device_key.strip().lower()
    if directory is not None:
        path = calibration_path(directory, key, precision)
        if path.exists():
            return model_from_record(json.loads(path.read_text()))
    if key == "host":
        raise ValueError(
            f"modelled:host at {precision} needs a calibration beside the checkpoint: run python -m "
            "harness.roofline calibrate --device cpu --target host --checkpoint DIR"
        )
    return RooflineModel(get_device(key), precision)
