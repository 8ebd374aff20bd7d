"""Measured latency and the latency predictor: provenance, JSON round trip, ordering, error paths.

No wall-clock thresholds and no calibration targets here (the machine is shared and noisy): the CLI
``python -m harness.predictor`` reports the calibration figures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from harness.measurement.timing import TimingProtocol
from harness.metrics.latency import LatencyResult, device_description, measure_latency
from harness.metrics.latency_predictor import LatencyPredictor, calibration_report, fit_nnls, subnet_features
from harness.predictor import format_report, main

FRAMES = 4


def test_measure_latency_module_has_provenance(tiny_nets):
    net = tiny_nets["pixel-base"]
    cfg = net.space.smallest()
    result = measure_latency(
        net.extract(cfg),
        net.dummy_inputs(cfg, batch_size=2, frames=FRAMES),
        threads=1,
        min_run_time=0.05,
        warmup=1,
    )
    assert isinstance(result, LatencyResult)
    assert result.median_ms > 0 and result.iqr_ms >= 0 and result.n_runs >= 1
    assert (result.batch, result.frames, result.resolution) == (2, FRAMES, cfg.resolution)
    assert result.threads == 1 and result.dtype == "float32" and result.device == "cpu"
    assert result.torch_version == torch.__version__ and result.device_name
    assert json.loads(json.dumps(result.to_dict()))["median_ms"] == result.median_ms


def test_measure_latency_callable_and_process_clock():
    x = torch.randn(64, 64)
    for clock in ("wall", "process"):
        result = measure_latency(lambda: x @ x, threads=1, min_run_time=0.02, warmup=0, clock=clock)
        assert result.median_ms > 0 and result.dtype == "n/a" and result.batch is None
        assert result.clock == clock


def test_measure_latency_rejects_bad_input():
    with pytest.raises(ValueError, match="inputs"):
        measure_latency(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="inputs are only"):
        measure_latency(lambda: None, {"x": 1})
    with pytest.raises(ValueError, match="threads"):
        measure_latency(lambda: None, threads=0)
    with pytest.raises(ValueError, match="clock"):
        measure_latency(lambda: None, clock="cycles")


def test_device_description_names_the_cpu():
    text = device_description("cpu")
    assert isinstance(text, str) and "CPU" in text


def test_calibration_report_by_hand():
    report = calibration_report([10.0, 20.0, 30.0, 40.0], [11.0, 18.0, 30.0, 44.0])
    assert report["n"] == 4
    assert report["mape_pct"] == pytest.approx((10 + 10 + 0 + 10) / 4)
    assert report["max_error_pct"] == pytest.approx(10.0)
    assert report["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal-length"):
        calibration_report([1.0, 2.0, 3.0], [1.0, 2.0])


def test_fit_nnls_recovers_a_linear_cost_model():
    rng = np.random.default_rng(0)
    features = rng.uniform(1, 100, size=(40, 3))
    truth = np.array([0.5, 0.0, 2.0])
    intercept, weights = fit_nnls(features, features @ truth + 3.0)
    assert intercept == pytest.approx(3.0, rel=1e-6)
    np.testing.assert_allclose(weights, truth, atol=1e-6)


def test_subnet_features_grow_with_size(tiny_nets):
    net = tiny_nets["pixel-ssr"]
    small = subnet_features(net, net.space.smallest(), FRAMES, 1)
    large = subnet_features(net, net.space.largest(), FRAMES, 1)
    assert large["macs_conv"] > small["macs_conv"] > 0
    assert large["macs_attention"] > small["macs_attention"]


@pytest.fixture(scope="module")
def predictor(tiny_nets):
    # Readings of ~5 ms forwards in 3 one-call rounds: a wide spread limit and a short back-off, so the
    # fixture stays fast on a shared machine (the limits' defaults are for the search's forwards).
    timing = TimingProtocol(rounds=3, round_s=0.004, max_spread=1.0, backoff_s=0.05)
    return LatencyPredictor.fit(
        tiny_nets["pixel-base"],
        frames=FRAMES,
        n_fit=12,
        n_holdout=6,
        threads=1,
        rounds=4,
        progress=False,
        timing=timing,
    )


def test_fit_reports_calibration_and_provenance(predictor):
    cal, prov = predictor.calibration, predictor.provenance
    assert cal["n"] == 6 and len(predictor.holdout) == 6
    assert {
        "mape_pct",
        "max_error_pct",
        "spearman",
        "fit_mape_pct",
        "repeat_mape_pct",
        "split_spearman",
    } <= set(cal)
    sizes = (prov["family"], prov["preset"], prov["frames"], prov["batch"])
    assert sizes == ("pixel-base", "tiny", FRAMES, 2)  # default batch: the guidance pair, as measured
    assert prov["n_fit"] == 12 and prov["threads"] == 1 and prov["device_name"]
    assert prov["timing"]["rounds"] == 3 and prov["clock"] == "wall"
    assert 0 < predictor.relative_error() < 10
    assert all(w >= 0 for w in predictor.weights.values()) and predictor.intercept_ms >= 0
    assert "MAPE" in format_report(predictor)


def test_predictor_round_trips_through_json(predictor, tiny_nets, tmp_path):
    net = tiny_nets["pixel-base"]
    cfgs = [net.space.largest(), net.space.smallest(), net.space.sample(7, resolution=16)]
    path = predictor.save(tmp_path / "latency" / "p.json")
    loaded = LatencyPredictor.load(path)
    assert [loaded.predict(net, c) for c in cfgs] == [predictor.predict(net, c) for c in cfgs]
    assert loaded.to_dict() == predictor.to_dict()


def test_predictions_order_largest_above_smallest(predictor, tiny_nets):
    net = tiny_nets["pixel-base"]
    assert predictor.predict(net, net.space.largest()) > predictor.predict(net, net.space.smallest()) > 0


def test_predict_rejects_other_resolution_and_family(predictor, tiny_nets):
    base, ssr = tiny_nets["pixel-base"], tiny_nets["pixel-ssr"]
    with pytest.raises(ValueError, match="calibrated at 16px"):
        predictor.predict(base, base.space.smallest(32))
    with pytest.raises(ValueError, match="fitted for pixel-base"):
        predictor.predict(ssr, ssr.space.smallest())


def test_load_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a latency predictor"):
        LatencyPredictor.load(path)


def test_cli_defaults_are_the_measured_conditions():
    from harness.measurement import MeasureSettings
    from harness.predictor import _parser

    args = _parser().parse_args([])
    assert (args.batch, args.threads, args.frames) == (2, MeasureSettings().threads, None)


def test_fit_refuses_the_process_clock(tiny_nets):
    with pytest.raises(ValueError, match="clock must be 'wall'"):
        LatencyPredictor.fit(tiny_nets["pixel-base"], clock="process", progress=False)


def test_cli_rejects_unknown_resolution(capsys):
    assert main(["--family", "pixel-base", "--preset", "tiny", "--resolution", "24", "--no-progress"]) == 2
    assert "resolution 24" in capsys.readouterr().err


def test_predictor_reports_a_roofline_model_on_its_held_out_readings(predictor, tiny_nets, tmp_path):
    """``--latency modelled:<device>``: the model is scored on the predictor's own held-out readings,
    the same subnets under the same frames and batch; the host's model needs its calibration first."""
    from harness.metrics.latency_predictor import calibration_report
    from harness.predictor import compare_modelled
    from harness.roofline import RooflineModel, get_device
    from harness.roofline.model import denoiser_ops
    from search_spaces import SubnetConfig

    net = tiny_nets["pixel-base"]
    report = compare_modelled(predictor, net, "modelled:a100-sxm4-80gb", None)
    model = RooflineModel(get_device("a100-sxm4-80gb"), "fp32")
    by_hand = [
        model.forward(denoiser_ops(net, SubnetConfig.from_dict(h["subnet"]), FRAMES, 2)).seconds * 1e3
        for h in predictor.holdout
    ]
    expected = calibration_report([h["measured_ms"] for h in predictor.holdout], by_hand)
    assert report["n"] == 6 and report["mape_pct"] == pytest.approx(expected["mape_pct"])
    assert report["device"] == model.label
    predictor.calibration["modelled"] = report
    try:
        text = format_report(predictor)
    finally:
        del predictor.calibration["modelled"]
    assert "roofline Spearman" in text and "compare ranks only" in text
    with pytest.raises(ValueError, match="calibrate"):
        compare_modelled(predictor, net, "modelled:host", tmp_path)


def test_cli_rejects_an_unknown_modelled_device_before_timing(capsys):
    assert main(["--latency", "modelled:nope", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown device 'nope'") and err.count("\n") == 1
