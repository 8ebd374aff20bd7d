"""Cost features of one forward pass, read from a ``TorchFunctionMode`` trace (usually on the meta device).

Every top-level torch call of the forward is seen once (calls made inside another call are not), with
its real argument and output shapes, so the trace needs no knowledge of the model's structure: a new
family gets features without new code. The heavy ops (convolutions, linear layers, attention, norms) are
not executed: the trace returns an uninitialised tensor of their output shape (the forward has no
data-dependent control flow), so on the CPU only the cheap elementwise ops run; on ``meta`` tensors
nothing runs at all (slower per op, through Python meta kernels, but independent of the model's scale).

Features (one forward, all floats):

- multiply-adds (``out.numel() * C_in/groups * prod(kernel)`` for convolutions) of convolutions by kernel
  shape: ``macs_conv`` (full kernels, e.g. the spatial 3x3), ``macs_conv_1d`` (kernels with some unit
  dims, e.g. the temporal 3x1x1 / 3x1), ``macs_pointwise`` (1x1 skip projections); ``macs_linear``
  (``out.numel() * in_features``); ``macs_attention`` (``scaled_dot_product_attention``:
  ``N * h * S * L * (d_qk + d_v)``, as ``harness.metrics.flops``).
- ``elems_norm``: output elements of group / layer norms; ``elems_other``: output elements of every other
  op that computes (elementwise, activations, cat, interpolate, ...) - the memory-bound work.
- ``calls_compute``: number of top-level calls that launch work (per-op dispatch overhead on CPU);
  ``calls_view``: number of view / reshape / indexing calls (Python + dispatcher overhead only).
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

FEATURES = (
    "macs_conv",
    "macs_conv_1d",
    "macs_pointwise",
    "macs_linear",
    "macs_attention",
    "elems_norm",
    "elems_other",
    "calls_compute",
    "calls_view",
)

_VIEW_OPS = frozenset(
    {
        "view",
        "reshape",
        "transpose",
        "permute",
        "narrow",
        "__getitem__",
        "expand",
        "split",
        "chunk",
        "unsqueeze",
        "squeeze",
        "flatten",
        "contiguous",
        "to",
        "as_tensor",
        "float",
        "type_as",
        "detach",
        "select",
        "unbind",
    }
)
_NORM_OPS = frozenset({"group_norm", "layer_norm", "batch_norm", "instance_norm"})


def _conv_out_shape(args: tuple, kwargs: dict) -> tuple[int, ...]:
    """Output shape of ``conv{1,2,3}d(input, weight, bias, stride, padding, dilation, groups)``."""
    x, weight = args[0], args[1]
    spatial = x.dim() - 2

    def arg(index: int, name: str, default):
        value = args[index] if len(args) > index else kwargs.get(name, default)
        if isinstance(value, str):
            return value  # "same" / "valid"
        return (value,) * spatial if isinstance(value, int) else tuple(value)

    stride, padding, dilation = arg(3, "stride", 1), arg(4, "padding", 0), arg(5, "dilation", 1)
    kernel = weight.shape[2:]
    if padding == "same":
        return (x.shape[0], weight.shape[0], *x.shape[2:])
    if padding == "valid":
        padding = (0,) * spatial
    sizes = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(x.shape[2:], padding, dilation, kernel, stride)
    ]
    return (x.shape[0], weight.shape[0], *sizes)


def _out_shape(name: str, args: tuple, kwargs: dict) -> tuple[int, ...]:
    """Output shape of a heavy op, without running it."""
    if name in ("conv1d", "conv2d", "conv3d"):
        return _conv_out_shape(args, kwargs)
    if name == "linear":
        return (*args[0].shape[:-1], args[1].shape[0])
    if name == "scaled_dot_product_attention":
        q, v = args[0], args[2]
        return (*q.shape[:-1], v.shape[-1])
    return tuple(args[0].shape)  # norms keep the input shape


def _macs_conv(args: tuple, out: torch.Tensor) -> int:
    weight = args[1]  # (C_out, C_in / groups, *kernel)
    return out.numel() * weight.shape[1] * prod(weight.shape[2:])


def _macs_linear(args: tuple, out: torch.Tensor) -> int:
    return out.numel() * args[1].shape[1]  # weight (out_features, in_features)


def _macs_sdpa(args: tuple, out: torch.Tensor) -> int:
    q, k, v = args[:3]  # (N, h, S, d), (N, h, L, d), (N, h, L, d_v)
    return prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _conv_feature(args: tuple) -> str:
    kernel = args[1].shape[2:]
    if prod(kernel) == 1:
        return "macs_pointwise"
    return "macs_conv_1d" if 1 in kernel else "macs_conv"


_MAC_OPS: dict[str, tuple[Callable[[tuple], str], Callable[[tuple, torch.Tensor], int]]] = {
    "conv1d": (_conv_feature, _macs_conv),
    "conv2d": (_conv_feature, _macs_conv),
    "conv3d": (_conv_feature, _macs_conv),
    "linear": (lambda args: "macs_linear", _macs_linear),
    "scaled_dot_product_attention": (lambda args: "macs_attention", _macs_sdpa),
}


class CostTrace(TorchFunctionMode):
    """Accumulates ``FEATURES`` over every top-level torch call made while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.features = dict.fromkeys(FEATURES, 0.0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _MAC_OPS or name in _NORM_OPS:  # shape only: uninitialised, never read for control flow
            x = args[0]
            out = torch.empty(_out_shape(name, args, kwargs), dtype=x.dtype, device=x.device)
        else:
            out = func(*args, **kwargs)
        if name == "__get__" or not isinstance(out, torch.Tensor):
            return out  # attribute reads (.shape, .dtype), sizes and other non-tensor results
        if name in _MAC_OPS:
            feature, macs = _MAC_OPS[name]
            self.features[feature(args)] += macs(args, out)
            self.features["calls_compute"] += 1
        elif name in _VIEW_OPS:
            self.features["calls_view"] += 1
        else:
            self.features["elems_norm" if name in _NORM_OPS else "elems_other"] += out.numel()
            self.features["calls_compute"] += 1
        return out


def forward_features(model: nn.Module, inputs: dict[str, Any]) -> dict[str, float]:
    """``FEATURES`` of one ``model(**inputs)`` call (run under ``torch.inference_mode``)."""
    trace = CostTrace()
    with torch.inference_mode(), trace:
        model(**inputs)
    return dict(trace.features)
