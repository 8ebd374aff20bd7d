"""``Supernet``: a ``VideoUNet`` at full size plus its search space, exact counting, masks and extraction."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from .config import SubnetConfig
from .ops import ranges_numel, take
from .plan import UNetHyper, UNetPlan
from .space import SearchSpace
from .unet import UNetSpec, VideoUNet, load_weights, save_module


class Supernet(VideoUNet):
    """Weight-sharing supernet of one family preset.

    ``set_active(cfg)`` chooses the subnet that ``forward`` runs (explicit, stored here only — operators
    keep no state); ``forward(..., subnet=cfg)`` overrides it for one call. ``extract(cfg)`` returns a
    standalone ``VideoUNet`` holding copies of that subnet's weights.
    """

    def __init__(self, family: str, preset: str, hyper: UNetHyper):
        self.unet_plan = UNetPlan(hyper)
        super().__init__(self.unet_plan.resolve(self._full_config(family, hyper)), frames=hyper.frames)
        self.family, self.preset, self.hyper = family, preset, hyper
        self.space = SearchSpace(
            family,
            list(self.unet_plan.layers.values()),
            self.unet_plan.blocks,
            hyper.resolutions,
            hyper.size_caps,
            self.count_params,
            text_path="temporal_cross" if hyper.context_dim else None,
        )
        self.active: SubnetConfig | None = None

    def _full_config(self, family: str, hyper: UNetHyper) -> SubnetConfig:
        keep = {b.name: {c: True for c in b.components} for b in self.unet_plan.blocks}
        return SubnetConfig.create(
            family, hyper.resolutions[0], {n: 1.0 for n in self.unet_plan.layers}, keep
        )

    # -- subnets -------------------------------------------------------------------------------------
    def set_active(self, cfg: SubnetConfig | None) -> None:
        self.active = None if cfg is None else self.space.validate(cfg)

    def spec_for(self, cfg: SubnetConfig) -> UNetSpec:
        return self.unet_plan.resolve(cfg)

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states=None,
        low_res=None,
        noise_level=None,
        subnet: SubnetConfig | None = None,
        spec: UNetSpec | None = None,
    ):
        if spec is None:
            cfg = subnet or self.active
            spec = self.spec if cfg is None else self.unet_plan.resolve(cfg)
        return super().forward(sample, timestep, encoder_hidden_states, low_res, noise_level, spec=spec)

    def active_ranges(self, cfg: SubnetConfig) -> dict:
        return self.param_ranges(self.unet_plan.resolve(cfg))

    def count_params(self, cfg: SubnetConfig) -> int:
        """Exact number of parameters of the subnet (equals ``extract(cfg)``'s count)."""
        shapes = {n: p.shape for n, p in self.named_parameters()}
        return sum(ranges_numel(r, shapes[n]) for n, r in self.active_ranges(cfg).items())

    def active_masks(self, cfg: SubnetConfig) -> dict[str, torch.Tensor]:
        """Boolean mask per parameter the subnet uses (True = entry belongs to it); unused ones absent."""
        params = dict(self.named_parameters())
        masks = {}
        for name, ranges in self.active_ranges(cfg).items():
            mask = torch.zeros_like(params[name], dtype=torch.bool)
            idx = torch.arange(mask.numel(), device=mask.device).view(mask.shape)
            mask.view(-1)[take(idx, ranges).reshape(-1)] = True
            masks[name] = mask
        return masks

    def active_regions(self, cfg: SubnetConfig) -> dict[str, list[tuple[slice, ...]]]:
        """Like ``active_masks``, as disjoint boxes instead of masks: per parameter, the blocks
        ``(slice(a0, b0), slice(a1, b1), ...)`` the subnet uses - one leading block for first-k slicing,
        one per segment for a decoder input ``[h | skip]``. No tensor is built; ``MaskedAdamW``,
        ``MaskedEMA`` and ``masked_clip_grad_norm_`` update such regions in place."""
        shapes = {name: p.shape for name, p in self.named_parameters()}
        regions = {}
        for name, ranges in self.active_ranges(cfg).items():
            shape = shapes[name]
            dims = [
                [(0, shape[d])] if d >= len(ranges) or ranges[d] is None else ranges[d]
                for d in range(len(shape))
            ]
            regions[name] = [tuple(slice(a, b) for a, b in block) for block in itertools.product(*dims)]
        return regions

    def extract(self, cfg: SubnetConfig) -> VideoUNet:
        """A static ``VideoUNet`` of the subnet with copied weights (same forward signature)."""
        cfg = self.space.validate(cfg)
        spec = self.unet_plan.resolve(cfg)
        ranges = self.param_ranges(spec)
        with torch.device("meta"):
            static = VideoUNet(spec, frames=self.frames, subnet=cfg)
        static = static.to_empty(device=self.conv_in.weight.device).to(self.conv_in.weight.dtype)
        params = dict(self.named_parameters())
        own = dict(static.named_parameters())
        if set(own) != set(ranges):
            raise RuntimeError(f"extraction mismatch: {sorted(set(own) ^ set(ranges))[:5]}")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(take(params[name], ranges[name]))
        return static

    # -- inputs --------------------------------------------------------------------------------------
    def dummy_inputs(
        self, cfg: SubnetConfig | None = None, batch_size: int = 1, frames: int | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Keyword inputs of one forward at ``cfg``'s resolution (random, seeded)."""
        cfg = cfg or self.space.largest()
        return make_dummy_inputs(
            self.spec, cfg.resolution, frames or self.frames, batch_size, seed, self.conv_in.weight.device
        )

    # -- persistence ---------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "kind": "supernet",
            "family": self.family,
            "preset": self.preset,
            "hyper": self.hyper.to_dict(),
        }

    def save_pretrained(self, directory: str | Path) -> None:
        save_module(self, directory, self.config_dict())


def make_dummy_inputs(
    spec: UNetSpec, resolution: int, frames: int, batch_size: int, seed: int, device=None
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = resolution
    inputs = {
        "sample": torch.randn(batch_size, spec.in_channels, frames, r, r, generator=g),
        "timestep": torch.randint(0, 1000, (batch_size,), generator=g),
    }
    if spec.context_dim:
        inputs["encoder_hidden_states"] = torch.randn(
            batch_size, spec.context_len, spec.context_dim, generator=g
        )
    if spec.cond_channels:
        inputs["low_res"] = torch.randn(batch_size, spec.cond_channels, frames, r // 2, r // 2, generator=g)
    if spec.noise_cond:
        inputs["noise_level"] = torch.rand(batch_size, generator=g)
    return {k: v.to(device) for k, v in inputs.items()} if device is not None else inputs


def static_config_dict(model: VideoUNet) -> dict:
    cfg = model.subnet_config
    return {
        "kind": "subnet",
        "spec": model.spec.to_dict(),
        "frames": model.frames,
        "subnet": None if cfg is None else cfg.to_dict(),
    }


def save_static(model: VideoUNet, directory: str | Path, extra: dict | None = None) -> None:
    """Save an extracted subnet (safetensors + config.json) for ``load_static``; ``extra`` goes into
    config.json too (e.g. the supernet's text encoder and noise schedule)."""
    save_module(model, directory, (extra or {}) | static_config_dict(model))


def load_static(directory: str | Path) -> VideoUNet:
    config = json.loads((Path(directory) / "config.json").read_text())
    if config.get("kind") != "subnet":
        raise ValueError(f"{directory} does not hold an extracted subnet (kind={config.get('kind')!r})")
    subnet = SubnetConfig.from_dict(config["subnet"]) if config.get("subnet") else None
    model = VideoUNet(UNetSpec.from_dict(config["spec"]), frames=config.get("frames"), subnet=subnet)
    model.load_state_dict(load_weights(directory))
    return model
