"""Per-device latency predictor for one denoiser forward of a subnet (HAT style: regression on measured
subnets).

Model: ``latency_ms = c0 + sum_k w_k * x_k`` over the cost features ``x`` of ``_cost_trace.FEATURES``
(multiply-adds of spatial / temporal convolutions, linear layers and attention; output elements of norms
and of other ops; number of compute and view calls), read from a ``TorchFunctionMode`` trace of the
subnet's static network on the meta device. The weights are fitted by non-negative least squares
(``scipy.optimize.nnls``) on *relative* residuals ``(pred - y) / y`` - what MAPE measures - so every term
is a non-negative cost (ms per multiply-add, per element, per call): a bigger subnet never predicts faster.
The features are correlated (wider layers raise several at once), so single weights need not be physical
rates; only their sum is calibrated. Unlike an OFA lookup table, it is fitted to whole forwards, so fusion
and per-call overheads are absorbed.

Protocol (``LatencyPredictor.fit``): ``n_fit + n_holdout`` distinct subnets are drawn with
``space.sample(rng, min_ratio=m, min_keep=k)`` where ``m`` and ``k`` are drawn per subnet from the ratio set
and ``[0, 1]``, so the draws span the space from the smallest to the largest subnets (plain uniform
per-layer draws concentrate near the middle of the range); the smallest and the largest valid subnet
join the fit set. Each subnet is extracted and timed in ``rounds`` interleaved rounds (shuffled order, fit
and held-out subnets mixed, so load drift hits both alike), each a clean robust reading of the measured
latency metric (``harness.measurement.timing``: contention-probed, retried); its latency is the median
over rounds. Fitting runs under the measured metric's per-forward conditions (batch 2 = the guidance
pair, threads 2, the preset's frames), recorded in ``provenance`` and checked by the metric
(``check_predictor_conditions``). The held-out subnets never enter the fit;
``calibration_report`` gives MAPE, max error and Spearman rank correlation on them, and, as the noise
floor those figures sit on, the same figures for round 1 against round 0 of the held-out timings
(``repeat_*``: how well one measurement predicts a repeat of itself; ``split_*``: the median of the even
rounds against that of the odd ones, the floor of the aggregate) and the mean spread across rounds.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import nnls
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from harness.metrics._cost_trace import FEATURES, forward_features
from harness.metrics.latency import device_description
from search_spaces import ConfigError, SubnetConfig, Supernet, VideoUNet, make_dummy_inputs

if TYPE_CHECKING:  # harness.measurement imports this module (the predicted Latency metric)
    from harness.measurement.timing import TimingProtocol

FORMAT = "sned-latency-predictor/1"
_CACHE_SIZE = 4096


def subnet_features(
    net: Supernet, cfg: SubnetConfig, frames: int, batch: int, resolution: int | None = None
) -> dict[str, float]:
    """Cost features of one forward of ``cfg``'s static network on inputs ``(batch, C, frames, R, R)``
    (``R = resolution or cfg.resolution``), traced on the meta device (no weights, no arithmetic)."""
    spec = net.spec_for(cfg)
    with torch.device("meta"):
        model = VideoUNet(spec)
    inputs = make_dummy_inputs(spec, resolution or cfg.resolution, frames, batch, seed=0, device="meta")
    return forward_features(model, inputs)


def calibration_report(measured_ms: Sequence[float], predicted_ms: Sequence[float]) -> dict[str, float]:
    """Accuracy of predictions against measurements: ``n``, ``mape_pct`` (mean |pred - y| / y, in %),
    ``max_error_pct``, ``median_error_pct`` and ``spearman`` (``scipy.stats.spearmanr`` rank correlation)."""
    y = np.asarray(measured_ms, dtype=np.float64)
    p = np.asarray(predicted_ms, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1 or len(y) < 3:
        raise ValueError(
            f"need two equal-length 1-D sequences of >= 3 latencies, got {y.shape} and {p.shape}"
        )
    if np.any(y <= 0):
        raise ValueError("measured latencies must be positive")
    err = np.abs(p - y) / y * 100
    return {
        "n": len(y),
        "mape_pct": float(err.mean()),
        "max_error_pct": float(err.max()),
        "median_error_pct": float(np.median(err)),
        "spearman": float(spearmanr(p, y).statistic),
    }


def fit_nnls(features: np.ndarray, latency_ms: np.ndarray) -> tuple[float, np.ndarray]:
    """Non-negative least squares on relative residuals: minimise ``||(X w + c0) / y - 1||``.

    ``features (n, k)``, ``latency_ms (n,)``; returns ``(c0, w (k,))``. Columns are scaled by their
    maximum for conditioning; the weights are returned in original units (ms per unit of feature).
    """
    design = np.hstack([features, np.ones((len(features), 1))])
    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0
    solution, _ = nnls(design / scale / latency_ms[:, None], np.ones(len(latency_ms)))
    weights = solution / scale
    return float(weights[-1]), weights[:-1]


def _draw_subnets(net: Supernet, resolution: int, count: int, rng: np.random.Generator) -> list[SubnetConfig]:
    """``count`` distinct subnets spanning the size range (see module docstring), extremes first."""
    space = net.space
    anchors = [cfg for cfg in (space.smallest(resolution), space.largest(resolution)) if space.fits(cfg)]
    out, seen = [], set()
    for cfg in anchors:
        out.append(cfg)
        seen.add(cfg.key)
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 50 * count:
            raise ConfigError(f"could not draw {count} distinct subnets at {resolution}px")
        min_ratio = float(rng.choice(space.ratios))
        try:
            cfg = space.sample(rng, min_ratio=min_ratio, min_keep=float(rng.random()), resolution=resolution)
        except ConfigError:
            continue  # that corner of the space cannot meet this resolution's size cap
        if cfg.key not in seen:
            out.append(cfg)
            seen.add(cfg.key)
    return out


def _measure_all(
    net: Supernet,
    cfgs: list[SubnetConfig],
    frames: int,
    batch: int,
    device: torch.device,
    threads: int,
    timing: TimingProtocol,
    rounds: int,
    rng: np.random.Generator,
    progress: bool,
) -> np.ndarray:
    """Latency ``(rounds, len(cfgs))`` in ms: per round, every subnet once in a shuffled order, each a
    clean robust reading (``harness.measurement.timing``, the measured metric's reading, with its
    contention probe on the smallest subnet). A reading the machine was too busy for is requeued at the
    end of its round; more than ``len(cfgs)`` requeues in a round raise ``MachineBusy``."""
    from harness.measurement.timing import MachineBusy, probe_for, robust_reading

    def make_reference():
        ref = net.extract(net.space.smallest(cfgs[0].resolution)).to(device).eval()
        ref_inputs = make_dummy_inputs(ref.spec, cfgs[0].resolution, frames, batch, seed=0, device=device)
        return lambda: ref(**ref_inputs)

    key = (net.family, net.preset, cfgs[0].resolution, batch, frames, str(device), threads)
    probe = probe_for(key, make_reference, device)
    times = np.zeros((rounds, len(cfgs)))
    with tqdm(total=rounds * len(cfgs), desc="latency", unit="subnet", disable=not progress) as bar:
        for r in range(rounds):
            queue, requeued = list(rng.permutation(len(cfgs))), 0
            while queue:
                i = queue.pop(0)
                static = net.extract(cfgs[i]).to(device).eval()
                inputs = make_dummy_inputs(
                    static.spec, cfgs[i].resolution, frames, batch, seed=0, device=device
                )
                try:
                    fn = lambda static=static, inputs=inputs: static(**inputs)
                    reading = robust_reading(fn, probe, timing, threads, device)
                except MachineBusy:
                    requeued += 1
                    if requeued > len(cfgs):
                        raise
                    queue.append(i)
                    continue
                times[r, i] = reading.value_ms
                bar.update(1)
    return times


def check_predictor_conditions(predictor: LatencyPredictor, conditions: dict[str, Any]) -> None:
    """Refuse a predictor fitted under other per-forward conditions (batch, threads, frames, device,
    dtype) than the latency it stands in for; one line naming the difference and the refit command."""
    prov = predictor.provenance
    differ = {k: (prov.get(k), v) for k, v in conditions.items() if prov.get(k) != v}
    if differ:
        fitted = ", ".join(f"{k} {a}" for k, (a, _) in differ.items())
        wanted = ", ".join(f"{k} {b}" for k, (_, b) in differ.items())
        flags = " ".join(f"--{k} {b}" for k, (_, b) in differ.items() if k in ("batch", "threads", "frames"))
        raise ValueError(
            f"latency predictor for {prov.get('family')} at {prov.get('resolution')}px was fitted at "
            f"{fitted}, but latency is measured at {wanted}: refit it with python -m harness.predictor "
            f"--resolution {prov.get('resolution')} {flags}".rstrip()
        )


class LatencyPredictor:
    """Linear cost model of one denoiser forward on one device (see module docstring).

    ``provenance`` records where and how it was fitted (device, threads, torch version, family, preset,
    resolution, frames, batch, counts, protocol); ``calibration`` the held-out report; ``holdout`` the
    held-out subnets' measured and predicted latencies.
    """

    def __init__(
        self,
        intercept_ms: float,
        weights: dict[str, float],
        provenance: dict[str, Any],
        calibration: dict[str, float] | None = None,
        holdout: list[dict[str, Any]] | None = None,
    ):
        missing = set(FEATURES) - set(weights)
        if missing:
            raise ValueError(f"predictor weights lack feature(s) {sorted(missing)}")
        self.intercept_ms = float(intercept_ms)
        self.weights = {name: float(weights[name]) for name in FEATURES}
        self.provenance = dict(provenance)
        self.calibration = dict(calibration or {})
        self.holdout = list(holdout or [])
        self._cache: dict[str, float] = {}  # cfg.key -> ms (a feature trace costs ~0.1-0.3 s on a small CPU)

    # -- prediction ----------------------------------------------------------------------------------
    def predict_features(self, features: dict[str, float]) -> float:
        """Latency (ms) from cost features."""
        return self.intercept_ms + sum(w * features[name] for name, w in self.weights.items())

    def predict(self, net: Supernet, cfg: SubnetConfig) -> float:
        """Predicted latency (ms) of one forward of ``cfg`` at the fitted frames / batch / resolution."""
        prov = self.provenance
        if (net.family, net.preset) != (prov["family"], prov["preset"]):
            raise ValueError(
                f"predictor was fitted for {prov['family']}/{prov['preset']}, not {net.family}/{net.preset}"
            )
        if cfg.resolution != prov["resolution"]:
            raise ValueError(
                f"predictor was calibrated at {prov['resolution']}px; config is at "
                f"{cfg.resolution}px (fit one predictor per resolution)"
            )
        if cfg.key not in self._cache:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            features = subnet_features(net, net.space.validate(cfg), prov["frames"], prov["batch"])
            self._cache[cfg.key] = self.predict_features(features)
        return self._cache[cfg.key]

    def relative_error(self) -> float:
        """Relative standard error of a prediction as an estimate of a measurement: the root mean square
        relative error on the held-out subnets (the calibration's MAPE for a file without them)."""
        rel = [(h["predicted_ms"] - h["measured_ms"]) / h["measured_ms"] for h in self.holdout]
        if rel:
            return float(np.sqrt(np.mean(np.square(rel))))
        return float(self.calibration.get("mape_pct", 0.0)) / 100

    # -- fitting -------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        net: Supernet,
        resolution: int | None = None,
        frames: int | None = None,
        batch: int = 2,
        n_fit: int = 80,
        n_holdout: int = 30,
        threads: int = 2,
        seed: int = 0,
        min_run_time: float = 0.3,
        rounds: int = 5,
        clock: str = "wall",
        device: str | torch.device = "cpu",
        progress: bool = True,
        timing: TimingProtocol | None = None,
    ) -> LatencyPredictor:
        """Measure ``n_fit + n_holdout`` subnets, fit on the first ``n_fit``, report on the rest.

        Defaults are the measured metric's per-forward conditions (``harness.measurement.cost.Latency``
        under ``MeasureSettings``' defaults): ``batch`` 2 (the classifier-free-guidance pair), ``threads``
        2, ``frames`` the supernet's; the provenance records them and ``Latency`` refuses a predictor
        fitted under others. ``resolution`` / ``frames``: ``None`` = the supernet's default resolution /
        training frames. Every (round, subnet) timing is a clean robust reading
        (``harness.measurement.timing``) of ``timing`` (default: 3 rounds of ``min_run_time / 3`` s,
        ``MeasureSettings``' acceptance limits); ``rounds`` such readings per subnet, interleaved over the
        subnets in shuffled orders, give its latency as their median. ``clock`` must be ``"wall"``:
        measured latency is wall-clock time. Weights do not change latency, so an untrained supernet is as
        good as a trained one.
        """
        resolution = resolution or net.space.default_resolution
        frames = frames or net.hyper.frames
        if threads < 1 or n_fit < len(FEATURES) + 1 or n_holdout < 3 or rounds < 1 or batch < 1:
            raise ValueError(
                f"need threads >= 1, n_fit >= {len(FEATURES) + 1}, n_holdout >= 3, rounds >= 1, batch >= 1"
            )
        if clock != "wall":
            raise ValueError(f"clock must be 'wall' (measured latency is wall-clock time), got {clock!r}")
        if timing is None:
            from harness.measurement.settings import MeasureSettings

            timing = dataclasses.replace(MeasureSettings().timing, rounds=3, round_s=min_run_time / 3)
        rng = np.random.default_rng(seed)
        cfgs = _draw_subnets(net, resolution, n_fit + n_holdout, rng)
        device = torch.device(device)
        times = _measure_all(net, cfgs, frames, batch, device, threads, timing, rounds, rng, progress)
        latency = np.median(times, axis=0)
        traced = [subnet_features(net, c, frames, batch) for c in cfgs]
        features = np.array([[f[name] for name in FEATURES] for f in traced])  # (n_fit + n_holdout, k)
        intercept, weights = fit_nnls(features[:n_fit], latency[:n_fit])
        provenance = {
            "device": str(device),
            "device_name": device_description(device),
            "threads": threads,
            "torch_version": torch.__version__,
            "dtype": str(net.conv_in.weight.dtype).removeprefix("torch."),
            "family": net.family,
            "preset": net.preset,
            "resolution": resolution,
            "frames": frames,
            "batch": batch,
            "n_fit": n_fit,
            "n_holdout": n_holdout,
            "seed": seed,
            "rounds": rounds,
            "min_run_time_s": timing.rounds * timing.round_s,
            "clock": clock,
            "timing": dataclasses.asdict(timing),
            "latency_statistic": f"median over rounds of a robust reading ({timing.name})",
            "model": "nnls on relative residuals: intercept + weights . features",
        }
        predictor = cls(intercept, dict(zip(FEATURES, weights.tolist())), provenance)
        predictor._calibrate(cfgs, features, times, n_fit)
        return predictor

    def _calibrate(
        self, cfgs: list[SubnetConfig], features: np.ndarray, times: np.ndarray, n_fit: int
    ) -> None:
        """Fill ``calibration`` and ``holdout`` from features ``(n, k)`` and timings ``(rounds, n)``; the
        first ``n_fit`` subnets were fitted on, the rest are held out."""
        weights = np.array([self.weights[name] for name in FEATURES])
        predicted = features @ weights + self.intercept_ms
        latency = np.median(times, axis=0)
        held = times[:, n_fit:]
        self.calibration = {
            **calibration_report(latency[n_fit:], predicted[n_fit:]),
            "fit_mape_pct": calibration_report(latency[:n_fit], predicted[:n_fit])["mape_pct"],
            # Noise floor: mean (max - min) / min over rounds of the held-out timings, in %.
            "measurement_spread_pct": float(((held.max(0) - held.min(0)) / held.min(0)).mean() * 100),
        }
        if len(times) >= 2:  # round 1 "predicted" by round 0: what a repeat measurement agrees to
            repeat = calibration_report(held[1], held[0])
            self.calibration.update(repeat_mape_pct=repeat["mape_pct"], repeat_spearman=repeat["spearman"])
        if len(times) >= 4:  # the same for the aggregate: median of the even rounds vs median of the odd ones
            split = calibration_report(np.median(held[1::2], axis=0), np.median(held[0::2], axis=0))
            self.calibration.update(split_mape_pct=split["mape_pct"], split_spearman=split["spearman"])
        self.holdout = [
            {"subnet": c.to_dict(), "measured_ms": float(y), "predicted_ms": float(p)}
            for c, y, p in zip(cfgs[n_fit:], latency[n_fit:], predicted[n_fit:])
        ]

    # -- persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "features": list(FEATURES),
            "intercept_ms": self.intercept_ms,
            "weights": self.weights,
            "provenance": self.provenance,
            "calibration": self.calibration,
            "holdout": self.holdout,
        }

    def save(self, path: str | Path) -> Path:
        """Write the predictor as JSON (parent directories created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyPredictor:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{path} is not a latency predictor (expected "format": "{FORMAT}")')
        if list(data["features"]) != list(FEATURES):
            raise ValueError(
                f"{path} uses features {data['features']}, this version computes {list(FEATURES)}"
            )
        return cls(
            data["intercept_ms"],
            data["weights"],
            data["provenance"],
            data.get("calibration"),
            data.get("holdout"),
        )

    def __repr__(self) -> str:
        p, c = self.provenance, self.calibration
        cal = f", MAPE {c['mape_pct']:.1f}%, Spearman {c['spearman']:.3f}" if c else ""
        return (
            f"LatencyPredictor({p.get('family')}/{p.get('preset')} {p.get('resolution')}px "
            f"x{p.get('frames')} b{p.get('batch')} on {p.get('device_name')}, "
            f"{p.get('threads')} threads{cal})"
        )
