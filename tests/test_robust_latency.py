"""Robust latency readings on a shared machine: accepted when quiet, retried or refused under real load
(spinning processes that occupy the cores), never cached when refused; protocol strings; predictor
conditions. No wall-clock thresholds: only decisions (accepted, retried, refused) and what is stored."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

from harness.candidates import Candidate
from harness.measurement import Generation, MeasureSettings, Recorder, register_models
from harness.measurement.cost import Latency
from harness.measurement.timing import (
    MachineBusy,
    OtherCpu,
    Probe,
    TimingProtocol,
    estimate,
    robust_reading,
    standard_error,
)
from harness.metrics._cost_trace import FEATURES
from harness.metrics.latency_predictor import LatencyPredictor, check_predictor_conditions
from harness.models import load_bundle
from harness.paths import DEFAULT_BASE
from harness.store import Store

CPUS = os.cpu_count() or 1
FAST = TimingProtocol(rounds=3, round_s=0.03, backoff_s=0.05)  # a screen-sized reading


@contextmanager
def spinning(n: int = CPUS + 1):
    """``n`` real processes spinning in Python (one more than the cores, so every core stays busy)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.3)  # let the interpreters start and take the cores
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@pytest.fixture(scope="module")
def base():
    return load_bundle(DEFAULT_BASE)


@pytest.fixture(scope="module")
def forward(base):
    """One forward of the shipped base's 40 % subnet on the default protocol's stage inputs, and the
    reference on its smallest subnet (what ``Latency`` uses)."""
    net = base.supernet
    g = Generation(base, None, 8, 3.0)
    static = net.extract(net.space.subnet_at_fraction(0.4)).eval()
    inputs = g.stage_inputs(static, 16, g.batch_per_forward)
    ref = net.extract(net.space.smallest()).eval()
    ref_inputs = g.stage_inputs(ref, 16, g.batch_per_forward)
    probe = Probe(lambda: ref(**ref_inputs), torch.device("cpu"))
    return (lambda: static(**inputs)), probe


def test_quiet_reading_is_accepted_with_its_provenance(forward):
    fn, probe = forward
    reading = robust_reading(fn, probe, FAST, threads=2)
    assert reading.value_ms > 0 and reading.retries <= FAST.retries
    assert len(reading.round_ms) == len(reading.reference_ms) == FAST.rounds
    assert reading.spread <= FAST.max_spread
    assert reading.se_ms >= FAST.se_floor * reading.value_ms  # never 0: the between-reading floor
    assert reading.se_within_ms <= reading.se_ms
    extra = reading.extra()
    assert {"rounds", "estimator", "spread", "retries", "probe"} <= set(extra)
    assert extra["rounds"] == FAST.rounds and extra["estimator"] == "median"
    assert {"reference_before_ms", "reference_median_ms", "other_cpu_cores"} <= set(extra["probe"])
    assert probe.scale_ms is not None and extra["probe"]["reference_scale_ms"] == probe.scale_ms


def test_reading_under_real_load_is_retried_or_refused(forward):
    fn, probe = forward
    robust_reading(fn, probe, FAST, threads=2)  # the reference's quiet scale, taken before the load
    protocol = dataclasses.replace(FAST, retries=1)
    with spinning():
        try:
            reading = robust_reading(fn, probe, protocol, threads=2)
        except MachineBusy as e:
            assert "no clean latency reading in 2 attempts" in str(e)
        else:  # the load let one attempt through: only after a rejected one
            assert reading.retries >= 1 and reading.rejected


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="other processes' CPU time is read from /proc")
def test_other_cpu_sees_a_spinning_process():
    with spinning(1):
        cpu = OtherCpu().start()
        time.sleep(0.5)
        busy = cpu.stop()
    assert busy is not None and busy > 0.5  # one process spinning = about one core


def test_value_measured_under_load_never_enters_the_store(base, tmp_path):
    store = Store.open(f"sqlite:///{tmp_path}/h.db")
    recorder = Recorder(store, register_models(store, base, None), "test", 0, 0.0)
    settings = MeasureSettings(min_run_time=0.09, latency_rounds=3, latency_retries=1, latency_backoff_s=0.05)
    latency = Latency.from_settings(Generation(base, None, settings.steps, settings.guidance), settings)
    cand = Candidate(base.supernet.space.smallest())
    cid = recorder.candidate_id(cand, 1, "smallest")
    protocol = latency.protocol(cand)
    latency.compute(cand)  # warm the process and its probe while quiet
    with spinning():
        try:
            recorder.measure(cid, ["latency_ms"], protocol, latency.device, lambda: latency.compute(cand))
        except MachineBusy:  # deferred: nothing recorded at all (the candidate is measured later)
            assert store.find_measurement(cid, "latency_ms", protocol, latency.device) is None
        else:
            row = store.find_measurement(cid, "latency_ms", protocol, latency.device)
            assert json.loads(row.extra)["retries"] >= 1  # accepted only after a rejected attempt
            pytest.skip("the load let a retried reading through; nothing to check about refusal")
    values = recorder.measure(cid, ["latency_ms"], protocol, latency.device, lambda: latency.compute(cand))
    row = store.find_measurement(cid, "latency_ms", protocol, latency.device)
    assert row.status == "ok" and row.value == values["latency_ms"] and row.std > 0
    extra = json.loads(row.extra)
    assert extra["spread"] <= settings.latency_max_spread
    others = [p["other_cpu_cores"] for p in extra["probe"]]
    assert all(o is None or o <= settings.latency_other_cpu for o in others)


def test_estimators_and_standard_error_by_hand():
    rounds = [10.0, 11.0, 12.0, 13.0, 50.0]
    assert estimate(rounds, "median") == 12.0 and estimate(rounds, "min") == 10.0
    assert estimate(rounds, "trimmed") == pytest.approx(12.0)  # 10 and 50 dropped
    assert estimate(rounds, "fastest-half") == pytest.approx(11.0)  # 10, 11, 12
    assert standard_error(100.0, [100.0, 100.0, 100.0], 0.03) == pytest.approx(3.0)  # the floor alone
    assert standard_error(100.0, [90.0, 100.0, 110.0], 0.0) > 0
    with pytest.raises(ValueError, match="estimator"):
        TimingProtocol(estimator="mean")
    with pytest.raises(ValueError, match="--latency-rounds"):
        MeasureSettings(latency_rounds=0)


def test_protocol_names_the_reading_and_reruns(base):
    g = Generation(base, None, 8, 3.0)
    cand = Candidate(base.supernet.space.smallest())
    full = Latency.from_settings(g, MeasureSettings()).protocol(cand)
    assert full.endswith(":b1:threads2:measured-static:float32:median7x120ms")
    screen = dataclasses.replace(MeasureSettings(), min_run_time=0.15, latency_rounds=3)
    assert Latency.from_settings(g, screen).protocol(cand).endswith(":median3x50ms")
    rerun = Latency.from_settings(g, dataclasses.replace(MeasureSettings(), rerun=2)).protocol(cand)
    assert rerun == full + ":rerun2"


def _predictor(**conditions) -> LatencyPredictor:
    prov = {"family": "pixel-base", "preset": "tiny", "resolution": 16, "frames": 12, "batch": 2}
    prov.update({"threads": 2, "device": "cpu", "dtype": "float32", **conditions})
    return LatencyPredictor(1.0, dict.fromkeys(FEATURES, 0.0), prov)


def test_predicted_latency_refuses_a_predictor_fitted_under_other_conditions(base):
    g = Generation(base, None, 8, 3.0)
    predictors = {("pixel-base", 16): _predictor(batch=1, threads=1)}
    with pytest.raises(ValueError, match=r"fitted at batch 1, threads 1.*--batch 2 --threads 2"):
        Latency(g, "predicted", 2, "cpu", 0.84, predictors)
    ok = Latency(g, "predicted", 2, "cpu", 0.84, {("pixel-base", 16): _predictor()})
    values, _ = ok.compute(Candidate(base.supernet.space.smallest()))
    assert values["latency_ms"] == pytest.approx(8.0)  # intercept 1 ms x 8 steps


def test_shipped_predictor_matches_the_measured_conditions(base):
    latency = Latency.from_settings(Generation(base, None, 8, 3.0), MeasureSettings())
    check_predictor_conditions(
        LatencyPredictor.load(DEFAULT_BASE / "latency-16px.json"), latency.conditions()
    )
