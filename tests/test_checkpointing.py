"""Activation checkpointing per diffusion block changes memory, not maths: same loss, same gradients."""

import zlib

import pytest
import torch

from search_spaces import list_families

FAMILIES = list_families()


def _grads(net, inputs, call) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    out = call(net, inputs)
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("through", ["subnet", "spec"])
def test_checkpointed_gradients_are_bit_identical(family, through, tiny_nets):
    """On CPU the recompute runs the same kernels on the same inputs in the same order, so the gradients
    are bit-identical (``torch.equal``), not merely close."""
    net = tiny_nets[family]
    cfg = net.space.sample(zlib.crc32(family.encode()), resolution=net.space.resolutions[-1])
    inputs = net.dummy_inputs(cfg, batch_size=2, frames=4, seed=1)
    if through == "subnet":

        def call(n, x):
            return n(**x, subnet=cfg)
    else:
        spec = net.spec_for(cfg)

        def call(n, x):
            return n(**x, spec=spec)

    try:
        plain_loss, plain = _grads(net, inputs, call)
        net.set_activation_checkpointing(True)
        ckpt_loss, ckpt = _grads(net, inputs, call)
    finally:
        net.set_activation_checkpointing(False)
        net.zero_grad(set_to_none=True)
    assert torch.equal(plain_loss, ckpt_loss)
    assert set(plain) == set(ckpt) and len(plain) > 0
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), f"{family}: {name} differs"
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_checkpointing_saves_fewer_tensors_for_backward(tiny_nets):
    """The option does what it is for: fewer activation bytes are kept for backward (saved-tensor hooks)."""
    net = tiny_nets["pixel-base"]
    cfg = net.space.largest()
    inputs = net.dummy_inputs(cfg, batch_size=1, frames=4, seed=0)
    params = {p.data_ptr() for p in net.parameters()}

    def saved_bytes() -> int:
        total = 0

        def pack(t):
            nonlocal total
            if t.data_ptr() not in params:
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(**inputs, subnet=cfg).sum()
        return total

    plain = saved_bytes()
    net.set_activation_checkpointing(True)
    try:
        ckpt = saved_bytes()
    finally:
        net.set_activation_checkpointing(False)
    assert ckpt < 0.5 * plain, (ckpt, plain)


def test_checkpointing_is_off_by_default_and_inert_without_grad(tiny_nets):
    net = tiny_nets["latent-unet"]
    assert net.activation_checkpointing is False
    inputs = net.dummy_inputs(batch_size=1, frames=2, seed=0)
    with torch.no_grad():
        a = net(**inputs)
        net.set_activation_checkpointing(True)
        b = net(**inputs)
        net.set_activation_checkpointing(False)
    assert torch.equal(a, b)
