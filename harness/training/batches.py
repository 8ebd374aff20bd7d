"""Per-step batches for supernet training, deterministic by ``(seed, step, sample index)``.

Every random choice of a step is derived from the seed and the step number alone, so a resumed run
draws exactly what an uninterrupted one would, and K data-parallel ranks together draw exactly the
samples of one process with the same global batch (rank r takes samples r, r+K, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.data import resize_video
from harness.diffusion import EPS_COSINE, NUM_TRAIN_TIMESTEPS, NoiseSchedule, noise_augment


def step_rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, stream])


def timestep_weights(late_portion: float = 0.25, late_multiplier: float = 1.0) -> torch.Tensor | None:
    """Sampling weights over the training timesteps: the noisiest ``late_portion`` drawn ``late_multiplier``
    times as often (diffusers' "later" timestep bias); ``None`` (uniform) when the multiplier is 1."""
    if not 0.0 < late_portion <= 1.0 or late_multiplier <= 0:
        raise ValueError(
            f"timestep bias needs a portion in (0, 1] and a positive multiplier, got "
            f"{late_portion} and {late_multiplier}"
        )
    if late_multiplier == 1.0:
        return None
    weights = torch.ones(NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    weights[NUM_TRAIN_TIMESTEPS - round(late_portion * NUM_TRAIN_TIMESTEPS) :] = late_multiplier
    return weights / weights.sum()


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, step, 7, index]).integers(2**62)))


class ClipSource:
    """Clips of a dataset at any resolution: ``clip(i, R) -> (3, T, R, R)`` in [-1, 1]."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def clip(self, index: int, resolution: int) -> torch.Tensor:
        if hasattr(self.dataset, "video_at"):
            return self.dataset.video_at(index, resolution)
        return resize_video(self.dataset[index]["video"], resolution)

    def caption(self, index: int) -> str:
        if hasattr(self.dataset, "caption_at"):
            return self.dataset.caption_at(index)
        return self.dataset[index]["caption"]


@dataclass
class Batch:
    """One rank's share of a step: ``noisy``/``noise``/``target`` ``(b, 3, T, R, R)`` (``target``: what the
    schedule's denoiser predicts, the noise or v), ``timesteps`` ``(b,)``,
    ``context`` ``(b, L, D)`` or None with ``drop`` ``(b,)`` marking classifier-free-guidance dropout,
    and for super-resolution ``low_res`` ``(b, 3, T, R/2, R/2)`` and ``noise_level`` ``(b,)``."""

    noisy: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor | None
    drop: torch.Tensor
    low_res: torch.Tensor | None = None
    noise_level: torch.Tensor | None = None

    def model_kwargs(self, null_text: torch.Tensor | None) -> dict:
        context = self.context
        if context is not None and null_text is not None:
            context = torch.where(self.drop[:, None, None], null_text.expand_as(context), context)
        kwargs = {"encoder_hidden_states": context}
        if self.low_res is not None:
            kwargs.update(low_res=self.low_res, noise_level=self.noise_level)
        return kwargs


def make_batch(
    source: ClipSource,
    text_encoder,
    *,
    seed: int,
    step: int,
    resolution: int,
    global_batch: int,
    rank: int = 0,
    world: int = 1,
    cond_drop: float = 0.1,
    super_resolution: bool = False,
    max_noise_level: float = 0.5,
    encode=None,
    offset_noise: float = 0.0,
    schedule: NoiseSchedule = EPS_COSINE,
    t_weights: torch.Tensor | None = None,
) -> Batch:
    """One rank's share of step ``step``'s global batch. ``encode`` (latent families) maps a pixel clip
    batch ``(1, 3, T, R, R)`` to the latents the supernet denoises; ``resolution`` is then in pixels.

    ``offset_noise`` (Guttenberg 2023): adds ``offset_noise * N(0, 1)`` per sample and channel, constant
    over frames and pixels, to the diffusion noise. With the cosine schedule's non-zero terminal SNR the
    network otherwise reads each clip's mean colour from the faint signal left at t ~ 980 (Lin et al.
    2024); sampling starts from zero-mean noise, so it then generates grey instead of dark backgrounds.
    A zero-terminal-SNR ``schedule`` removes that cause. ``t_weights`` (``timestep_weights``) biases
    the timesteps drawn; ``None`` draws them uniformly. The super-resolution conditioning is always
    noised on the paper's schedule (its noise level is an input, not a prediction)."""
    indices = step_rng(seed, step, 2).integers(0, len(source), size=global_batch)
    mine = list(range(rank, global_batch, world))
    sched = schedule.train_scheduler()
    clips, lows, noises, ts, drops, levels, captions = [], [], [], [], [], [], []
    for j in mine:
        g = sample_generator(seed, step, j)
        clip = source.clip(int(indices[j]), resolution)
        if encode is not None:
            clip = encode(clip[None])[0]
        noises.append(torch.randn(clip.shape, generator=g))
        ts.append(
            int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g))
            if t_weights is None
            else int(torch.multinomial(t_weights, 1, generator=g))
        )
        drops.append(bool(torch.rand(1, generator=g) < cond_drop))
        captions.append(source.caption(int(indices[j])))
        if super_resolution:
            level = torch.rand(1, generator=g) * max_noise_level
            low = resize_video(clip, resolution // 2)
            lows.append(noise_augment(low[None], level, generator=g)[0])
            levels.append(level)
        if offset_noise:  # drawn last: without it every other draw is unchanged
            noises[-1] = noises[-1] + offset_noise * torch.randn((clip.shape[0], 1, 1, 1), generator=g)
        clips.append(clip)
    x0, noise = torch.stack(clips), torch.stack(noises)
    timesteps = torch.tensor(ts, dtype=torch.long)
    context = text_encoder.encode(captions) if text_encoder is not None else None
    return Batch(
        noisy=sched.add_noise(x0, noise, timesteps),
        noise=noise,
        target=schedule.target(x0, noise, timesteps),
        timesteps=timesteps,
        context=context,
        drop=torch.tensor(drops, dtype=torch.bool),
        low_res=torch.stack(lows) if super_resolution else None,
        noise_level=torch.cat(levels) if super_resolution else None,
    )
