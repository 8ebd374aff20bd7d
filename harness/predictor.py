"""Fit and calibrate a latency predictor for one supernet family on this machine.

    python -m harness.predictor --family pixel-base --preset tiny --resolution 16 \\
        --out results/latency/pixel-base-tiny-16.json [--checkpoint DIR] [--batch 2] [--threads 2] \\
        [--fit 80] [--holdout 30] [--latency modelled:host]

Times ``--fit + --holdout`` random subnets (see ``harness.metrics.latency_predictor``), fits on the first
group, prints the calibration on the held-out group (MAPE, max error, Spearman) and writes the predictor
JSON; ``--latency modelled:<device>`` also scores that roofline model (``harness.roofline``) on the same
held-out readings, beside the predictor's figures. The defaults are the measured latency's per-forward conditions (``python -m harness.search``'s
defaults: batch 2 = the classifier-free-guidance pair, 2 threads, the preset's frames); the JSON records
them and a search with ``--latency predicted`` refuses a predictor fitted under others. ``--checkpoint`` is a ``Supernet.save_pretrained`` directory; without it an untrained supernet is
built (weights do not change latency). Without ``--out`` the JSON goes next to the checkpoint
(``latency-<R>px.json``) or to ``results/latency/<family>-<preset>-<R>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.device_policy import add_device_arguments, policy_from_args
from harness.measurement.settings import MeasureSettings
from harness.measurement.timing import MachineBusy
from harness.metrics.latency_predictor import LatencyPredictor
from search_spaces import SubnetConfig, Supernet, build_supernet, load_supernet


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.predictor", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--family", default=None, help="supernet family (default: the checkpoint's, else pixel-base)"
    )
    p.add_argument("--preset", default=None, help="family preset (default: the checkpoint's, else tiny)")
    p.add_argument("--checkpoint", type=Path, default=None, help="Supernet.save_pretrained directory")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the family's first)")
    p.add_argument("--frames", type=int, default=None, help="frames per video (default: the preset's)")
    p.add_argument(
        "--batch", type=int, default=2, help="batch per forward (2: the guidance pair the search times)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=MeasureSettings().threads,
        help="intra-op threads (the search's --threads default)",
    )
    p.add_argument("--fit", type=int, default=80, help="subnets measured for fitting")
    p.add_argument("--holdout", type=int, default=30, help="held-out subnets for the calibration report")
    p.add_argument("--rounds", type=int, default=5, help="interleaved readings per subnet")
    p.add_argument(
        "--min-run-time", type=float, default=0.3, help="seconds timed per reading (3 timed rounds)"
    )
    p.add_argument(
        "--clock", choices=("wall",), default="wall", help="wall-clock latency (what the search measures)"
    )
    p.add_argument(
        "--latency",
        default="measured",
        help="measured (fit only), or modelled:<device>[:<precision>]: also report that roofline model "
        "(harness.roofline; a calibration beside --checkpoint is preferred) on the same held-out readings",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="predictor JSON path")
    p.add_argument("--no-progress", action="store_true")
    # --compile / --cuda-graphs are not offered: the fit times many fresh subnets, one compile each
    add_device_arguments(p, latency=False, text=False)
    return p


def _load_net(args: argparse.Namespace) -> Supernet:
    if args.checkpoint is None:
        return build_supernet(args.family or "pixel-base", args.preset or "tiny")
    net = load_supernet(args.checkpoint)
    for name, wanted, got in (("family", args.family, net.family), ("preset", args.preset, net.preset)):
        if wanted is not None and wanted != got:
            raise ValueError(f"--{name} {wanted} does not match the checkpoint's {name} {got}")
    return net


def _out_path(args: argparse.Namespace, net: Supernet, resolution: int) -> Path:
    if args.out is not None:
        return args.out
    if args.checkpoint is not None:
        return args.checkpoint / f"latency-{resolution}px.json"
    return Path("results/latency") / f"{net.family}-{net.preset}-{resolution}.json"


def compare_modelled(predictor: LatencyPredictor, net: Supernet, mode: str, checkpoint: Path | None) -> dict:
    """The roofline model of ``mode`` scored on the predictor's held-out readings, under the same
    resolution, frames and batch per forward (``calibration_report``'s figures and the model's label)."""
    from harness.metrics.latency_predictor import calibration_report
    from harness.roofline.fit import load_model
    from harness.roofline.metric import parse_modelled
    from harness.roofline.model import denoiser_ops

    model = load_model(*parse_modelled(mode, predictor.provenance.get("dtype")), checkpoint)
    frames, batch = predictor.provenance["frames"], predictor.provenance["batch"]
    cfgs = [net.space.validate(SubnetConfig.from_dict(h["subnet"])) for h in predictor.holdout]
    modelled = [model.forward(denoiser_ops(net, c, frames, batch, model.dtype)).seconds * 1e3 for c in cfgs]
    measured = [h["measured_ms"] for h in predictor.holdout]
    return {"device": model.label, "mode": mode, **calibration_report(measured, modelled)}


def format_report(predictor: LatencyPredictor) -> str:
    """The calibration as a short two-column table."""
    p, c = predictor.provenance, predictor.calibration
    rows = [
        ("held-out subnets", f"{c['n']}"),
        ("MAPE", f"{c['mape_pct']:.1f} %"),
        ("max error", f"{c['max_error_pct']:.1f} %"),
        ("median error", f"{c['median_error_pct']:.1f} %"),
        ("Spearman", f"{c['spearman']:.3f}"),
        (f"fit MAPE ({p['n_fit']} subnets)", f"{c['fit_mape_pct']:.1f} %"),
        ("timing spread across rounds", f"{c['measurement_spread_pct']:.1f} %"),
    ]
    if "repeat_mape_pct" in c:
        rows += [
            ("repeat timing MAPE (noise)", f"{c['repeat_mape_pct']:.1f} %"),
            ("repeat timing Spearman", f"{c['repeat_spearman']:.3f}"),
        ]
    if "split_mape_pct" in c:
        rows += [
            ("even/odd-round medians MAPE", f"{c['split_mape_pct']:.1f} %"),
            ("even/odd-round medians Spearman", f"{c['split_spearman']:.3f}"),
        ]
    measured = [h["measured_ms"] for h in predictor.holdout]
    rows.append(("held-out latency range", f"{min(measured):.1f} - {max(measured):.1f} ms"))
    if "modelled" in c:  # the roofline model on the same readings (--latency modelled:...)
        m = c["modelled"]
        rows += [
            (f"roofline MAPE ({m['device']})", f"{m['mape_pct']:.1f} %"),
            ("roofline Spearman", f"{m['spearman']:.3f}"),
        ]
        if not m["mode"].startswith("modelled:host"):  # another device's milliseconds: ranks compare
            rows.append(("roofline note", "a modelled device other than this host: compare ranks only"))
    head = (
        f"latency predictor {p['family']}/{p['preset']}: {p['resolution']}px x {p['frames']} frames, "
        f"batch {p['batch']}\n{p['device_name']}, {p['threads']} thread(s), "
        f"{p.get('clock', 'wall')} clock, torch {p['torch_version']}"
    )
    width = max(len(k) for k, _ in rows)
    return head + "\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.latency != "measured":
            from harness.roofline.metric import parse_modelled

            parse_modelled(args.latency)  # a bad mode is one line before minutes of timing
        policy = policy_from_args(args)  # before anything is built: a missing GPU is one line
        policy.apply()
        net = _load_net(args).to(policy.torch_device)
        resolution = args.resolution or net.space.default_resolution
        if resolution not in net.space.resolutions:
            raise ValueError(f"resolution {resolution} is not one of {list(net.space.resolutions)}")
        with policy.autocast():  # every timed forward runs in this thread under the precision
            predictor = LatencyPredictor.fit(
                net,
                resolution=resolution,
                frames=args.frames,
                batch=args.batch,
                n_fit=args.fit,
                n_holdout=args.holdout,
                threads=args.threads,
                seed=args.seed,
                min_run_time=args.min_run_time,
                rounds=args.rounds,
                clock=args.clock,
                device=args.device,
                progress=not args.no_progress,
            )
        if policy.precision != "fp32":  # what the search's Latency.conditions() compares against
            predictor.provenance["dtype"] = policy.precision
        predictor.provenance["policy"] = policy.provenance()
        if args.latency != "measured":
            predictor.calibration["modelled"] = compare_modelled(
                predictor, net, args.latency, args.checkpoint
            )
    except (ValueError, FileNotFoundError, MachineBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = predictor.save(_out_path(args, net, resolution))
    print(format_report(predictor))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
