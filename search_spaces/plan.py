"""The symbolic plan of a supernet UNet: searchable layers, blocks, structural rules, and ``resolve``.

``UNetHyper`` is a preset (plain data). ``UNetPlan`` turns it into the search space's dimensions — one
channel ratio per searchable layer, keep flags per diffusion-block component — and resolves a
``SubnetConfig`` into the concrete ``UNetSpec`` that the network runs at. Structural rules live here:
widths along a residual stream share one layer (``down{l}.width``), a ResBlock whose input and output
streams differ (first block of a level, every decoder block reading ``[h | skip]``) cannot be dropped,
and every width is rounded to a multiple of the group-norm group size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .blocks import ATTENTIONS, BlockSpec, ResSpec
from .conditioning import upgrade_config, validate_conditioning
from .config import SubnetConfig
from .unet import UNetSpec


@dataclass(frozen=True)
class UNetHyper:
    """Hyperparameters of a supernet family preset (the full, largest network)."""

    model_channels: int = 40
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attentions: tuple[tuple[str, ...], ...] = (("temporal_self", "temporal_cross"), ATTENTIONS)  # per level
    mid_blocks: int = 1
    mid_attentions: tuple[str, ...] = ATTENTIONS
    head_dim: int = 8
    ff_mult: int = 2  # feed-forward hidden width per stream channel; 0 = no feed-forward
    group_size: int = 4
    temb_mult: int = 4
    in_channels: int = 3
    out_channels: int = 3
    cond_channels: int = 0
    noise_cond: bool = False
    context_dim: int = 384
    context_len: int = 8
    max_frames: int = 16
    frames: int = 12
    temporal_conv: bool = True
    conditioning: tuple[str, ...] = ()  # extra input embeddings, by registered name (see .conditioning)
    scale_shift: bool = False
    padding_mode: str = "zeros"
    resolutions: tuple[int, ...] = (16,)
    size_caps: tuple[float, ...] = (1.0,)  # max fraction of the supernet's parameters, per resolution

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditioning", validate_conditioning(self.conditioning, self.context_dim))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetHyper:
        """Inverse of ``to_dict``; also reads configs saved before the extras were named (legacy booleans)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        d = upgrade_config(d)
        d = {
            k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v)
            for k, v in d.items()
            if k in fields
        }
        return cls(**d)


@dataclass(frozen=True)
class Layer:
    """A searchable width: ``active(ratio)`` rounds ``ratio * full`` to a multiple of ``quantum``."""

    name: str
    full: int
    quantum: int

    def active(self, ratio: float) -> int:
        units = math.floor(ratio * self.full / self.quantum + 0.5)
        return min(self.full, max(self.quantum, units * self.quantum))


@dataclass(frozen=True)
class BlockPlan:
    """One diffusion block: its stream layer, ResBlock input segments, and which components exist."""

    name: str
    stream: str  # layer name of the residual stream width
    inputs: tuple[str, ...]  # layer names of the ResBlock's input segments ([h] or [h, skip])
    attentions: tuple[str, ...]
    droppable: tuple[str, ...] = field(default=())

    @property
    def skip_conv(self) -> bool:
        return self.inputs != (self.stream,)

    @property
    def components(self) -> tuple[str, ...]:
        return ("res",) + self.attentions


class UNetPlan:
    """Layers, blocks and the config -> ``UNetSpec`` resolution of one UNet supernet."""

    def __init__(self, hyper: UNetHyper):
        if len(hyper.attentions) != len(hyper.channel_mult):
            raise ValueError("attentions must list the attention components of every level")
        self.hyper = hyper
        self.layers: dict[str, Layer] = {}
        self.blocks: list[BlockPlan] = []
        self._build()

    def _width(self, name: str, full: int) -> str:
        self.layers[name] = Layer(name, full, self.hyper.group_size)
        return name

    def _block(self, name: str, stream: str, inputs: tuple[str, ...], attentions: tuple[str, ...]) -> None:
        h = self.hyper
        full = self.layers[stream].full
        self.layers[f"{name}.res"] = Layer(f"{name}.res", full, h.group_size)
        for att in attentions:
            self.layers[f"{name}.{att}"] = Layer(f"{name}.{att}", max(1, full // h.head_dim), 1)
        if attentions and h.ff_mult:  # ff_mult=0: no feed-forward (e.g. LVDM's attention blocks)
            self.layers[f"{name}.ff"] = Layer(f"{name}.ff", full * h.ff_mult, h.group_size)
        plan = BlockPlan(name, stream, inputs, tuple(attentions))
        droppable = (() if plan.skip_conv else ("res",)) + tuple(attentions)
        self.blocks.append(dataclasses.replace(plan, droppable=droppable))

    def _build(self) -> None:
        h = self.hyper
        levels = len(h.channel_mult)
        down = [self._width(f"down{l}.width", h.model_channels * m) for l, m in enumerate(h.channel_mult)]
        up = [self._width(f"up{l}.width", h.model_channels * m) for l, m in enumerate(h.channel_mult)]
        skips, current = [down[0]], down[0]  # conv_in runs at the first stream width
        for l in range(levels):
            for i in range(h.num_res_blocks):
                self._block(f"down{l}.{i}", down[l], (current,), h.attentions[l])
                current = down[l]
                skips.append(current)
            if l < levels - 1:
                skips.append(current)  # downsample output
        for i in range(h.mid_blocks):
            self._block(f"mid.{i}", current, (current,), h.mid_attentions)
        for l in reversed(range(levels)):
            for i in range(h.num_res_blocks + 1):
                self._block(f"up{l}.{i}", up[l], (current, skips.pop()), h.attentions[l])
                current = up[l]

    # -- resolution ----------------------------------------------------------------------------------
    def widths(self, cfg: SubnetConfig) -> dict[str, int]:
        ratios = cfg.ratio_map
        return {name: layer.active(ratios[name]) for name, layer in self.layers.items()}

    def block_spec(self, block: BlockPlan, widths: dict[str, int], keep: dict[str, bool]) -> BlockSpec:
        stream = widths[block.stream]
        res = None
        if keep.get("res", True) or "res" not in block.droppable:
            res = ResSpec(
                tuple(widths[i] for i in block.inputs), widths[f"{block.name}.res"], stream, block.skip_conv
            )
        heads = {a: widths[f"{block.name}.{a}"] if keep.get(a, True) else 0 for a in block.attentions}
        ff = widths.get(f"{block.name}.ff", 0) if any(heads.values()) else 0
        return BlockSpec(stream, res, ff=ff, **heads)

    def resolve(self, cfg: SubnetConfig) -> UNetSpec:
        """The concrete sizes a config runs at (assumes ``cfg`` was validated)."""
        h = self.hyper
        widths = self.widths(cfg)
        keep = cfg.keep_map
        specs = {b.name: self.block_spec(b, widths, keep.get(b.name, {})) for b in self.blocks}
        levels = len(h.channel_mult)
        return UNetSpec(
            in_channels=h.in_channels,
            out_channels=h.out_channels,
            cond_channels=h.cond_channels,
            noise_cond=h.noise_cond,
            model_channels=h.model_channels,
            temb_dim=h.model_channels * h.temb_mult,
            context_dim=h.context_dim,
            context_len=h.context_len,
            head_dim=h.head_dim,
            group_size=h.group_size,
            max_frames=h.max_frames,
            temporal_conv=h.temporal_conv,
            scale_shift=h.scale_shift,
            padding_mode=h.padding_mode,
            conv_in=widths["down0.width"],
            conditioning=h.conditioning,
            down=tuple(tuple(specs[f"down{l}.{i}"] for i in range(h.num_res_blocks)) for l in range(levels)),
            down_widths=tuple(widths[f"down{l}.width"] for l in range(levels)),
            mid=tuple(specs[f"mid.{i}"] for i in range(h.mid_blocks)),
            up=tuple(tuple(specs[f"up{l}.{i}"] for i in range(h.num_res_blocks + 1)) for l in range(levels)),
            up_widths=tuple(widths[f"up{l}.width"] for l in range(levels)),
        )
