"""Diffusion-block components built from the shared dynamic operators.

Each module takes an explicit *spec* (a frozen dataclass of active sizes) in ``forward``. ``plan(spec)``
maps every child to the sizes it runs at; the same plan gives ``param_ranges`` (see ``ops``), so slicing,
parameter counts, optimizer masks and extraction all come from one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ops import DynamicConv, DynamicGroupNorm, DynamicLayerNorm, DynamicLinear, Ranges, RelativePositionBias

FULL = "full"  # plan marker: the child runs at its full, fixed size (not searchable)


class DynamicModule(nn.Module):
    """A module whose children run at sizes given by ``plan(spec)``."""

    def plan(self, spec) -> dict[str, object]:
        raise TypeError(f"{type(self).__name__} must define plan(spec)")

    def param_ranges(self, spec) -> dict[str, Ranges]:
        """Active index ranges of every parameter that ``spec`` uses, by parameter name."""
        out: dict[str, Ranges] = {
            name: (None,) * p.dim() for name, p in self._parameters.items() if p is not None
        }
        for child_name, child_spec in self.plan(spec).items():
            child = getattr(self, child_name)
            if child_spec is FULL:
                ranges = {n: (None,) * p.dim() for n, p in child.named_parameters()}
            else:
                ranges = child.param_ranges(child_spec)
            out.update({f"{child_name}.{n}": r for n, r in ranges.items()})
        return out


def zero_(module: nn.Module) -> nn.Module:
    """Zero-initialise a residual branch's last layer so the branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


@dataclass(frozen=True)
class ResSpec:
    """Sizes of one ResBlock: input segments (``(h,)`` or ``(h, skip)``), hidden width, output width."""

    in_sizes: tuple[int, ...]
    hidden: int
    out: int
    skip_conv: bool  # structural: a 1x1 projection on the residual path (input width may differ)


class ResBlock(DynamicModule):
    """GroupNorm-SiLU-Conv(1x3x3) [+ temporal Conv(3x1x1)] + time embedding, GroupNorm-SiLU-Conv, residual.

    Input ``(B, sum(in_sizes), T, H, W)``, time embedding ``(B, temb_dim)`` or per frame ``(B, T, temb_dim)``;
    output ``(B, out, T, H, W)``.
    ``scale_shift`` uses the time embedding as ``norm(h) * (1 + scale) + shift`` (LVDM / ADM).
    """

    def __init__(
        self,
        full: ResSpec,
        temb_dim: int,
        group_size: int,
        temporal_conv: bool = True,
        scale_shift: bool = False,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = DynamicGroupNorm(full.in_sizes, group_size)
        self.conv1 = DynamicConv(full.in_sizes, full.hidden, (1, 3, 3), padding_mode=padding_mode)
        self.conv_t = zero_(DynamicConv(full.hidden, full.hidden, (3, 1, 1))) if temporal_conv else None
        emb_out = (full.hidden, full.hidden) if scale_shift else full.hidden
        self.emb = DynamicLinear(temb_dim, emb_out)
        self.norm2 = DynamicGroupNorm(full.hidden, group_size)
        self.conv2 = zero_(DynamicConv(full.hidden, full.out, (1, 3, 3), padding_mode=padding_mode))
        self.skip = DynamicConv(full.in_sizes, full.out, (1, 1, 1)) if full.skip_conv else None
        self.temb_dim = temb_dim

    def plan(self, spec: ResSpec) -> dict[str, object]:
        p = {
            "norm1": spec.in_sizes,
            "conv1": (spec.in_sizes, spec.hidden),
            "emb": ((self.temb_dim,), (spec.hidden, spec.hidden) if self.scale_shift else spec.hidden),
            "norm2": (spec.hidden,),
            "conv2": ((spec.hidden,), spec.out),
        }
        if self.conv_t is not None:
            p["conv_t"] = ((spec.hidden,), spec.hidden)
        if self.skip is not None:
            p["skip"] = (spec.in_sizes, spec.out)
        return p

    def forward(self, x: torch.Tensor, temb: torch.Tensor, spec: ResSpec) -> torch.Tensor:
        p = self.plan(spec)
        h = self.conv1(F.silu(self.norm1(x, p["norm1"])), p["conv1"])
        if self.conv_t is not None:
            h = h + self.conv_t(h, p["conv_t"])
        e = self.emb(F.silu(temb), p["emb"])
        # (B, hidden[*2], 1 or T, 1, 1)
        e = e[:, :, None, None, None] if e.dim() == 2 else e.transpose(1, 2)[:, :, :, None, None]
        if self.scale_shift:
            scale, shift = e.split(spec.hidden, dim=1)
            h = self.norm2(h, p["norm2"]) * (1 + scale) + shift
        else:
            h = self.norm2(h + e, p["norm2"])
        h = self.conv2(F.silu(h), p["conv2"])
        residual = self.skip(x, p["skip"]) if self.skip is not None else x
        return residual + h


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` with the bias folded into the dot product, so that SDPA runs
    without a mask and stays eligible for its flash kernel: a float mask rules flash out on CUDA, and on
    CPU whenever the mask needs a gradient - i.e. in every training step, where this is used (inference,
    FLOP counting and latency runs pass the bias as a mask: same maths, no extra channels).

    ``q, k, v`` ``(N, h, S, d)``, ``bias`` ``(h, S, S)``; returns ``(N, h, S, d)``. Queries get ``E`` extra
    channels holding the one-hot of their position ``i`` and keys the column ``bias[:, :, j] / scale``, so
    the extra channels add exactly ``bias[h, i, j]`` to the scaled score (``E = S`` rounded up to a multiple
    of 8, the kernels' head-dim granularity; the padding is zeros). Values get ``E`` zero channels (flash
    needs one head dim for q, k and v) that are dropped from the output. Costs ``E / d`` more q/k/v traffic
    (16 / 64 for the paper's temporal attention) and saves no ``(N, h, S, S)`` bias or probabilities.
    """
    n, h, s, d = q.shape
    scale = d**-0.5
    e = -(-s // 8) * 8
    pos = torch.arange(e, device=q.device)
    one_hot = (pos[:s, None] == pos[None, :]).to(q.dtype).expand(n, h, s, e)  # (N, h, S_i, E)
    columns = F.pad(bias.transpose(-1, -2) / scale, (0, e - s))  # (h, S_j, E): [h, j, i] = bias[h, i, j]
    q = torch.cat([q, one_hot], dim=-1)
    k = torch.cat([k, columns.expand(n, h, s, e)], dim=-1)
    v = F.pad(v, (0, e))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :d]


@dataclass(frozen=True)
class AttentionSpec:
    dim: int  # active width of the residual stream (queries, output)
    heads: int  # active number of heads; head dim is fixed


class Attention(DynamicModule):
    """Pre-norm multi-head attention with a fixed head dim and a searchable number of heads.

    Tokens ``(N, S, dim)``; ``context`` ``(N, L, context_dim)`` for cross-attention, else self-attention.
    ``max_frames`` adds a learned relative position bias (temporal attention). Uses
    ``scaled_dot_product_attention``. Returns the residual branch ``(N, S, dim)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        max_frames: int | None = None,
    ):
        super().__init__()
        inner = heads * head_dim
        self.head_dim = head_dim
        self.context_dim = context_dim
        self.norm = DynamicLayerNorm(dim)
        self.to_q = DynamicLinear(dim, inner, bias=False)
        self.to_k = DynamicLinear(context_dim or dim, inner, bias=False)
        self.to_v = DynamicLinear(context_dim or dim, inner, bias=False)
        self.to_out = zero_(DynamicLinear(inner, dim))
        self.rel_pos = RelativePositionBias(heads, max_frames) if max_frames else None

    def plan(self, spec: AttentionSpec) -> dict[str, object]:
        inner = spec.heads * self.head_dim
        kv_in = (self.context_dim,) if self.context_dim else (spec.dim,)
        p = {
            "norm": spec.dim,
            "to_q": ((spec.dim,), inner),
            "to_k": (kv_in, inner),
            "to_v": (kv_in, inner),
            "to_out": ((inner,), spec.dim),
        }
        if self.rel_pos is not None:
            p["rel_pos"] = spec.heads
        return p

    def forward(self, tokens: torch.Tensor, spec: AttentionSpec, context: torch.Tensor | None = None):
        p = self.plan(spec)
        h = self.norm(tokens, p["norm"])
        kv = h if context is None else context
        n, s, _ = h.shape
        q = self.to_q(h, p["to_q"]).view(n, s, spec.heads, self.head_dim).transpose(1, 2)  # (N, h, S, d)
        k = self.to_k(kv, p["to_k"]).view(n, kv.shape[1], spec.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(kv, p["to_v"]).view(n, kv.shape[1], spec.heads, self.head_dim).transpose(1, 2)
        if self.rel_pos is None:
            out = F.scaled_dot_product_attention(q, k, v)  # (N, h, S, d)
        else:
            bias = self.rel_pos(s, spec.heads).to(q.dtype)  # (h, S, S)
            if torch.is_grad_enabled() and bias.requires_grad:
                out = biased_attention(q, k, v, bias)
            else:
                # Without a bias gradient a broadcast (1, h, S, S) float mask is cheaper than folding it
                # in (no extra channels): CPU's flash kernel and CUDA's memory-efficient / cuDNN ones
                # take it (an (h, S, S) one would send CPU to the math kernel).
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        out = out.transpose(1, 2).reshape(n, s, spec.heads * self.head_dim)
        return self.to_out(out, p["to_out"])


@dataclass(frozen=True)
class FeedForwardSpec:
    dim: int
    hidden: int


class FeedForward(DynamicModule):
    """Pre-norm MLP ``LayerNorm -> Linear -> GELU -> Linear`` on tokens ``(N, S, dim)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = DynamicLayerNorm(dim)
        self.fc1 = DynamicLinear(dim, hidden)
        self.fc2 = zero_(DynamicLinear(hidden, dim))

    def plan(self, spec: FeedForwardSpec) -> dict[str, object]:
        return {"norm": spec.dim, "fc1": ((spec.dim,), spec.hidden), "fc2": ((spec.hidden,), spec.dim)}

    def forward(self, tokens: torch.Tensor, spec: FeedForwardSpec) -> torch.Tensor:
        p = self.plan(spec)
        return self.fc2(F.gelu(self.fc1(self.norm(tokens, p["norm"]), p["fc1"])), p["fc2"])


ATTENTIONS = ("spatial", "temporal_self", "temporal_cross")


@dataclass(frozen=True)
class BlockSpec:
    """One diffusion block: ResBlock (None = dropped) then attentions (active heads, 0 = dropped / absent)
    and a feed-forward (hidden width, 0 = dropped)."""

    stream: int
    res: ResSpec | None
    spatial: int = 0
    temporal_self: int = 0
    temporal_cross: int = 0
    ff: int = 0


class DiffusionBlock(DynamicModule):
    """ResBlock -> spatial attention -> temporal self-attention -> temporal cross-attention -> FF.

    Video ``(B, C, T, H, W)``; text tokens ``(B, L, context_dim)``. Every attention and the FF are residual.
    Built from a spec: the supernet from its full spec, an extracted subnet from the active one.
    """

    def __init__(
        self,
        full: BlockSpec,
        temb_dim: int,
        context_dim: int,
        head_dim: int,
        group_size: int,
        max_frames: int,
        temporal_conv: bool = True,
        scale_shift: bool = False,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        d = full.stream
        self.res = (
            ResBlock(full.res, temb_dim, group_size, temporal_conv, scale_shift, padding_mode)
            if full.res
            else None
        )
        self.spatial = Attention(d, full.spatial, head_dim) if full.spatial else None
        self.temporal_self = (
            Attention(d, full.temporal_self, head_dim, max_frames=max_frames) if full.temporal_self else None
        )
        self.temporal_cross = (
            Attention(d, full.temporal_cross, head_dim, context_dim=context_dim)
            if full.temporal_cross
            else None
        )
        self.ff = FeedForward(d, full.ff) if full.ff else None

    def plan(self, spec: BlockSpec) -> dict[str, object]:
        p: dict[str, object] = {}
        if spec.res:
            p["res"] = spec.res
        for name in ATTENTIONS:
            if getattr(spec, name):
                p[name] = AttentionSpec(spec.stream, getattr(spec, name))
        if spec.ff:
            p["ff"] = FeedForwardSpec(spec.stream, spec.ff)
        return p

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, spec: BlockSpec):
        p = self.plan(spec)
        if "res" in p:
            x = self.res(x, temb, p["res"])
        b, c, t, h, w = x.shape
        if "spatial" in p:
            tokens = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)  # (B*T, H*W, C)
            tokens = tokens + self.spatial(tokens, p["spatial"])
            x = tokens.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        if "temporal_self" in p:
            tokens = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)  # (B*H*W, T, C)
            tokens = tokens + self.temporal_self(tokens, p["temporal_self"])
            x = tokens.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)
        if "temporal_cross" in p or "ff" in p:
            tokens = x.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)  # (B, T*H*W, C)
            if "temporal_cross" in p:
                tokens = tokens + self.temporal_cross(tokens, p["temporal_cross"], context=context)
            if "ff" in p:
                tokens = tokens + self.ff(tokens, p["ff"])
            x = tokens.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return x
