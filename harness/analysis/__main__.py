"""``python -m harness.analysis``: analysis commands on a store.

    python -m harness.analysis reproduce --storage URL --study NAME [--neighbours K] [--offset 1]

    python -m harness.analysis trajectories --storage URL --study SINGLE --study SCHEDULES

``trajectories`` compares studies searched with the same budget (single subnets against trajectory
schedules, issue 20) on one reference point: hypervolume with its spread, per kind, and the cheapest
candidate within noise of the largest single subnet's FVD with its latency ratio.

``reproduce`` re-measures the study's noise-aware front and its K nearest neighbours with fresh noise
(seed + offset, latency timed again), records them in the store, and prints stored against new values:
Spearman per objective, the fraction of front points still on the front, and interval coverage.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from harness.analysis.remeasure import remeasure
from harness.analysis.reproduce import MIN_REMEASURED, format_reproduction
from harness.analysis.uncertainty import DEFAULT_Z
from harness.cli import run_cli
from harness.paths import DEFAULT_STORAGE
from harness.store import validate_storage_url


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.analysis", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("reproduce", help="re-measure a study's front with fresh noise and compare")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="store URL (default results/harness.db)")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument(
        "--neighbours",
        type=int,
        default=None,
        help=f"candidates off the front, nearest to it, re-measured too (default: enough for "
        f"{MIN_REMEASURED} in all, at least one per front point)",
    )
    p.add_argument("--offset", type=int, default=1, help="seed offset and latency rerun index (default 1)")
    p.add_argument(
        "--noise-z",
        type=float,
        default=DEFAULT_Z,
        help=f"standard errors a difference must exceed to dominate (default {DEFAULT_Z})",
    )
    t = commands.add_parser("trajectories", help="single subnets against schedules, studies on one reference")
    t.add_argument("--storage", default=DEFAULT_STORAGE, help="store URL (default results/harness.db)")
    t.add_argument("--study", action="append", required=True, help="study name (repeat for several)")
    t.add_argument(
        "--objective", action="append", default=None, help="cost then quality (default latency, fvd)"
    )
    t.add_argument("--device", default=None, help="device of the rows (needed when the store holds several)")
    t.add_argument("--z", type=float, default=1.0, help="SEs within which a candidate matches (default 1)")
    return parser


def _trajectories(args: argparse.Namespace, url: str) -> None:
    from harness import analysis
    from harness.analysis.trajectories import format_study_comparison, study_comparison

    objectives = analysis.resolve_objectives(args.objective or ["latency", "fvd"])
    frames = {}
    for study in args.study:
        df = analysis.select(analysis.load_results(url, study), study=study, device=args.device)
        if df.empty:
            raise ValueError(f"study '{study}' has no full-fidelity results in the store")
        frames[study] = analysis.load_bootstrap(url, df)  # paired SEs under common random numbers
    print(format_study_comparison(study_comparison(frames, objectives, args.z), args.z))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; bad input raises ``ValueError`` (one line, see ``harness.cli.run_cli``)."""
    args = _parser().parse_args(argv)
    url = validate_storage_url(args.storage)
    if args.command == "trajectories":
        return _trajectories(args, url)
    result = remeasure(url, args.study, args.offset, args.neighbours, args.noise_z)
    print(format_reproduction(result))
    if result.meta.get("failed"):
        print(f"{len(result.meta['failed'])} re-measurement(s) failed (recorded as failed in the store)")


if __name__ == "__main__":
    run_cli(main)
