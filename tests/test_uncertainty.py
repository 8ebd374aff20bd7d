"""Noise-aware fronts, error bars, floors and per-study fidelity selection, on stores written through
the real ``Store`` and Optuna APIs (``build_study`` is shared with ``tests/test_reproduce.py``).

The rows are constructed so that each decision is known by hand: which point a difference beyond the
noise dominates, which only a difference within it (statistically tied), and where common bootstrap
replicates (paired SE) turn a tie into dominance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from harness import analysis
from harness.figures import plot_front
from harness.report import format_front, report_front, study_results
from harness.store import Store, optuna_storage

DEVICE = "Test CPU (2 logical CPUs)"
EXTRACTOR = "proxy-v1"
LATENCY = "gen:ddim8:cfg:16px:12f:b1:threads2:measured-static"
FVD = f"fvd32_12f_16px@{EXTRACTOR}:real256:x1:ddim8:g3:seed0"
SCREEN_LATENCY = "gen:ddim8:cfg:16px:12f:b1:threads2:measured-static:screen"
SCREEN_FVD = f"fvd8_12f_16px@{EXTRACTOR}:real256:x1:ddim8:g3:seed0"
FLOOR = {"fvd": 3.0, "fvd_se": 0.25, "kvd": 0.01, "kvd_se": 0.002, "n": 32, "method": "heldout-real"}
B = 200


@dataclass
class Row:
    """One candidate's measurements (``boot``: its bootstrap replicates of FVD, or ``None``)."""

    latency: float
    fvd: float
    latency_se: float = 1.0
    fvd_se: float = 0.3
    params: float = 5e5
    boot: np.ndarray | None = None
    boot_seed: int = 0
    latency_protocol: str = LATENCY
    fvd_protocol: str = FVD
    state: str = "complete"  # or "pruned": a screened trial not promoted
    fidelity: str = "full"
    extra: dict = field(default_factory=dict)


def _record(store: Store, cid: int, row: Row) -> None:
    store.record_measurement(cid, "params", row.params, protocol="exact", device="any", unit="count")
    store.record_measurement(cid, "flops", row.params * 2e3, protocol="fvcore:gen:ddim8:cfg:16px:12f",
                             device="any", unit="FLOP")  # fmt: skip
    store.record_measurement(cid, "latency_ms", row.latency, std=row.latency_se, protocol=row.latency_protocol,
                             device=DEVICE, unit="ms", extra={"rounds": 5, "estimator": "median"})  # fmt: skip
    extra = {"floor": FLOOR, **row.extra}
    if row.boot is not None:
        extra["bootstrap"] = {"method": "percentile-resample", "B": len(row.boot), "seed": row.boot_seed,
                              "n": 32, "fvd": list(map(float, row.boot)),
                              "kvd": list(map(float, row.boot / 100))}  # fmt: skip
    for metric, value, se in (("fvd", row.fvd, row.fvd_se), ("kvd", row.fvd / 100, row.fvd_se / 100)):
        store.record_measurement(cid, metric, value, std=se, protocol=row.fvd_protocol, device=DEVICE,
                                 extractor=EXTRACTOR, seed=0, extra=extra)  # fmt: skip


def build_study(url: str, rows: Sequence[Row], name: str = "study", attrs: dict | None = None) -> list[str]:
    """A study of ``rows`` (trial ``i`` = row ``i``), measured, told and linked; returns the keys."""
    keys = []
    with Store.open(url) as store:
        supernet = store.get_or_create_supernet(
            "a" * 64, "pixel-base", "tiny", {"base": {"total_params": 1e6}}
        )
        study = optuna.create_study(study_name=name, storage=optuna_storage(url),
                                    directions=["minimize", "minimize"])  # fmt: skip
        for key, value in (attrs or {}).items():
            study.set_user_attr(key, value)
        for i, row in enumerate(rows):
            config = {"format": "sned-subnet/1", "family": "pixel-base", "resolution": 16, "i": i, "s": name}
            key = hashlib.sha256(repr(config).encode()).hexdigest()
            cid = store.get_or_create_candidate(supernet.id, key, config, 16, row.params, f"row {i}").id
            _record(store, cid, row)
            user = {"candidate_key": key, "searcher": "tpe", "fidelity": row.fidelity}
            if row.state == "pruned":
                user["screen"] = {"latency_ms": row.latency, "fvd": row.fvd}
                trial = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs=user)
            else:
                trial = optuna.trial.create_trial(values=[row.latency, row.fvd], user_attrs=user)
            study.add_trial(trial)
            store.link_trial(cid, name, "tpe", trial_number=study.trials[-1].number)
            keys.append(key)
    return keys


def _frame(rows: Sequence[tuple[float, float, float, float]]) -> pd.DataFrame:
    """Constructed rows ``(latency, latency_se, fvd, fvd_se)`` with the columns the analysis reads."""
    df = pd.DataFrame(rows, columns=["latency_ms", "latency_ms_std", "fvd", "fvd_std"])
    return df.assign(candidate_key=[f"k{i}" for i in range(len(df))], device=DEVICE, extractor=EXTRACTOR)


# Dominance decisions.


def test_a_difference_within_the_noise_does_not_dominate() -> None:
    df = _frame(
        [
            (100.0, 1.0, 10.0, 0.3),  # k0: best everywhere
            (101.0, 1.0, 10.2, 0.3),  # k1: worse by 1.0 ms (SE diff 1.41) and 0.2 FVD (SE diff 0.42)
            (150.0, 1.0, 20.0, 0.3),  # k2: worse by far more than the noise
            (90.0, 1.0, 30.0, 0.3),
        ]
    )  # fmt: skip  k3: faster, much worse FVD: on the strict front
    strict = analysis.pareto_front(df, ("latency_ms", "fvd"))
    noisy = analysis.pareto_front(df, ("latency_ms", "fvd"), noise_z=1.96)
    assert set(strict["candidate_key"]) == {"k0", "k3"}
    assert set(noisy["candidate_key"]) == {"k0", "k1", "k3"}
    assert dict(zip(noisy["candidate_key"], noisy["tied"])) == {"k0": False, "k1": True, "k3": False}
    assert analysis.tied_count(noisy) == 1
    # A tighter SE makes the same difference significant: 1.0 ms > 1.96 * sqrt(0.2^2 + 0.2^2) = 0.55.
    tight = df.assign(latency_ms_std=0.2)
    assert set(analysis.pareto_front(tight, ("latency_ms", "fvd"), noise_z=1.96)["candidate_key"]) == {
        "k0",
        "k3",
    }


def test_no_worse_in_every_objective_is_required() -> None:
    # k0 is far better in FVD but 0.5 ms slower: it does not dominate k1, however small 0.5 ms is.
    df = _frame([(100.5, 1.0, 10.0, 0.3), (100.0, 1.0, 20.0, 0.3)])
    front = analysis.pareto_front(df, ("latency_ms", "fvd"), noise_z=1.96)
    assert set(front["candidate_key"]) == {"k0", "k1"} and not front["tied"].any()


def test_z_zero_is_the_strict_front_and_noise_fronts_contain_it() -> None:
    rng = np.random.default_rng(3)
    df = _frame([(rng.uniform(50, 150), rng.uniform(0.5, 3), rng.uniform(5, 30), rng.uniform(0.2, 2))
                 for _ in range(60)])  # fmt: skip
    strict = set(analysis.pareto_front(df, ("latency_ms", "fvd"))["candidate_key"])
    assert set(analysis.pareto_front(df, ("latency_ms", "fvd"), noise_z=0.0)["candidate_key"]) == strict
    sizes = []
    for z in (0.5, 1.96, 4.0):
        front = analysis.pareto_front(df, ("latency_ms", "fvd"), noise_z=z)
        assert strict <= set(front["candidate_key"])
        assert set(front.loc[~front["tied"], "candidate_key"]) == strict
        sizes.append(len(front))
    assert sizes == sorted(sizes) and sizes[-1] > len(strict)  # more noise tolerance, more ties


def test_exact_counts_have_no_noise() -> None:
    # 10 fewer parameters is a real difference (SE 0), whatever FVD's noise: k1 is dominated.
    df = _frame([(0, 0, 10.0, 0.3), (0, 0, 10.1, 0.3)]).assign(params=[1000.0, 1010.0])
    front = analysis.pareto_front(df, ("params", "fvd"), noise_z=1.96)
    assert list(front["candidate_key"]) == ["k0"]


def test_paired_bootstrap_turns_a_tie_into_dominance(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shared = rng.normal(10.0, 0.3, B)  # common random numbers: both replicates move together
    paired = [Row(100.0, 10.0, boot=shared), Row(100.0, 10.5, boot=shared + 0.5 + rng.normal(0, 0.02, B))]
    # The same values with replicates resampled under different seeds cannot be paired.
    unpaired = [Row(100.0, 10.0, boot=shared), Row(100.0, 10.5, boot=shared + 0.5, boot_seed=1)]
    url = f"sqlite:///{tmp_path / 'paired.db'}"
    keys = build_study(url, paired, "paired")
    keys_unpaired = build_study(url, unpaired, "unpaired")
    rows = analysis.load_bootstrap(url, analysis.load_results(url, "paired"))
    assert rows["fvd_bootstrap"].map(len).tolist() == [B, B] and rows["fvd_bootstrap_key"].nunique() == 1
    se = analysis.difference_se(rows, "fvd")
    assert se[0, 1] < 0.05 < np.hypot(0.3, 0.3)  # paired SE far below the unpaired one
    assert list(analysis.pareto_front(rows, ("latency_ms", "fvd"), noise_z=1.96)["candidate_key"]) == [
        keys[0]
    ]
    # Without the replicates the 0.5 difference is within 1.96 * 0.42: tied.
    plain = analysis.load_results(url, "paired")
    assert len(analysis.pareto_front(plain, ("latency_ms", "fvd"), noise_z=1.96)) == 2
    other = analysis.load_bootstrap(url, analysis.load_results(url, "unpaired"))
    front = analysis.pareto_front(other, ("latency_ms", "fvd"), noise_z=1.96)
    assert set(front["candidate_key"]) == set(keys_unpaired) and analysis.tied_count(front) == 1


# Tables, floors and plots.


def test_tables_print_value_plus_minus_se_and_the_floor(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tables.db'}"
    build_study(
        url, [Row(100.0, 10.0, params=4e5), Row(101.0, 10.2, params=6e5), Row(90.0, 30.0, params=1e6)]
    )
    df = study_results(url, "study", DEVICE, EXTRACTOR)
    assert df["fvd_floor"].tolist() == [3.0] * 3 and df["fvd_floor_se"].tolist() == [0.25] * 3
    text = format_front(analysis.pareto_front(df, ("latency_ms", "fvd"), noise_z=1.96))
    lines = text.splitlines()
    assert (
        "100.0 ± 1" in text
        and "10.0 ± 0.3" in text
        and lines[-1].split()[:4] == ["floor", "3.0", "±", "0.25"]
    )
    assert sum(line.split()[0].endswith("*") for line in lines[2:-1]) == 1  # the tied trial is starred
    assert "± 0 " not in text + " " and "± n/a" not in text


def test_table1_never_prints_plus_minus_zero(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    build_study(url, [Row(100.0, 10.0, fvd_se=0.0, params=4e5), Row(120.0, 9.0, params=1e6)])
    table = analysis.table1(analysis.load_results(url), fractions=(0.4, 1.0))
    assert list(table["FVD"]) == ["10 ± n/a", "9 ± 0.3"]  # a legacy std of 0 is no standard error
    assert list(table["Latency (ms)"]) == ["100 ± 1", "120 ± 1"] and set(table["FVD floor"]) == {"3 ± 0.25"}
    assert analysis.format_estimate(12.34, 0.0004, "fvd") == "12.3 ± 0.0004"  # never rounded to ± 0.0
    assert analysis.format_estimate(float("nan"), 1.0) == "n/a"


def test_front_plot_draws_error_bars_in_both_axes_and_the_floor(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'plot.db'}"
    build_study(url, [Row(100.0, 10.0, latency_se=2.0, fvd_se=0.5), Row(101.0, 10.2),
                      Row(150.0, 20.0), Row(90.0, 30.0)])  # fmt: skip
    df = study_results(url, "study", DEVICE, EXTRACTOR)
    figure = plot_front(df, ("latency_ms", "fvd"), tmp_path / "front.png")
    ax = figure.axes[0]
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}
    front = next(c for label, c in bars.items() if label.startswith("Pareto front"))
    assert "±1.96 SE" in front.get_label() and front.has_xerr and front.has_yerr
    assert any(label.startswith("statistically tied (1)") for label in bars)
    assert any(label.startswith("candidates (4)") for label in bars)
    # The fastest-with-best-FVD point's bars: 2 x 1.96 x SE long in each axis.
    x_segments, y_segments = (np.asarray(c.get_segments()) for c in front.lines[2])
    lengths = sorted(np.ptp(x_segments[:, :, 0], axis=1)), sorted(np.ptp(y_segments[:, :, 1], axis=1))
    assert lengths[0][-1] == pytest.approx(2 * 1.96 * 2.0) and lengths[1][-1] == pytest.approx(2 * 1.96 * 0.5)
    floor = [line for line in ax.get_lines() if "floor" in line.get_label()]
    assert len(floor) == 1 and floor[0].get_ydata()[0] == 3.0
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"


# Fidelities.


def test_screen_only_candidates_never_reach_the_reported_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'fidelity.db'}"
    protocols = {"full": {"latency_ms": LATENCY, "fvd": FVD},
                 "screen-8": {"latency_ms": SCREEN_LATENCY, "fvd": SCREEN_FVD}}  # fmt: skip
    rows = [Row(100.0, 10.0), Row(120.0, 8.0),
            # Screened and not promoted: its screen values would dominate everything.
            Row(50.0, 5.0, latency_protocol=SCREEN_LATENCY, fvd_protocol=SCREEN_FVD, state="pruned",
                fidelity="screen-8")]  # fmt: skip
    keys = build_study(url, rows, attrs={"fidelity_protocols": protocols, "objectives": ["latency", "fvd"]})
    full = analysis.load_results(url, "study")
    assert keys[2] not in set(full["candidate_key"]) and set(full["fidelity"]) == {"full"}
    every = analysis.load_results(url, "study", fidelity=None)
    assert dict(zip(every["candidate_key"], every["fidelity"]))[keys[2]] == "screen-8"
    screen = analysis.load_results(url, "study", fidelity="screen-8")
    assert list(screen["candidate_key"]) == [keys[2]]
    assert list(analysis.pareto_front(every, ("latency_ms", "fvd"))["candidate_key"]) == [keys[2]]
    df = study_results(url, "study", DEVICE, EXTRACTOR)
    report_front(df, url, "study", ["latency", "fvd"], plot=False)
    out = capsys.readouterr().out
    assert "2 of 2 full-fidelity trials, 0 of them statistically tied" in out
    assert "row 2" not in out and "row 0" in out and "row 1" in out


def test_quality_metrics_share_their_fidelity(tmp_path: Path) -> None:
    # A fidelity naming only FVD still assigns KVD (one measurement): no row pairs full FVD with screen KVD.
    url = f"sqlite:///{tmp_path / 'pairs.db'}"
    key = build_study(url, [Row(100.0, 10.0)], attrs={"fidelity_protocols": {"full": {"fvd": FVD}}})[0]
    with Store.open(url) as store:
        cid = int(analysis.load_results(url)["candidate_id"].iloc[0])
        store.record_measurement(
            cid, "kvd", 0.5, std=0.01, protocol=SCREEN_FVD, device=DEVICE, extractor=EXTRACTOR
        )
    assert len(analysis.load_results(url, "study", fidelity=None)) == 2
    full = analysis.load_results(url, "study")
    assert list(full["candidate_key"]) == [key] and list(full["kvd_protocol"]) == [FVD]
