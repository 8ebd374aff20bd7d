"""Single subnets against trajectory schedules in the analysis (issue 20): kinds, hypervolume with its
spread on one reference, the cheapest candidate matching a reference's quality, and the plot's markers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness import analysis
from harness.figures import plot_front


def results(points, kinds, fvd_se=0.5, latency_se=0.0):
    """A results table in ``load_results``' columns: ``points`` = [(latency_ms, fvd)], one per candidate."""
    rows = []
    for i, ((latency, fvd), kind) in enumerate(zip(points, kinds)):
        rows.append({
            "study": "s", "searcher": "tpe", "trial_number": i, "candidate_key": f"k{i}", "resolution": 16,
            "kind": kind, "segments": 2 if kind == "schedule" else 1, "steps": np.nan,
            "description": f"candidate {i}", "params": 1000.0 + i, "param_fraction": 0.5,
            "latency_ms": latency, "latency_ms_std": latency_se, "fvd": fvd, "fvd_std": fvd_se,
            "device": "cpu", "extractor": "proxy", "fidelity": "full",
        })  # fmt: skip
    return pd.DataFrame.from_records(rows)


SINGLE = [(10.0, 5.0), (6.0, 7.0), (3.0, 11.0)]
SCHEDULES = [(5.0, 5.5), (4.0, 7.5)]


def test_kinds_follow_the_number_of_segments():
    df = results(SINGLE + SCHEDULES, ["subnet"] * 3 + ["schedule"] * 2)
    assert list(analysis.trajectory_kind(df)) == ["single subnet"] * 3 + ["schedule"] * 2
    assert list(analysis.trajectory_kind(df.drop(columns="segments"))) == ["single subnet"] * 5


def test_compare_trajectories_uses_one_reference_and_counts_the_overall_front():
    df = results(SINGLE + SCHEDULES, ["subnet"] * 3 + ["schedule"] * 2)
    table = analysis.compare_trajectories(df, ("latency_ms", "fvd")).set_index("kind")
    assert list(table.index) == ["single subnet", "schedule", "all"]
    assert len(set(table["reference"])) == 1
    ref = np.array(table["reference"].iloc[0])
    for kind, part in (("single subnet", df.iloc[:3]), ("schedule", df.iloc[3:]), ("all", df)):
        assert table.loc[kind, "hypervolume"] == pytest.approx(
            analysis.hypervolume(part, ("latency_ms", "fvd"), ref)
        )
    # The schedules dominate the middle single subnet: all beats either kind alone, and both schedules
    # are on the front of all candidates, beside the fastest and the best single subnets.
    assert table.loc["all", "hypervolume"] > table.loc["single subnet", "hypervolume"]
    assert (
        table.loc["schedule", "on_overall_front"] == 2 and table.loc["single subnet", "on_overall_front"] == 2
    )
    assert (table["hypervolume_spread"] > 0).all()


def test_hypervolume_spread_grows_with_the_standard_errors_and_is_zero_for_exact_points():
    quiet, noisy = results(SINGLE, ["subnet"] * 3, 0.1), results(SINGLE, ["subnet"] * 3, 1.0)
    ref = (12.0, 13.0)
    v0, s0 = analysis.hypervolume_spread(quiet, ("latency_ms", "fvd"), ref)
    v1, s1 = analysis.hypervolume_spread(noisy, ("latency_ms", "fvd"), ref)
    assert v0 == v1 and 0 < s0 < s1
    exact = results(SINGLE, ["subnet"] * 3, fvd_se=0.0)
    assert analysis.hypervolume_spread(exact, ("latency_ms", "fvd"), ref) == (v0, 0.0)


def test_cheapest_matching_is_within_noise_of_the_reference():
    df = results(SINGLE + SCHEDULES, ["subnet"] * 3 + ["schedule"] * 2, fvd_se=0.5)
    # k0 (the largest, FVD 5.0 ± 0.5): k3 (FVD 5.5, 0.5 worse) is within 1 combined SE (0.71); k1 not.
    best = analysis.cheapest_matching(df, "k0", z=1.0)
    assert best["candidate_key"] == "k3" and best["cost_ratio"] == pytest.approx(0.5)
    assert best["quality_gap"] == pytest.approx(0.5)
    # Stricter: nothing but the reference itself matches.
    assert analysis.cheapest_matching(df, "k0", z=0.5)["candidate_key"] == "k0"
    assert analysis.cheapest_matching(df, "missing") is None


def test_front_plot_draws_schedules_as_squares(tmp_path):
    df = results(SINGLE + SCHEDULES, ["subnet"] * 3 + ["schedule"] * 2)
    figure = plot_front(df, ("latency_ms", "fvd"), tmp_path / "front.png")
    assert (tmp_path / "front.png").stat().st_size > 1000
    ax = figure.axes[0]
    markers = {line.get_marker() for line in ax.lines if line.get_marker() not in (None, "None", "")}
    assert {"o", "s"} <= markers
    labels = ax.get_legend_handles_labels()[1]
    assert any("schedule" in label for label in labels)
    single_only = plot_front(results(SINGLE, ["subnet"] * 3), ("latency_ms", "fvd"))
    assert "s" not in {line.get_marker() for line in single_only.axes[0].lines}


@pytest.mark.slow
def test_trajectory_search_then_the_comparison_command(tmp_path):
    """A real trajectory search (with the largest subnet as its anchor), then ``python -m harness.analysis
    trajectories`` on it: hypervolume per kind on one reference and the cheapest match of the largest."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    url = f"sqlite:///{tmp_path}/h.db"
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parent.parent

    def run(*argv):
        proc = subprocess.run([sys.executable, "-m", *argv], cwd=repo, env=env, text=True,
                              capture_output=True, timeout=900, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    run("harness.search", "--objective", "latency", "--steps-choices", "2,3", "--segments", "2",
        "--trials", "4", "--fvd-videos", "4", "--steps", "2", "--threads", "1", "--no-plot",
        "--anchors", "1.0", "--storage", url, "--study", "traj")  # fmt: skip
    out = run("harness.analysis", "trajectories", "--storage", url, "--study", "traj")
    assert re.search(r"traj: \d+ candidates, hypervolume [\d.e+-]+ ± ", out), out
    assert "single subnet:" in out and "largest single subnet: fvd" in out, out
    ratio = float(re.search(r"= ([\d.]+)x the largest's", out).group(1))
    assert 0 < ratio <= 1.0  # the largest matches itself: the cheapest match is never slower
    df = analysis.load_results(url, "traj")
    assert set(df["kind"]) <= {"subnet", "schedule"} and df["segments"].max() <= 2
    single = df[df["kind"] == "subnet"]
    assert single["steps"].dropna().isin([3.0]).all()  # own steps only where they differ from --steps 2
    assert df[df["kind"] == "schedule"]["steps"].isin([2.0, 3.0]).all()
