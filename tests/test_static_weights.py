"""Extracted static subnets use their own weights as they are: no weight is sliced or concatenated per
forward (a supernet at a partial decoder input ``[h | skip]`` still concatenates its two slices)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from search_spaces import list_families, load_static, save_static

FAMILIES = list_families()


class WeightCats(TorchDispatchMode):
    """Counts ``aten.cat`` calls that read a parameter's storage, and all ``aten.cat`` calls."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.on_weights = 0
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.cat:
            self.total += 1
            tensors = args[0]
            if any(t.untyped_storage().data_ptr() in self.storages for t in tensors):
                self.on_weights += 1
        return func(*args, **(kwargs or {}))


def _partial(net):
    """A subnet whose decoder inputs are partial ``[h | skip]`` (every layer at its smallest ratio)."""
    return net.space.smallest()


@pytest.mark.parametrize("family", FAMILIES)
def test_static_forward_concatenates_no_weight(family, tiny_nets):
    net = tiny_nets[family]
    cfg = _partial(net)
    inputs = net.dummy_inputs(cfg, batch_size=1, frames=2, seed=0)
    static = net.extract(cfg)
    with torch.no_grad():
        with WeightCats(net) as sliced:
            expected = net(**inputs, subnet=cfg)
        with WeightCats(static) as own:
            out = static(**inputs)
    # The detector sees the supernet's per-forward weight concatenations (so it can fail) ...
    assert sliced.on_weights > 0
    # ... and the static subnet makes none; its only cats are the activations' [h | skip].
    assert own.on_weights == 0 and own.total > 0
    assert (out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_static_weights_are_contiguous_and_roundtrip(family, tiny_nets, tmp_path):
    net = tiny_nets[family]
    static = net.extract(_partial(net))
    assert all(p.is_contiguous() for p in static.parameters())
    save_static(static, tmp_path / "s")
    loaded = load_static(tmp_path / "s")
    inputs = net.dummy_inputs(_partial(net), batch_size=1, frames=2, seed=1)
    with torch.no_grad(), WeightCats(loaded) as own:
        out = loaded(**inputs)
    assert own.on_weights == 0
    with torch.no_grad():
        assert torch.equal(out, static(**inputs))
