"""Text-to-video generation through the pixel chain: base model, then the SSR model applied recursively;
or, for a latent family, the latent denoiser followed by the autoencoder's decoder.

``generate`` works with supernets at given subnets and with extracted static subnets alike; the metrics
(FVD, latency of a whole generation) call it, and so does ``python -m harness.sample``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from harness.checkpoints import noise_schedule_of
from harness.diffusion import bind_subnet, ddim_sample, noise_augment, null_context
from harness.latent import LatentCodec
from search_spaces import SubnetConfig, Supernet


@dataclass
class Chain:
    """The models of one pipeline. ``base_subnet``/``ssr_subnets`` pick subnets of supernets (None: the
    largest / a static model); ``ssr_subnets`` maps each output resolution to the SSR subnet run there."""

    base: torch.nn.Module
    ssr: torch.nn.Module | None = None
    text_encoder: object | None = None
    base_subnet: SubnetConfig | None = None
    ssr_subnets: dict[int, SubnetConfig] = field(default_factory=dict)
    codec: LatentCodec | None = None  # latent families: decodes the base model's latents to pixels

    @property
    def channels(self) -> int:
        """Channels the base model denoises (3 for pixels, the latent channels otherwise)."""
        return self.base.spec.in_channels

    @property
    def base_resolution(self) -> int:
        if self.base_subnet is not None:
            return self.base_subnet.resolution
        if isinstance(self.base, Supernet):
            return self.base.space.default_resolution
        return self.base.subnet_config.resolution

    @property
    def frames(self) -> int:
        return self.base.hyper.frames if isinstance(self.base, Supernet) else getattr(self.base, "frames", 12)

    def stages(self, resolution: int) -> list[int]:
        """Output resolution of every stage: ``[base, 2*base, ...]`` up to ``resolution``."""
        out = [self.base_resolution]
        while out[-1] < resolution:
            out.append(out[-1] * 2)
        if out[-1] != resolution:
            raise ValueError(f"resolution {resolution} is not the base resolution {out[0]} times a power of 2")
        if len(out) > 1 and self.codec is not None:
            raise ValueError(f"a latent model generates at its own latent sizes; resolution {resolution} is not "
                             f"{out[0]}")
        if len(out) > 1 and self.ssr is None:
            raise ValueError(f"resolution {resolution} needs the super-resolution model; pass --ssr-checkpoint")
        return out

    def ssr_subnet(self, resolution: int) -> SubnetConfig | None:
        if not isinstance(self.ssr, Supernet):
            return None
        if resolution in self.ssr_subnets:
            return self.ssr_subnets[resolution]
        largest = self.ssr.space.largest(resolution)
        return largest if self.ssr.space.fits(largest) else self.ssr.space.subnet_at_fraction(
            self.ssr.space.size_caps[resolution], resolution)


def _base_denoiser(chain: Chain):
    if isinstance(chain.base, Supernet):
        return bind_subnet(chain.base, chain.base_subnet or chain.base.space.largest())
    return chain.base


@torch.no_grad()
def generate(chain: Chain, prompts: list[str], resolution: int | None = None, steps: int = 20,
             ssr_steps: int | None = None, guidance: float = 3.0, seed: int = 0, aug_level: float = 0.2,
             progress: bool = False) -> torch.Tensor:
    """Generate one video per prompt: ``(B, 3, T, R, R)`` in [-1, 1]. Deterministic by ``seed``.

    With a latent codec, ``resolution`` is the latent size and the decoded video is
    ``(B, 3, T * d_t, R * d_h, R * d_w)``."""
    resolution = resolution or chain.base_resolution
    stages = chain.stages(resolution)
    b, frames = len(prompts), chain.frames
    g = torch.Generator().manual_seed(seed)
    context = chain.text_encoder.encode(prompts) if chain.text_encoder is not None else None
    bar = (lambda it: tqdm(it, leave=False, desc="denoise")) if progress else None

    video = ddim_sample(_base_denoiser(chain), (b, chain.channels, frames, stages[0], stages[0]), context,
                        null_context(chain.base, b), steps=steps, guidance=guidance, generator=g, progress=bar,
                        clip=chain.codec is None, schedule=noise_schedule_of(chain.base))
    if chain.codec is not None:
        return chain.codec.decode(video)
    for r in stages[1:]:
        level = torch.full((b,), aug_level)
        low = noise_augment(video, level, generator=g)
        sub = chain.ssr_subnet(r)
        denoiser = bind_subnet(chain.ssr, sub) if sub is not None else chain.ssr
        video = ddim_sample(denoiser, (b, 3, frames, r, r), context, null_context(chain.ssr, b),
                            steps=ssr_steps or steps, guidance=guidance, generator=g, progress=bar,
                            schedule=noise_schedule_of(chain.ssr), low_res=low, noise_level=level)
    return video
