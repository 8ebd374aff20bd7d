"""A video UNet assembled from diffusion blocks, built from a plain spec (diffusers style).

The same class is the supernet (built from the full spec, run at an active spec) and an extracted static
subnet (built from the active spec, run at its own). ``forward`` takes the spec explicitly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file, save_file
from torch import nn

from .blocks import FULL, BlockSpec, DiffusionBlock, DynamicModule, ResSpec, zero_
from .ops import DynamicConv, DynamicGroupNorm

POSITION_BANDS = 2  # sin/cos of k*pi*x for k = 1..POSITION_BANDS, beside x and y themselves
POSITION_FEATURES = 2 + 4 * POSITION_BANDS


def position_features(height: int, width: int, device=None, dtype=None,
                      offset: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed features of the pixel-centre coordinates in ``[-1, 1]``: ``(1, POSITION_FEATURES, 1, H, W)``;
    with ``offset`` ``(B, 2, T)`` (x, y), of the coordinates minus that offset: ``(B, POSITION_FEATURES, T,
    H, W)``.

    Normalised coordinates, so the same features (and the projection that reads them) serve every
    resolution of a multi-resolution supernet.
    """
    y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (2.0 / height) - 1.0
    x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (2.0 / width) - 1.0
    y, x = y[:, None].expand(height, width), x[None, :].expand(height, width)
    if offset is not None:  # (B, T, H, W) each
        offset = offset.float()
        x, y = x - offset[:, 0, :, None, None], y - offset[:, 1, :, None, None]
    feats = [x, y]
    for k in range(1, POSITION_BANDS + 1):
        for c in (x, y):
            feats += [torch.sin(k * torch.pi * c), torch.cos(k * torch.pi * c)]
    if offset is not None:
        return torch.stack(feats, dim=1).to(dtype)  # (B, F, T, H, W)
    return torch.stack(feats)[None, :, None].to(dtype)  # (1, F, 1, H, W)


@dataclass(frozen=True)
class UNetSpec:
    """Every size of a video UNet. Widths are channel counts; heads are counts (head dim fixed)."""

    in_channels: int          # channels of the noisy sample
    out_channels: int         # channels of the prediction
    cond_channels: int        # channels of the upsampled low-res video concatenated to the input (SSR); 0 = none
    noise_cond: bool          # embed a noise-augmentation level (SSR)
    model_channels: int       # sinusoidal timestep embedding size
    temb_dim: int
    context_dim: int          # text-token dim; 0 = unconditional
    context_len: int
    head_dim: int
    group_size: int
    max_frames: int
    temporal_conv: bool
    scale_shift: bool
    padding_mode: str
    conv_in: int                           # width after conv_in (= first encoder stream)
    down: tuple[tuple[BlockSpec, ...], ...]  # per level
    down_widths: tuple[int, ...]           # stream width per encoder level (downsamplers run at it)
    mid: tuple[BlockSpec, ...]
    up: tuple[tuple[BlockSpec, ...], ...]  # per level, index = level (level 0 = full resolution)
    up_widths: tuple[int, ...]
    frame_embedding: bool = False          # absolute frame index in the time embedding
    pooled_text: bool = False              # mean text token in the time embedding (Imagen)
    position_embedding: bool = False       # projected pixel coordinates added after conv_in
    position_modulation: bool = False      # ... scaled and shifted per frame by the time embedding
    position_velocity: bool = False        # ... and of coordinates moving at a prompted velocity

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetSpec":
        def block(b: dict) -> BlockSpec:
            res = b["res"]
            res = ResSpec(tuple(res["in_sizes"]), res["hidden"], res["out"], res["skip_conv"]) if res else None
            return BlockSpec(**{**b, "res": res})

        d = dict(d)
        d["down"] = tuple(tuple(block(b) for b in level) for level in d["down"])
        d["up"] = tuple(tuple(block(b) for b in level) for level in d["up"])
        d["mid"] = tuple(block(b) for b in d["mid"])
        d["down_widths"] = tuple(d["down_widths"])
        d["up_widths"] = tuple(d["up_widths"])
        return cls(**d)


class VideoUNet(DynamicModule):
    """Text-conditioned video denoiser ``eps(sample, t, text[, low_res, noise_level])``.

    ``forward(sample (B, C, T, H, W), timestep (B,), encoder_hidden_states (B, L, D) | None,
    low_res (B, 3, T, h, w) | None, noise_level (B,) | None) -> (B, out_channels, T, H, W)``.
    ``encoder_hidden_states=None`` uses the learned null text embedding (classifier-free guidance).
    """

    def __init__(self, spec: UNetSpec):
        super().__init__()
        self.spec = spec
        s = spec
        self.time_embed = nn.Sequential(nn.Linear(s.model_channels, s.temb_dim), nn.SiLU(),
                                        nn.Linear(s.temb_dim, s.temb_dim))
        self.noise_embed = (nn.Sequential(nn.Linear(s.model_channels, s.temb_dim), nn.SiLU(),
                                          nn.Linear(s.temb_dim, s.temb_dim)) if s.noise_cond else None)
        if s.frame_embedding:  # zero at init: adding it to a trained network leaves its function unchanged
            self.frame_embed = nn.Parameter(torch.zeros(s.max_frames, s.temb_dim))
        if s.pooled_text:  # zero at init, like the frame embedding
            if not s.context_dim:
                raise ValueError("pooled_text needs a text-conditioned model (context_dim > 0)")
            self.pooled_text = zero_(nn.Linear(s.context_dim, s.temb_dim))
        if s.context_dim:
            self.null_text = nn.Parameter(torch.randn(1, s.context_len, s.context_dim) * 0.02)
        self.conv_in = DynamicConv(s.in_channels + s.cond_channels, s.conv_in, (1, 3, 3),
                                   padding_mode=s.padding_mode)
        if s.position_embedding:  # zero at init, like the frame embedding
            self.position_embed = zero_(DynamicConv(POSITION_FEATURES, s.conv_in, (1, 1, 1)))
        if s.position_modulation:  # zero at init: (1 + 0) * features + 0
            if not s.position_embedding:
                raise ValueError("position_modulation modulates the position embedding; set position_embedding")
            self.position_film = zero_(nn.Linear(s.temb_dim, 2 * POSITION_FEATURES))

        def blocks(specs):
            return nn.ModuleList(
                DiffusionBlock(b, s.temb_dim, s.context_dim, s.head_dim, s.group_size, s.max_frames,
                               s.temporal_conv, s.scale_shift, s.padding_mode) for b in specs)

        self.down = nn.ModuleList(blocks(level) for level in s.down)
        self.downsample = nn.ModuleList(DynamicConv(w, w, (1, 3, 3), stride=2, padding_mode=s.padding_mode)
                                        for w in s.down_widths[:-1])
        self.mid = blocks(s.mid)
        self.up = nn.ModuleList(blocks(level) for level in s.up)
        self.upsample = nn.ModuleList(DynamicConv(w, w, (1, 3, 3), padding_mode=s.padding_mode)
                                      for w in s.up_widths[1:])
        self.norm_out = DynamicGroupNorm(s.up_widths[0], s.group_size)
        self.conv_out = DynamicConv(s.up_widths[0], s.out_channels, (1, 3, 3), padding_mode=s.padding_mode)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        if s.position_velocity:  # zero at init, like the frame embedding; built last (others' init stays)
            if not (s.position_embedding and s.context_dim):
                raise ValueError("position_velocity needs position_embedding and a text-conditioned model")
            self.velocity = zero_(nn.Linear(s.context_dim, 2))
            self.moving_position_embed = zero_(DynamicConv(POSITION_FEATURES, s.conv_in, (1, 1, 1)))

    # -- sizes ---------------------------------------------------------------------------------------
    def plan(self, spec: UNetSpec) -> dict[str, object]:
        p: dict[str, object] = {"time_embed": FULL,
                                "conv_in": ((spec.in_channels + spec.cond_channels,), spec.conv_in),
                                "norm_out": (spec.up_widths[0],),
                                "conv_out": ((spec.up_widths[0],), spec.out_channels)}
        if self.noise_embed is not None:
            p["noise_embed"] = FULL
        if self.spec.position_embedding:
            p["position_embed"] = ((POSITION_FEATURES,), spec.conv_in)
        if self.spec.position_modulation:
            p["position_film"] = FULL
        if self.spec.pooled_text:
            p["pooled_text"] = FULL
        if self.spec.position_velocity:
            p["velocity"] = FULL
            p["moving_position_embed"] = ((POSITION_FEATURES,), spec.conv_in)
        for group, specs in (("down", spec.down), ("up", spec.up)):
            for level, level_specs in enumerate(specs):
                for i, block in enumerate(level_specs):
                    p[f"{group}.{level}.{i}"] = block
        for i, block in enumerate(spec.mid):
            p[f"mid.{i}"] = block
        for level, w in enumerate(spec.down_widths[:-1]):
            p[f"downsample.{level}"] = ((w,), w)
        for level, w in enumerate(spec.up_widths[1:]):
            p[f"upsample.{level}"] = ((w,), w)
        return p

    def param_ranges(self, spec: UNetSpec):
        # Children are addressed by dotted paths ("down.0.1"); resolve them through get_submodule.
        out = {name: (None,) * p.dim() for name, p in self._parameters.items() if p is not None}
        for path, child_spec in self.plan(spec).items():
            child = self.get_submodule(path)
            ranges = ({n: (None,) * p.dim() for n, p in child.named_parameters()} if child_spec is FULL
                      else child.param_ranges(child_spec))
            out.update({f"{path}.{n}": r for n, r in ranges.items()})
        return out

    # -- forward -------------------------------------------------------------------------------------
    def embed(self, timestep: torch.Tensor, noise_level: torch.Tensor | None, batch: int,
              frames: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """Time (+ noise-augmentation level, + pooled text tokens ``context`` ``(B, L, D)``) embedding
        ``(B, temb_dim)``; with ``frame_embedding`` ``(B, T, temb_dim)``, the frame's learned vector added.

        Why a frame embedding: temporal convolutions and relative-position attention are (up to the clip's
        edges) blind to *which* frame they are at, and the first denoising step of a zero-terminal-SNR
        schedule sees noise that is alike in every frame. Placing an object at ``x0 - v * t`` for a prompted
        direction needs ``t`` (and *where* a pixel is: see ``position_embedding`` in ``forward``)."""
        t = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(-1)
        temb = self.time_embed(get_timestep_embedding(t, self.spec.model_channels, flip_sin_to_cos=True,
                                                      downscale_freq_shift=0).to(self.conv_in.weight.dtype))
        if self.noise_embed is not None:
            if noise_level is None:
                noise_level = torch.zeros(batch, device=temb.device)
            level = noise_level.reshape(-1).expand(batch) if noise_level.numel() == 1 else noise_level
            emb = get_timestep_embedding(level.float() * 1000, self.spec.model_channels, flip_sin_to_cos=True,
                                         downscale_freq_shift=0)
            temb = temb + self.noise_embed(emb.to(temb.dtype))
        if self.spec.pooled_text:  # every ResBlock, also those of levels without cross-attention, sees the prompt
            temb = temb + self.pooled_text(context.mean(dim=1))
        if self.spec.frame_embedding:
            if frames > self.spec.max_frames:
                raise ValueError(f"{frames} frames exceed the model's max_frames {self.spec.max_frames}")
            temb = temb[:, None, :] + self.frame_embed[:frames]
        return temb

    def modulated_position(self, height: int, width: int, temb: torch.Tensor) -> torch.Tensor:
        """The coordinate features ``(1, F, 1, H, W)``; with ``position_modulation``, scaled and shifted per
        sample and frame by the time embedding ``(B, D)`` or ``(B, T, D)``: ``(B, F, T or 1, H, W)``.

        Why: a "moving left" object sits right of centre early and left of it late, so where it is depends
        on the product of position, frame and prompt; a shift of the x coordinate by an amount that depends
        on (frame, prompt) was meant to offer that product, but the amount is a linear map of a SiLU of
        the *sum* of the frame and prompt embeddings, which forms their product only weakly. It was added
        when the narrow subnets of the tiny base lagged the largest at following the direction; whether it
        or the training beside it brought the 40% subnet along was not separated. The space's smallest
        still ignored the direction: see ``moving_position``."""
        feats = position_features(height, width, temb.device, temb.dtype)
        if not self.spec.position_modulation:
            return feats
        film = self.position_film(F.silu(temb))  # (B, [T,] 2F)
        film = film[:, None] if film.dim() == 2 else film
        scale, shift = film.permute(0, 2, 1)[..., None, None].chunk(2, dim=1)  # (B, F, T', 1, 1) each
        return feats * (1 + scale) + shift

    def moving_position(self, height: int, width: int, frames: int, context: torch.Tensor) -> torch.Tensor:
        """The coordinate features in a frame of reference that moves at a velocity read (linearly) from the
        mean text token of ``context`` ``(B, L, D)``: ``(B, F, T, H, W)``, the offset zero at the clip's
        middle frame. The velocity is in coordinate units (the frame spans 2) per ``max_frames`` frames.

        Why: a subnet whose only text paths are the pooled prompt and one full-resolution cross-attention
        (the tiny base's smallest) could not learn from the position embedding and its modulation where a
        "moving left" object is at frame t: that needs the product of prompt and frame, which those paths
        form only through a SiLU of their sum: trained alone for 1,200 steps it still moved objects the
        prompted way in 19% of 32 videos (chance 25%). Here the product is formed explicitly (velocity times
        frame offset), and the subnet only has to place the object still, in coordinates that move with it,
        as it already does for colour and shape: the same 1,200 steps with this path took it to 78%."""
        velocity = self.velocity(context.mean(dim=1))  # (B, 2)
        tau = (torch.arange(frames, device=velocity.device, dtype=velocity.dtype) - (frames - 1) / 2)
        offset = velocity[:, :, None] * (tau / self.spec.max_frames)  # (B, 2, T)
        return position_features(height, width, velocity.device, self.conv_in.weight.dtype, offset=offset)

    def text_context(self, encoder_hidden_states: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if not self.spec.context_dim:
            return None
        if encoder_hidden_states is None:
            return self.null_text.expand(batch, -1, -1)
        return encoder_hidden_states.to(self.null_text.dtype)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                encoder_hidden_states: torch.Tensor | None = None, low_res: torch.Tensor | None = None,
                noise_level: torch.Tensor | None = None, spec: UNetSpec | None = None) -> torch.Tensor:
        spec = spec or self.spec
        b, _, t, h, w = sample.shape
        if h % (2 ** (len(spec.down) - 1)) or w % (2 ** (len(spec.down) - 1)):
            raise ValueError(f"resolution {h}x{w} must be divisible by {2 ** (len(spec.down) - 1)}")
        timestep = torch.as_tensor(timestep, device=sample.device)
        context = self.text_context(encoder_hidden_states, b)
        temb = self.embed(timestep, noise_level, b, t, context)
        p = self.plan(spec)
        x = sample
        if spec.cond_channels:
            if low_res is None:
                raise ValueError("this super-resolution model needs low_res=(B, 3, T, h, w)")
            up = F.interpolate(low_res.transpose(1, 2).reshape(b * t, -1, *low_res.shape[-2:]), size=(h, w),
                               mode="bilinear", align_corners=False)  # (B*T, 3, H, W)
            x = torch.cat([x, up.reshape(b, t, -1, h, w).transpose(1, 2)], dim=1)
        x = self.conv_in(x, p["conv_in"])
        if spec.position_embedding:
            # Why: convolutions are translation-equivariant and the spatial attention has no position, so
            # from the pure noise of the first zero-terminal-SNR step the network could place an object
            # where "moving left" puts it at frame t only through the zero padding; without this the tiny
            # base ignored the direction word. (B, C, T, H, W) + (1 or B, C, 1 or T, H, W).
            x = x + self.position_embed(self.modulated_position(h, w, temb), p["position_embed"])
        if spec.position_velocity:
            moving = self.moving_position(h, w, t, context)
            x = x + self.moving_position_embed(moving, p["moving_position_embed"])
        skips = [x]
        for level, level_specs in enumerate(spec.down):
            for i, block_spec in enumerate(level_specs):
                x = self.down[level][i](x, temb, context, block_spec)
                skips.append(x)
            if level < len(spec.down) - 1:
                x = self.downsample[level](x, p[f"downsample.{level}"])
                skips.append(x)
        for i, block_spec in enumerate(spec.mid):
            x = self.mid[i](x, temb, context, block_spec)
        for level in reversed(range(len(spec.up))):
            for i, block_spec in enumerate(spec.up[level]):
                x = torch.cat([x, skips.pop()], dim=1)  # [h | skip]
                x = self.up[level][i](x, temb, context, block_spec)
            if level > 0:
                bt = x.shape[0] * x.shape[2]
                x = F.interpolate(x.transpose(1, 2).reshape(bt, x.shape[1], *x.shape[-2:]), scale_factor=2,
                                  mode="nearest").reshape(x.shape[0], x.shape[2], x.shape[1],
                                                          x.shape[3] * 2, x.shape[4] * 2).transpose(1, 2)
                x = self.upsample[level - 1](x, p[f"upsample.{level - 1}"])
        x = F.silu(self.norm_out(x, p["norm_out"]))
        return self.conv_out(x, p["conv_out"])


def save_module(module: nn.Module, directory: str | Path, config: dict, weights_name: str = "model") -> None:
    """Write ``config.json`` + ``<weights_name>.safetensors`` atomically (temp files, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp_w = directory / f".{weights_name}.safetensors.tmp"
    tmp_c = directory / ".config.json.tmp"
    save_file(tensors, str(tmp_w))
    tmp_c.write_text(json.dumps(config, indent=1, sort_keys=True))
    tmp_w.replace(directory / f"{weights_name}.safetensors")
    tmp_c.replace(directory / "config.json")


def load_weights(directory: str | Path, weights_name: str = "model") -> dict[str, torch.Tensor]:
    path = Path(directory) / f"{weights_name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}: expected a directory written by save_pretrained")
    return load_file(str(path))
