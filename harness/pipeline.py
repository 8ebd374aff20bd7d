"""Text-to-video generation through the pixel chain: base model, then the SSR model applied recursively;
or, for a latent family, the latent denoiser followed by the autoencoder's decoder.

``generate`` works with supernets at given subnets and with extracted static subnets alike; the metrics
(FVD, latency of a whole generation) call it, and so does ``python -m harness.sample``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from harness.diffusion import bind_subnet, ddim_sample, noise_augment, null_context
from harness.latent import LatentCodec
from harness.models import ModelBundle, in_memory
from search_spaces import SubnetConfig, Supernet


@dataclass
class Chain:
    """The models of one pipeline. ``base_subnet``/``ssr_subnets`` pick subnets of supernets (None: the
    largest / a static model); ``ssr_subnets`` maps each output resolution to the SSR subnet run there.

    ``base`` and ``ssr`` are ``ModelBundle``s (a bare network is wrapped by ``harness.models.in_memory``:
    the paper's noise schedule, no codec); ``text_encoder`` is the loaded encoder (``None`` when
    unconditional). A latent base model's codec decodes its samples to pixels."""

    base: ModelBundle
    ssr: ModelBundle | None = None
    text_encoder: object | None = None
    base_subnet: SubnetConfig | None = None
    ssr_subnets: dict[int, SubnetConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.base, ModelBundle):
            self.base = in_memory(self.base)
        if self.ssr is not None and not isinstance(self.ssr, ModelBundle):
            self.ssr = in_memory(self.ssr)

    @property
    def codec(self) -> LatentCodec | None:
        return self.base.codec

    @property
    def channels(self) -> int:
        """Channels the base model denoises (3 for pixels, the latent channels otherwise)."""
        return self.base.channels

    @property
    def base_resolution(self) -> int:
        return self.base_subnet.resolution if self.base_subnet is not None else self.base.default_resolution

    @property
    def frames(self) -> int:
        return self.base.frames

    def stages(self, resolution: int) -> list[int]:
        """Output resolution of every stage: ``[base, 2*base, ...]`` up to ``resolution``."""
        out = [self.base_resolution]
        while out[-1] < resolution:
            out.append(out[-1] * 2)
        if out[-1] != resolution:
            raise ValueError(
                f"resolution {resolution} is not the base resolution {out[0]} times a power of 2"
            )
        if len(out) > 1 and self.codec is not None:
            raise ValueError(
                f"a latent model generates at its own latent sizes; resolution {resolution} is not {out[0]}"
            )
        if len(out) > 1 and self.ssr is None:
            raise ValueError(
                f"resolution {resolution} needs the super-resolution model; pass --ssr-checkpoint"
            )
        return out

    def ssr_subnet(self, resolution: int) -> SubnetConfig | None:
        ssr = self.ssr.network if self.ssr is not None else None
        if not isinstance(ssr, Supernet):
            return None
        if resolution in self.ssr_subnets:
            return self.ssr_subnets[resolution]
        largest = ssr.space.largest(resolution)
        return (
            largest
            if ssr.space.fits(largest)
            else ssr.space.subnet_at_fraction(ssr.space.size_caps[resolution], resolution)
        )


def _base_denoiser(chain: Chain):
    net = chain.base.network
    if isinstance(net, Supernet):
        return bind_subnet(net, chain.base_subnet or net.space.largest())
    return net


@torch.no_grad()
def generate(
    chain: Chain,
    prompts: list[str],
    resolution: int | None = None,
    steps: int = 20,
    ssr_steps: int | None = None,
    guidance: float = 3.0,
    seed: int = 0,
    aug_level: float = 0.2,
    progress: bool = False,
) -> torch.Tensor:
    """Generate one video per prompt: ``(B, 3, T, R, R)`` in [-1, 1]. Deterministic by ``seed``.

    With a latent codec, ``resolution`` is the latent size and the decoded video is
    ``(B, 3, T * d_t, R * d_h, R * d_w)``."""
    resolution = resolution or chain.base_resolution
    stages = chain.stages(resolution)
    b, frames = len(prompts), chain.frames
    g = torch.Generator().manual_seed(seed)
    context = chain.text_encoder.encode(prompts) if chain.text_encoder is not None else None
    bar = (lambda it: tqdm(it, leave=False, desc="denoise")) if progress else None

    video = ddim_sample(
        _base_denoiser(chain),
        (b, chain.channels, frames, stages[0], stages[0]),
        context,
        null_context(chain.base.network, b),
        steps=steps,
        guidance=guidance,
        generator=g,
        progress=bar,
        clip=chain.codec is None,
        schedule=chain.base.schedule,
    )
    if chain.codec is not None:
        return chain.codec.decode(video)
    for r in stages[1:]:
        level = torch.full((b,), aug_level)
        low = noise_augment(video, level, generator=g)
        sub = chain.ssr_subnet(r)
        ssr = chain.ssr.network
        denoiser = bind_subnet(ssr, sub) if sub is not None else ssr
        video = ddim_sample(
            denoiser,
            (b, 3, frames, r, r),
            context,
            null_context(ssr, b),
            steps=ssr_steps or steps,
            guidance=guidance,
            generator=g,
            progress=bar,
            schedule=chain.ssr.schedule,
            low_res=low,
            noise_level=level,
        )
    return video
