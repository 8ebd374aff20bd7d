"""``python -m harness.sample``: generate a video from a prompt with a supernet subnet or an extracted subnet.

python -m harness.sample --prompt "a large red square moving left" --resolution 32 --out red.gif
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness.cli import run_cli
from harness.device_policy import add_device_arguments, policy_from_args
from harness.models import load_bundle
from harness.paths import DEFAULT_BASE, DEFAULT_SSR
from harness.pipeline import Chain, generate
from harness.video_io import save_frame_grid, save_gif
from search_spaces import SubnetConfig, Supernet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.sample", description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint", default=str(DEFAULT_BASE), help="base model directory (supernet or subnet)"
    )
    p.add_argument("--ssr-checkpoint", default=str(DEFAULT_SSR), help="super-resolution model directory")
    p.add_argument("--subnet", default=None, help="JSON file of the base subnet config (default: largest)")
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
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per stage")
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


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    policy = policy_from_args(args)  # before loading anything: a missing GPU is one line
    policy.apply()
    base = load_bundle(args.checkpoint)
    if not args.prompt and base.text_encoder is not None:
        raise ValueError('this model is text-conditioned: pass --prompt "..."')
    prompts = args.prompt or [""] * args.num_videos
    resolution = args.resolution
    ssr = load_bundle(args.ssr_checkpoint) if resolution and resolution > base.default_resolution else None
    policy.place(base)
    policy.place(ssr)
    text = base.text_encoder.load(policy.device, dtype=args.text_dtype) if base.text_encoder else None
    chain = Chain(base, ssr, text, policy=policy)
    if args.subnet:
        if not base.is_supernet:
            raise ValueError("--subnet applies to a supernet checkpoint; this checkpoint is already a subnet")
        chain.base_subnet = _read_config(args.subnet, base.network)
    if args.ssr_subnet and ssr is not None:
        cfg = _read_config(args.ssr_subnet, ssr.network)
        chain.ssr_subnets = {
            r: ssr.supernet.space.validate(cfg.replace(resolution=r)) for r in chain.stages(resolution)[1:]
        }
    with torch.no_grad():
        video = generate(
            chain,
            prompts,
            resolution,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            progress=True,
        ).cpu()
    out = save_gif(video, args.out)
    grid = save_frame_grid(video, Path(args.out).with_suffix(".png"))
    print(f"wrote {out} and {grid}: {tuple(video.shape)} (B, C, T, H, W)")


if __name__ == "__main__":
    run_cli(main)
