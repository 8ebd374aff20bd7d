"""A video UNet assembled from diffusion blocks, built from a plain spec (diffusers style).

The same class is the supernet (built from the full spec, run at an active spec) and an extracted static
subnet (built from the active spec, run at its own). ``forward`` takes the spec explicitly. Input embeddings
beyond the paper are named extras of ``spec.conditioning``, held in one module (see ``conditioning``).
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
from torch.utils.checkpoint import checkpoint

from .blocks import FULL, BlockSpec, DiffusionBlock, DynamicModule, ResSpec
from .conditioning import ConditioningExtras, upgrade_config, upgrade_legacy_keys_hook, validate_conditioning
from .config import SubnetConfig
from .ops import DynamicConv, DynamicGroupNorm


@dataclass(frozen=True)
class UNetSpec:
    """Every size of a video UNet. Widths are channel counts; heads are counts (head dim fixed)."""

    in_channels: int  # channels of the noisy sample
    out_channels: int  # channels of the prediction
    cond_channels: int  # channels of the upsampled low-res video concatenated to the input (SSR); 0 = none
    noise_cond: bool  # embed a noise-augmentation level (SSR)
    model_channels: int  # sinusoidal timestep embedding size
    temb_dim: int
    context_dim: int  # text-token dim; 0 = unconditional
    context_len: int
    head_dim: int
    group_size: int
    max_frames: int
    temporal_conv: bool
    scale_shift: bool
    padding_mode: str
    conv_in: int  # width after conv_in (= first encoder stream)
    down: tuple[tuple[BlockSpec, ...], ...]  # per level
    down_widths: tuple[int, ...]  # stream width per encoder level (downsamplers run at it)
    mid: tuple[BlockSpec, ...]
    up: tuple[tuple[BlockSpec, ...], ...]  # per level, index = level (level 0 = full resolution)
    up_widths: tuple[int, ...]
    conditioning: tuple[str, ...] = ()  # names of the extra input embeddings (see ``conditioning``)

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditioning", validate_conditioning(self.conditioning, self.context_dim))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetSpec:
        def block(b: dict) -> BlockSpec:
            res = b["res"]
            res = (
                ResSpec(tuple(res["in_sizes"]), res["hidden"], res["out"], res["skip_conv"]) if res else None
            )
            return BlockSpec(**{**b, "res": res})

        d = upgrade_config(d)  # configs saved before the extras were named
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

    ``frames`` is the clip length the model generates by default (``None``: ``spec.max_frames``);
    ``subnet_config`` the config an extracted subnet was cut at (``None`` for a supernet or a network built
    from a spec). Loading accepts the parameter names of checkpoints saved before the extras were named
    (see ``conditioning.legacy_key_map``).
    """

    def __init__(self, spec: UNetSpec, frames: int | None = None, subnet: SubnetConfig | None = None):
        super().__init__()
        self.spec = spec
        self.frames: int = spec.max_frames if frames is None else frames
        self.subnet_config: SubnetConfig | None = subnet
        s = spec
        self.time_embed = nn.Sequential(
            nn.Linear(s.model_channels, s.temb_dim), nn.SiLU(), nn.Linear(s.temb_dim, s.temb_dim)
        )
        self.noise_embed = (
            nn.Sequential(
                nn.Linear(s.model_channels, s.temb_dim), nn.SiLU(), nn.Linear(s.temb_dim, s.temb_dim)
            )
            if s.noise_cond
            else None
        )
        if s.context_dim:
            self.null_text = nn.Parameter(torch.randn(1, s.context_len, s.context_dim) * 0.02)
        self.conv_in = DynamicConv(
            s.in_channels + s.cond_channels, s.conv_in, (1, 3, 3), padding_mode=s.padding_mode
        )

        def blocks(specs):
            return nn.ModuleList(
                DiffusionBlock(
                    b,
                    s.temb_dim,
                    s.context_dim,
                    s.head_dim,
                    s.group_size,
                    s.max_frames,
                    s.temporal_conv,
                    s.scale_shift,
                    s.padding_mode,
                )
                for b in specs
            )

        self.down = nn.ModuleList(blocks(level) for level in s.down)
        self.downsample = nn.ModuleList(
            DynamicConv(w, w, (1, 3, 3), stride=2, padding_mode=s.padding_mode) for w in s.down_widths[:-1]
        )
        self.mid = blocks(s.mid)
        self.up = nn.ModuleList(blocks(level) for level in s.up)
        self.upsample = nn.ModuleList(
            DynamicConv(w, w, (1, 3, 3), padding_mode=s.padding_mode) for w in s.up_widths[1:]
        )
        self.norm_out = DynamicGroupNorm(s.up_widths[0], s.group_size)
        self.conv_out = DynamicConv(s.up_widths[0], s.out_channels, (1, 3, 3), padding_mode=s.padding_mode)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # Built last, so the random init of the rest does not depend on which extras the spec names.
        self.conditioning = ConditioningExtras(s)
        self.register_load_state_dict_pre_hook(upgrade_legacy_keys_hook)
        self.activation_checkpointing = False
        self._checkpoint_kwargs: dict = {}

    def set_activation_checkpointing(self, enabled: bool = True, context_fn=None) -> None:
        """Recompute each diffusion block in backward instead of saving its activations: a training step
        then keeps only the blocks' inputs (plus one block's activations while it is recomputed), at the
        cost of a second forward of every block. Gradients are unchanged (non-reentrant checkpointing
        reruns the same ops on the same inputs). Has no effect without autograd (generation).

        ``context_fn`` is passed to ``torch.utils.checkpoint.checkpoint``: a tool whose Python modes must
        also see the recompute (``harness.memory``'s autocast emulation) re-enters them there."""
        self.activation_checkpointing = bool(enabled)
        self._checkpoint_kwargs = {"context_fn": context_fn} if context_fn is not None else {}

    def _block(self, block: DiffusionBlock, x, temb, context, block_spec: BlockSpec) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(
                block, x, temb, context, block_spec, use_reentrant=False, **self._checkpoint_kwargs
            )
        return block(x, temb, context, block_spec)

    # -- sizes ---------------------------------------------------------------------------------------
    def plan(self, spec: UNetSpec) -> dict[str, object]:
        p: dict[str, object] = {
            "time_embed": FULL,
            "conv_in": ((spec.in_channels + spec.cond_channels,), spec.conv_in),
            "norm_out": (spec.up_widths[0],),
            "conv_out": ((spec.up_widths[0],), spec.out_channels),
        }
        if self.noise_embed is not None:
            p["noise_embed"] = FULL
        p.update(self.conditioning.plan(spec))
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
            ranges = (
                {n: (None,) * p.dim() for n, p in child.named_parameters()}
                if child_spec is FULL
                else child.param_ranges(child_spec)
            )
            out.update({f"{path}.{n}": r for n, r in ranges.items()})
        return out

    # -- forward -------------------------------------------------------------------------------------
    def embed(
        self,
        timestep: torch.Tensor,
        noise_level: torch.Tensor | None,
        batch: int,
        frames: int,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Time (+ noise-augmentation level) embedding ``(B, temb_dim)``, then the conditioning extras'
        additions (text tokens ``context`` ``(B, L, D)``): ``(B, temb_dim)`` or per frame
        ``(B, T, temb_dim)``."""
        t = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(-1)
        temb = self.time_embed(
            get_timestep_embedding(
                t, self.spec.model_channels, flip_sin_to_cos=True, downscale_freq_shift=0
            ).to(self.conv_in.weight.dtype)
        )
        if self.noise_embed is not None:
            if noise_level is None:
                noise_level = torch.zeros(batch, device=temb.device)
            level = noise_level.reshape(-1).expand(batch) if noise_level.numel() == 1 else noise_level
            emb = get_timestep_embedding(
                level.float() * 1000, self.spec.model_channels, flip_sin_to_cos=True, downscale_freq_shift=0
            )
            temb = temb + self.noise_embed(emb.to(temb.dtype))
        return self.conditioning.time_embedding(temb, context, frames)

    def text_context(self, encoder_hidden_states: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if not self.spec.context_dim:
            return None
        if encoder_hidden_states is None:
            return self.null_text.expand(batch, -1, -1)
        return encoder_hidden_states.to(self.null_text.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        spec: UNetSpec | None = None,
    ) -> torch.Tensor:
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
            up = F.interpolate(
                low_res.transpose(1, 2).reshape(b * t, -1, *low_res.shape[-2:]),
                size=(h, w),
                mode="bilinear",
                align_corners=False,
            )  # (B*T, 3, H, W)
            x = torch.cat([x, up.reshape(b, t, -1, h, w).transpose(1, 2)], dim=1)
        x = self.conditioning.features(self.conv_in(x, p["conv_in"]), temb, context, spec)  # (B, C, T, H, W)
        skips = [x]
        for level, level_specs in enumerate(spec.down):
            for i, block_spec in enumerate(level_specs):
                x = self._block(self.down[level][i], x, temb, context, block_spec)
                skips.append(x)
            if level < len(spec.down) - 1:
                x = self.downsample[level](x, p[f"downsample.{level}"])
                skips.append(x)
        for i, block_spec in enumerate(spec.mid):
            x = self._block(self.mid[i], x, temb, context, block_spec)
        for level in reversed(range(len(spec.up))):
            for i, block_spec in enumerate(spec.up[level]):
                x = torch.cat([x, skips.pop()], dim=1)  # [h | skip]
                x = self._block(self.up[level][i], x, temb, context, block_spec)
            if level > 0:
                bt = x.shape[0] * x.shape[2]
                x = (
                    F.interpolate(
                        x.transpose(1, 2).reshape(bt, x.shape[1], *x.shape[-2:]),
                        scale_factor=2,
                        mode="nearest",
                    )
                    .reshape(x.shape[0], x.shape[2], x.shape[1], x.shape[3] * 2, x.shape[4] * 2)
                    .transpose(1, 2)
                )
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
