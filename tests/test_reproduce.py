"""Reproducing a front: the statistics on constructed rows and on rows in a store, and the
``python -m harness.analysis reproduce`` command end to end on a tiny study made by the real search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness import analysis
from harness.store import Store, optuna_storage
from tests.test_uncertainty import DEVICE, FVD, LATENCY, Row, _record, build_study

NEW_LATENCY, NEW_FVD = f"{LATENCY}:rerun1", FVD.replace("seed0", "seed1")
OBJECTIVES = ("latency_ms", "fvd")


def _rows(values: list[tuple[float, float]], se: tuple[float, float] = (2.0, 0.5)) -> pd.DataFrame:
    return pd.DataFrame({
        "candidate_key": [f"k{i}" for i in range(len(values))], "trial_number": range(len(values)),
        "description": [f"row {i}" for i in range(len(values))],
        "latency_ms": [v[0] for v in values], "latency_ms_std": se[0],
        "fvd": [v[1] for v in values], "fvd_std": se[1], "device": DEVICE, "extractor": "proxy-v1",
    })  # fmt: skip


def test_compare_computes_spearman_front_kept_and_coverage() -> None:
    stored = _rows([(100, 30), (120, 20), (140, 12), (160, 10), (200, 25), (210, 28)])
    # k1 comes back 20 FVD worse: out of its interval (1.96 * sqrt(0.5^2 + 0.5^2) = 1.39) and off the
    # front; k4 just out (1.5); every other value moves within the noise.
    new = _rows([(101, 30.4), (119, 40), (141, 11.8), (158, 10.3), (203, 26.5), (209, 28.1)])
    front = ["k0", "k1", "k2", "k3"]
    result = analysis.compare(stored, new, OBJECTIVES, front)
    table = result.table.set_index("candidate_key")
    assert result.n_front == 4 and result.front_kept == 0.75
    assert not table.loc["k1", "new_front"] and table.loc[["k0", "k2", "k3"], "new_front"].all()
    assert result.coverage == {"latency_ms": 1.0, "fvd": 4 / 6}
    assert list(table.index[~table["fvd_covered"]]) == ["k1", "k4"]
    expected = stats.spearmanr(stored["fvd"], new["fvd"]).statistic
    assert result.spearman["fvd"] == pytest.approx(expected) and result.spearman["latency_ms"] == 1.0
    text = analysis.format_reproduction(result)
    assert "120.0 ± 2" in text and "40.0 ± 0.5" in text and "NO" in text and "fvd 67%" in text


def test_nearest_neighbours_are_the_closest_to_the_front_in_scaled_space() -> None:
    rows = _rows([(100, 30), (200, 10), (105, 31), (195, 12), (150, 29), (300, 40)])
    # Latency spans 200 ms and FVD 30: scaled, k2 and k3 lie next to a front point, k4 between them.
    assert analysis.nearest_neighbours(rows, ["k0", "k1"], OBJECTIVES, 3) == ["k2", "k3", "k4"]
    assert analysis.nearest_neighbours(rows, ["k0", "k1"], OBJECTIVES, 0) == []
    assert [analysis.default_neighbours(n) for n in (2, 6, 8)] == [10, 6, 8]


def test_reproduction_reads_the_plan_and_rows_from_the_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rerun.db'}"
    stored = [Row(100.0, 30.0), Row(120.0, 20.0), Row(160.0, 10.0), Row(200.0, 25.0)]
    keys = build_study(url, stored)
    with pytest.raises(ValueError, match="no re-measurement with offset 1.*harness.analysis reproduce"):
        analysis.reproduction(url, "study", 1)
    new = [Row(101.0, 30.2), Row(119.0, 20.3), Row(161.0, 9.8)]  # the fourth not re-measured yet
    results = analysis.load_results(url, "study")
    with Store.open(url) as store:
        for key, row in zip(keys, new):
            cid = int(results.loc[results["candidate_key"] == key, "candidate_id"].iloc[0])
            _record(store, cid, Row(row.latency, row.fvd, latency_protocol=NEW_LATENCY, fvd_protocol=NEW_FVD))
    quality = {"fvd": [FVD], "kvd": [FVD], "text_alignment": [FVD]}
    plan = {"objectives": list(OBJECTIVES), "device": DEVICE, "noise_z": 1.96, "front": keys[:3],
            "candidates": keys, "stored": {"latency_ms": [LATENCY], **quality},
            "new": {"latency_ms": [NEW_LATENCY], **{m: [NEW_FVD] for m in quality}}}  # fmt: skip
    storage = optuna_storage(url)
    storage.set_study_user_attr(storage.get_study_id_from_name("study"), "reproduce-1", plan)
    storage.engine.dispose()
    result = analysis.reproduction(url, "study", 1)
    assert result.n_planned == 4 and len(result.table) == 3 and result.n_front == 3
    assert result.front_kept == 1.0 and result.coverage == {"latency_ms": 1.0, "fvd": 1.0}
    assert result.spearman == {"latency_ms": 1.0, "fvd": 1.0}
    assert list(result.table["fvd_new"]) == [30.2, 20.3, 9.8]
    # The re-measured rows are the study's "rerun-1" fidelity: never in its default results.
    assert len(analysis.load_results(url, "study")) == 4
    every = analysis.load_results(url, "study", fidelity=None)
    assert every["fidelity"].value_counts().to_dict() == {"full": 4, "rerun-1": 3}


@pytest.mark.slow
def test_reproduce_command_on_a_tiny_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.analysis.__main__ import main as analysis_main
    from harness.search import main as search_main

    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    tiny = ["--fvd-videos", "4", "--real-videos", "16", "--steps", "2"]
    search_main(
        ["--trials", "4", *tiny, "--storage", url, "--study", "tiny", "--no-plot", "--anchors", "0.4,1.0"]
    )
    capsys.readouterr()
    argv = ["reproduce", "--storage", url, "--study", "tiny", "--neighbours", "2"]
    analysis_main(argv)
    out = capsys.readouterr().out
    attrs = analysis.study_attributes(url, ["tiny"])["tiny"]
    plan = attrs["reproduce-1"]
    assert (
        set(plan["front"]) <= set(plan["candidates"])
        and 2 < len(plan["candidates"]) <= len(plan["front"]) + 2
    )
    assert (
        all(p.endswith("seed1") for p in plan["new"]["fvd"])
        and plan["new"]["latency_ms"] != plan["stored"]["latency_ms"]
    )
    every = analysis.load_results(url, "tiny", fidelity=None)
    rerun = every[every["fidelity"] == "rerun-1"].drop_duplicates("candidate_key")
    assert set(rerun["candidate_key"]) == set(plan["candidates"]) and rerun["fvd_std"].gt(0).all()
    for line in ("Spearman (stored vs new): latency_ms", "stored front points still on the re-measured front",
                 "intervals covering the re-measurement"):  # fmt: skip
        assert line in out
    assert f"re-measured {len(plan['candidates'])} of {len(plan['candidates'])} planned" in out
    # A second run re-measures nothing (every value is in the store) and reports the same figures.
    analysis_main(argv)
    assert capsys.readouterr().out == out
    assert len(analysis.load_results(url, "tiny", fidelity=None)) == len(every)
    with pytest.raises(ValueError, match="--offset must be at least 1"):
        analysis_main([*argv, "--offset", "0"])
    assert not np.isnan(analysis.reproduction(url, "tiny").front_kept)
