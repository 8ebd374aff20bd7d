"""Per-step batches for supernet training, deterministic by ``(seed, step, sample index)``.

Every random choice of a step is derived from the seed and the step number alone, so a resumed run
draws exactly what an uninterrupted one would, and K data-parallel ranks together draw exactly the
samples of one process with the same global batch (rank r takes samples r, r+K, ...).
"""

from __future__ import annotations

import dataclasses
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
    weights = torch.ones(NUM_TRAIN_TIMESTEPS, dtype=torch.float64, device="cpu")
    weights[NUM_TRAIN_TIMESTEPS - round(late_portion * NUM_TRAIN_TIMESTEPS) :] = late_multiplier
    return weights / weights.sum()


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(
        int(np.random.default_rng([seed, step, 7, index]).integers(2**62))
    )


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


@dataclass
class StepSamples:
    """One rank's share of a step as drawn on the CPU (what a ``DataLoader`` worker hands over).

    ``clips`` ``(b, 3, T, R, R)`` pixels in [-1, 1]; ``noise`` ``(b, C, T', R', R')`` in the space the
    supernet denoises (the latents' shape for a latent family); ``timesteps`` ``(b,)`` long; ``drop``
    ``(b,)`` bool; ``captions`` ``b`` strings; super-resolution: ``low_res`` ``(b, 3, T, R/2, R/2)``
    (already noise-augmented) and ``noise_level`` ``(b,)``."""

    step: int
    clips: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    drop: torch.Tensor
    captions: list[str]
    low_res: torch.Tensor | None = None
    noise_level: torch.Tensor | None = None

    def pin_memory(self) -> StepSamples:
        """Page-locked copies (``DataLoader(pin_memory=True)`` calls this), so host-to-GPU copies overlap."""
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **pinned)


_CPU = torch.device("cpu")  # batches are drawn on the CPU with CPU generators: the same bits on any device


def draw_step(
    source: ClipSource,
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
    latent: tuple[int, tuple[int, int, int]] | None = None,
    offset_noise: float = 0.0,
    t_weights: torch.Tensor | None = None,
) -> StepSamples:
    """Everything random in one rank's share of step ``step``, on the CPU. ``latent`` = ``(channels,
    downsample)`` of a latent family's codec: the noise then has the latents' shape. See ``make_batch``."""
    indices = step_rng(seed, step, 2).integers(0, len(source), size=global_batch)
    mine = list(range(rank, global_batch, world))
    clips, lows, noises, ts, drops, levels, captions = [], [], [], [], [], [], []
    for j in mine:
        g = sample_generator(seed, step, j)
        clip = source.clip(int(indices[j]), resolution)  # (3, T, R, R)
        shape = clip.shape
        if latent is not None:
            channels, (dt, dh, dw) = latent
            shape = (channels, shape[1] // dt, shape[2] // dh, shape[3] // dw)
        noises.append(torch.randn(shape, generator=g, device=_CPU))
        ts.append(
            int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g, device=_CPU))
            if t_weights is None
            else int(torch.multinomial(t_weights, 1, generator=g))
        )
        drops.append(bool(torch.rand(1, generator=g, device=_CPU) < cond_drop))
        captions.append(source.caption(int(indices[j])))
        if super_resolution:
            level = torch.rand(1, generator=g, device=_CPU) * max_noise_level
            low = resize_video(clip, resolution // 2)[None]
            aug = torch.randn(low.shape, generator=g, device=_CPU)  # noise_augment's own draw, made here
            lows.append(noise_augment(low, level, noise=aug)[0])
            levels.append(level)
        if offset_noise:  # drawn last: without it every other draw is unchanged
            offset = torch.randn((shape[0], 1, 1, 1), generator=g, device=_CPU)
            noises[-1] = noises[-1] + offset_noise * offset
        clips.append(clip)
    return StepSamples(
        step=step,
        clips=torch.stack(clips),
        noise=torch.stack(noises),
        timesteps=torch.tensor(ts, dtype=torch.long, device=_CPU),
        drop=torch.tensor(drops, dtype=torch.bool, device=_CPU),
        captions=captions,
        low_res=torch.stack(lows) if super_resolution else None,
        noise_level=torch.cat(levels) if super_resolution else None,
    )


def to_batch(
    samples: StepSamples,
    text_encoder,
    *,
    schedule: NoiseSchedule = EPS_COSINE,
    encode=None,
    device: torch.device | str = _CPU,
) -> Batch:
    """The model's inputs on ``device``: clips encoded (latent families, one clip at a time so the result
    does not depend on how the global batch is split over ranks), captions embedded, noise added."""

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    x0 = move(samples.clips)
    if encode is not None:
        x0 = torch.cat([encode(clip[None]) for clip in x0])
    noise, timesteps = move(samples.noise), move(samples.timesteps)
    if x0.shape != noise.shape:
        raise RuntimeError(f"encoded clips {tuple(x0.shape)} and their noise {tuple(noise.shape)} differ")
    context = text_encoder.encode(samples.captions).to(device) if text_encoder is not None else None
    return Batch(
        noisy=schedule.train_scheduler().add_noise(x0, noise, timesteps),
        noise=noise,
        target=schedule.target(x0, noise, timesteps),
        timesteps=timesteps,
        context=context,
        drop=move(samples.drop),
        low_res=move(samples.low_res),
        noise_level=move(samples.noise_level),
    )


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
    latent: tuple[int, tuple[int, int, int]] | None = None,
    offset_noise: float = 0.0,
    schedule: NoiseSchedule = EPS_COSINE,
    t_weights: torch.Tensor | None = None,
    device: torch.device | str = _CPU,
) -> Batch:
    """One rank's share of step ``step``'s global batch, on ``device``. ``encode`` (latent families, with
    ``latent`` = ``(channels, downsample)``) maps a pixel clip batch ``(1, 3, T, R, R)`` to the latents the
    supernet denoises; ``resolution`` is then in pixels.

    ``offset_noise`` (Guttenberg 2023): adds ``offset_noise * N(0, 1)`` per sample and channel, constant
    over frames and pixels, to the diffusion noise. With the cosine schedule's non-zero terminal SNR the
    network otherwise reads each clip's mean colour from the faint signal left at t ~ 980 (Lin et al.
    2024); sampling starts from zero-mean noise, so it then generates grey instead of dark backgrounds.
    A zero-terminal-SNR ``schedule`` removes that cause. ``t_weights`` (``timestep_weights``) biases
    the timesteps drawn; ``None`` draws them uniformly. The super-resolution conditioning is always
    noised on the paper's schedule (its noise level is an input, not a prediction)."""
    if encode is not None and latent is None:  # learn the latents' shape from one encoded clip
        clip = source.clip(0, resolution)  # (3, T, R, R)
        probe = encode(clip[None].to(device))[0]  # (C, T', R', R')
        latent = (probe.shape[0], tuple(a // b for a, b in zip(clip.shape[1:], probe.shape[1:])))
    samples = draw_step(
        source,
        seed=seed,
        step=step,
        resolution=resolution,
        global_batch=global_batch,
        rank=rank,
        world=world,
        cond_drop=cond_drop,
        super_resolution=super_resolution,
        max_noise_level=max_noise_level,
        latent=latent,
        offset_noise=offset_noise,
        t_weights=t_weights,
    )
    return to_batch(samples, text_encoder, schedule=schedule, encode=encode, device=device)


class StepDataset(torch.utils.data.Dataset):
    """Map-style dataset over step numbers: item ``s`` is this rank's ``StepSamples`` of step ``s``.

    Sharding is by construction: step ``s`` draws ``global_batch`` sample indices from ``(seed, s)`` and
    rank ``r`` of ``K`` loads only samples ``r, r + K, ...`` (DistributedSampler's interleave, without
    sampler state to save: a resumed run starts at its step). ``resolution_of(step)`` gives the pixel
    resolution of the step's subnet; ``t_weights_of(step)``, when given, the step's timestep weights
    (timestep-aware sampling: they depend on the step's subnet), replacing ``draw``'s ``t_weights``;
    ``draw`` the remaining ``draw_step`` arguments. Workers of a ``DataLoader`` prefetch whole steps
    (decoding and resizing folder videos off the training process)."""

    def __init__(self, source: ClipSource, resolution_of, steps: range, t_weights_of=None, **draw) -> None:
        self.source, self.resolution_of, self.steps, self.draw = source, resolution_of, steps, draw
        self.t_weights_of = t_weights_of

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, step: int) -> StepSamples:
        draw = self.draw
        if self.t_weights_of is not None:
            draw = {**draw, "t_weights": self.t_weights_of(step)}
        return draw_step(self.source, step=step, resolution=self.resolution_of(step), **draw)


def step_loader(dataset: StepDataset, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Iterate ``dataset``'s steps in order, ``workers`` processes ahead (0: in this process)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # an item is already one step's batch
        sampler=dataset.steps,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
    )
