"""``python -m harness.roofline``: the device catalogue, the paper-scale table, host validation, calibration.

python -m harness.roofline catalogue
python -m harness.roofline table --device a100-sxm4-80gb --steps 50 --out results/roofline/paper-table.md
python -m harness.roofline validate --fit 20 --holdout 30 --rounds 5 --out results/roofline/host-validation.json
python -m harness.roofline calibrate --device cpu --target host --checkpoint DIR
python -m harness.roofline calibrate --device cuda --target a100-sxm4-80gb --precision bf16 --checkpoint DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from harness.cli import run_cli
from harness.roofline.catalogue import CATALOGUE, PRECISIONS, get_device


def _command(argv: list[str] | None) -> str:
    return "python -m harness.roofline " + shlex.join(sys.argv[1:] if argv is None else argv)


def _timing_arguments(p: argparse.ArgumentParser) -> None:
    from harness.measurement.timing import TimingProtocol as T

    p.add_argument("--latency-max-spread", type=float, default=T.max_spread, help="as harness.search")
    p.add_argument(
        "--latency-probe-tolerance", type=float, default=T.probe_tolerance, help="as harness.search"
    )
    p.add_argument("--latency-other-cpu", type=float, default=T.other_cpu, help="as harness.search")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds timed per reading (3 rounds)")


def _timing(args: argparse.Namespace):
    from harness.measurement.settings import MeasureSettings

    return dataclasses.replace(
        MeasureSettings().timing,
        rounds=3,
        round_s=args.min_run_time / 3,
        max_spread=args.latency_max_spread,
        probe_tolerance=args.latency_probe_tolerance,
        other_cpu=args.latency_other_cpu,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.roofline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("catalogue", help="the devices' figures and their sources")

    t = sub.add_parser("table", help="modelled latency of SNED-S/M/L/B at paper scale")
    t.add_argument("--device", default="a100-sxm4-80gb", help=f"one of {', '.join(CATALOGUE)}")
    t.add_argument("--family", default="pixel-base")
    t.add_argument("--preset", default="paper")
    t.add_argument("--steps", type=int, default=50, help="denoiser steps per video")
    t.add_argument("--frames", type=int, default=None, help="frames (default: the preset's)")
    t.add_argument("--no-guidance", action="store_true", help="one forward per step instead of the pair")
    t.add_argument("--out", type=Path, default=None, help="Markdown file (a .json beside it)")

    for name, helptext in (
        ("validate", "host model vs measured host latency"),
        ("calibrate", "fit a device"),
    ):
        v = sub.add_parser(name, help=helptext)
        v.add_argument("--family", default="pixel-base")
        v.add_argument("--preset", default="tiny")
        v.add_argument("--fit", type=int, default=20, help="subnets fitted on")
        v.add_argument("--holdout", type=int, default=30, help="held-out subnets reported on")
        v.add_argument("--rounds", type=int, default=5, help="interleaved readings per subnet")
        v.add_argument("--threads", type=int, default=2)
        v.add_argument("--batch", type=int, default=2, help="batch per forward (2: the guidance pair)")
        v.add_argument("--frames", type=int, default=None)
        v.add_argument("--seed", type=int, default=0)
        v.add_argument("--no-progress", action="store_true")
        _timing_arguments(v)
    v.add_argument("--device", default="cpu", help="where to time: cpu or cuda[:N]")
    v.add_argument(
        "--target", default="host", help=f"what is calibrated: host, or one of {', '.join(CATALOGUE)}"
    )
    v.add_argument("--precision", choices=PRECISIONS, default="fp32")
    v.add_argument("--checkpoint", type=Path, default=None, help="supernet directory (the record goes there)")
    v.add_argument("--out-dir", type=Path, default=None, help="where the record goes without --checkpoint")
    sub.choices["validate"].add_argument(
        "--out",
        type=Path,
        default=Path("results/roofline/host-validation.json"),
        help="report JSON (.md beside)",
    )
    return p


def _catalogue() -> None:
    for spec in CATALOGUE.values():
        print(f"{spec.key}: {spec.name}")
        for name, fig in spec.figures().items():
            print(f"  {name:<18} {fig.value:>8g}  {fig.source}")


def _table(args: argparse.Namespace, command: str) -> None:
    from harness.roofline.paper_table import format_table, paper_table

    get_device(args.device)
    rows = paper_table(args.device, args.family, args.preset, args.steps, args.frames, not args.no_guidance)
    text = format_table(rows, command)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        print(f"wrote {args.out}")


def _validate(args: argparse.Namespace, command: str) -> None:
    from harness.roofline.validate import format_report, validate, write_report
    from search_spaces import build_supernet

    net = build_supernet(args.family, args.preset)  # weights do not change latency
    report = validate(
        net, args.fit, args.holdout, args.rounds, args.threads, args.batch, args.frames, args.seed,
        progress=not args.no_progress, timing=_timing(args),
    )  # fmt: skip
    out, md = write_report(report, args.out, command)
    print(format_report(report, command))
    print(f"wrote {out} and {md}")


def _calibrate(args: argparse.Namespace, command: str) -> None:
    from harness.roofline.calibrate import calibrate

    if args.checkpoint is None and args.out_dir is None:
        raise ValueError("calibrate needs --checkpoint DIR (the record goes beside it) or --out-dir DIR")
    record, path = calibrate(args, _timing(args), command)
    r = record["report"]
    print(
        f"calibrated {record['device']['name']} at {record['precision']}: held-out MAPE "
        f"{r['heldout']['mape_pct']:.1f} %, Spearman {r['heldout']['spearman']:.3f} "
        f"(uncalibrated {r['uncalibrated_heldout']['mape_pct']:.1f} %, {r['uncalibrated_heldout']['spearman']:.3f})"
    )
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    command = _command(argv)
    {
        "catalogue": lambda: _catalogue(),
        "table": lambda: _table(args, command),
        "validate": lambda: _validate(args, command),
        "calibrate": lambda: _calibrate(args, command),
    }[args.command]()


if __name__ == "__main__":
    run_cli(main)
