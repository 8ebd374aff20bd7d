"""Constraints that do not waste work: a limit known before measurement (parameters) is checked before
anything is timed or generated, violations are relative to their limits, and the limits are part of the
study's identity."""

from __future__ import annotations

import pytest

from harness.searchers.runner import limit_violations
from harness.store import Store
from tests.test_search import FAST, completed, search

LIMIT = 5e5  # parameters: the tiny supernet's smallest subnets fit, SNED-M/L/B (0.6, 0.8, 1.0) do not


def test_violations_are_relative_to_their_limits():
    values = {"params": 1.1e6, "flops": 4.5e9, "latency_ms": 90.0}
    limits = {"params": 1e6, "flops": 5e9, "latency_ms": 100.0}
    assert limit_violations(values, limits) == pytest.approx([0.1, -0.1, -0.1])


@pytest.mark.slow
def test_a_parameter_limit_skips_timing_and_fvd_and_a_resume_with_another_limit_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/h.db"
    args = ["--objective", "latency", "--trials", "5", "--storage", url, "--study", "c", *FAST]
    search(*args, "--max-params", f"{LIMIT:g}")
    trials = completed(url, "c")
    skipped = [t for t in trials if t.user_attrs.get("infeasible_before_measurement")]
    measured = [t for t in trials if not t.user_attrs.get("infeasible_before_measurement")]
    assert len(skipped) >= 3 and measured  # at least the three large anchors
    frame = Store(url).measurements_frame()
    for t in skipped:
        rows = frame[frame.candidate_key == t.user_attrs["candidate_key"]]
        assert set(rows.metric) == {"params"}, "a candidate over the limit was timed or generated"
        params = rows.value.iloc[0]
        assert params > LIMIT and list(t.constraints.values()) == pytest.approx([(params - LIMIT) / LIMIT])
    for t in measured:
        assert t.user_attrs["metrics"]["params"] <= LIMIT and max(t.constraints.values()) <= 0
        rows = frame[frame.candidate_key == t.user_attrs["candidate_key"]]
        assert {"latency_ms", "fvd"} <= set(rows.metric)
    refused = search(*args, "--max-params", "6e5", check=False)
    assert refused.returncode != 0
    assert "limits" in refused.stderr.strip().splitlines()[-1] and "--study NEW" in refused.stderr
