"""Measurement settings and the one argument group that ``search`` and ``evaluate`` share.

The two commands build their settings here, with the same defaults, so they name the same protocols and
share cached measurements.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from harness.device_policy import DEFAULT_PRECISION, DevicePolicy, add_device_arguments, check_device
from harness.measurement.timing import ESTIMATORS, TimingProtocol

LATENCY_MODES = ["measured", "predicted"]  # modes without an argument
LATENCY_MODE_KINDS: list[str] = ["modelled"]  # modes written "<kind>:<argument>" (modelled: harness.roofline)
__all__ = [
    "MeasureSettings",
    "add_measure_arguments",
    "check_device",
    "check_latency_mode",
    "settings_from_args",
]
_T = TimingProtocol  # its class attributes are its fields' defaults


def check_latency_mode(mode: str) -> str:
    """``mode`` when it names a latency mode (``LATENCY_MODES``, or ``<kind>:<argument>`` for a kind in
    ``LATENCY_MODE_KINDS``), else a one-line ``ValueError``. A new mode registers itself by adding its
    name to ``LATENCY_MODES`` (no argument) or ``LATENCY_MODE_KINDS`` (with one)."""
    kind, sep, argument = mode.partition(":")
    if (not sep and mode in LATENCY_MODES) or (sep and argument and kind in LATENCY_MODE_KINDS):
        return mode
    known = [*LATENCY_MODES, *(f"{k}:<argument>" for k in LATENCY_MODE_KINDS)]
    raise ValueError(f"unknown latency mode {mode!r}; use one of {', '.join(known)}")


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
    precision: str = DEFAULT_PRECISION  # harness.device_policy.PRECISIONS
    compile: bool = False  # latency: time forwards through torch.compile
    cuda_graphs: bool = False  # latency: replay forwards from CUDA graphs (GPU)
    seed: int = 0
    # Latency readings (harness.measurement.timing; defaults and their measurements in TimingProtocol).
    # Screen readings: dataclasses.replace(settings, min_run_time=0.15, latency_rounds=3).
    min_run_time: float = _T.rounds * _T.round_s  # seconds timed per reading, in latency_rounds rounds
    latency_rounds: int = _T.rounds
    latency_estimator: str = _T.estimator
    latency_max_spread: float = _T.max_spread
    latency_probe_tolerance: float = _T.probe_tolerance
    latency_other_cpu: float = _T.other_cpu
    latency_retries: int = _T.retries
    latency_backoff_s: float = _T.backoff_s
    latency_se_floor: float = _T.se_floor
    rerun: int = 0  # > 0: latency timed again under protocol ":rerun<k>" instead of read back (contract 4)
    claim_timeout_s: float = 1800.0  # a claim older than this is taken over (its worker is presumed dead)

    def __post_init__(self) -> None:
        for name, value, least in (
            ("--steps", self.steps, 1),
            ("--threads", self.threads, 1),
            ("--fvd-videos", self.fvd_videos, 3),  # the jackknife SE leaves one out of at least 3
            ("--real-videos", self.real_videos, 2),
            ("--fvd-repeats", self.fvd_repeats, 1),
        ):
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        _ = self.policy  # validates device, precision, compile and CUDA graphs (one line naming the option)
        check_latency_mode(self.latency)
        if self.rerun < 0:
            raise ValueError(f"--rerun must be at least 0, got {self.rerun}")
        if not self.min_run_time > 0:
            raise ValueError(f"--latency-time must be positive, got {self.min_run_time}")
        _ = self.timing  # validates the latency reading's settings (one line naming the option)

    @property
    def policy(self) -> DevicePolicy:
        """Where and in which precision everything is computed (``harness.device_policy``)."""
        return DevicePolicy(self.device, self.precision, self.compile, self.cuda_graphs)

    @property
    def timing(self) -> TimingProtocol:
        """How a latency reading is taken and accepted."""
        return TimingProtocol(
            rounds=self.latency_rounds,
            round_s=self.min_run_time / max(1, self.latency_rounds),
            estimator=self.latency_estimator,
            max_spread=self.latency_max_spread,
            probe_tolerance=self.latency_probe_tolerance,
            other_cpu=self.latency_other_cpu,
            retries=self.latency_retries,
            backoff_s=self.latency_backoff_s,
            se_floor=self.latency_se_floor,
        )


POLICY_FIELDS = ("precision", "compile", "cuda_graphs")  # added with issue 18


def study_settings(settings: MeasureSettings) -> dict:
    """``settings`` as a study records them (``dataclasses.asdict``), without the device-policy fields
    that are at their defaults: a study created before they existed compares equal on resume (a missing
    field reads as None on both sides), and one under another precision is still told apart."""
    defaults = MeasureSettings()
    out = asdict(settings)
    for name in POLICY_FIELDS:
        if out[name] == getattr(defaults, name):
            del out[name]
    return out


def add_measure_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The measurement options (devices, protocols), with :class:`MeasureSettings`' defaults."""
    d = MeasureSettings()
    g = parser.add_argument_group("measurement")
    add_device_arguments(parser, latency=True, default_device=d.device)
    g.add_argument("--threads", type=int, default=d.threads, help="CPU threads for torch and latency timing")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of FVD sampling (and of the searcher)")
    g.add_argument(
        "--latency",
        default=d.latency,
        help="latency of the extracted static subnet (measured), the predictor's estimate (predicted), or "
        "a named GPU's roofline model (modelled:<device>[:<precision>], python -m harness.roofline catalogue)",
    )
    g.add_argument(
        "--rerun",
        type=int,
        default=d.rerun,
        help="re-measure latency as a new reading (protocol ':rerun<k>') instead of reading it back",
    )
    t = parser.add_argument_group("latency reading (see harness.measurement.timing)")
    t.add_argument("--latency-time", type=float, default=d.min_run_time, help="seconds timed per reading")
    t.add_argument("--latency-rounds", type=int, default=d.latency_rounds, help="timed rounds per reading")
    t.add_argument(
        "--latency-estimator", choices=ESTIMATORS, default=d.latency_estimator, help="estimator over rounds"
    )
    t.add_argument(
        "--latency-max-spread",
        type=float,
        default=d.latency_max_spread,
        help="retry a reading whose rounds' (max - min) / value is above this",
    )
    t.add_argument(
        "--latency-probe-tolerance",
        type=float,
        default=d.latency_probe_tolerance,
        help="retry when the reference forward is this much slower than its quiet time",
    )
    t.add_argument(
        "--latency-other-cpu",
        type=float,
        default=d.latency_other_cpu,
        help="retry when other processes used more cores than this during a reading (Linux)",
    )
    t.add_argument("--latency-retries", type=int, default=d.latency_retries, help="retries before giving up")
    t.add_argument(
        "--latency-backoff", type=float, default=d.latency_backoff_s, help="seconds before a retry (doubling)"
    )
    t.add_argument(
        "--latency-se-floor",
        type=float,
        default=d.latency_se_floor,
        help="relative standard error between fresh readings on this machine",
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
        precision=args.precision,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        seed=args.seed,
        min_run_time=args.latency_time,
        latency_rounds=args.latency_rounds,
        latency_estimator=args.latency_estimator,
        latency_max_spread=args.latency_max_spread,
        latency_probe_tolerance=args.latency_probe_tolerance,
        latency_other_cpu=args.latency_other_cpu,
        latency_retries=args.latency_retries,
        latency_backoff_s=args.latency_backoff,
        latency_se_floor=args.latency_se_floor,
        rerun=args.rerun,
        claim_timeout_s=1800.0 if shared_storage else 0.0,
    )
