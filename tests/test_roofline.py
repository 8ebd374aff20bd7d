"""The roofline latency model: per-op FLOPs and bytes equal hand counts, the catalogue's figures all have
sources, the model is its formula, fits recover what generated the data, calibration records are
preferred, a generation sums like measured latency, and modelled rows never answer measured queries."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.candidates import Candidate
from harness.metrics._cost_trace import FEATURES, NORM_FLOPS_PER_ELEMENT, forward_features, forward_ops
from harness.roofline import CATALOGUE, DEFAULT_EFFICIENCIES, RooflineModel, compute_unit, get_device
from harness.roofline.fit import (
    calibration_record,
    fit_efficiencies,
    fit_overheads,
    load_model,
    predict_seconds,
    save_calibration,
)
from harness.roofline.metric import ModelledLatency, parse_modelled
from harness.roofline.model import OpArrays, denoiser_ops, modelled_generation
from harness.roofline.paper_table import paper_table

F32 = 4


def _one(module: nn.Module, *inputs: torch.Tensor, dtype=None):
    ops = [op for op in forward_ops(module, inputs, dtype) if op.kind != "view"]
    assert len(ops) == 1, ops
    return ops[0]


# -- per-op FLOPs and bytes against hand counts ------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_linear_and_conv_by_hand(device):
    with torch.device(device):
        linear, conv = nn.Linear(8, 4), nn.Conv2d(2, 3, 3, padding=1)
        x, image = torch.randn(3, 8), torch.randn(1, 2, 5, 5)
    op = _one(linear, x)
    assert (op.kind, op.macs, op.flops) == ("linear", 3 * 4 * 8, 2 * 3 * 4 * 8)
    assert (op.bytes_in, op.bytes_weight, op.bytes_out) == (3 * 8 * F32, (4 * 8 + 4) * F32, 3 * 4 * F32)
    op = _one(conv, image)
    macs = (1 * 3 * 5 * 5) * 2 * 9  # output elements x C_in x kernel
    assert (op.kind, op.macs, op.flops) == ("conv", macs, 2 * macs)
    assert (op.bytes_in, op.bytes_weight, op.bytes_out) == (50 * F32, (3 * 2 * 9 + 3) * F32, 75 * F32)


def test_temporal_and_pointwise_convs_are_their_own_kinds():
    x = torch.randn(1, 4, 3, 2, 2)  # (B, C, T, H, W)
    temporal, pointwise = nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0), bias=False), nn.Conv3d(4, 6, 1)
    op = _one(temporal, x)
    assert (op.kind, op.macs) == ("conv_1d", 4 * 3 * 2 * 2 * 4 * 3)
    assert op.bytes_weight == 4 * 4 * 3 * F32
    op = _one(pointwise, x)
    assert (op.kind, op.macs, op.bytes_out) == ("pointwise", 6 * 12 * 4, 6 * 12 * F32)


def test_attention_norm_and_elementwise_by_hand():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 4)

    class Attend(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    op = _one(Attend(), q, k, v)
    assert (op.kind, op.macs) == ("attention", 2 * 5 * 7 * (8 + 4))
    assert op.bytes_in == (80 + 112 + 56) * F32 and op.bytes_out == 2 * 5 * 4 * F32  # fused: no scores
    x = torch.randn(1, 4, 3, 3)
    op = _one(nn.GroupNorm(2, 4), x)
    assert (op.kind, op.flops) == ("norm", 36 * NORM_FLOPS_PER_ELEMENT)
    assert (op.bytes_in, op.bytes_weight, op.bytes_out) == (36 * F32, 8 * F32, 36 * F32)

    class AddSilu(nn.Module):
        def forward(self, a, b):
            return F.silu(a + b)

    ops = forward_ops(AddSilu(), (x, x))
    assert [(o.name, o.kind, o.flops, o.bytes) for o in ops] == [
        ("add", "elementwise", 36, 3 * 36 * F32),
        ("silu", "elementwise", 36, 2 * 36 * F32),
    ]


def test_views_move_nothing_copies_move_both_ways_and_dtype_sets_the_size():
    class Shuffle(nn.Module):
        def forward(self, x):
            return x.transpose(1, 2).contiguous().reshape(2, -1)

    x = torch.randn(2, 3, 4)
    ops = forward_ops(Shuffle(), (x,))
    assert [(o.name, o.kind, o.bytes) for o in ops] == [
        ("transpose", "view", 0),
        ("contiguous", "copy", 2 * 24 * F32),
        ("reshape", "view", 0),
    ]
    op = _one(nn.Linear(8, 4), torch.randn(3, 8), dtype=torch.bfloat16)
    assert (op.bytes_in, op.bytes_weight, op.bytes_out) == (3 * 8 * 2, 36 * 2, 3 * 4 * 2)

    class Index(nn.Module):  # integer tensors keep their own size under a floating run dtype
        def forward(self, t):
            return t + 1

    assert _one(Index(), torch.arange(6), dtype=torch.bfloat16).bytes == 2 * 6 * 8


def test_buffers_count_as_weights():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("gain", torch.ones(5))

        def forward(self, x):
            return x * self.gain

    op = _one(Scale(), torch.randn(2, 5))
    assert (op.bytes_in, op.bytes_weight, op.bytes_out) == (10 * F32, 5 * F32, 10 * F32)


@pytest.mark.parametrize("family", ["pixel-base", "pixel-ssr", "latent-unet"])
def test_ops_agree_with_the_predictor_features(tiny_nets, family):
    net = tiny_nets[family]
    cfg = net.space.largest()
    static = net.extract(cfg).eval()
    inputs = net.dummy_inputs(cfg, batch_size=2, frames=2)
    ops, features = forward_ops(static, inputs), forward_features(static, inputs)
    for feature, kind in (("macs_linear", "linear"), ("macs_attention", "attention"), ("macs_conv", "conv")):
        assert sum(o.macs for o in ops if o.kind == kind) == features[feature]
    assert len(ops) == features["calls_compute"] + features["calls_view"]
    assert all(o.bytes > 0 for o in ops if o.kind not in ("view",))


def test_paper_scale_trace_is_fast():
    from search_spaces import build_supernet

    with torch.device("meta"):
        net = build_supernet("pixel-base", "paper")
    cfg = net.space.subnet_at_fraction(0.6)
    start = time.perf_counter()
    arrays = denoiser_ops(net, cfg, frames=16, batch=2)
    elapsed = time.perf_counter() - start
    assert arrays.flops.sum() > 1e13  # ~2 x 4.6 T multiply-adds per guided forward
    assert elapsed < 2.0  # 0.2 s on the 2-core development machine; loose for a loaded CI runner


# -- the catalogue -----------------------------------------------------------------------------------
def test_catalogue_entries_all_have_sources():
    assert {"a100-sxm4-80gb", "a100-pcie-40gb", "h100-sxm", "h200", "l4"} <= set(CATALOGUE)
    for spec in CATALOGUE.values():
        figures = spec.figures()
        assert {"peak_fp32_tflops", "peak_tf32_tflops", "peak_bf16_tflops", "bandwidth_gbs"} <= set(figures)
        for name, fig in figures.items():
            assert fig.source.strip(), f"{spec.key}.{name} has no source"
            assert fig.value > 0 or name == "view_us"
        for unit in ("fp32", "tf32", "bf16"):
            assert "datasheet" in spec.peak_tflops[unit].source
    a100 = get_device("A100-SXM4-80GB")
    assert [a100.peak_tflops[u].value for u in ("fp32", "tf32", "bf16")] == [19.5, 156, 312]
    assert a100.bandwidth_gbs.value == 2039
    with pytest.raises(ValueError, match="use one of"):
        get_device("v100")


def test_compute_units_follow_pytorch_defaults():
    assert compute_unit("conv", "fp32") == "tf32"  # cudnn.allow_tf32 defaults to True
    assert compute_unit("linear", "fp32") == "fp32"  # matmul.allow_tf32 defaults to False
    assert compute_unit("linear", "tf32") == "tf32"
    assert compute_unit("attention", "tf32") == "fp32"
    assert compute_unit("attention", "bf16") == compute_unit("linear", "bf16") == "bf16"
    assert compute_unit("norm", "bf16") == "fp32"


# -- the model ---------------------------------------------------------------------------------------
def test_model_is_its_formula():
    ops = forward_ops(nn.Sequential(nn.Linear(512, 512), nn.SiLU()), (torch.randn(1024, 512),))
    arrays = OpArrays.from_ops(ops)
    model = RooflineModel(get_device("a100-sxm4-80gb"), "fp32")
    linear, silu = ops
    eff_c, eff_m = DEFAULT_EFFICIENCIES["linear"]
    expected = max(linear.flops / (19.5e12 * eff_c), linear.bytes / (2039e9 * eff_m))
    expected += silu.bytes / (2039e9 * DEFAULT_EFFICIENCIES["elementwise"][1])
    t = model.forward(arrays)
    assert t.seconds == pytest.approx(expected + 2 * 5e-6)
    assert t.compute_bound_ops == 1 and t.memory_bound_ops == 1
    bf16 = RooflineModel(get_device("a100-sxm4-80gb"), "bf16").forward(arrays)
    assert bf16.seconds < t.seconds
    assert model.label == "A100-SXM4-80GB (roofline v1, uncalibrated, fp32)"


@pytest.fixture(scope="module")
def tiny_arrays(tiny_nets):
    net = tiny_nets["pixel-base"]
    rng = np.random.default_rng(0)
    cfgs = [net.space.smallest(), net.space.largest()] + [net.space.sample(rng) for _ in range(14)]
    return [denoiser_ops(net, c, frames=4, batch=2) for c in cfgs]


def test_fits_recover_the_model_that_made_the_data(tiny_arrays):
    truth = RooflineModel(
        get_device("l4"),
        "fp32",
        {k: (0.3 + 0.05 * i, 0.9 - 0.05 * i) for i, k in enumerate(DEFAULT_EFFICIENCIES)},
        launch_us=12.0,
        view_us=2.0,
    )
    y = predict_seconds(truth, tiny_arrays)
    overheads = fit_overheads(RooflineModel(truth.device, "fp32", truth.efficiencies), tiny_arrays, y)
    assert (overheads.launch_us, overheads.view_us) == pytest.approx((12.0, 2.0), rel=1e-6)
    fitted = fit_efficiencies(RooflineModel(truth.device, "fp32"), tiny_arrays, y, prior=1e-4)
    assert predict_seconds(fitted, tiny_arrays) == pytest.approx(y, rel=0.01)


def test_calibration_is_preferred_and_named(tmp_path: Path, tiny_arrays):
    assert load_model("a100-sxm4-80gb", "bf16", tmp_path).calibration is None
    fitted = fit_overheads(RooflineModel(get_device("a100-sxm4-80gb"), "bf16"), tiny_arrays,
                           np.full(len(tiny_arrays), 0.01))  # fmt: skip
    record = calibration_record(fitted, {"heldout": {"mape_pct": 1.0}}, {"device_name": "test"})
    path = save_calibration(record, tmp_path)
    assert path.name == "roofline-a100-sxm4-80gb-bf16.json"
    loaded = load_model("a100-sxm4-80gb", "bf16", tmp_path)
    assert loaded.label == "A100-SXM4-80GB (roofline v1, calibrated, bf16)"
    assert loaded.launch_us == pytest.approx(fitted.launch_us)
    assert loaded.identity()["calibration"] == json.loads(path.read_text())["sha256"]
    assert load_model("a100-sxm4-80gb", "fp32", tmp_path).calibration is None  # other precision
    with pytest.raises(ValueError, match="calibrate --device cpu"):
        load_model("host", "fp32", tmp_path)


def test_paper_table_rows():
    rows = paper_table("a100-sxm4-80gb", steps=10, precisions=("bf16",))
    by = {r["model"]: r for r in rows}
    assert by["SNED-S"]["step_s"] < by["SNED-M"]["step_s"] < by["SNED-L"]["step_s"] < by["SNED-B"]["step_s"]
    assert by["SNED-B"]["video_s"] == pytest.approx(10 * by["SNED-B"]["step_s"])
    assert by["SNED-B"]["params"] / by["SNED-S"]["params"] == pytest.approx(2.5, rel=0.05)


# -- a generation and the store ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain():
    from harness.measurement.generation import Generation
    from harness.models import load_bundle
    from harness.paths import DEFAULT_BASE, DEFAULT_SSR

    base, ssr = load_bundle(DEFAULT_BASE), load_bundle(DEFAULT_SSR)
    return Generation(base, ssr, steps=3, guidance=3.0)


def test_generation_sums_steps_guidance_pair_and_ssr_stages(chain):
    base, ssr = chain.base.supernet, chain.ssr.supernet
    cand = Candidate(base.space.smallest(), ssr.space.smallest(64))
    model = load_model("h100-sxm", "bf16")
    got = modelled_generation(model, chain, cand)
    assert [s.name for s in got.stages] == ["pixel-base@16", "pixel-ssr@32", "pixel-ssr@64"]
    expected = model.forward(denoiser_ops(base, cand.base, chain.frames, 2, torch.bfloat16)).seconds * 3
    for cfg in cand.ssr_stages(16).values():
        expected += model.forward(denoiser_ops(ssr, cfg, chain.frames, 2, torch.bfloat16)).seconds * 3
    assert got.seconds == pytest.approx(expected)
    assert got.label == model.label


def test_latent_generation_adds_one_decode():
    from harness.measurement.generation import Generation
    from harness.models import load_bundle
    from harness.paths import RESULTS

    g = Generation(load_bundle(RESULTS / "checkpoints" / "latent-unet-tiny"), None, steps=2, guidance=1.0)
    cand = Candidate(g.base.supernet.space.smallest())
    got = modelled_generation(load_model("l4"), g, cand)
    assert [(s.name, s.forwards) for s in got.stages][-1] == ("decode", 1)
    assert got.stages[-1].forward_s > 0


def test_parse_modelled_modes():
    assert parse_modelled("modelled:A100-SXM4-80GB") == ("a100-sxm4-80gb", "fp32")
    assert parse_modelled("modelled:l4:bf16") == ("l4", "bf16")
    assert parse_modelled("modelled:h200", precision="bf16-autocast") == ("h200", "bf16")
    for bad in ("modelled:", "modelled:v100", "modelled:l4:int8", "modelled:l4:bf16:x"):
        with pytest.raises(ValueError):
            parse_modelled(bad)


def test_modelled_rows_never_answer_measured_queries(tmp_path: Path, chain):
    from harness.measurement.cost import Latency
    from harness.measurement.generation import Generation
    from harness.measurement.recorder import Recorder
    from harness.measurement.settings import MeasureSettings
    from harness.store import Store

    generation = Generation(chain.base, None, steps=2, guidance=3.0)
    cand = Candidate(generation.base.supernet.space.smallest())
    store = Store.open(f"sqlite:///{tmp_path}/s.db")
    supernet = store.get_or_create_supernet("a" * 64, "pixel-base", "tiny")
    recorder = Recorder(store, supernet.id, "w", seed=0, claim_timeout_s=60.0)
    cid = store.get_or_create_candidate(supernet.id, cand.key, {"i": 1}, 16, 10).id
    measured = Latency.from_settings(generation, MeasureSettings(steps=2))
    modelled = ModelledLatency.from_mode(generation, "modelled:a100-sxm4-80gb")
    assert modelled.device != measured.device and "roofline" in modelled.device
    assert modelled.protocol(cand) != measured.protocol(cand)

    def query(group):
        return recorder.cached(cid, ["latency_ms"], group.protocol(cand), group.device, group.identity(cand))

    # A measured row (its value given to the recorder: what is tested is the key, not the timing).
    recorder.measure(cid, ["latency_ms"], measured.protocol(cand), measured.device,
                     lambda: ({"latency_ms": 12.0}, {}), identity=measured.identity(cand))  # fmt: skip
    assert query(modelled) is None
    value = recorder.measure_group(cid, modelled, cand)["latency_ms"]
    assert recorder.measured == 2 and value != 12.0
    assert query(measured)["latency_ms"] == 12.0
    assert query(modelled)["latency_ms"] == value
    for other in ("modelled:a100-sxm4-80gb:bf16", "modelled:h100-sxm"):  # another model is another row
        assert query(ModelledLatency.from_mode(generation, other)) is None
    rows = store.measurements_frame()
    assert set(rows.device) == {measured.device, modelled.device}


def test_features_unchanged_by_op_records(tiny_nets):
    """Recording ops must not change the predictor's features (fitted predictors depend on them)."""
    net = tiny_nets["pixel-base"]
    static = net.extract(net.space.largest()).eval()
    inputs = net.dummy_inputs(batch_size=2, frames=2)
    from harness.metrics._cost_trace import CostTrace

    plain, recorded = CostTrace(), CostTrace(record_ops=True)
    with torch.inference_mode(), plain:
        static(**inputs)
    with torch.no_grad(), recorded:
        static(**inputs)
    assert {f: plain.features[f] for f in FEATURES} == {f: recorded.features[f] for f in FEATURES}


def test_validation_analysis_reports_every_model(tiny_nets):
    """The validation's fitting and report on timings made by a known host-like model (plus 2 %
    noise): the calibrated roofline recovers it, and every compared model has its held-out figures."""
    from harness.metrics.latency_predictor import _draw_subnets
    from harness.roofline.catalogue import DeviceSpec, Figure
    from harness.roofline.timed import Timings
    from harness.roofline.validate import analyse, format_report

    net = tiny_nets["pixel-base"]
    cfgs = _draw_subnets(net, 16, 16, np.random.default_rng(1))
    host = DeviceSpec("host", "test CPU", {"fp32": Figure(0.05, "test")}, Figure(10.0, "test"),
                      Figure(10.0, "test"), Figure(3.0, "test"))  # fmt: skip
    truth = RooflineModel(host, "fp32", {k: (0.5, 0.8) for k in DEFAULT_EFFICIENCIES}, 20.0, 4.0)
    y = predict_seconds(truth, [denoiser_ops(net, c, 4, 2) for c in cfgs]) * 1e3
    noise = np.random.default_rng(2).normal(1.0, 0.02, size=(3, len(cfgs)))
    report = analyse(net, cfgs, Timings(y[None, :] * noise), host, n_fit=10, frames=4, batch=2)
    held = report["heldout"]
    assert held["roofline (calibrated)"]["mape_pct"] < 5.0
    assert {"regression predictor", "FLOPs (one scale fitted)"} <= set(held)
    assert held["repeat (noise floor): even vs odd rounds"]["n"] == 6
    assert "| roofline (calibrated) |" in format_report(report, "test")


@pytest.mark.slow
def test_calibrate_on_the_host_as_the_device(tmp_path: Path):
    """The calibration command end to end with the host CPU as the "device" (no GPU here): it times
    subnets, fits, writes the record beside the checkpoint, and ``modelled:host`` then uses it. The
    acceptance limits are loosened: this checks the plumbing, not the machine's quietness."""
    from harness.roofline.__main__ import main
    from harness.roofline.metric import parse_modelled

    main(["calibrate", "--device", "cpu", "--target", "host", "--out-dir", str(tmp_path),
          "--fit", "5", "--holdout", "3", "--rounds", "1", "--frames", "2", "--min-run-time", "0.06",
          "--latency-probe-tolerance", "50", "--latency-other-cpu", "8", "--latency-max-spread", "20",
          "--no-progress"])  # fmt: skip
    record = json.loads((tmp_path / "roofline-host-fp32.json").read_text())
    assert record["precision"] == "fp32" and record["report"]["heldout"]["n"] == 3
    assert record["provenance"]["command"].startswith("python -m harness.roofline calibrate")
    model = load_model(*parse_modelled("modelled:host"), tmp_path)
    assert "calibrated" in model.label and model.launch_us == record["launch_us"]


@pytest.mark.slow
def test_search_with_modelled_latency_end_to_end(tmp_path: Path):
    """``python -m harness.search --latency modelled:a100-sxm4-80gb`` on the tiny preset: every trial
    completes and its latency rows carry the model's device name, none the host's."""
    import os
    import subprocess
    import sys

    import optuna

    from harness.analysis import load_results
    from harness.store import Store, optuna_storage

    url = f"sqlite:///{tmp_path}/e.db"
    args = ["--objective", "latency", "--trials", "3", "--storage", url, "--latency", "modelled:a100-sxm4-80gb",
            "--fvd-videos", "4", "--steps", "2", "--threads", "1", "--no-plot"]  # fmt: skip
    env = {"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "harness.search", *args],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **env},
        text=True,
        capture_output=True,
        timeout=900,
        check=False,
    )
    study = optuna.load_study(
        study_name="pixel-base-tiny-16px-latency+fvd-tpe-seed0", storage=optuna_storage(url)
    )
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3, proc.stderr[-3000:]
    rows = Store.open(url).measurements_frame()
    latency = rows[(rows.metric == "latency_ms") & (rows.status == "ok")]
    assert len(latency) >= 3
    assert set(latency.device) == {"A100-SXM4-80GB (roofline v1, uncalibrated, fp32)"}
    assert all("modelled-roofline-v1" in p for p in latency.protocol)
    fvd = rows[rows.metric == "fvd"]
    assert set(fvd.device).isdisjoint(latency.device)  # quality is the host's, never the model's
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The study's rows pair the model's latency with the host's FVD, one row per told trial; the
    # host's own rows (measured params/FVD alone) stay rows of no study.
    df = load_results(url, study.study_name)
    mine = df[df.study == study.study_name]
    assert sorted(mine.trial_number) == sorted(t.number for t in complete)
    assert set(mine.device) == set(latency.device)
    assert set(mine.quality_device) == set(fvd.device)
    assert mine[["latency_ms", "fvd"]].notna().all().all()
    assert "quality_device" in df and (df.device != df.quality_device).sum() == len(mine)
    assert "Pareto front" in proc.stdout
