"""FLOP counting with fvcore ``FlopCountAnalysis`` (one multiply-add = one FLOP), completed for our models.

fvcore traces the model with ``torch.jit.trace`` and counts each traced aten op with a *handle*. Its
defaults cover convolutions, linear layers / matmuls and norms; this module registers explicit handles for
everything else that our video UNets run, so no operator is left silently uncounted:

- ``aten::scaled_dot_product_attention``: the two matmuls ``q @ k^T`` and ``attn @ v``,
  ``N * h * S * L * (d_qk + d_v)`` multiply-adds for ``q (N, h, S, d_qk)``, ``k (N, h, L, d_qk)``,
  ``v (N, h, L, d_v)``. Scaling, the additive mask and the softmax (``O(S * L)`` per head, ~``1/d`` of
  the matmuls) are not counted: the same convention as ``torch.utils.flop_counter`` (``sdpa_flop_count``)
  and fvcore, which ignores ``aten::softmax``.
- Upsampling: one FLOP per output element for nearest (a copy, counted as an elementwise op) and the
  number of interpolation taps per output element for linear modes (4 bilinear, 8 trilinear), as fvcore's
  own 2-D defaults; the 3-D variants fvcore lacks are registered the same way.
- Elementwise arithmetic and activations (``ELEMENTWISE_OPS``: add, mul, silu, gelu, sin, ...): one FLOP
  per output element when ``elementwise=True`` (default), otherwise explicitly zero. Either way they are
  registered, so they never appear in ``unsupported_ops()``.

Pure data movement (view, reshape, cat, pad, ...) is zero FLOPs through fvcore's own ignore list.
``count_flops`` raises if the trace still holds an operator without a handle (``strict=True``).
Cross-check: ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per multiply-add for
conv / matmul / attention and ignores norms and elementwise ops (see ``tests/test_flops.py``).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():  # fvcore.nn scripts its focal loss at import (a jit deprecation warning)
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from search_spaces import SubnetConfig, Supernet, VideoUNet, make_dummy_inputs

Inputs = dict[str, Any] | tuple[Any, ...]

ELEMENTWISE_OPS = (
    "aten::add",
    "aten::add_",
    "aten::sub",
    "aten::sub_",
    "aten::rsub",
    "aten::mul",
    "aten::mul_",
    "aten::div",
    "aten::div_",
    "aten::reciprocal",
    "aten::neg",
    "aten::exp",
    "aten::sin",
    "aten::cos",
    "aten::sqrt",
    "aten::rsqrt",
    "aten::pow",
    "aten::silu",
    "aten::silu_",
    "aten::gelu",
    "aten::sigmoid",
    "aten::tanh",
    "aten::softmax",
)

# Operator families, as fvcore's ``by_operator`` names them (the handle name without ``aten::``).
MATMUL_OPERATORS = (
    "conv",
    "linear",
    "matmul",
    "mm",
    "addmm",
    "bmm",
    "einsum",
    "scaled_dot_product_attention",
)


def _sdpa_flop(inputs: list, outputs: list) -> int:
    """``q @ k^T`` plus ``attn @ v`` multiply-adds of ``aten::scaled_dot_product_attention``."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = prod(q[:-2])  # (N, h) or any leading dims
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _per_output_element(scale: float):
    def handle(inputs: list, outputs: list) -> int:
        return int(scale * prod(get_shape(outputs[0])))

    return handle


def _mean_flop(inputs: list, outputs: list) -> int:
    return prod(get_shape(inputs[0]))


def _zero(inputs: list, outputs: list) -> int:
    return 0


def _handles(elementwise: bool) -> dict[str, Any]:
    handles: dict[str, Any] = {
        "aten::scaled_dot_product_attention": _sdpa_flop,
        "aten::upsample_nearest2d": _per_output_element(1),
        "aten::upsample_nearest3d": _per_output_element(1),
        "aten::upsample_bilinear2d": _per_output_element(4),
        "aten::upsample_trilinear3d": _per_output_element(8),
        # Replicate padding of the autoencoder's convolutions: data movement, as fvcore's constant pad.
        "aten::pad": _zero,
        "aten::replication_pad3d": _zero,
    }
    per_element = _per_output_element(1) if elementwise else _zero
    handles.update({op: per_element for op in ELEMENTWISE_OPS})
    handles["aten::mean"] = _mean_flop if elementwise else _zero  # pooled text tokens: one add per input
    return handles


def _positional(module: nn.Module, inputs: Inputs) -> tuple[Any, ...]:
    """Keyword inputs -> the positional tuple ``torch.jit.trace`` needs (gaps filled with defaults)."""
    if isinstance(inputs, tuple):
        return inputs
    if not isinstance(inputs, dict):
        raise TypeError(f"inputs must be a dict of keyword inputs or a tuple, got {type(inputs).__name__}")
    params = list(inspect.signature(module.forward).parameters.values())
    unknown = set(inputs) - {p.name for p in params}
    if unknown:
        raise ValueError(f"{type(module).__name__}.forward has no argument(s) {sorted(unknown)}")
    last = max(i for i, p in enumerate(params) if p.name in inputs)
    out = []
    for p in params[: last + 1]:
        if p.name not in inputs and p.default is inspect.Parameter.empty:
            raise ValueError(f"missing required input '{p.name}' for {type(module).__name__}.forward")
        out.append(inputs.get(p.name, p.default))
    return tuple(out)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence fvcore's logging and the tracer's / jit's warnings for the duration of an analysis."""
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def flop_analysis(module: nn.Module, inputs: Inputs, elementwise: bool = True) -> FlopCountAnalysis:
    """A traced, quiet fvcore ``FlopCountAnalysis`` of ``module(**inputs)`` with this module's handles.

    ``inputs``: keyword inputs (e.g. ``Supernet.dummy_inputs``) or a positional tuple. The trace runs
    here, under ``torch.no_grad`` and with warnings silenced; ``.total()``, ``.by_operator()``,
    ``.by_module()`` and ``.unsupported_ops()`` then read the cached result.
    """
    args = _positional(module, inputs)
    analysis = FlopCountAnalysis(module, args).set_op_handle(**_handles(elementwise))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with _quiet(), torch.no_grad():
        analysis.total()
    return analysis


def _check_supported(analysis: FlopCountAnalysis) -> None:
    missing = analysis.unsupported_ops()
    if missing:
        raise RuntimeError(
            f"no FLOP handle for operator(s) {dict(missing)}: register one in "
            "harness.metrics.flops (or pass strict=False)"
        )


def count_flops(module: nn.Module, inputs: Inputs, elementwise: bool = True, strict: bool = True) -> int:
    """FLOPs (multiply-adds) of one ``module(**inputs)`` call, counted by fvcore with our handles.

    ``elementwise``: count elementwise arithmetic / activations as one FLOP per output element (else 0).
    ``strict``: raise if any traced operator has no handle instead of dropping it silently.
    """
    analysis = flop_analysis(module, inputs, elementwise)
    if strict:
        _check_supported(analysis)
    return int(analysis.total())


def flops_by_operator(
    module: nn.Module, inputs: Inputs, elementwise: bool = True, strict: bool = True
) -> dict[str, int]:
    """FLOPs per operator family (fvcore ``by_operator`` names: ``conv``, ``linear``, ``group_norm``,
    ``scaled_dot_product_attention``, ``add``, ...), largest first."""
    analysis = flop_analysis(module, inputs, elementwise)
    if strict:
        _check_supported(analysis)
    counts = {name: int(n) for name, n in analysis.by_operator().items()}
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def matmul_flops(by_operator: dict[str, int]) -> int:
    """The multiply-adds of convolutions, linear layers, matmuls and attention in a ``by_operator`` dict
    (the families ``FlopCounterMode`` counts)."""
    return sum(n for name, n in by_operator.items() if name in MATMUL_OPERATORS)


# -- denoiser and whole-video FLOPs ------------------------------------------------------------------
def _default_frames(model: VideoUNet) -> int:
    return model.frames


def denoiser_inputs(
    model: VideoUNet, subnet: SubnetConfig | int, frames: int | None = None, batch: int = 1
) -> tuple[VideoUNet, dict[str, torch.Tensor]]:
    """The static network and keyword inputs of one denoiser forward.

    ``subnet``: a ``SubnetConfig`` (``model`` must then be its ``Supernet``; the subnet is extracted and
    run at ``cfg.resolution``) or a resolution in pixels (``model`` runs as it is: a static ``VideoUNet``
    or a supernet at its active / full size). ``frames``: ``None`` means the model's training frames.
    Inputs: ``sample (batch, C, frames, R, R)`` plus text tokens / low-res video as the spec needs.
    """
    frames = frames or _default_frames(model)
    if isinstance(subnet, SubnetConfig):
        if not isinstance(model, Supernet):
            raise TypeError(
                "a SubnetConfig needs the Supernet it belongs to; pass a resolution for a static net"
            )
        static, resolution = model.extract(subnet), subnet.resolution
    elif isinstance(subnet, int) and not isinstance(subnet, bool):
        static, resolution = model, subnet
    else:
        raise TypeError(
            f"subnet must be a SubnetConfig or a resolution in pixels, got {type(subnet).__name__}"
        )
    device = next(static.parameters()).device
    return static, make_dummy_inputs(static.spec, resolution, frames, batch, seed=0, device=device)


def denoiser_flops(
    model: VideoUNet, subnet: SubnetConfig | int, frames: int | None = None, batch: int = 1
) -> int:
    """FLOPs of one denoiser forward of ``model`` at ``subnet`` (see ``denoiser_inputs`` for arguments)."""
    static, inputs = denoiser_inputs(model, subnet, frames, batch)
    return count_flops(static.eval(), inputs)


@dataclass(frozen=True)
class GenerationStage:
    """One model of a generation chain (base, then each SSR stage): ``steps`` sampling steps, each one
    forward of ``model(**inputs)`` - two with classifier-free ``guidance`` (conditional + null text)."""

    model: nn.Module
    inputs: Inputs
    steps: int
    guidance: bool = True
    name: str = ""

    @property
    def forwards(self) -> int:
        return self.steps * (2 if self.guidance else 1)


def generation_flops(stages: Sequence[GenerationStage | tuple]) -> int:
    """FLOPs of generating one video with a chain of stages:
    ``sum(count_flops(model, inputs) * steps * (2 if guidance else 1))``.

    ``stages``: ``GenerationStage`` records or plain tuples ``(model, inputs, steps[, guidance])``, e.g.
    ``[(base, base_inputs, 50, True), (ssr, ssr32_inputs, 20, True), (ssr, ssr64_inputs, 20, True)]``.
    Inputs should hold the batch of one video (batch 1 without guidance batching).
    """
    total = 0
    for i, stage in enumerate(stages):
        if not isinstance(stage, GenerationStage):
            if not isinstance(stage, tuple) or not 3 <= len(stage) <= 4:
                raise TypeError(f"stage {i} must be a GenerationStage or (model, inputs, steps[, guidance])")
            stage = GenerationStage(*stage)
        if stage.steps < 0:
            raise ValueError(f"stage {i} has a negative step count {stage.steps}")
        total += count_flops(stage.model, stage.inputs) * stage.forwards
    return total
