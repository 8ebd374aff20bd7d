"""Dynamic operators shared by every supernet family.

Every operator holds the *full* weights and takes the active sizes of its input and output as explicit
arguments; it slices the first ``k`` channels of its weights in ``forward`` (views, no copies) and keeps no
state between calls. A layer that reads a concatenation ``[h | skip]`` declares its input as two
*segments*; the active input channels are then the first ``a`` of ``h`` and the first ``b`` of ``skip``.

Each operator also reports ``param_ranges(sizes)``: for each of its parameters, the active index ranges
along every dimension. That one description drives slicing, exact parameter counts, masks for the
frozen-rest optimizer and the weight copy of ``extract``, so the four can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Active index ranges of one parameter: per dimension a tuple of (start, stop) pairs, or None for "all".
DimRanges = tuple[tuple[int, int], ...] | None
Ranges = tuple[DimRanges, ...]


def segment_ranges(full_sizes: Sequence[int], active_sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """First-k ranges of each segment of a concatenated dimension, e.g. ``[h | skip]``."""
    if len(full_sizes) != len(active_sizes):
        raise ValueError(f"expected {len(full_sizes)} input segments, got {len(active_sizes)}")
    out, offset = [], 0
    for full, active in zip(full_sizes, active_sizes):
        if not 0 < active <= full:
            raise ValueError(f"active size {active} outside 1..{full}")
        out.append((offset, offset + active))
        offset += full
    return tuple(out)


def merge_ranges(dim_ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """Join ranges that touch, e.g. ``((0, 4), (4, 6)) -> ((0, 6),)``: an extracted static subnet's
    ``[h | skip]`` segments are stored back to back, so its slices are whole views and never copied."""
    out = [dim_ranges[0]]
    for start, stop in dim_ranges[1:]:
        if start == out[-1][1]:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return tuple(out)


def take(tensor: torch.Tensor, ranges: Ranges) -> torch.Tensor:
    """Slice ``tensor`` by ``ranges``; a single range per dim (after joining ranges that touch) is a view,
    several are concatenated (a supernet's decoder input at a partial ``[h | skip]``)."""
    for dim, dim_ranges in enumerate(ranges):
        if dim_ranges is None:
            continue
        dim_ranges = merge_ranges(dim_ranges)
        if len(dim_ranges) == 1:
            start, stop = dim_ranges[0]
            if start != 0 or stop != tensor.shape[dim]:
                tensor = tensor.narrow(dim, start, stop - start)
        else:
            tensor = torch.cat([tensor.narrow(dim, s, e - s) for s, e in dim_ranges], dim)
    return tensor


def _segments(size: int | Sequence[int]) -> tuple[int, ...]:
    return (size,) if isinstance(size, int) else tuple(size)


def ranges_numel(ranges: Ranges, shape: Sequence[int]) -> int:
    n = 1
    for dim_ranges, full in zip(ranges, shape):
        n *= full if dim_ranges is None else sum(e - s for s, e in dim_ranges)
    return n


class DynamicLinear(nn.Module):
    """Linear layer on the last dimension; input may be several concatenated segments.

    Sizes: ``(in_sizes, out_sizes)``. Input ``(..., sum(in_sizes))``, output ``(..., sum(out_sizes))``;
    several output segments serve e.g. a scale-shift projection ``[scale | shift]``.
    """

    def __init__(
        self, in_features: int | Sequence[int], out_features: int | Sequence[int], bias: bool = True
    ):
        super().__init__()
        self.in_segments = _segments(in_features)
        self.out_segments = _segments(out_features)
        self.weight = nn.Parameter(torch.empty(sum(self.out_segments), sum(self.in_segments)))
        self.bias = nn.Parameter(torch.zeros(sum(self.out_segments))) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def param_ranges(self, sizes: tuple[tuple[int, ...], int | tuple[int, ...]]) -> dict[str, Ranges]:
        in_sizes, out_sizes = sizes
        out_r = segment_ranges(self.out_segments, _segments(out_sizes))
        out = {"weight": (out_r, segment_ranges(self.in_segments, in_sizes))}
        if self.bias is not None:
            out["bias"] = (out_r,)
        return out

    def forward(self, x: torch.Tensor, sizes: tuple[tuple[int, ...], int]) -> torch.Tensor:
        r = self.param_ranges(sizes)
        bias = take(self.bias, r["bias"]) if self.bias is not None else None
        return F.linear(x, take(self.weight, r["weight"]), bias)


class DynamicConv(nn.Module):
    """Convolution over video tensors ``(B, C, T, H, W)`` with kernel ``(kt, kh, kw)``.

    ``(1, 3, 3)`` is a spatial 2D convolution (run as ``conv2d`` over ``B*T`` frames), ``(3, 1, 1)`` a
    temporal one. ``stride`` applies to H and W only. Sizes: ``(in_sizes, out_size)``.
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        out_channels: int,
        kernel_size=(1, 3, 3),
        stride: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        self.in_segments = _segments(in_channels)
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = stride
        self.padding_mode = padding_mode
        self.weight = nn.Parameter(torch.empty(out_channels, sum(self.in_segments), *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def param_ranges(self, sizes: tuple[tuple[int, ...], int]) -> dict[str, Ranges]:
        in_sizes, out_size = sizes
        w = (((0, out_size),), segment_ranges(self.in_segments, in_sizes), None, None, None)
        out = {"weight": w}
        if self.bias is not None:
            out["bias"] = (((0, out_size),),)
        return out

    def forward(self, x: torch.Tensor, sizes: tuple[tuple[int, ...], int]) -> torch.Tensor:
        r = self.param_ranges(sizes)
        weight = take(self.weight, r["weight"])
        bias = take(self.bias, r["bias"]) if self.bias is not None else None
        kt, kh, kw = self.kernel_size
        pad = (kt // 2, kh // 2, kw // 2)
        b, c, t, h, w = x.shape
        if kt == 1:
            frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
            if self.padding_mode != "zeros" and (kh > 1 or kw > 1):
                frames = F.pad(frames, (pad[2], pad[2], pad[1], pad[1]), mode=self.padding_mode)
                y = F.conv2d(frames, weight[:, :, 0], bias, stride=self.stride)
            else:
                y = F.conv2d(frames, weight[:, :, 0], bias, stride=self.stride, padding=pad[1:])
            return y.reshape(b, t, -1, *y.shape[-2:]).transpose(1, 2)  # (B, C', T, H', W')
        if kh == 1 and kw == 1 and self.stride == 1:
            # Temporal convolution as a (kt x 1) conv2d over (T, H*W): much faster than conv3d on CPU.
            seq = x.reshape(b, c, t, h * w)
            if self.padding_mode != "zeros":
                seq = F.pad(seq, (0, 0, pad[0], pad[0]), mode=self.padding_mode)
                y = F.conv2d(seq, weight[:, :, :, :, 0], bias)
            else:
                y = F.conv2d(seq, weight[:, :, :, :, 0], bias, padding=(pad[0], 0))
            return y.reshape(b, -1, t, h, w)
        if self.padding_mode != "zeros":
            x = F.pad(x, (pad[2], pad[2], pad[1], pad[1], pad[0], pad[0]), mode=self.padding_mode)
            return F.conv3d(x, weight, bias, stride=(1, self.stride, self.stride))
        return F.conv3d(x, weight, bias, stride=(1, self.stride, self.stride), padding=pad)


class DynamicGroupNorm(nn.Module):
    """Group norm with a fixed *group size*, so any active width that is a multiple of it is valid.

    Input ``(B, C, ...)`` with ``C = sum(active segment sizes)``; each segment must be a multiple of
    ``group_size`` so no group straddles ``h`` and ``skip``.
    """

    def __init__(self, channels: int | Sequence[int], group_size: int, eps: float = 1e-5):
        super().__init__()
        self.segments = _segments(channels)
        for full in self.segments:
            if full % group_size:
                raise ValueError(f"group norm width {full} is not a multiple of group size {group_size}")
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(sum(self.segments)))
        self.bias = nn.Parameter(torch.zeros(sum(self.segments)))

    def param_ranges(self, sizes: tuple[int, ...]) -> dict[str, Ranges]:
        r = (segment_ranges(self.segments, sizes),)
        return {"weight": r, "bias": r}

    def forward(self, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        if any(s % self.group_size for s in sizes):
            raise ValueError(f"group norm widths {sizes} are not multiples of {self.group_size}")
        r = self.param_ranges(sizes)
        groups = sum(sizes) // self.group_size
        return F.group_norm(x, groups, take(self.weight, r["weight"]), take(self.bias, r["bias"]), self.eps)


class DynamicLayerNorm(nn.Module):
    """Layer norm over the last (channel) dimension of tokens ``(N, S, C)``. Sizes: active ``C``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def param_ranges(self, size: int) -> dict[str, Ranges]:
        r = (((0, size),),)
        return {"weight": r, "bias": r}

    def forward(self, x: torch.Tensor, size: int) -> torch.Tensor:
        return F.layer_norm(x, (size,), self.weight[:size], self.bias[:size], self.eps)


class RelativePositionBias(nn.Module):
    """Learned per-head bias ``b[h, i - j]`` for temporal attention (imagen-pytorch, Shaw et al.).

    Sizes: active number of heads. Returns ``(heads, T, T)``.
    """

    def __init__(self, heads: int, max_frames: int):
        super().__init__()
        self.max_frames = max_frames
        self.table = nn.Parameter(torch.zeros(heads, 2 * max_frames - 1))

    def param_ranges(self, heads: int) -> dict[str, Ranges]:
        return {"table": (((0, heads),), None)}

    def forward(self, frames: int, heads: int) -> torch.Tensor:
        if frames > self.max_frames:
            raise ValueError(f"{frames} frames exceed the model's maximum of {self.max_frames}")
        pos = torch.arange(frames, device=self.table.device)
        index = pos[:, None] - pos[None, :] + self.max_frames - 1  # (T, T)
        return self.table[:heads][:, index]
