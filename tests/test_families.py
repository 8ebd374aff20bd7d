"""The contract every registered supernet family keeps, tested over ``list_families()`` so a newly
registered family is covered without editing this file: it builds (every preset, on the meta device), a
sliced subnet computes what its extracted copy computes, exact parameter counts and optimizer masks agree
with the copy, supernet and static subnet survive save/load, the search-space operators stay in the space,
and ``dummy_inputs`` drives a forward at every resolution."""

import zlib

import numpy as np
import pytest
import torch

from harness.training.masked_optim import box_to_mask
from search_spaces import (
    SubnetConfig,
    build_supernet,
    list_families,
    list_presets,
    load_static,
    load_supernet,
    save_static,
)

FAMILIES = list_families()
PRESETS = [(family, preset) for family in FAMILIES for preset in list_presets(family)]
N_RANDOM = 50  # random subnets per resolution, beside the largest and the smallest


def _configs(space, resolution: int, n: int, seed: int) -> list[SubnetConfig]:
    """The largest subnet at ``resolution`` (a random one where a size cap excludes it), the smallest and
    ``n`` random ones."""
    rng = np.random.default_rng(seed)
    largest = space.largest(resolution)
    first = largest if space.fits(largest) else space.sample(rng, resolution=resolution)
    return [first, space.smallest(resolution)] + [space.sample(rng, resolution=resolution) for _ in range(n)]


def test_every_family_has_a_tiny_preset():
    assert FAMILIES
    for family in FAMILIES:
        assert "tiny" in list_presets(family), f"{family}: the contract tests build its 'tiny' preset"


@pytest.mark.parametrize("family,preset", PRESETS)
def test_every_preset_builds_and_counts_on_meta(family, preset):
    """Paper-scale presets are built on the meta device only (no memory, no init): the counts are exact."""
    with torch.device("meta"):
        net = build_supernet(family, preset)
        smallest = net.space.smallest()
        static = net.extract(smallest)
    n = sum(p.numel() for p in net.parameters())
    assert net.space.total_params == n == net.count_params(net.space.largest(net.space.default_resolution))
    assert net.count_params(smallest) == sum(p.numel() for p in static.parameters()) < n
    assert static.subnet_config == smallest and static.frames == net.frames == net.hyper.frames


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_equals_extracted(family, tiny_nets):
    net = tiny_nets[family]
    for res in net.space.resolutions:
        for i, cfg in enumerate(
            _configs(net.space, res, N_RANDOM, seed=zlib.crc32(f"{family}/{res}".encode()))
        ):
            inputs = net.dummy_inputs(cfg, batch_size=1, frames=4, seed=i)  # frames do not change the maths
            with torch.no_grad():
                sliced = net(**inputs, subnet=cfg)
                static = net.extract(cfg)
                out = static(**inputs)
            assert out.shape == inputs["sample"].shape
            diff = (sliced - out).abs().max().item()
            assert diff <= 1e-5, f"{family} {cfg.describe()}: max abs diff {diff}"
            assert net.count_params(cfg) == sum(p.numel() for p in static.parameters())
            assert sliced.abs().mean() > 0  # randomized weights: a vacuous zero output would hide bugs


@pytest.mark.parametrize("family", FAMILIES)
def test_set_active_matches_explicit_subnet(family, tiny_nets):
    net = tiny_nets[family]
    cfg = net.space.sample(3)
    inputs = net.dummy_inputs(cfg)
    with torch.no_grad():
        net.set_active(cfg)
        a = net(**inputs)
        net.set_active(None)
        b = net(**inputs, subnet=cfg)
        c = net(**net.dummy_inputs(net.space.largest()))  # a different forward in between
        d = net(**inputs, subnet=cfg)
    assert torch.equal(a, b) and torch.equal(b, d) and c.shape[-1] == net.space.largest().resolution


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_match_counts(family, tiny_nets):
    net = tiny_nets[family]
    cfg = net.space.sample(5)
    masks = net.active_masks(cfg)
    assert sum(int(m.sum()) for m in masks.values()) == net.count_params(cfg)
    params = dict(net.named_parameters())
    regions = net.active_regions(cfg)
    assert regions.keys() == masks.keys()
    for name, region in regions.items():
        assert torch.equal(box_to_mask(params[name], region), masks[name]), name
        assert sum(params[name][box].numel() for box in region) == int(masks[name].sum())  # disjoint


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(family, tiny_nets, tmp_path):
    net = tiny_nets[family]
    net.save_pretrained(tmp_path / "super")
    again = load_supernet(tmp_path / "super")
    cfg = net.space.sample(7)
    static = net.extract(cfg)
    save_static(static, tmp_path / "sub")
    loaded = load_static(tmp_path / "sub")
    inputs = net.dummy_inputs(cfg)
    with torch.no_grad():
        assert torch.equal(net(**inputs, subnet=cfg), again(**inputs, subnet=cfg))
        assert torch.equal(static(**inputs), loaded(**inputs))
    assert again.hyper == net.hyper and loaded.spec == static.spec
    assert loaded.subnet_config == cfg and loaded.frames == static.frames == net.frames


@pytest.mark.parametrize("family", FAMILIES)
def test_space_operators_stay_in_the_space(family, tiny_nets):
    space = tiny_nets[family].space
    rng = np.random.default_rng(1)
    for res in space.resolutions:
        a, b = space.sample(rng, resolution=res), space.sample(rng, resolution=res)
        for cfg in (a, b, space.smallest(res)):
            assert space.validate(SubnetConfig.from_json(cfg.to_json())) == cfg
        for _ in range(10):
            child = space.mutate(space.crossover(a, b, rng), rng, prob=0.3)
            assert space.validate(child) == child and space.fits(child) and child.resolution == res


@pytest.mark.parametrize("family", FAMILIES)
def test_dummy_inputs_drive_a_forward_at_every_resolution(family, tiny_nets):
    net = tiny_nets[family]
    spec = net.spec
    for res in net.space.resolutions:
        cfg = net.space.smallest(res)
        inputs = net.dummy_inputs(cfg, batch_size=2)
        assert inputs["sample"].shape == (2, spec.in_channels, net.frames, res, res)
        assert ("encoder_hidden_states" in inputs) == bool(spec.context_dim)
        assert ("low_res" in inputs) == bool(spec.cond_channels)
        assert ("noise_level" in inputs) == spec.noise_cond
        with torch.no_grad():
            out = net(**inputs, subnet=cfg)
        assert out.shape == (2, spec.out_channels, net.frames, res, res) and torch.isfinite(out).all()
