"""Measurement settings and the one argument group that ``search`` and ``evaluate`` share.

The two commands build their settings here, with the same defaults, so they name the same protocols and
share cached measurements.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

LATENCY_MODES = ("measured", "predicted")


@dataclass(frozen=True)
class MeasureSettings:
    steps: int = 8  # DDIM steps per stage
    guidance: float = 3.0  # classifier-free guidance (each step = 2 forwards)
    fvd_videos: int = 32  # fake videos per FVD run
    real_videos: int = 256  # real heldout videos for the reference statistics
    fvd_repeats: int = 1  # FVD runs averaged (the paper: 10)
    fvd_weights: str | None = None  # I3D weights file; None = the offline proxy extractor
    fvd_data: str = "synthetic"  # real videos: the built-in synthetic set or a dataset folder
    fvd_split: str = "heldout"  # their split
    checks: tuple[str, ...] = ()  # dataset-provided checks computed from the FVD videos (harness.data)
    latency: str = "measured"  # "measured" (extracted static subnet) or "predicted" (regression)
    threads: int = 2
    device: str = "cpu"
    seed: int = 0
    min_run_time: float = 0.25  # seconds per latency measurement
    claim_timeout_s: float = 1800.0  # a claim older than this is taken over (its worker is presumed dead)

    def __post_init__(self) -> None:
        for name, value, least in (
            ("--steps", self.steps, 1),
            ("--threads", self.threads, 1),
            ("--fvd-videos", self.fvd_videos, 2),
            ("--real-videos", self.real_videos, 2),
            ("--fvd-repeats", self.fvd_repeats, 1),
        ):
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        if self.latency not in LATENCY_MODES:
            raise ValueError(f"unknown latency mode {self.latency!r}; use one of {', '.join(LATENCY_MODES)}")


def add_measure_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The measurement options (devices, protocols), with :class:`MeasureSettings`' defaults."""
    d = MeasureSettings()
    g = parser.add_argument_group("measurement")
    g.add_argument("--device", default=d.device, help="device for sampling and latency (cpu, cuda)")
    g.add_argument("--threads", type=int, default=d.threads, help="CPU threads for torch and latency timing")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of FVD sampling (and of the searcher)")
    g.add_argument(
        "--latency",
        choices=LATENCY_MODES,
        default=d.latency,
        help="latency of the extracted static subnet, or the predictor's estimate",
    )
    g.add_argument("--steps", type=int, default=d.steps, help="DDIM steps per stage when generating")
    g.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale")
    g.add_argument("--fvd-videos", type=int, default=d.fvd_videos, help="generated videos per FVD estimate")
    g.add_argument("--fvd-repeats", type=int, default=d.fvd_repeats, help="FVD runs averaged (mean ± std)")
    g.add_argument(
        "--fvd-weights", default=d.fvd_weights, help="I3D weights file (default: the offline proxy extractor)"
    )
    g.add_argument(
        "--fvd-data",
        default=d.fvd_data,
        help="real videos for FVD/KVD: 'synthetic' or a dataset folder (e.g. Sky Timelapse)",
    )
    g.add_argument("--fvd-split", default=d.fvd_split, help="split of --fvd-data holding the real videos")
    g.add_argument(
        "--real-videos",
        type=int,
        default=d.real_videos,
        help="real videos for the FVD/KVD reference statistics",
    )
    g.add_argument(
        "--checks",
        default="",
        help="dataset-provided checks computed from the FVD videos, comma-separated (the synthetic "
        "data provides motion_alignment)",
    )
    return g


def settings_from_args(args: argparse.Namespace, shared_storage: bool = False) -> MeasureSettings:
    """Settings from :func:`add_measure_arguments`' options. ``shared_storage``: a server many workers
    share (a claim there may be a live worker's); on SQLite, one process by contract, a claim left
    behind is a killed run's and is taken over at once."""
    return MeasureSettings(
        steps=args.steps,
        guidance=args.guidance,
        fvd_videos=args.fvd_videos,
        real_videos=args.real_videos,
        fvd_repeats=args.fvd_repeats,
        fvd_weights=args.fvd_weights,
        fvd_data=args.fvd_data,
        fvd_split=args.fvd_split,
        checks=tuple(c.strip() for c in args.checks.split(",") if c.strip()),
        latency=args.latency,
        threads=args.threads,
        device=args.device,
        seed=args.seed,
        claim_timeout_s=1800.0 if shared_storage else 0.0,
    )
