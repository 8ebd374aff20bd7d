"""Paper-scale sizes, and the zero-initialised conditioning extras (the family-wide extraction, counting
and persistence contract is in ``test_families``)."""

import dataclasses

import pytest
import torch

from search_spaces import build_supernet, list_families, list_presets
from search_spaces.registry import preset_hyper


@pytest.mark.parametrize("family,target,tol", [("pixel-base", 1.6e9, 0.05), ("pixel-ssr", 428e6, 0.05)])
def test_paper_preset_sizes_on_meta(family, target, tol):
    with torch.device("meta"):
        net = build_supernet(family, "paper")
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - target) / target <= tol, f"{family} paper preset has {n / 1e6:.1f}M parameters"
    assert net.space.total_params == n


def _without(net, extra: str) -> tuple[str, ...]:
    """``net``'s extras less ``extra`` and every extra that builds on it (they cannot stand without it)."""
    kept = [n for n in net.hyper.conditioning if n != extra]
    while any(r not in kept for n in kept for r in type(net.conditioning[n]).requires):
        kept = [n for n in kept if all(r in kept for r in type(net.conditioning[n]).requires)]
    return tuple(kept)


EXTRAS = [
    (family, extra)
    for family in list_families()
    if "tiny" in list_presets(family)
    for extra in preset_hyper(family, "tiny").conditioning
]


@pytest.mark.parametrize("family,extra", EXTRAS)
def test_zero_initialised_additions_are_the_network_without_them(tiny_nets, family, extra):
    """Every conditioning extra starts at zero, so a supernet saved without it (older checkpoints,
    ``--init``) computes exactly the same function after gaining it; trained, it changes the function.
    An extra that acts through another (``requires``) is measured with that one in place."""
    net = tiny_nets[family]
    kept = _without(net, extra)
    plain = build_supernet(family, "tiny", hyper=dataclasses.replace(net.hyper, conditioning=kept))
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    removed = sorted(
        f"conditioning.{n}.{p}"
        for n in net.hyper.conditioning
        if n not in kept
        for p, _ in net.conditioning[n].named_parameters()
    )
    assert not missing and sorted(unexpected) == removed
    own = [k for k in removed if k.startswith(f"conditioning.{extra}.")]
    cfg = net.space.sample(2)
    inputs = net.dummy_inputs(cfg, batch_size=2, frames=12, seed=0)
    saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
    try:
        with torch.no_grad():
            for k in removed:
                net.state_dict()[k].zero_()
            # Equal up to float rounding: a per-frame time embedding runs the projections on another shape.
            torch.testing.assert_close(
                net(**inputs, subnet=cfg), plain(**inputs, subnet=cfg), atol=1e-6, rtol=0
            )
            for k in own:
                net.state_dict()[k].copy_(saved[k])
            change = (net(**inputs, subnet=cfg) - plain(**inputs, subnet=cfg)).abs().max()
        assert change > 1e-3, f"{extra} does not change the function once non-zero"
    finally:
        net.load_state_dict(saved)
