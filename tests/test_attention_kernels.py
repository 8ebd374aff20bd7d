"""Temporal attention's learned relative position bias keeps SDPA eligible for its flash kernel.

With autograd the bias is folded into the dot product (``blocks.biased_attention``): with the old
``(h, T, T)`` float mask, and with any mask that needs a gradient, the flash-only context below raises
"No available kernel" on CPU (and CUDA's flash kernel takes no bias at all). Without autograd it is a
broadcast ``(1, h, T, T)`` mask, which CPU's flash kernel takes.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from search_spaces.blocks import Attention, AttentionSpec, biased_attention

from .conftest import randomize_


def _old(attn: Attention, tokens: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """The previous forward: the bias as a float mask, math attention."""
    p = attn.plan(spec)
    h = attn.norm(tokens, p["norm"])
    n, s, _ = h.shape
    q, k, v = (
        getattr(attn, f"to_{x}")(h, p[f"to_{x}"]).view(n, s, spec.heads, attn.head_dim).transpose(1, 2)
        for x in "qkv"
    )
    bias = attn.rel_pos(s, spec.heads).to(q.dtype)
    with sdpa_kernel([SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return attn.to_out(out.transpose(1, 2).reshape(n, s, -1), p["to_out"])


@pytest.mark.parametrize("frames", [3, 8, 16])
def test_folded_bias_equals_float_mask(frames):
    attn = randomize_(Attention(32, 4, 16, max_frames=16), seed=frames, scale=0.3)
    spec = AttentionSpec(24, 3)  # a partial width and head count, as in a sampled subnet
    tokens = torch.randn(5, frames, 24, generator=torch.Generator().manual_seed(0))
    with sdpa_kernel([SDPBackend.MATH]):
        new = attn(tokens, spec)
    assert (new - _old(attn, tokens, spec)).abs().max() <= 2e-6  # fp32: only the summation order differs
    q, k, v = (torch.randn(2, 3, frames, 16, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(3, frames, frames, dtype=torch.float64)
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert (biased_attention(q, k, v, bias) - exact).abs().max() <= 1e-12


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch explains why the control has no flash kernel
def test_temporal_attention_trains_on_the_flash_kernel():
    attn = randomize_(Attention(32, 4, 16, max_frames=16), seed=1, scale=0.3)
    spec = AttentionSpec(32, 4)
    tokens = torch.randn(6, 16, 32, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = attn(tokens, spec)
        out.square().sum().backward()
    assert attn.rel_pos.table.grad is not None and attn.rel_pos.table.grad.abs().sum() > 0
    # the control: the old float mask has no flash kernel here
    q = torch.randn(6, 4, 16, 16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(RuntimeError, match="No available kernel"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=attn.rel_pos(16, 4).detach())


def test_the_tiny_base_trains_and_generates_on_flash_only(tiny_nets):
    net = tiny_nets["pixel-base"]
    assert any(b.temporal_self is not None for level in net.down for b in level)
    inputs = net.dummy_inputs(batch_size=1, frames=4, seed=0)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        trained = net(**inputs)
        trained.square().mean().backward()
        with torch.no_grad():
            generated = net(**inputs)
    net.zero_grad(set_to_none=True)
    assert (trained - generated).abs().max() <= 1e-6  # the fold and the mask: the same attention
