"""Noise schedules (diffusers' schedulers, not rewritten), the training loss, and guided denoising.

A *denoiser* is anything called as ``denoiser(sample, timestep, encoder_hidden_states, **conditioning)``:
a ``Supernet`` with a subnet bound (``bind_subnet``) or an extracted static ``VideoUNet``. ``ddim_sample``
also takes one denoiser per step (a trajectory schedule: a different subnet for different steps).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from harness.device_policy import default_device

NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"  # cosine (Nichol & Dhariwal): better than linear at 16-64px
PREDICTIONS = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class NoiseSchedule:
    """What a denoiser was trained to predict, on which noise schedule; saved with every checkpoint.

    ``NoiseSchedule()`` is the paper's setting: epsilon prediction on the cosine schedule, DDIM from
    t = 951 ("leading" spacing). Its terminal SNR is not zero, so sampling from pure noise starts from
    something no training input looked like: the network had learnt to read colour and motion from the
    signal left at high t (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
    flawed"). ``ZERO_SNR_V`` follows their fix: betas rescaled to zero terminal SNR, v prediction (epsilon
    is undefined at SNR 0), and DDIM from t = 999 ("trailing" spacing) down to the clean sample.
    """

    prediction: str = "epsilon"
    zero_terminal_snr: bool = False
    beta_schedule: str = BETA_SCHEDULE

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; use one of {list(PREDICTIONS)}")
        if self.zero_terminal_snr and self.prediction == "epsilon":
            raise ValueError("epsilon prediction is undefined at zero terminal SNR; use v_prediction")

    def _kwargs(self) -> dict:
        return {
            "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction,
            "clip_sample": False,
            "rescale_betas_zero_snr": self.zero_terminal_snr,
        }

    def train_scheduler(self) -> DDPMScheduler:
        """The training scheduler (``add_noise``, ``get_velocity``): built once per schedule and shared,
        since every training step uses it; do not mutate it."""
        return _train_scheduler(self)

    def sampling_scheduler(self, steps: int) -> DDIMScheduler:
        # diffusers builds its tables with the default device: they are CPU tables indexed by Python ints
        # (0-dim CPU tensors mix with any device), whatever default device the caller runs under.
        with default_device("cpu"):
            return self._sampling_scheduler(steps)

    def _sampling_scheduler(self, steps: int) -> DDIMScheduler:
        if self.zero_terminal_snr:  # start at t = 999 (pure noise) and end on the clean sample
            sched = DDIMScheduler(**self._kwargs(), set_alpha_to_one=True, timestep_spacing="trailing")
        else:  # not t=999: x0 from eps blows up there
            sched = DDIMScheduler(
                **self._kwargs(), set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1
            )
        sched.set_timesteps(steps)
        return sched

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The training target: ``noise`` (epsilon) or ``sqrt(a) * noise - sqrt(1 - a) * x0`` (v)."""
        if self.prediction == "epsilon":
            return noise
        return self.train_scheduler().get_velocity(x0, noise, timesteps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> NoiseSchedule:
        """``None`` (a checkpoint from before schedules were recorded) is the paper's setting."""
        return cls(**data) if data else cls()

    @classmethod
    def named(cls, name: str) -> NoiseSchedule:
        if name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {name!r}; use one of {list(SCHEDULES)}")
        return SCHEDULES[name]


@functools.cache
def _train_scheduler(schedule: NoiseSchedule) -> DDPMScheduler:
    with default_device("cpu"):  # cached for the process: never on a caller's default device
        return DDPMScheduler(**schedule._kwargs())


SCHEDULES = {
    "eps-cosine": NoiseSchedule(),
    "v-zero-snr": NoiseSchedule("v_prediction", zero_terminal_snr=True),
}
EPS_COSINE, ZERO_SNR_V = SCHEDULES["eps-cosine"], SCHEDULES["v-zero-snr"]


def train_scheduler(schedule: NoiseSchedule = EPS_COSINE) -> DDPMScheduler:
    return schedule.train_scheduler()


def sampling_scheduler(steps: int, schedule: NoiseSchedule = EPS_COSINE) -> DDIMScheduler:
    return schedule.sampling_scheduler(steps)


def bind_subnet(model: torch.nn.Module, subnet=None) -> Callable:
    """A denoiser callable: the supernet at ``subnet``, or ``model`` itself when it is static."""
    if subnet is None:
        return model
    return lambda *args, **kwargs: model(*args, subnet=subnet, **kwargs)


def null_context(model: torch.nn.Module, batch: int) -> torch.Tensor | None:
    null = getattr(model, "null_text", None)
    return None if null is None else null.expand(batch, -1, -1)


def noise_augment(
    low_res: torch.Tensor,
    level: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
):
    """Imagen-style conditioning augmentation: diffuse the low-res video to ``level`` in [0, 1] of the
    schedule. ``low_res`` ``(B, 3, T, h, w)``, ``level`` ``(B,)``; ``noise`` (same shape as ``low_res``)
    is drawn from ``generator`` when ``None``."""
    sched = EPS_COSINE.train_scheduler()
    t = (level * (NUM_TRAIN_TIMESTEPS - 1)).round().long()
    if noise is None:  # a generator is a CPU one here (seeded draws are made on the CPU, then moved)
        noise = torch.randn(low_res.shape, generator=generator, device="cpu")
    noise = noise.to(low_res)
    return sched.add_noise(low_res, noise, t)


@torch.no_grad()
def ddim_sample(
    denoiser: Callable | Sequence[Callable],
    shape: tuple[int, ...],
    context: torch.Tensor | None,
    null: torch.Tensor | None,
    steps: int = 20,
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
    progress: Callable | None = None,
    clip: bool = True,
    schedule: NoiseSchedule = EPS_COSINE,
    noise: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    **conditioning,
) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance: ``out = out_null + g * (out_text - out_null)`` on the
    denoiser's output (epsilon or v, as ``schedule`` says).

    ``denoiser``: one callable run at every step, or a sequence of ``steps`` callables, ``denoiser[i]``
    run at step ``i + 1`` in sampling order (step 1 is the noisiest), e.g. one subnet for the first steps
    and another for the rest.

    ``shape`` ``(B, C, T, H, W)``; ``context``/``null`` ``(B, L, D)`` text tokens (``None`` when
    unconditional or ``guidance == 1``). Conditioning tensors are repeated for the doubled batch.
    ``noise``: the initial sample ``shape`` (drawn from ``generator`` when ``None``), so a caller can
    seed every video of a batch on its own; DDIM (eta 0) draws nothing after it. ``device``: where the
    sample lives (``None``: the conditioning's, else the noise's device); the denoiser's output is taken
    in float32 (an autocast forward returns half precision) before guidance and the DDIM update.
    Returns the sample, clamped to [-1, 1] when ``clip`` (pixels; latents are returned as they are).
    """
    per_step = None if callable(denoiser) else list(denoiser)
    if per_step is not None and len(per_step) != steps:
        raise ValueError(f"got {len(per_step)} per-step denoisers for {steps} steps; give one per step")
    sched = schedule.sampling_scheduler(steps)
    if noise is not None and tuple(noise.shape) != tuple(shape):
        raise ValueError(f"initial noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    x = torch.randn(shape, generator=generator, device="cpu") if noise is None else noise
    if device is None:
        device = next(iter(conditioning.values())).device if conditioning else x.device
    x = x.to(device)
    guided = context is not None and null is not None and guidance != 1.0
    timesteps = sched.timesteps if progress is None else progress(sched.timesteps)
    for i, t in enumerate(timesteps):
        net = denoiser if per_step is None else per_step[i]
        tt = torch.full((shape[0],), int(t), dtype=torch.long, device=x.device)
        if guided:
            cond = {k: torch.cat([v, v]) for k, v in conditioning.items()}
            out = net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([context, null]), **cond)
            out_text, out_null = out.float().chunk(2)
            out = out_null + guidance * (out_text - out_null)
        else:
            out = net(x, tt, context, **conditioning).float()
        x = sched.step(out, t, x, generator=generator).prev_sample
    return x.clamp(-1, 1) if clip else x


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error to the schedule's target (``NoiseSchedule.target``)."""
    return F.mse_loss(prediction, target)
