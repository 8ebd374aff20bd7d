"""``python -m harness.plot``: the figures of ``harness.figures`` from a store (PNG files; prints each path).

    python -m harness.plot --storage URL --study NAME [--study NAME2 ...] \\
        [--objective latency --objective fvd] [--device D] [--extractor E] [--out results/plots]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from harness import analysis
from harness.cli import run_cli
from harness.figures import (  # noqa: F401  (the figure functions' old home: notebooks import them from here)
    DEFAULT_OBJECTIVES,
    plot_front,
    plot_hypervolume,
    plot_latency_vs_flops,
    plot_training_logs,
    write_plots,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.plot", description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="store URL (sqlite:///path.db, postgresql://...)")
    parser.add_argument(
        "--training-log",
        action="append",
        help="instead of a store: a training run's log.jsonl (repeatable) -> loss curve PNG",
    )
    parser.add_argument("--study", action="append", help="study name (repeat for several; default: all)")
    objectives = ", ".join([*analysis.MINIMIZE, *analysis.ALIASES])
    parser.add_argument("--objective", action="append", help=f"two of {objectives} (default: latency, fvd)")
    parser.add_argument("--device", help="device of the measurements (needed when the store holds several)")
    parser.add_argument("--extractor", help="FVD feature extractor (needed when the store holds several)")
    parser.add_argument("--out", default="results/plots", help="output directory (default: results/plots)")
    parser.add_argument(
        "--noise-z",
        type=float,
        default=analysis.DEFAULT_Z,
        help="standard errors a difference must exceed to dominate on the front, and the error bars' "
        f"half-length (default {analysis.DEFAULT_Z})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m harness.plot``; bad input raises ``ValueError`` (one line, see run_cli)."""
    args = _parser().parse_args(argv)
    if args.training_log:
        print(plot_training_logs(args.training_log, Path(args.out) / "training_loss.png"))
        return
    if not args.storage:
        raise ValueError("pass --storage URL (or --training-log FILE for a loss curve)")
    objectives = analysis.resolve_objectives(args.objective or DEFAULT_OBJECTIVES)
    if len(objectives) != 2:
        raise ValueError(f"give exactly two --objective options, got {len(objectives)}")
    results = analysis.load_results(args.storage, args.study)
    results = analysis.select(results, device=args.device, extractor=args.extractor)
    results = analysis.load_bootstrap(args.storage, results)  # paired SEs where replicates are shared
    for path in write_plots(results, objectives, args.out, args.noise_z):
        print(path)


if __name__ == "__main__":
    run_cli(main)
