"""One latency scale per machine (harness.measurement.calibration): the first quiet warm-up's scale is
recorded and reused by later processes, with their own warm-up scale kept as provenance."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.measurement.calibration import calibrated_scale


def test_the_first_scale_is_recorded_and_reused_by_other_processes(tmp_path, monkeypatch):
    path = tmp_path / "cal.json"
    monkeypatch.setenv("SNED_LATENCY_CALIBRATION", str(path))
    first, info = calibrated_scale("cpu|ref", 15.3)
    assert first == 15.3 and info["reference_scale_now_ms"] == 15.3
    code = "from harness.measurement.calibration import calibrated_scale as c; print(c('cpu|ref', 13.4)[0])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(other.stdout) == 15.3  # a later, faster process keeps the machine's scale
    again, info = calibrated_scale("cpu|ref", 13.4)
    assert again == 15.3 and info["reference_scale_now_ms"] == 13.4 and info["calibrated_at"]
    assert calibrated_scale("cpu|other-ref", 7.0)[0] == 7.0  # each reference has its own


def test_off_uses_each_process_scale(monkeypatch):
    monkeypatch.setenv("SNED_LATENCY_CALIBRATION", "off")
    assert calibrated_scale("cpu|ref", 13.4) == (13.4, {"calibration": "off"})


def test_an_unreadable_file_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "cal.json"
    path.write_text("[1, 2")
    monkeypatch.setenv("SNED_LATENCY_CALIBRATION", str(path))
    with pytest.raises(ValueError, match="delete it to recalibrate"):
        calibrated_scale("cpu|ref", 13.4)
    assert path.read_text() == "[1, 2"  # left as it was
