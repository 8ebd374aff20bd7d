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

Per-op records (``CostTrace(record_ops=True)``, :func:`forward_ops`): every call the features count is
also one :class:`OpCost` with its kind (``KINDS``), multiply-adds, FLOPs (2 per multiply-add for
convolutions, linear layers and attention; ``NORM_FLOPS_PER_ELEMENT`` per output element of a norm; 1
per output element of every other computing op, fvcore's elementwise convention) and the bytes it must
move: tensor inputs, outputs and weights (parameters and buffers of the traced model, or views of them),
each floating tensor at the run's dtype (``dtype``; ``None`` = as traced) and integer tensors at their
own size. A call in ``_VIEW_OPS`` whose result shares its input's memory moves nothing (kind ``view``);
one that copies (``contiguous`` of a transposed tensor, ``to`` another dtype, a reshape that cannot
view) is kind ``copy`` and moves its input and output. Attention moves ``q, k, v``, its mask and its
output: the fused-kernel (flash / memory-efficient) traffic, not the math path's ``S x L`` scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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

# Kinds of per-op records: the roofline model (harness.roofline) gives each its own efficiencies.
KINDS = ("conv", "conv_1d", "pointwise", "linear", "attention", "norm", "elementwise", "copy", "view")
_FEATURE_KIND = {
    "macs_conv": "conv",
    "macs_conv_1d": "conv_1d",
    "macs_pointwise": "pointwise",
    "macs_linear": "linear",
    "macs_attention": "attention",
}
# FLOPs per output element of a group / layer norm: the statistics (a sum and a sum of squares: 2), the
# normalisation (subtract, multiply: 2) and the affine (multiply, add: 2) - a convention, as fvcore's one
# FLOP per elementwise output; norms are memory-bound on every device we model, so it rarely matters.
NORM_FLOPS_PER_ELEMENT = 6


@dataclass(frozen=True)
class OpCost:
    """One top-level torch call of a forward: its kind (``KINDS``), work and memory traffic in bytes."""

    name: str  # the torch function's name, e.g. "conv2d", "add", "transpose"
    kind: str
    macs: int  # multiply-adds (convolutions, linear layers, attention; else 0)
    flops: int  # floating-point operations (see the module docstring)
    bytes_in: int  # tensor inputs that are not weights
    bytes_out: int
    bytes_weight: int  # parameters / buffers of the model (or views of them) among the inputs

    @property
    def bytes(self) -> int:
        return self.bytes_in + self.bytes_out + self.bytes_weight


def _tensors(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    """The tensors among call arguments (one level of lists / tuples, as ``cat`` and ``stack`` take)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (t for t in v if isinstance(t, torch.Tensor))


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory ``t`` views (itself when it is not a view; tracked outside inference mode)."""
    return t._base if t._base is not None else t


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
    """Accumulates ``FEATURES`` over every top-level torch call made while the mode is active.

    ``record_ops``: also keep one :class:`OpCost` per counted call in ``ops`` (see the module docstring);
    ``weights``: the model's parameters and buffers (their bytes are the op's ``bytes_weight``);
    ``dtype``: the run's dtype, at whose size floating tensors are counted (``None``: as traced). Views
    are told from copies by their ``_base``, which autograd tracks outside ``torch.inference_mode``: trace
    per-op records under ``torch.no_grad`` (:func:`forward_ops` does)."""

    def __init__(
        self,
        record_ops: bool = False,
        weights: Iterable[torch.Tensor] = (),
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.features = dict.fromkeys(FEATURES, 0.0)
        self.record_ops, self.dtype = record_ops, dtype
        self._weights = {id(w) for w in weights}
        self.ops: list[OpCost] = []

    def _nbytes(self, t: torch.Tensor) -> int:
        if self.dtype is not None and t.is_floating_point():
            return t.numel() * self.dtype.itemsize
        return t.numel() * t.element_size()

    def _record(self, name: str, kind: str, macs: int, flops: int, args, kwargs, out) -> None:
        inputs = list(_tensors((*args, *kwargs.values())))
        if kind == "view" and not any(_root(out) is _root(t) for t in inputs):
            kind = "copy"  # a "view op" that had to copy (contiguous, to another dtype, reshape)
        if kind == "view":
            self.ops.append(OpCost(name, kind, 0, 0, 0, 0, 0))
            return
        is_weight = [id(t) in self._weights or id(_root(t)) in self._weights for t in inputs]
        weight = sum(self._nbytes(t) for t, w in zip(inputs, is_weight) if w)
        other = sum(self._nbytes(t) for t, w in zip(inputs, is_weight) if not w)
        self.ops.append(OpCost(name, kind, macs, flops, other, self._nbytes(out), weight))

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
            feature, count = _MAC_OPS[name]
            macs = count(args, out)
            self.features[feature(args)] += macs
            self.features["calls_compute"] += 1
            kind, flops = _FEATURE_KIND[feature(args)], 2 * macs
        elif name in _VIEW_OPS:
            self.features["calls_view"] += 1
            kind, macs, flops = "view", 0, 0
        else:
            norm = name in _NORM_OPS
            self.features["elems_norm" if norm else "elems_other"] += out.numel()
            self.features["calls_compute"] += 1
            kind, macs = ("norm" if norm else "elementwise"), 0
            flops = out.numel() * (NORM_FLOPS_PER_ELEMENT if norm else 1)
        if self.record_ops:
            self._record(name, kind, macs, flops, args, kwargs, out)
        return out


def forward_features(model: nn.Module, inputs: dict[str, Any]) -> dict[str, float]:
    """``FEATURES`` of one ``model(**inputs)`` call (run under ``torch.inference_mode``)."""
    trace = CostTrace()
    with torch.inference_mode(), trace:
        model(**inputs)
    return dict(trace.features)


def forward_ops(
    model: nn.Module, inputs: dict[str, Any] | tuple, dtype: torch.dtype | None = None
) -> list[OpCost]:
    """One :class:`OpCost` per top-level call of ``model(**inputs)`` (or ``model(*inputs)``), bytes at
    ``dtype`` (``None``: as traced). Run under ``torch.no_grad`` (views are told from copies there); on
    the meta device nothing is computed, so a paper-scale forward takes well under a second."""
    weights = [*model.parameters(), *model.buffers()]
    trace = CostTrace(record_ops=True, weights=weights, dtype=dtype)
    with torch.no_grad(), trace:
        model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return trace.ops
