"""A study's analysis reads only its own measurement setting, and only trials that were told.

Trial links record the setting a trial was told from (device, extractor, protocols; schema version 4),
so a store that also holds another device's or another extractor's rows for the same candidates gives
the study's analysis only its own; and a link to a trial that never finished (a worker killed between
linking and telling, whose trial is then failed as stale) is not part of the study.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import optuna
import pytest
from sqlalchemy import text

from harness import analysis
from harness.store import Store, optuna_storage
from harness.store._migrations import upgrade
from harness.store.urls import create_store_engine

DEVICE, OTHER_DEVICE = "Host CPU (2 logical CPUs)", "NVIDIA A100-SXM4-80GB"
EXTRACTOR, OTHER_EXTRACTOR = "proxy-v1", "i3d-k400"
STUDY = "sned-study"
SETTING = {"device": DEVICE, "extractor": EXTRACTOR, "protocols": {"latency_ms": "gen", "fvd": "fvd32"}}


def _candidate(store: Store, supernet_id: int, index: int) -> int:
    config = {"format": "sned-subnet/1", "family": "pixel-base", "resolution": 16,
              "ratios": {"width": 0.4 + 0.1 * index}, "keep": {}}  # fmt: skip
    key = hashlib.sha256(repr(config).encode()).hexdigest()
    return store.get_or_create_candidate(supernet_id, key, config, 16, 100 * (index + 1), f"c{index}").id


def _measure(store: Store, cid: int, latency: float, fvd: float, device: str, extractor: str) -> None:
    store.record_measurement(cid, "params", 1.0, protocol="exact", device="any", unit="count")
    store.record_measurement(cid, "latency_ms", latency, std=1.0, protocol="gen", device=device, unit="ms")
    for metric in ("fvd", "kvd"):
        store.record_measurement(cid, metric, fvd, std=0.5, protocol=f"fvd32@{extractor}", device=device,
                                 extractor=extractor)  # fmt: skip


def _tell_and_link(store: Store, study: optuna.Study, cid: int, values: list[float]) -> int:
    trial = study.ask()
    store.link_trial(cid, STUDY, "tpe", trial_number=trial.number, setting=SETTING)
    study.tell(trial, values)
    return trial.number


@pytest.fixture()
def url(tmp_path: Path) -> str:
    """One study of two candidates measured on the host with the proxy extractor; the same candidates
    also measured on another device and with another extractor, outside the study."""
    url = f"sqlite:///{tmp_path / 'mixed.db'}"
    with Store.open(url) as store:
        supernet = store.get_or_create_supernet(
            "e" * 64, "pixel-base", "tiny", {"base": {"total_params": 1000}}
        )
        study = optuna.create_study(
            study_name=STUDY, storage=optuna_storage(url), directions=["minimize"] * 2
        )
        for index in range(2):
            cid = _candidate(store, supernet.id, index)
            _measure(store, cid, 100.0 + index, 10.0 - index, DEVICE, EXTRACTOR)
            _measure(store, cid, 5.0 + index, 30.0 - index, OTHER_DEVICE, EXTRACTOR)
            _measure(store, cid, 100.0 + index, 90.0 - index, DEVICE, OTHER_EXTRACTOR)
            _tell_and_link(store, study, cid, [100.0 + index, 10.0 - index])
    return url


def test_a_study_reads_only_its_own_device_and_extractor(url: str) -> None:
    rows = analysis.load_results(url, STUDY)
    assert len(rows) == 2, rows[["device", "extractor", "latency_ms", "fvd"]]
    assert set(rows["device"]) == {DEVICE} and set(rows["extractor"]) == {EXTRACTOR}
    assert sorted(rows["latency_ms"]) == [100.0, 101.0] and sorted(rows["fvd"]) == [9.0, 10.0]
    # The study's front needs no select(): nothing of another setting is in it.
    assert len(analysis.pareto_front(rows, ("latency_ms", "fvd"))) == 2
    # The other settings' rows are still in the store's table, as rows of no study; mixing them with
    # the study's is refused in one line until one setting is chosen.
    every = analysis.load_results(url)
    assert len(every) == 2 * 3  # per candidate: (host, proxy) of the study, (host, i3d), (A100, proxy)
    assert (every["study"] == STUDY).sum() == 2
    assert set(every.loc[every["study"].isna(), "device"]) == {DEVICE, OTHER_DEVICE}
    with pytest.raises(ValueError, match="mix devices"):
        analysis.pareto_front(every, ("latency_ms", "fvd"))
    chosen = analysis.select(every, device=OTHER_DEVICE, extractor=EXTRACTOR).dropna(subset=["fvd"])
    assert sorted(chosen["latency_ms"]) == [5.0, 6.0] and chosen["study"].isna().all()


def test_a_link_to_a_trial_never_told_is_not_part_of_the_study(url: str) -> None:
    """A kill between ``link_trial`` and ``tell``: the link exists, its trial is RUNNING and later FAIL
    (stale); the study's analysis shows neither, and the candidate's next trial shows once."""
    study = optuna.load_study(study_name=STUDY, storage=optuna_storage(url))
    with Store(url) as store:
        supernet_id = store.get_or_create_supernet("e" * 64, "pixel-base", "tiny").id
        cid = _candidate(store, supernet_id, 7)
        _measure(store, cid, 120.0, 8.0, DEVICE, EXTRACTOR)
        killed = study.ask()
        store.link_trial(cid, STUDY, "tpe", trial_number=killed.number, setting=SETTING)
    running = analysis.load_results(url, STUDY)
    assert killed.number not in set(running["trial_number"]) and len(running) == 2
    study.tell(killed, state=optuna.trial.TrialState.FAIL)  # what a live worker does to a stale trial
    assert killed.number not in set(analysis.load_results(url, STUDY)["trial_number"])
    with Store(url) as store:
        number = _tell_and_link(store, study, cid, [120.0, 8.0])
    told = analysis.load_results(url, STUDY)
    assert list(told.loc[told["candidate_id"] == cid, "trial_number"]) == [number]


def test_links_from_before_version_4_keep_every_setting(tmp_path: Path) -> None:
    """A version-3 store's links have no setting: after the upgrade they join every setting, as before."""
    url = f"sqlite:///{tmp_path / 'v3.db'}"
    engine = create_store_engine(url)
    assert upgrade(engine, target=3) == 3
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO sned_supernet (id, checkpoint_sha256, family, preset, metadata, "
                                "created_at) VALUES (1, :h, 'pixel-base', 'tiny', '{}', '2026-01-01')"),
                           {"h": "f" * 64})  # fmt: skip
        connection.execute(text("INSERT INTO sned_candidate (id, supernet_id, key, config_json, resolution, "
                                "params, description) VALUES (1, 1, 'k', '{}', 16, 10, 'c')"))  # fmt: skip
        connection.execute(text("INSERT INTO sned_trial_link (candidate_id, study_name, trial_number, searcher, "
                                "created_at) VALUES (1, 'old', 0, 'tpe', '2026-01-01')"))  # fmt: skip
    engine.dispose()
    with Store.open(url) as store:
        store.record_measurement(1, "latency_ms", 3.0, protocol="gen", device=DEVICE, unit="ms")
        store.record_measurement(1, "latency_ms", 4.0, protocol="gen", device=OTHER_DEVICE, unit="ms")
        frame = store.measurements_frame()
    assert all(settings == [{}] for settings in frame["link_settings"])
    rows = analysis.load_results(url, "old")
    assert sorted(rows["device"]) == sorted([DEVICE, OTHER_DEVICE])
