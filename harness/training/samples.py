"""Sample videos written beside a training run's checkpoint (``--sample-every``)."""

from __future__ import annotations

from pathlib import Path

import torch

from harness.data import resize_video
from harness.diffusion import bind_subnet, ddim_sample, null_context

PROMPTS = ["a large red square moving left", "a small blue circle moving up"]


@torch.no_grad()
def write_training_samples(trainer, steps: int = 10, guidance: float = 3.0, seed: int = 0) -> Path:
    """Largest and smallest subnet side by side: text-to-video for a base model, upscaling of a training
    clip for a super-resolution model. Returns the GIF path (``<run>/samples/step_<7-digit step>.gif``)."""
    from harness.video_io import save_gif

    net, device = trainer.net, trainer.device
    space = net.space
    res = space.default_resolution
    frames = net.hyper.frames
    context = trainer.text.encode(PROMPTS).to(device) if trainer.text is not None else None
    conditioning = {}
    if net.spec.cond_channels:
        clips = torch.stack(
            [resize_video(trainer.source.clip(i, res), res // 2) for i in range(len(PROMPTS))]
        )
        level = torch.full((len(PROMPTS),), 0.2, device=device)
        conditioning = {"low_res": clips.to(device), "noise_level": level}
    videos = []
    was_training = net.training
    net.eval()
    for cfg in (space.largest(res), space.smallest(res)):
        g = torch.Generator(device="cpu").manual_seed(seed)
        shape = (len(PROMPTS), net.spec.in_channels, frames, res, res)
        noise = torch.randn(shape, generator=g, device="cpu").to(device)  # CPU draw: same on every device
        video = ddim_sample(
            bind_subnet(net, cfg),
            shape,
            context,
            null_context(net, len(PROMPTS)) if context is not None else None,
            steps=steps,
            guidance=guidance,
            generator=g,
            clip=trainer.codec is None,
            schedule=trainer.schedule,
            noise=noise,
            **conditioning,
        )
        videos.append((trainer.codec.decode(video) if trainer.codec is not None else video).cpu())
    net.train(was_training)
    out = Path(trainer.opts.out) / "samples" / f"step_{trainer.step:07d}.gif"
    return save_gif(torch.cat(videos), out)  # rows: prompts; largest subnet first, then smallest
