"""Pareto analysis, plots and the notebook, against a fresh fixture store written through the real APIs.

The fixture holds one supernet, two Optuna studies ("tpe" and "evolution"), 12 candidates each at 16 and
32 px, with made-up but plausible measurements (latency roughly proportional to FLOPs, FVD falling with
parameters) and one failed FVD measurement.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from sqlalchemy import inspect

from harness import analysis
from harness.cli import run_cli
from harness.plot import main as plot_main
from harness.store import Store, optuna_storage

ROOT = Path(__file__).resolve().parents[1]
TOTAL_PARAMS = 1_000_000
DEVICE = "Test CPU (2 logical CPUs)"
EXTRACTOR = "proxy-v1"
STUDIES = {"sned-tpe": "tpe", "sned-evolution": "evolution"}
# Fractions of the supernet's parameters: the tpe study holds the ones nearest 40/60/80/100 %.
TPE_FRACTIONS = (0.41, 0.3, 0.55, 0.62, 0.7, 0.33, 0.79, 0.9, 0.47, 1.0, 0.66, 0.85)
EXPECTED_TABLE1 = {"SNED-S": ("sned-tpe", 0.41), "SNED-M": ("sned-tpe", 0.62),
                   "SNED-L": ("sned-tpe", 0.79), "SNED-B": ("sned-tpe", 1.0)}  # fmt: skip
FAILED_TRIAL = ("sned-tpe", 5)  # its quality measurement failed
QUALITY = ("fvd", "kvd", "text_alignment")


def _candidate_values(fraction: float, resolution: int, rng: np.random.Generator) -> dict[str, float]:
    params = round(fraction * TOTAL_PARAMS)
    flops = params * (resolution / 16) ** 2 * 12 * 10 * 2.0  # per video: frames x steps x CFG pair
    return {"params": params, "flops": flops, "latency_ms": flops / 2e7 * rng.uniform(0.9, 1.1),
            "fvd": 700 - 350 * fraction - (60 if resolution == 32 else 0) + rng.normal(0, 15),
            "fvd_std": rng.uniform(2, 8), "kvd": 40 - 20 * fraction + rng.normal(0, 1),
            "kvd_std": rng.uniform(0.1, 0.5), "text_alignment": 0.2 + 0.1 * fraction}  # fmt: skip


def _record(
    store: Store, candidate_id: int, values: dict[str, float], resolution: int, failed: bool, offset: int = 0
) -> None:
    """``offset`` > 0: a re-measurement with fresh noise (``harness.analysis reproduce``'s protocols)."""
    gen = f"ddim10:cfg:{resolution}px:12f"
    rerun, seed = (f":rerun{offset}" if offset else ""), offset
    store.record_measurement(
        candidate_id, "params", values["params"], protocol="exact", device="any", unit="count"
    )
    flops, latency = values["flops"], values["latency_ms"]
    store.record_measurement(
        candidate_id, "flops", flops, protocol=f"fvcore:gen:{gen}", device="any", unit="FLOP"
    )
    store.record_measurement(candidate_id, "latency_ms", latency, std=latency * 0.01, unit="ms", seed=0,
                             protocol=f"gen:{gen}:b1:threads2{rerun}", device=DEVICE)  # fmt: skip
    quality = {"protocol": f"fvd32_12f_{resolution}px@{EXTRACTOR}:ddim10:g3:seed{seed}", "device": DEVICE,
               "extractor": EXTRACTOR, "seed": seed}  # fmt: skip
    for metric in ("fvd", "kvd", "text_alignment"):
        if failed:
            store.record_failure(candidate_id, metric, "RuntimeError: out of memory", **quality)
        else:
            store.record_measurement(candidate_id, metric, values[metric], std=values.get(f"{metric}_std"),
                                     **quality)  # fmt: skip


def _add_trial(store: Store, study: optuna.Study, supernet_id: int, searcher: str, fraction: float,
               rng: np.random.Generator) -> None:  # fmt: skip
    """One candidate: measured in the store, told to the study as a trial, linked to that trial."""
    number = len(study.trials)
    resolution = 16 if number % 2 == 0 else 32
    config = {"format": "sned-subnet/1", "family": "pixel-base", "resolution": resolution,
              "ratios": {"width": fraction}, "keep": {"study": study.study_name}}  # fmt: skip
    key = hashlib.sha256(repr(config).encode()).hexdigest()
    values = _candidate_values(fraction, resolution, rng)
    row = store.get_or_create_candidate(supernet_id, key, config, resolution, values["params"],
                                        f"{fraction:.0%} params, {resolution}px")  # fmt: skip
    failed = (study.study_name, number) == FAILED_TRIAL
    _record(store, row.id, values, resolution, failed)
    attrs = {
        "candidate_key": key,
        "searcher": searcher,
        "param_fraction": values["params"] / TOTAL_PARAMS,
        **({"measurement_failed": True} if failed else {}),
    }  # as the searchers tell a failure
    objectives = None if failed else [values["latency_ms"], values["fvd"]]
    state = optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.COMPLETE
    study.add_trial(optuna.trial.create_trial(state=state, values=objectives, user_attrs=attrs))
    store.link_trial(row.id, study.study_name, searcher, trial_number=study.trials[-1].number)


def _build_store(url: str) -> None:
    """Two studies of 12 candidates each, recorded through ``Store`` and Optuna's ``add_trial``."""
    rng = np.random.default_rng(0)
    evolution_fractions = tuple(rng.uniform(0.3, 0.95, size=12).round(3))
    with Store.open(url) as store:
        metadata = {"base": {"total_params": TOTAL_PARAMS}}
        supernet = store.get_or_create_supernet("a" * 64, "pixel-base", "tiny", metadata)
        for study_name, searcher in STUDIES.items():
            study = optuna.create_study(study_name=study_name, storage=optuna_storage(url),
                                        directions=["minimize", "minimize"])  # fmt: skip
            for fraction in TPE_FRACTIONS if searcher == "tpe" else evolution_fractions:
                _add_trial(store, study, supernet.id, searcher, fraction, rng)
    _add_reproduction(url, "sned-tpe", rng)


def _add_reproduction(url: str, name: str, rng: np.random.Generator) -> None:
    """A re-measurement of the study's noise-aware front and 4 neighbours with fresh noise, recorded as
    ``python -m harness.analysis reproduce`` records one (the rows under their own protocols, the plan)."""
    rows = analysis.load_results(url, name).dropna(subset=["fvd"])
    front = list(analysis.pareto_front(rows, ("latency_ms", "fvd"), noise_z=1.96)["candidate_key"])
    chosen = front + analysis.nearest_neighbours(rows, front, ("latency_ms", "fvd"), 4)
    with Store.open(url) as store:
        for key in chosen:
            row = rows[rows["candidate_key"] == key].iloc[0]
            values = {"params": row["params"], "flops": row["flops"],
                      "latency_ms": row["latency_ms"] * rng.normal(1, 0.01),
                      "fvd": row["fvd"] + rng.normal(0, row["fvd_std"]), "fvd_std": row["fvd_std"],
                      "kvd": row["kvd"] + rng.normal(0, row["kvd_std"]), "kvd_std": row["kvd_std"],
                      "text_alignment": row["text_alignment"]}  # fmt: skip
            _record(store, int(row["candidate_id"]), values, int(row["resolution"]), False, offset=1)
    every = analysis.load_results(url, name, fidelity=None)
    protocols = {side: {m: sorted(every.loc[every[f"{m}_protocol"].str.contains(f"{mark}$", regex=True)
                                            & every["candidate_key"].isin(chosen), f"{m}_protocol"].unique())
                        for m, mark in marks.items()}
                 for side, marks in (("stored", {"latency_ms": "threads2", **dict.fromkeys(QUALITY, "seed0")}),
                                     ("new", {"latency_ms": "rerun1", **dict.fromkeys(QUALITY, "seed1")}))}  # fmt: skip
    plan = {"objectives": ["latency_ms", "fvd"], "device": DEVICE, "noise_z": 1.96, "front": front,
            "candidates": chosen, **protocols}  # fmt: skip
    study = optuna.load_study(study_name=name, storage=optuna_storage(url))
    study.set_user_attr("reproduce-1", plan)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('analysis') / 'harness.db'}"
    _build_store(url)
    return url


@pytest.fixture(scope="module")
def results(store_url: str) -> pd.DataFrame:
    return analysis.load_results(store_url)


def _brute_force_front(points: np.ndarray) -> np.ndarray:
    """Indices of points no other point dominates (<= everywhere, < somewhere), minimising."""
    keep = [i for i, p in enumerate(points)
            if not any(np.all(q <= p) and np.any(q < p) for j, q in enumerate(points) if j != i)]  # fmt: skip
    return np.array(keep)


# Loading.


def test_load_results_pivots_one_row_per_candidate_and_setting(results: pd.DataFrame, store_url: str) -> None:
    assert len(results) == 24 and results["candidate_key"].is_unique
    for column in ("study", "searcher", "trial_number", "candidate_key", "resolution", "description",
                   "params", "flops", "latency_ms", "fvd", "fvd_std", "kvd", "kvd_std", "text_alignment",
                   "device", "extractor", "latency_ms_protocol", "fvd_protocol", "status"):  # fmt: skip
        assert column in results, column
    assert set(results["device"]) == {DEVICE} and set(results["extractor"]) == {EXTRACTOR}
    assert dict(results.groupby("study")["searcher"].first()) == STUDIES
    np.testing.assert_allclose(results["param_fraction"], results["params"] / TOTAL_PARAMS)
    np.testing.assert_allclose(results["supernet_params"], TOTAL_PARAMS)
    failed = results[results["status"] == "failed"]
    assert [(s, n) for s, n in zip(failed["study"], failed["trial_number"])] == [FAILED_TRIAL]
    assert failed["fvd"].isna().all() and failed["latency_ms"].notna().all()
    assert "out of memory" in failed["error"].iloc[0]
    only = analysis.load_results(store_url, "sned-evolution")
    assert len(only) == 12 and set(only["searcher"]) == {"evolution"}
    assert list(only["trial_number"]) == list(range(12))


def test_load_results_rejects_unknown_study_and_empty_store(store_url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown study 'nope'.*sned-evolution, sned-tpe"):
        analysis.load_results(store_url, "nope")
    empty = tmp_path / "empty.db"
    Store.open(empty).close()
    with pytest.raises(ValueError, match="holds no measurements"):
        analysis.load_results(str(empty))


def test_settings_never_mix_devices_or_extractors(tmp_path: Path) -> None:
    url = str(tmp_path / "settings.db")
    with Store.open(url) as store:
        metadata = {"base": {"total_params": 1000}, "ssr": {"total_params": 500}}
        supernet = store.get_or_create_supernet("c" * 64, "pixel-base+pixel-ssr", "tiny", metadata)
        subnet = {
            "format": "sned-subnet/1",
            "family": "pixel-base",
            "resolution": 16,
            "ratios": {},
            "keep": {},
        }
        chain = {
            "format": "sned-chain/1",
            "resolution": 32,
            "base": subnet,
            "ssr": {**subnet, "resolution": 32},
        }
        cid = store.get_or_create_candidate(
            supernet.id, "d" * 64, chain, 32, 600, "40% params, 32px chain"
        ).id
        store.record_measurement(cid, "flops", 1e9, protocol="fvcore", device="any", unit="FLOP")
        for device, latency in (("cpu-A", 50.0), ("gpu-B", 5.0)):
            store.record_measurement(cid, "latency_ms", latency, protocol="gen", device=device, unit="ms")
        for extractor, fvd in (("proxy-v1", 300.0), ("i3d", 900.0)):
            for metric, value in (("fvd", fvd), ("kvd", fvd / 10)):
                store.record_measurement(cid, metric, value, std=1.0, protocol=f"{metric}@{extractor}",
                                         device="cpu-A", extractor=extractor)  # fmt: skip
    results = analysis.load_results(url)
    assert len(results) == 3 and results["study"].isna().all() and set(results["kind"]) == {"chain"}
    assert (results["kvd"] * 10 == results["fvd"]).sum() == 2 and (results["flops"] == 1e9).all()
    gpu = results[results["device"] == "gpu-B"]
    assert len(gpu) == 1 and gpu["fvd"].isna().all() and gpu["latency_ms"].iloc[0] == 5.0
    np.testing.assert_allclose(results["param_fraction"], 600 / 1500)
    with pytest.raises(ValueError, match="several devices"):
        analysis.select(results)
    chosen = analysis.select(results, device="cpu-A", extractor="i3d")
    assert list(chosen["fvd"]) == [900.0] and list(chosen["fvd_protocol"]) == ["fvd@i3d"]
    with Store(url) as store, store.session() as session:  # the analysis created no Optuna tables
        assert not inspect(session.connection()).has_table("studies")


def test_mixed_devices_are_refused_until_one_is_selected(results: pd.DataFrame) -> None:
    other = results.assign(device="Other GPU", latency_ms=results["latency_ms"] / 10)
    mixed = pd.concat([results, other], ignore_index=True)
    with pytest.raises(ValueError, match="mix devices"):
        analysis.pareto_front(mixed, ("latency_ms", "fvd"))
    with pytest.raises(ValueError, match="several devices"):
        analysis.select(mixed)
    assert len(analysis.pareto_front(mixed, ("params", "flops")))  # counted metrics hold on every device
    chosen = analysis.select(mixed, device="Other GPU")
    assert set(chosen["device"]) == {"Other GPU"} and len(chosen) == len(results)


# Fronts and hypervolume.


@pytest.mark.parametrize("objectives", [("latency_ms", "fvd"), ("params", "fvd"), ("flops", "kvd")])
def test_pareto_front_equals_brute_force(results: pd.DataFrame, objectives: tuple[str, str]) -> None:
    measured = results.dropna(subset=list(objectives)).reset_index(drop=True)
    expected = set(measured.loc[_brute_force_front(measured[list(objectives)].to_numpy()), "candidate_key"])
    front = analysis.pareto_front(results, objectives)
    assert set(front["candidate_key"]) == expected and len(front) == len(expected)
    assert front[objectives[0]].is_monotonic_increasing


def test_pareto_front_with_a_maximised_objective(results: pd.DataFrame) -> None:
    flipped = results.assign(text_alignment=-results["text_alignment"])  # maximise x == minimise -x
    expected = analysis.pareto_front(flipped, ("params", "text_alignment"))
    front = analysis.pareto_front(results, ("params", "text_alignment"), minimize=None)
    assert set(front["candidate_key"]) == set(expected["candidate_key"])


def test_fronts_by_resolution_partition(results: pd.DataFrame) -> None:
    fronts = analysis.fronts_by_resolution(results, ("latency", "fvd"))
    assert list(fronts) == [16, 32]
    for resolution, front in fronts.items():
        assert set(front["resolution"]) == {resolution}
        same = results[results["resolution"] == resolution]
        assert set(front["candidate_key"]) == set(analysis.pareto_front(same)["candidate_key"])


def test_hypervolume_matches_hand_computation_in_2d() -> None:
    points = pd.DataFrame({"latency_ms": [1.0, 2.0, 3.0, 2.5], "fvd": [3.0, 2.0, 1.0, 2.5]})
    # Union of rectangles up to (4, 4): 3x1 + 2x1 + 1x1; (2.5, 2.5) is dominated by (2, 2).
    assert analysis.hypervolume(points, ("latency_ms", "fvd"), reference=(4.0, 4.0)) == pytest.approx(6.0)
    # Default reference: 1.1 x the worst value of each objective = (3.3, 3.3).
    np.testing.assert_allclose(analysis.reference_point(points, ("latency_ms", "fvd")), [3.3, 3.3])
    expected = 2.3 * 0.3 + 1.3 * 1.0 + 0.3 * 1.0
    assert analysis.hypervolume(points, ("latency_ms", "fvd")) == pytest.approx(expected)
    # Maximising -fvd against reference -4 is the same volume.
    maximised = analysis.hypervolume(points.assign(fvd=-points["fvd"]), ("latency_ms", "fvd"), (4.0, -4.0),
                                     minimize=(True, False))  # fmt: skip
    assert maximised == pytest.approx(6.0)


def test_hypervolume_over_trials_is_non_decreasing_and_ends_at_the_final_value(results: pd.DataFrame) -> None:
    objectives = ("latency_ms", "fvd")
    reference = analysis.reference_point(results, objectives)
    curves = analysis.hypervolume_over_trials(results, objectives, reference)
    assert list(curves.columns) == ["study", "searcher", "trial_number", "hypervolume"]
    comparison = analysis.compare_searchers(results, objectives)
    np.testing.assert_allclose(comparison["reference"].iloc[0], reference)
    for (study, searcher), curve in curves.groupby(["study", "searcher"]):
        assert list(curve["trial_number"]) == list(range(12))
        assert np.all(np.diff(curve["hypervolume"].to_numpy()) >= 0) and curve["hypervolume"].iloc[-1] > 0
        final = analysis.hypervolume(results[results["study"] == study], objectives, reference)
        assert curve["hypervolume"].iloc[-1] == pytest.approx(final)
        row = comparison[comparison["study"] == study].iloc[0]
        assert row["hypervolume"] == pytest.approx(final) and row["searcher"] == searcher
        assert row["n_trials"] == 12 and row["n_measured"] == (11 if study == FAILED_TRIAL[0] else 12)


def test_compare_resolutions(results: pd.DataFrame) -> None:
    table = analysis.compare_resolutions(results, ("latency_ms", "fvd"))
    assert list(table["resolution"]) == [16, 32] and table["n_candidates"].sum() == 24
    overall = len(analysis.pareto_front(results, ("latency_ms", "fvd")))
    assert 0 < table["on_overall_front"].sum() <= overall
    assert (table["best_latency_ms"] > 0).all()


def test_latency_flops_correlation(results: pd.DataFrame) -> None:
    correlation = analysis.latency_flops_correlation(results)
    assert correlation["n"] == 24 and correlation["spearman"] > 0.9 and correlation["pearson"] > 0.9


# Table 1.


def test_table1_picks_the_candidates_nearest_each_fraction(results: pd.DataFrame) -> None:
    table = analysis.table1(results)
    assert list(table.columns) == ["Model", "target", "param fraction", "key", "resolution", "#Params",
                                   "FLOPs", "Latency (ms)", "FVD", "KVD", "FVD floor", "KVD floor"]  # fmt: skip
    assert list(table["Model"]) == ["SNED-S", "SNED-M", "SNED-L", "SNED-B"]
    for _, row in table.iterrows():
        study, fraction = EXPECTED_TABLE1[row["Model"]]
        assert row["#Params"] == round(fraction * TOTAL_PARAMS) and row["param fraction"] == fraction
        match = results[(results["study"] == study) & (results["params"] == row["#Params"])]
        assert row["key"] == match["candidate_key"].iloc[0][:12]
        assert "±" in row["FVD"] and "±" in row["KVD"]
    # Without a supernet size the largest candidate is 100 %.
    by_max = analysis.table1(results.assign(param_fraction=np.nan))
    assert list(by_max["#Params"]) == list(table["#Params"])


def test_fraction_subnets_prefers_a_tagged_candidate() -> None:
    rows = pd.DataFrame({"candidate_key": ["a", "b", "c"], "params": [40.0, 55.0, 100.0],
                         "param_fraction": [0.4, 0.55, 1.0], "fvd": [3.0, 2.0, 1.0],
                         "latency_ms": [1.0, 2.0, 3.0],
                         "description": ["", "tagged SNED-S", ""]})  # fmt: skip
    picked = analysis.fraction_subnets(rows, (0.4, 1.0))
    assert list(picked["candidate_key"]) == ["b", "c"] and list(picked["model"]) == ["SNED-S", "SNED-B"]


# The plot command.


def test_plot_cli_writes_pngs(store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plots"
    argv = ["--storage", store_url, "--study", "sned-tpe", "--study", "sned-evolution",
            "--objective", "latency", "--objective", "fvd", "--out", str(out)]  # fmt: skip
    run_cli(lambda: plot_main(argv))
    written = capsys.readouterr().out.split()
    names = {"front_latency_ms_vs_fvd.png", "hypervolume_latency_ms_vs_fvd.png", "latency_vs_flops.png"}
    assert {Path(p).name for p in written} == names
    for path in written:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(path).stat().st_size > 5000


def test_plot_cli_unknown_study_exits_2_with_one_line(store_url: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "harness.plot", "--storage", store_url, "--study", "missing-study",
               "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "missing-study" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("problem", ["empty", "malformed", "objective"])
def test_plot_cli_bad_input_exits_2(problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.db"
    Store.open(empty).close()
    storage = {
        "empty": str(empty),
        "malformed": "postgresql://user:hunter2@db.example",
        "objective": str(empty),
    }
    argv = ["--storage", storage[problem], "--out", str(tmp_path / "plots")]
    argv += ["--objective", "speed"] if problem == "objective" else []
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: plot_main(argv))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and error.startswith("error: ")
    assert "hunter2" not in error
    assert {"empty": "no measurements", "malformed": "no database name", "objective": "speed"}[
        problem
    ] in error
    assert not (tmp_path / "plots").exists()


# The notebook.


@pytest.mark.slow
def test_notebook_executes_against_the_fixture_store(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = ROOT / "notebooks" / "pareto_analysis.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    assert "parameters" in notebook.cells[1].metadata.get("tags", [])
    monkeypatch.setenv("SNED_STORAGE_URL", store_url)
    monkeypatch.setenv("SNED_STUDY", "sned-tpe,sned-evolution")
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})  # fmt: skip
    client.execute(env=dict(os.environ))
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3
    text = "".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in outputs)
    assert "SNED-B" in text and "spearman" in text.lower() and "statistically tied" in text
    assert "stored front points still on the re-measured front" in text and "re-measured" in text


def test_plot_cli_draws_training_loss_curves(tmp_path: Path) -> None:
    import json

    from PIL import Image

    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "Loss/train": 1.0 / s}) + "\n" for s in range(1, 121)))
    plot_main(["--training-log", str(log), "--out", str(tmp_path / "plots")])
    with Image.open(tmp_path / "plots" / "training_loss.png") as image:
        assert image.size[0] > 300
    with pytest.raises(ValueError, match="does not exist"):
        plot_main(["--training-log", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
