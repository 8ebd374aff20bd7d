"""Cache keys that cannot lie: a stored value is reused only when what produced it is the same (torch,
the metric's implementation version, extractor weights, a folder real set's content, the latency
predictor and its device), and stores from before cache keys are migrated without reusing their rows."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from PIL import Image

from harness.candidates import Candidate
from harness.measurement.cost import FlopCount, Latency, ParamCount
from harness.measurement.generation import Generation
from harness.measurement.predictors import predictor_identity
from harness.measurement.quality import FrechetQuality, extractor_weights_sha256, real_set_sha256
from harness.measurement.recorder import Computed, MetricGroup, Recorder, cache_key
from harness.measurement.settings import MeasureSettings
from harness.metrics.extractor import ProxyConfig, ProxyExtractor, ProxyVideoNet
from harness.metrics.fvd import FVDProtocol, ProxyFeatures
from harness.metrics.i3d import I3DFeatureExtractor
from harness.metrics.latency_predictor import FEATURES, LatencyPredictor
from harness.store import SCHEMA_VERSION, Store, _migrations
from harness.store.urls import create_store_engine, ensure_parent_directory, validate_storage_url

SHA, KEY = "a" * 64, "b" * 64


class Counted(MetricGroup):
    """A metric group whose value is the number of times it was computed (1 = measured once)."""

    metrics, device = ("params",), "any"
    versions: ClassVar[Mapping[str, int]] = {"params": 1}

    def __init__(self) -> None:
        self.calls = 0

    def protocol(self, cand: Candidate) -> str:
        return "exact"

    def compute(self, cand: Candidate) -> Computed:
        self.calls += 1
        return {"params": float(self.calls)}, {}


class CountedV2(Counted):
    """The same metric after a bug fix: its implementation version bumped."""

    versions: ClassVar[Mapping[str, int]] = {"params": 2}


@pytest.fixture(scope="module")
def cand() -> Candidate:
    from search_spaces import build_supernet

    return Candidate(build_supernet("pixel-base", "tiny").space.smallest())


def _recorder(store: Store) -> tuple[Recorder, int]:
    supernet = store.get_or_create_supernet(SHA, "pixel-base", "tiny")
    recorder = Recorder(store, supernet.id, "w", seed=0, claim_timeout_s=60.0)
    return recorder, store.get_or_create_candidate(supernet.id, KEY, {"i": 1}, 16, 10).id


# Migration.


def _version_2_store(url: str) -> None:
    """A store as the previous release left it: schema version 2, one ok row and its finished claim."""
    ensure_parent_directory(validate_storage_url(url))
    engine = create_store_engine(validate_storage_url(url))
    assert _migrations.upgrade(engine, target=2) == 2
    engine.dispose()
    with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
        connection.execute(
            "INSERT INTO sned_supernet VALUES (1, ?, 'pixel-base', 'tiny', '{}', '2026-01-01 00:00:00')",
            (SHA,),
        )
        connection.execute("INSERT INTO sned_candidate VALUES (1, 1, ?, '{\"i\": 1}', 16, 10, '')", (KEY,))
        connection.execute(
            "INSERT INTO sned_measurement VALUES (1, 1, 'params', 99.0, NULL, 'count', 'exact', NULL, "
            "'any', '2.3', 0, 'ok', NULL, '{}', '2026-01-01 00:00:00', 1.5)"
        )
        connection.execute(
            "INSERT INTO sned_claim VALUES (1, 1, 'params', 'exact', 'any', 'old', 'done', '2026-01-01 00:00:00')"
        )


def test_migrated_store_keeps_old_rows_but_never_reuses_them(tmp_path: Path, cand: Candidate) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    _version_2_store(url)
    with Store.open(url) as store:
        assert store.schema_version() == SCHEMA_VERSION == 4
        old = store.measurements_frame()
        assert old[["metric", "value", "wall_s", "cache_key"]].values.tolist() == [["params", 99.0, 1.5, ""]]
        recorder, cid = _recorder(store)
        group = Counted()
        # The old row (and its finished claim) would answer this lookup if keys were (candidate, metric,
        # protocol, device) only: it is computed instead, and recorded beside the old row.
        assert recorder.measure_group(cid, group, cand)["params"] == 1.0 and group.calls == 1
        assert recorder.measure_group(cid, group, cand)["params"] == 1.0 and group.calls == 1  # now cached
        every = store.measurements_frame(superseded=True)
        assert every["value"].tolist() == [99.0, 1.0]
        assert store.measurements_frame()["value"].tolist() == [1.0]  # the analysis sees the newest
        assert store.find_measurement(cid, "params", "exact", "any", cache_key="").value == 99.0


def test_version_bump_invalidates_rows(tmp_path: Path, cand: Candidate) -> None:
    with Store.open(tmp_path / "s.db") as store:
        recorder, cid = _recorder(store)
        first, fixed = Counted(), CountedV2()
        assert recorder.measure_group(cid, first, cand)["params"] == 1.0
        assert recorder.measure_group(cid, Counted(), cand)["params"] == 1.0  # same version: reused
        assert recorder.measure_group(cid, fixed, cand)["params"] == 1.0 and fixed.calls == 1  # recomputed
        rows = store.measurements_frame(superseded=True)
        assert [identity["versions"] for identity in rows["identity"]] == [{"params": 1}, {"params": 2}]
        assert all(identity["torch"] == torch.__version__ for identity in rows["identity"])
        assert (recorder.measured, recorder.cache_hits) == (2, 1)


def test_torch_version_is_part_of_the_key(
    tmp_path: Path, cand: Candidate, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(tmp_path / "s.db") as store:
        recorder, cid = _recorder(store)
        group = Counted()
        with monkeypatch.context() as patch:
            patch.setattr(torch, "__version__", "1.0.0")  # a worker that ran an older torch
            assert recorder.measure_group(cid, group, cand)["params"] == 1.0
        assert recorder.measure_group(cid, group, cand)["params"] == 2.0 and group.calls == 2
        rows = store.measurements_frame(superseded=True)
        assert [identity["torch"] for identity in rows["identity"]] == ["1.0.0", torch.__version__]


@pytest.mark.postgres
def test_postgres_store_is_migrated_to_cache_keys(postgres_url: str) -> None:
    engine = create_store_engine(validate_storage_url(postgres_url))
    assert _migrations.upgrade(engine, target=2) == 2
    engine.dispose()
    with Store.open(postgres_url) as store:
        assert store.schema_version() == SCHEMA_VERSION
        supernet = store.get_or_create_supernet(SHA, "pixel-base", "tiny")
        cid = store.get_or_create_candidate(supernet.id, KEY, {"i": 1}, 16, 10).id
        for key, value in (("", 1.0), ("k" * 64, 2.0), ("", 3.0)):  # the third hits the first's key
            store.record_measurement(cid, "params", value, protocol="exact", device="any", cache_key=key)
        assert store.measurements_frame(superseded=True)["value"].tolist() == [1.0, 2.0]
        assert store.claim(cid, "params", "exact", "any", "w1", cache_key="")
        assert store.claim(cid, "params", "exact", "any", "w2", cache_key="k" * 64)


# What goes into the key.


def _proxy(seed: int) -> ProxyFeatures:
    torch.manual_seed(seed)
    return ProxyFeatures(extractor=ProxyExtractor(ProxyVideoNet(ProxyConfig())))


def test_extractor_key_is_its_weights_not_its_name(tmp_path: Path) -> None:
    one, other = _proxy(0), _proxy(1)
    assert one.name == other.name == "proxy-v1"
    assert extractor_weights_sha256(one) != extractor_weights_sha256(other)
    assert extractor_weights_sha256(one) == extractor_weights_sha256(_proxy(0))
    shipped = ProxyFeatures()  # loaded from results/extractor/proxy-v1: the file's recorded hash
    assert extractor_weights_sha256(shipped) == shipped.extractor.metadata["weights_sha256"]
    # Two I3D files: the same network and name, other file contents.
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights a")
    b.write_bytes(b"weights b")
    network = torch.nn.Linear(2, 2)
    keys = {extractor_weights_sha256(I3DFeatureExtractor(network, source=str(p))) for p in (a, b)}
    assert len(keys) == 2
    with pytest.raises(ValueError, match="weights_sha256"):
        extractor_weights_sha256(object())


def _frames(folder: Path, level: int, count: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.new("RGB", (8, 8), (level + 20 * k,) * 3).save(folder / f"f_{k}.png")


def test_folder_real_set_key_is_its_content(tmp_path: Path) -> None:
    for i in range(3):
        _frames(tmp_path / "heldout" / f"clip{i}", 10 * i)
    protocol = FVDProtocol(num_real=2, num_fake=3, frames=3, resolution=8, dataset=str(tmp_path))
    assert real_set_sha256(dataclasses.replace(protocol, dataset="synthetic")) is None
    before = real_set_sha256(protocol)
    assert real_set_sha256(protocol) == before
    _frames(tmp_path / "heldout" / "clip1", 200)  # same files, other pixels
    assert real_set_sha256(protocol) != before


def _predictor(intercept: float, device_name: str) -> LatencyPredictor:
    provenance = {"device": "cpu", "device_name": device_name, "family": "pixel-base", "preset": "tiny",
                  "resolution": 16, "batch": 2, "threads": 2, "frames": 12, "dtype": "float32"}  # fmt: skip
    return LatencyPredictor(intercept, dict.fromkeys(FEATURES, 1e-6), provenance)


def test_predicted_latency_key_names_predictor_and_its_device() -> None:
    fitted = _predictor(1.0, "cpu: host A")
    assert predictor_identity(fitted) == predictor_identity(_predictor(1.0, "cpu: host A"))
    assert (
        predictor_identity(fitted)["sha256"] != predictor_identity(_predictor(1.5, "cpu: host A"))["sha256"]
    )
    assert predictor_identity(_predictor(1.0, "cpu: host B"))["fitted_on"] == "cpu: host B"


@pytest.fixture(scope="module")
def generation() -> Generation:
    from harness.models import load_bundle
    from harness.paths import DEFAULT_BASE

    return Generation(load_bundle(DEFAULT_BASE), None, steps=2, guidance=3.0)


def test_cost_groups_name_versions_and_inputs(generation: Generation) -> None:
    cand = Candidate(generation.base.supernet.space.smallest())
    assert ParamCount(generation).identity(cand) == {"versions": {"params": 1}}
    assert set(FlopCount(generation).identity(cand)) == {"versions", "fvcore"}

    def latency(predictor: LatencyPredictor) -> Latency:
        conditions = {"batch": generation.batch_per_forward, "threads": 2, "frames": generation.frames}
        predictor.provenance.update(conditions)
        return Latency(generation, "predicted", 2, "cpu", 0.1, {("pixel-base", 16): predictor})

    one = latency(_predictor(1.0, "cpu: host A")).identity(cand)
    assert one["predictors"]["pixel-base@16px"]["fitted_on"] == "cpu: host A"
    assert cache_key(one) != cache_key(latency(_predictor(1.0, "cpu: host B")).identity(cand))
    assert cache_key(one) != cache_key(latency(_predictor(2.0, "cpu: host A")).identity(cand))
    measured = Latency(generation, "measured", 2, "cpu", 0.1).identity(cand)
    assert measured == {"versions": {"latency_ms": 1}}


def test_quality_key_names_extractor_weights_and_real_content(generation: Generation, tmp_path: Path) -> None:
    cand = Candidate(generation.base.supernet.space.smallest())
    settings = MeasureSettings(steps=2)

    def quality(extractor: ProxyFeatures, settings: MeasureSettings = settings) -> FrechetQuality:
        return FrechetQuality(generation, None, settings, extractor=extractor, cache_dir=tmp_path / "cache")

    one, other = quality(_proxy(0)), quality(_proxy(1))
    assert one.protocol(cand) == other.protocol(cand)  # same name, same protocol string ...
    assert cache_key(one.identity(cand)) != cache_key(other.identity(cand))  # ... other weights
    assert "real_sha256" not in one.identity(cand)
    for i in range(3):
        _frames(tmp_path / "data" / "heldout" / f"clip{i}", 10 * i, count=generation.pixel_frames)
    folder = dataclasses.replace(settings, fvd_data=str(tmp_path / "data"), real_videos=2, fvd_videos=3)
    before = quality(_proxy(0), folder)
    protocol, identity = before.protocol(cand), before.identity(cand)
    _frames(tmp_path / "data" / "heldout" / "clip1", 200, count=generation.pixel_frames)  # other pixels
    after = quality(_proxy(0), folder)
    assert after.protocol(cand) == protocol and after.identity(cand)["real_sha256"] != identity["real_sha256"]
