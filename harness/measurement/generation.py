"""What one generated video runs through: the denoiser stages of a candidate and the once-per-video work.

Cost metrics (FLOPs, latency) and the protocol strings that name them read a candidate's generation from
here, so a pixel chain (base, then SSR per doubling) and a latent model (denoiser, then the decoder) are
told apart in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.candidates import Candidate
from harness.device_policy import DevicePolicy
from harness.models import ModelBundle
from harness.pipeline import Chain
from search_spaces import SubnetConfig, Supernet, make_dummy_inputs


@dataclass(frozen=True)
class DenoiserStage:
    """One denoiser of a generation, run ``steps`` times (twice per step under guidance): a whole stage,
    or one segment of a trajectory candidate's base denoiser (its steps only)."""

    name: str
    supernet: Supernet
    subnet: SubnetConfig
    resolution: int
    steps: int


@dataclass(frozen=True)
class OncePerVideo:
    """Work done once per generated video, after denoising (a latent model's decoder)."""

    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]


class Generation:
    """The generation of candidates of one (base [, SSR]) pipeline under given steps and guidance, on
    ``policy``'s device and precision (``None``: fp32 on the CPU). The bundles must be on that device
    already (``DevicePolicy.place``, done by ``Measurer``); nothing here moves a shared model."""

    def __init__(
        self,
        base: ModelBundle,
        ssr: ModelBundle | None,
        steps: int,
        guidance: float,
        policy: DevicePolicy | None = None,
    ):
        self.base, self.ssr, self.steps, self.guidance = base, ssr, steps, guidance
        self.policy = policy or DevicePolicy()

    @property
    def guided(self) -> bool:
        """Classifier-free guidance doubles each step's forwards; unconditional models run once."""
        return self.guidance != 1 and bool(self.base.network.spec.context_dim)

    @property
    def batch_per_forward(self) -> int:
        return 2 if self.guided else 1  # conditional + null text in one batch

    @property
    def frames(self) -> int:
        """Frames the denoisers run at (latent frames for a latent model)."""
        return self.base.frames

    @property
    def pixel_frames(self) -> int:
        codec = self.base.codec
        return codec.pixel_frames(self.frames) if codec is not None else self.frames

    def pixel_resolution(self, cand: Candidate) -> int:
        codec = self.base.codec
        return codec.pixel_resolution(cand.resolution) if codec is not None else cand.resolution

    def steps_of(self, cand: Candidate) -> int:
        """The base denoiser's sampling steps for ``cand``: its own (a trajectory candidate's) or the
        protocol's. SSR stages always run the protocol's steps."""
        return cand.steps or self.steps

    def denoisers(self, cand: Candidate) -> list[DenoiserStage]:
        """Every denoiser run of a generation with its step count: the base (one entry per segment of
        a trajectory candidate, named by its steps), then each SSR stage."""
        base, r0 = self.base.supernet, cand.base.resolution
        segments = cand.trajectory(self.steps)
        named = len(segments) > 1
        out = [
            DenoiserStage(
                f"{base.family}@{r0}" + (f"[steps {s.first}-{s.last}]" if named else ""),
                base,
                s.subnet,
                r0,
                s.steps,
            )
            for s in segments
        ]
        for r, cfg in cand.ssr_stages(r0).items():
            out.append(
                DenoiserStage(f"{self.ssr.supernet.family}@{r}", self.ssr.supernet, cfg, r, self.steps)
            )
        return out

    def once_per_video(self, cand: Candidate, device: str | torch.device = "cpu") -> list[OncePerVideo]:
        """The once-per-video work with its inputs on ``device`` (drawn on the CPU, seeded, then moved).
        The module is the bundle's own (shared with generation): a caller must not move it."""
        codec = self.base.codec
        if codec is None:
            return []
        shape = (1, codec.channels, self.frames, cand.resolution, cand.resolution)
        z = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(0), device="cpu")
        return [OncePerVideo("decode", codec.decoder_module(), {"latents": z.to(device)})]

    def stage_inputs(
        self, static: torch.nn.Module, resolution: int, batch: int, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Inputs of one forward of a stage's static subnet (random, seeded), on ``device``: drawn on the
        CPU (the same inputs on every device), then moved."""
        with torch.device("cpu"):  # make_dummy_inputs draws without device=: pin its default
            inputs = make_dummy_inputs(static.spec, resolution, self.frames, batch, seed=0)
        return {k: v.to(device) for k, v in inputs.items()}

    def suffix(self, cand: Candidate) -> str:
        """The generation's part of a protocol string, e.g. ``ddim8:cfg:16px:12f``. The steps named are
        the protocol's: a trajectory candidate that carries its own (``cand.steps``) runs those instead,
        and its key says so, so its rows never stand for another step count; one protocol per study
        keeps single-subnet and trajectory candidates in one front."""
        if self.base.codec is not None:  # latent size, then the decoded video's size
            return (
                f"ddim{self.steps}:nocfg:{cand.resolution}lat:{self.frames}f:"
                f"+decode:{self.pixel_resolution(cand)}px:{self.pixel_frames}f"
            )
        return f"ddim{self.steps}:{'cfg' if self.guided else 'nocfg'}:{cand.resolution}px:{self.frames}f"

    def chain(self, cand: Candidate, text_encoder) -> Chain:
        """The pipeline that generates ``cand``'s videos (``harness.pipeline.generate``)."""
        return Chain(self.base, self.ssr, text_encoder, cand.base, cand.ssr_stages(cand.base.resolution),
                     policy=self.policy, base_segments=cand.segments)  # fmt: skip
