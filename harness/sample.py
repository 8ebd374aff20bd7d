"""``python -m harness.sample``: generate a video from a prompt with a supernet subnet or an extracted subnet.

python -m harness.sample --prompt "a large red square moving left" --resolution 32 --out red.gif

A trajectory schedule (issue 20: a different base subnet for different sampling steps) runs from the
directory ``harness.export`` wrote (``--checkpoint EXPORTED``, found by its ``schedule.json``) or on a
supernet checkpoint from a candidate file (``--schedule candidate.json``, format sned-trajectory/1); its
step count is the schedule's (a different ``--steps`` is refused). An exported single subnet whose
``candidate.json`` beside it records its own step count runs that count by default.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.candidates import TRAJECTORY_FORMAT, Candidate
from harness.cli import run_cli
from harness.device_policy import add_device_arguments, policy_from_args
from harness.models import ModelBundle, load_bundle
from harness.paths import DEFAULT_BASE, DEFAULT_SSR
from harness.pipeline import Chain, generate
from harness.schedule_files import SCHEDULE_FILE, read_schedule
from harness.video_io import save_frame_grid, save_gif
from search_spaces import ConfigError, SubnetConfig, Supernet

DEFAULT_STEPS = 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.sample", description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        default=str(DEFAULT_BASE),
        help="base model directory (supernet, subnet, or an exported schedule's directory)",
    )
    p.add_argument("--ssr-checkpoint", default=str(DEFAULT_SSR), help="super-resolution model directory")
    p.add_argument("--subnet", default=None, help="JSON file of the base subnet config (default: largest)")
    p.add_argument(
        "--schedule",
        default=None,
        help="JSON file of a trajectory candidate (format sned-trajectory/1: harness.export's "
        "candidate.json or Candidate.to_json()) to run on the supernet --checkpoint",
    )
    p.add_argument(
        "--ssr-subnet",
        default=None,
        help="JSON file of the SSR subnet config (ratios reused "
        "at every upscaling stage; default: largest within each stage's size cap)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="text prompt (repeatable; unconditional models: one video per prompt, text ignored)",
    )
    p.add_argument("--num-videos", type=int, default=1, help="videos to generate when no --prompt is given")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="output side in pixels (latent families: the latent side; default: the base model's)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"DDIM steps of the base model (default: a schedule's own count, else {DEFAULT_STEPS})",
    )
    p.add_argument(
        "--ssr-steps", type=int, default=None, help="DDIM steps of each SSR stage (default: --steps)"
    )
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out", default="sample.gif", help="output GIF (a PNG frame grid is written beside it)")
    add_device_arguments(p, latency=False)
    return p


def _read_config(path: str, model) -> SubnetConfig:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"subnet file {p} does not exist; write one with harness.export or cfg.to_json()"
        )
    cfg = SubnetConfig.from_json(p.read_text())
    return model.space.validate(cfg) if isinstance(model, Supernet) else cfg


def read_schedule_candidate(path: str) -> Candidate:
    """The trajectory candidate in ``path``: ``Candidate.to_json()``'s text, or the ``candidate`` of the
    record ``harness.export`` writes (``candidate.json``). Anything else is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"schedule file {p} does not exist; pass harness.export's candidate.json or Candidate.to_json()"
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--schedule {p} is not JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and "candidate" in data and "format" not in data:
        data = data["candidate"]  # an export's record
    if not isinstance(data, dict) or data.get("format") != TRAJECTORY_FORMAT:
        raise ConfigError(
            f"--schedule {p} is not a trajectory candidate (format {TRAJECTORY_FORMAT}); a single subnet "
            "goes to --subnet"
        )
    return Candidate.from_dict(data)


def _recorded_steps(checkpoint: Path) -> int | None:
    """The step count an exported subnet's ``candidate.json`` (beside its folder) records, if any."""
    record = checkpoint.parent / "candidate.json"
    if not (checkpoint / "config.json").is_file() or not record.is_file():
        return None
    try:
        steps = json.loads(record.read_text()).get("steps")
    except (json.JSONDecodeError, AttributeError):
        return None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


@dataclass
class _Base:
    """The base model a sample runs: ``bundle`` (for an exported schedule, its first segment's),
    ``bundles`` to place on the device, ``steps`` the schedule fixes (``strict``) or the export records,
    the ``--schedule`` candidate, and the base part of the ``Chain``'s arguments."""

    bundle: ModelBundle
    bundles: list[ModelBundle]
    steps: int | None = None
    strict: bool = False
    candidate: Candidate | None = None
    chain_args: dict = field(default_factory=dict)


def _exported_schedule(directory: Path) -> _Base:
    """An exported schedule's static segment networks, checked against its ``schedule.json``."""
    steps, pairs = read_schedule(directory)
    bundles: dict[Path, ModelBundle] = {}
    for seg, folder in pairs:
        bundle = bundles.get(folder) or load_bundle(folder)
        if bundle.is_supernet or bundle.subnet != seg.subnet:
            raise ConfigError(
                f"{folder} is not the subnet {directory / SCHEDULE_FILE} names for steps "
                f"{seg.first}-{seg.last}; re-export the schedule with python -m harness.export"
            )
        bundles[folder] = bundle
    segments = tuple(seg for seg, _ in pairs)
    networks = tuple(bundles[folder].network for _, folder in pairs)
    return _Base(bundles[pairs[0][1]], list(bundles.values()), steps, True, None,
                 {"base_segments": segments, "base_networks": networks})  # fmt: skip


def _base_model(args) -> _Base:
    """The base model of ``--checkpoint`` with ``--subnet`` or ``--schedule`` (one-line errors)."""
    checkpoint = Path(args.checkpoint)
    if (checkpoint / SCHEDULE_FILE).is_file():
        if args.subnet or args.schedule:
            raise ValueError(
                f"{checkpoint} is an exported schedule with its own subnets; drop --subnet/--schedule"
            )
        return _exported_schedule(checkpoint)
    base = load_bundle(checkpoint)
    if (args.subnet or args.schedule) and not base.is_supernet:
        raise ValueError(
            "--subnet and --schedule apply to a supernet checkpoint; this one is already a subnet"
        )
    if args.subnet and args.schedule:
        raise ValueError("give the base subnet once: --subnet or --schedule, not both")
    if args.subnet:
        return _Base(base, [base], chain_args={"base_subnet": _read_config(args.subnet, base.network)})
    if args.schedule:
        cand = read_schedule_candidate(args.schedule)
        Candidate(cand.base, None, cand.steps, cand.segments).validate(base.supernet, None)
        return _Base(
            base, [base], cand.steps, True, cand, {"base_subnet": cand.base, "base_segments": cand.segments}
        )
    return _Base(base, [base], _recorded_steps(checkpoint))


def _steps(args, base: _Base) -> int:
    if base.strict and args.steps is not None and args.steps != base.steps:
        raise ValueError(
            f"--steps {args.steps} differs from the schedule's {base.steps} steps; drop --steps "
            "(a schedule runs the step count it was searched at)"
        )
    steps = args.steps if args.steps is not None else (base.steps or DEFAULT_STEPS)
    if steps < 1 or (args.ssr_steps is not None and args.ssr_steps < 1):
        raise ValueError("--steps and --ssr-steps must be at least 1")
    return steps


def _ssr_subnets(args, chain: Chain, ssr: ModelBundle | None, cand: Candidate | None, resolution) -> dict:
    """The SSR subnet per stage: ``--ssr-subnet``'s, else the ``--schedule`` candidate's (if any)."""
    if ssr is None:
        return {}
    if args.ssr_subnet:
        if cand is not None and cand.ssr is not None:
            raise ValueError("the --schedule candidate has its SSR subnet: drop --ssr-subnet")
        cfg = _read_config(args.ssr_subnet, ssr.network)
    elif cand is not None and cand.ssr is not None and ssr.is_supernet:
        cfg = cand.ssr
    else:
        return {}
    return {r: ssr.supernet.space.validate(cfg.replace(resolution=r)) for r in chain.stages(resolution)[1:]}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    policy = policy_from_args(args)  # before loading anything: a missing GPU is one line
    policy.apply()
    base = _base_model(args)
    steps = _steps(args, base)
    if not args.prompt and base.bundle.text_encoder is not None:
        raise ValueError('this model is text-conditioned: pass --prompt "..."')
    prompts = args.prompt or [""] * args.num_videos
    cand = base.candidate
    resolution = args.resolution or (cand.resolution if cand is not None and cand.ssr is not None else None)
    big = resolution and resolution > base.bundle.default_resolution
    ssr = load_bundle(args.ssr_checkpoint) if big else None
    chain = Chain(base.bundle, ssr, None, policy=policy, **base.chain_args)
    chain.ssr_subnets = _ssr_subnets(args, chain, ssr, cand, resolution)
    for bundle in [*base.bundles, ssr]:
        policy.place(bundle)
    bundle = base.bundle
    chain.text_encoder = (
        bundle.text_encoder.load(policy.device, dtype=args.text_dtype) if bundle.text_encoder else None
    )
    with torch.no_grad():
        video = generate(
            chain,
            prompts,
            resolution,
            steps=steps,
            ssr_steps=args.ssr_steps,
            guidance=args.guidance,
            seed=args.seed,
            progress=True,
        ).cpu()
    out = save_gif(video, args.out)
    grid = save_frame_grid(video, Path(args.out).with_suffix(".png"))
    print(f"wrote {out} and {grid}: {tuple(video.shape)} (B, C, T, H, W)")


if __name__ == "__main__":
    run_cli(main)
