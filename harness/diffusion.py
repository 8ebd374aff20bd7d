"""Noise schedules (diffusers' schedulers, not rewritten), the training loss, and guided denoising.

A *denoiser* is anything called as ``denoiser(sample, timestep, encoder_hidden_states, **conditioning)``:
a ``Supernet`` with a subnet bound (``bind_subnet``) or an extracted static ``VideoUNet``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"  # cosine (Nichol & Dhariwal): better than linear at 16-64px


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE,
                         prediction_type="epsilon", clip_sample=False)


def sampling_scheduler(steps: int) -> DDIMScheduler:
    sched = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE,
                          prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                          timestep_spacing="leading", steps_offset=1)  # not t=999: x0 from eps blows up there
    sched.set_timesteps(steps)
    return sched


def bind_subnet(model: torch.nn.Module, subnet=None) -> Callable:
    """A denoiser callable: the supernet at ``subnet``, or ``model`` itself when it is static."""
    if subnet is None:
        return model
    return lambda *args, **kwargs: model(*args, subnet=subnet, **kwargs)


def null_context(model: torch.nn.Module, batch: int) -> torch.Tensor | None:
    null = getattr(model, "null_text", None)
    return None if null is None else null.expand(batch, -1, -1)


def noise_augment(low_res: torch.Tensor, level: torch.Tensor, generator: torch.Generator | None = None):
    """Imagen-style conditioning augmentation: diffuse the low-res video to ``level`` in [0, 1] of the
    schedule. ``low_res`` ``(B, 3, T, h, w)``, ``level`` ``(B,)``."""
    sched = train_scheduler()
    t = (level * (NUM_TRAIN_TIMESTEPS - 1)).round().long()
    noise = torch.randn(low_res.shape, generator=generator).to(low_res)
    return sched.add_noise(low_res, noise, t)


@torch.no_grad()
def ddim_sample(denoiser: Callable, shape: tuple[int, ...], context: torch.Tensor | None,
                null: torch.Tensor | None, steps: int = 20, guidance: float = 3.0,
                generator: torch.Generator | None = None, progress: Callable | None = None,
                clip: bool = True, **conditioning) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance: ``eps = eps_null + g * (eps_text - eps_null)``.

    ``shape`` ``(B, C, T, H, W)``; ``context``/``null`` ``(B, L, D)`` text tokens (``None`` when
    unconditional or ``guidance == 1``). Conditioning tensors are repeated for the doubled batch.
    Returns the sample, clamped to [-1, 1] when ``clip`` (pixels; latents are returned as they are).
    """
    sched = sampling_scheduler(steps)
    x = torch.randn(shape, generator=generator)
    device = next(iter(conditioning.values())).device if conditioning else None
    x = x.to(device) if device is not None else x
    guided = context is not None and null is not None and guidance != 1.0
    timesteps = sched.timesteps if progress is None else progress(sched.timesteps)
    for t in timesteps:
        tt = torch.full((shape[0],), int(t), dtype=torch.long, device=x.device)
        if guided:
            cond = {k: torch.cat([v, v]) for k, v in conditioning.items()}
            eps = denoiser(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([context, null]), **cond)
            eps_text, eps_null = eps.chunk(2)
            eps = eps_null + guidance * (eps_text - eps_null)
        else:
            eps = denoiser(x, tt, context, **conditioning)
        x = sched.step(eps, t, x, generator=generator).prev_sample
    return x.clamp(-1, 1) if clip else x


def epsilon_loss(prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction, noise)
