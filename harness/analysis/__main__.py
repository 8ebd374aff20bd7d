"""``python -m harness.analysis``: analysis commands on a store.

    python -m harness.analysis reproduce --storage URL --study NAME [--neighbours K] [--offset 1]

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
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; bad input raises ``ValueError`` (one line, see ``harness.cli.run_cli``)."""
    args = _parser().parse_args(argv)
    url = validate_storage_url(args.storage)
    result = remeasure(url, args.study, args.offset, args.neighbours, args.noise_z)
    print(format_reproduction(result))
    if result.meta.get("failed"):
        print(f"{len(result.meta['failed'])} re-measurement(s) failed (recorded as failed in the store)")


if __name__ == "__main__":
    run_cli(main)
