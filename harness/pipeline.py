"""Text-to-video generation through the pixel chain: base model, then the SSR model applied recursively;
or, for a latent family, the latent denoiser followed by the autoencoder's decoder.

``generate`` works with supernets at given subnets and with extracted static subnets alike; the metrics
(FVD, latency of a whole generation) call it, and so does ``python -m harness.sample``. A trajectory
schedule (``Chain.base_segments``, issue 20) runs a different base subnet for different sampling steps:
sliced from the one supernet, or from the static networks an exported schedule holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from harness.candidates import Segment
from harness.device_policy import DevicePolicy
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
    unconditional). A latent base model's codec decodes its samples to pixels. ``policy``: the device
    and precision generation runs under (``harness.device_policy``; ``None``: fp32 on the device the
    base network's weights are on); the models must be there already (``DevicePolicy.place``).

    ``base_segments`` (a trajectory candidate's ``Candidate.segments``; empty: ``base_subnet`` at every
    step): segment ``Segment(first, last, subnet)`` runs ``subnet`` of the base supernet at steps
    ``first .. last`` (1-based, sampling order), sliced per step with no weight copy. ``base_networks``
    (an exported schedule; empty for a supernet): one static network per segment, aligned with
    ``base_segments``, run in its place; ``base`` is then the first segment's bundle (schedule, codec,
    frames) and each segment's ``subnet`` records what its network was cut at. ``generate`` must be
    given the schedule's step count."""

    base: ModelBundle
    ssr: ModelBundle | None = None
    text_encoder: object | None = None
    base_subnet: SubnetConfig | None = None
    ssr_subnets: dict[int, SubnetConfig] = field(default_factory=dict)
    policy: DevicePolicy | None = None
    base_segments: tuple[Segment, ...] = ()
    base_networks: tuple[torch.nn.Module, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.base, ModelBundle):
            self.base = in_memory(self.base)
        if self.ssr is not None and not isinstance(self.ssr, ModelBundle):
            self.ssr = in_memory(self.ssr)
        self.base_segments = tuple(self.base_segments)
        self.base_networks = tuple(self.base_networks)
        if self.base_networks and len(self.base_networks) != len(self.base_segments):
            raise ValueError(
                f"got {len(self.base_networks)} static networks for {len(self.base_segments)} segments; "
                "give one per segment"
            )
        if self.base_segments and not self.base_networks and not isinstance(self.base.network, Supernet):
            raise ValueError(
                "a schedule of subnets needs a supernet base; for static subnets pass one per segment "
                "as base_networks"
            )
        first = self.base_segments[0].subnet if self.base_segments else None
        if first is not None and self.base_subnet is not None and self.base_subnet != first:
            raise ValueError(
                "base_subnet is not the first segment's subnet; leave base_subnet unset for a schedule"
            )

    @property
    def run_policy(self) -> DevicePolicy:
        if self.policy is not None:
            return self.policy
        param = next(self.base.network.parameters(), None)
        return DevicePolicy(str(param.device) if param is not None else "cpu")

    @property
    def codec(self) -> LatentCodec | None:
        return self.base.codec

    @property
    def channels(self) -> int:
        """Channels the base model denoises (3 for pixels, the latent channels otherwise)."""
        return self.base.channels

    @property
    def base_resolution(self) -> int:
        cfg = self.base_subnet or (self.base_segments[0].subnet if self.base_segments else None)
        return cfg.resolution if cfg is not None else self.base.default_resolution

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


VIDEO_STREAM = 0x5EED_F00D  # tags the per-video seed stream apart from any other use of (seed, index)


def video_seed(seed: int, index: int) -> int:
    """Seed of generated video ``index`` of a set seeded by ``seed``: a hash of ``(seed, index)`` only, so
    video ``index`` is the same whatever the set's size and batching (the prefix property that common
    random numbers and reuse between fidelities rely on). 63 bits, fit for ``torch.Generator.manual_seed``."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    state = np.random.SeedSequence([VIDEO_STREAM, seed, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def video_seeds(seed: int, start: int, stop: int) -> list[int]:
    """``video_seed(seed, i)`` for ``i`` in ``start .. stop - 1``."""
    return [video_seed(seed, i) for i in range(start, stop)]


class _Noise:
    """Where a generation's random draws come from: one generator for the whole batch (``seed``, the
    original behaviour, bit-identical), or one generator per video (``video_seeds``), each drawing its
    video's slice of every random tensor in the same order as the batched draw. Draws are made on the
    CPU (so a seed gives the same noise on every device) and moved to ``device``."""

    def __init__(self, batch: int, seed: int, per_video: Sequence[int] | None, device: torch.device):
        if per_video is not None and len(per_video) != batch:
            raise ValueError(f"got {len(per_video)} video seeds for {batch} prompts; give one per prompt")
        self.device = device
        cpu = torch.device("cpu")
        self.shared = torch.Generator(cpu).manual_seed(seed) if per_video is None else None
        self.own = (
            [torch.Generator(cpu).manual_seed(int(s)) for s in per_video] if per_video is not None else []
        )

    @property
    def generator(self) -> torch.Generator | None:
        """The batch generator for steps that draw later (None per video: DDIM with eta 0 draws nothing)."""
        return self.shared

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.shared is not None:
            return torch.randn(shape, generator=self.shared, device="cpu").to(self.device)
        draws = [torch.randn((1, *shape[1:]), generator=g, device="cpu") for g in self.own]
        return torch.cat(draws).to(self.device)


def _base_denoiser(chain: Chain, steps: int):
    """The base model's denoiser: one callable, or for a schedule one per step (``ddim_sample``)."""
    net = chain.base.network
    if chain.base_segments:
        return _per_step_denoisers(chain, steps)
    if isinstance(net, Supernet):
        return bind_subnet(net, chain.base_subnet or net.space.largest())
    return net


def _per_step_denoisers(chain: Chain, steps: int) -> list:
    """``chain.base_segments`` unrolled to one denoiser per step: the segment's subnet bound to the one
    supernet (a slicing closure, no copy) or its static network, repeated over the segment's steps."""
    segments = chain.base_segments
    if segments[-1].last != steps:
        raise ValueError(
            f"the schedule's segments end at step {segments[-1].last} but generation runs {steps} "
            f"steps; pass steps={segments[-1].last} (the schedule's step count)"
        )
    out, expected = [], 1
    for i, seg in enumerate(segments):
        if seg.first != expected or seg.last < seg.first:
            raise ValueError(
                f"segment {i + 1} covers steps {seg.first}-{seg.last} but the schedule is at step "
                f"{expected}; segments must cover 1 .. {steps} in order (build them with Candidate.schedule)"
            )
        net = chain.base_networks[i] if chain.base_networks else bind_subnet(chain.base.network, seg.subnet)
        out.extend([net] * seg.steps)
        expected = seg.last + 1
    return out


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
    video_seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Generate one video per prompt: ``(B, 3, T, R, R)`` in [-1, 1]. Deterministic by ``seed``.

    ``video_seeds`` (one per prompt; e.g. :func:`video_seeds`) seeds every video on its own instead:
    its initial noise and SSR augmentation noise then do not depend on the other videos of the batch
    (``seed`` is ignored), so a video can be regenerated alone or in another batch. Batching still moves
    results by the float round-off of batched kernels (up to 2.4e-6 between batches of 16 and 4 on a
    2-core Xeon: 4 of 147,456 values one 8-bit level apart).

    ``steps``: the base denoiser's DDIM steps (a schedule's own count when ``chain.base_segments`` is
    set: anything else is a ``ValueError``); ``ssr_steps``: each SSR stage's (``None``: ``steps``).

    With a latent codec, ``resolution`` is the latent size and the decoded video is
    ``(B, 3, T * d_t, R * d_h, R * d_w)``. Runs on ``chain.run_policy``'s device and precision; the
    video is float32 on that device."""
    policy = chain.run_policy
    with policy.autocast():
        return _generate(chain, prompts, resolution, steps, ssr_steps, guidance, seed, aug_level,
                         progress, video_seeds, policy.torch_device).float()  # fmt: skip


def _generate(chain, prompts, resolution, steps, ssr_steps, guidance, seed, aug_level, progress, video_seeds,
              device: torch.device) -> torch.Tensor:  # fmt: skip
    resolution = resolution or chain.base_resolution
    stages = chain.stages(resolution)
    b, frames = len(prompts), chain.frames
    noise = _Noise(b, seed, video_seeds, device)
    g = noise.generator
    context = chain.text_encoder.encode(prompts).to(device) if chain.text_encoder is not None else None
    bar = (lambda it: tqdm(it, leave=False, desc="denoise")) if progress else None

    shape = (b, chain.channels, frames, stages[0], stages[0])
    video = ddim_sample(
        _base_denoiser(chain, steps),
        shape,
        context,
        null_context(chain.base.network, b),
        steps=steps,
        guidance=guidance,
        generator=g,
        progress=bar,
        clip=chain.codec is None,
        schedule=chain.base.schedule,
        noise=noise.randn(shape),
        device=device,
    )
    if chain.codec is not None:
        return chain.codec.decode(video)
    for r in stages[1:]:
        level = torch.full((b,), aug_level, device=device)
        low = noise_augment(video, level, noise=noise.randn(tuple(video.shape)))
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
            noise=noise.randn((b, 3, frames, r, r)),
            device=device,
        )
    return video
