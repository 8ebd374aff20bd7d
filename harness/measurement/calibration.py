"""One latency scale per machine: every process's milliseconds are on the same scale.

A reading is the ratio candidate / reference times the reference's *scale* (``timing.Probe``). Measured
fresh in every process, the scale follows the shared machine's speed at that moment: here a search and
its re-measurement 6 minutes later had scales of 15.3 and 13.4 ms, so every re-measured latency was
12 % lower, while the ratios candidate / reference agreed to 1.9 % (median 0.999) and the intervals
covered only 36 % of the re-measurements. So the scale of a reference is measured once on a machine
(the first quiet warm-up) and recorded in a small JSON file; later processes on that machine use the
recorded one and record their own warm-up scale beside it in each reading (``reference_scale_now_ms``),
so a machine that became slower or faster shows in the provenance instead of in the values.

The file is ``$SNED_LATENCY_CALIBRATION`` (``off``: every process uses its own scale), by default
``~/.cache/sned-harness/latency-calibration.json``; its keys name the device, torch version and the
reference (family, preset, resolution, batch, frames, threads). Delete an entry (or the file) to
recalibrate: values measured before and after are then on different scales and should not be compared.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from pathlib import Path
from typing import Any

ENV = "SNED_LATENCY_CALIBRATION"


def calibration_path() -> Path | None:
    """The calibration file in use, or ``None`` when calibration is off."""
    chosen = os.environ.get(ENV)
    if chosen is not None and chosen.strip().lower() == "off":
        return None
    if chosen:
        return Path(chosen)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sned-harness" / "latency-calibration.json"


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(
            f"latency calibration file {path} is unreadable ({e}); delete it to recalibrate"
        ) from None
    return data


def calibrated_scale(key: str, measured_ms: float) -> tuple[float, dict[str, Any]]:
    """The scale (ms) of reference ``key`` on this machine and its provenance: the recorded one, or
    ``measured_ms`` (this process's quiet warm-up), which is recorded when there is none yet."""
    path = calibration_path()
    if path is None:
        return measured_ms, {"calibration": "off"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes starting together record one scale, not several
        data = _read(path)
        entry = data.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("scale_ms"), int | float):
            entry = {"scale_ms": measured_ms, "calibrated_at": dt.datetime.now(dt.UTC).isoformat()}
            data[key] = entry
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)  # a reader never sees half a file
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_UN)
    return float(entry["scale_ms"]), {
        "calibration": str(path),
        "calibrated_at": entry["calibrated_at"],
        "reference_scale_now_ms": measured_ms,
    }
