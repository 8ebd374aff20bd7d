"""FLOP counting: fvcore with our handles vs ``torch.utils.flop_counter.FlopCounterMode`` and by hand.

``FlopCounterMode`` counts 2 FLOPs per multiply-add for convolutions, matmuls and attention and nothing
else; on the CPU it counts an unmasked ``scaled_dot_product_attention`` as 0 (the fused CPU flash kernel
has no formula in this torch version), so the comparison forces the MATH backend, which decomposes
attention into the ``bmm`` calls it does count. Our SDPA handle is also checked against a hand count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from harness.metrics._cost_trace import forward_features
from harness.metrics.flops import (
    GenerationStage,
    count_flops,
    denoiser_flops,
    denoiser_inputs,
    flop_analysis,
    flops_by_operator,
    generation_flops,
    matmul_flops,
)

FRAMES = 2  # keeps the traced forwards cheap; temporal attention still sees several frames
FAMILIES = ["pixel-base", "pixel-ssr", "latent-unet"]
POINTS = ["largest", "sampled", "smallest"]


def _config(net, point: str):
    space = net.space
    return {
        "largest": space.largest(),
        "smallest": space.smallest(),
        "sampled": space.sample(3, resolution=space.default_resolution),
    }[point]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Counting needs no speed; one thread avoids scheduler stalls on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def analyses(tiny_nets):
    """(family, point) -> (static net, inputs, fvcore analysis), traced once per module."""
    out = {}
    with _one_thread():
        for family in FAMILIES:
            net = tiny_nets[family]
            for point in POINTS:
                static, inputs = denoiser_inputs(net, _config(net, point), frames=FRAMES)
                out[family, point] = (static.eval(), inputs, flop_analysis(static, inputs))
    return out


def _flop_counter_macs(static, inputs) -> float:
    with (
        _one_thread(),
        sdpa_kernel(SDPBackend.MATH),
        FlopCounterMode(display=False) as counter,
        torch.no_grad(),
    ):
        static(**inputs)
    return counter.get_total_flops() / 2


class _Attend(nn.Module):
    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("point", ["largest", "smallest"])
def test_fvcore_agrees_with_flop_counter_mode(analyses, family, point):
    static, inputs, analysis = analyses[family, point]
    assert not analysis.unsupported_ops(), analysis.unsupported_ops()
    ours = matmul_flops({name: int(n) for name, n in analysis.by_operator().items()})
    reference = _flop_counter_macs(static, inputs)
    assert ours == pytest.approx(reference, rel=0.02)
    # Everything else we count (norms, elementwise, upsampling) is a small remainder on top.
    assert ours < analysis.total() < 1.1 * ours


@pytest.mark.parametrize("family", FAMILIES)
def test_smaller_subnets_have_fewer_flops(analyses, family):
    totals = [analyses[family, point][2].total() for point in POINTS]
    assert totals[0] > totals[1] > totals[2] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_cost_trace_macs_match_fvcore(analyses, family):
    static, inputs, analysis = analyses[family, "largest"]
    ops = analysis.by_operator()
    features = forward_features(static, inputs)
    conv = features["macs_conv"] + features["macs_conv_1d"] + features["macs_pointwise"]
    assert conv == ops["conv"]
    assert features["macs_linear"] == ops["linear"]
    assert features["macs_attention"] == ops["scaled_dot_product_attention"]


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_scale_with_pixels(analyses, tiny_nets, family):
    static, _, analysis = analyses[family, "smallest"]
    low = tiny_nets[family].space.default_resolution
    with _one_thread():
        high = denoiser_flops(static, 2 * low, frames=FRAMES)
    # conv / linear x4 (embeddings constant), spatial attention's matmuls x16 (tokens^2): in between.
    assert 3.9 < high / analysis.total() < 16.0


def test_denoiser_flops_rejects_config_for_static(analyses, tiny_nets):
    static = analyses["pixel-base", "smallest"][0]
    with pytest.raises(TypeError, match="Supernet"):
        denoiser_flops(static, tiny_nets["pixel-base"].space.smallest())
    with pytest.raises(TypeError, match="resolution"):
        denoiser_flops(static, 16.0)


def test_sdpa_handle_counts_two_matmuls():
    n, h, s, length, d, dv = 2, 3, 10, 7, 8, 4
    q, k, v = torch.randn(n, h, s, d), torch.randn(n, h, length, d), torch.randn(n, h, length, dv)
    expected = n * h * s * length * d + n * h * s * length * dv
    assert count_flops(_Attend(), (q, k, v)) == expected
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _Attend()(q, k, v, torch.zeros(s, length))
    assert counter.get_total_flops() == 2 * expected


def test_elementwise_and_upsampling_handles():
    x = torch.randn(2, 5, 4, 4)
    up = nn.Sequential(nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"))
    assert flops_by_operator(up, (x,)) == {"upsample_nearest2d": 2 * 5 * 8 * 8, "silu": x.numel()}
    assert count_flops(up, (x,), elementwise=False) == 2 * 5 * 8 * 8
    bilinear = nn.Upsample(scale_factor=2, mode="bilinear")
    assert count_flops(bilinear, (x,)) == 4 * 2 * 5 * 8 * 8


def test_unsupported_operator_is_an_error():
    class Cumsum(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=0)

    with pytest.raises(RuntimeError, match="cumsum"):
        count_flops(Cumsum(), (torch.randn(3, 4),))
    assert count_flops(Cumsum(), (torch.randn(3, 4),), strict=False) == 0


def test_keyword_inputs_follow_the_signature():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(6, 3)

        def forward(self, x, extra=None, y=None):
            return self.a(x) + (self.b(y) if y is not None else 0)

    x, y = torch.randn(2, 4), torch.randn(2, 6)
    assert count_flops(TwoInputs(), {"x": x, "y": y}) == 2 * 3 * 4 + 2 * 3 * 6 + 2 * 3
    with pytest.raises(ValueError, match="no argument"):
        count_flops(TwoInputs(), {"x": x, "z": y})


def test_generation_flops_multiplies_steps_and_guidance():
    base, ssr = nn.Linear(8, 8), nn.Linear(16, 16)
    xb, xs = (torch.randn(1, 8),), (torch.randn(1, 16),)
    fb, fs = count_flops(base, xb), count_flops(ssr, xs)
    stages = [GenerationStage(base, xb, steps=10, guidance=True, name="base"), (ssr, xs, 4, False)]
    assert generation_flops(stages) == fb * 10 * 2 + fs * 4
    with pytest.raises(TypeError, match="stage 0"):
        generation_flops([(base, xb)])
