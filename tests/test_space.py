"""The search space: JSON round trip, keys, validation errors, sampling, evolution operators, targets."""

import itertools
import json

import numpy as np
import pytest

from search_spaces import ConfigError, SubnetConfig, build_supernet


@pytest.fixture(scope="module")
def base():
    return build_supernet("pixel-base", "tiny")


@pytest.fixture(scope="module")
def ssr():
    return build_supernet("pixel-ssr", "tiny")


def test_json_round_trip_and_stable_key(base):
    cfg = base.space.sample(0)
    again = SubnetConfig.from_json(cfg.to_json())
    assert again == cfg and again.key == cfg.key and len(cfg.key) == 64
    assert base.space.sample(1).key != cfg.key
    assert "params" in base.space.describe(cfg) and "16px" in cfg.describe()


def _mutated(cfg, **changes) -> str:
    d = json.loads(cfg.to_json())
    for path, value in changes.items():
        node = d
        keys = path.split("/")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return json.dumps(d)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"ratios/down0.width": 0.45}, "down0.width"),
        ({"keep/up0.0/res": False}, "cannot drop its res"),
        ({"resolution": 24}, "resolution 24"),
        ({"family": "pixel-ssr"}, "family 'pixel-ssr'"),
    ],
)
def test_validate_names_the_problem(base, change, needle):
    text = _mutated(base.space.largest(), **change)
    with pytest.raises(ConfigError) as e:
        base.space.from_json(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_validate_rejects_over_cap_and_malformed_json(ssr):
    over = ssr.space.largest(64)  # 64px has a 60% cap
    with pytest.raises(ConfigError, match="cap at 64px"):
        ssr.space.validate(over)
    with pytest.raises(ConfigError, match="malformed subnet config JSON"):
        SubnetConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="not a subnet config"):
        SubnetConfig.from_json('{"a": 1}')


def test_sampling_respects_warmup_knobs_and_caps(ssr):
    rng = np.random.default_rng(0)
    full = [ssr.space.sample(rng, min_ratio=1.0, min_keep=1.0, resolution=32) for _ in range(5)]
    assert all(c.num_dropped == 0 and c.mean_ratio == 1.0 for c in full)
    for _ in range(20):
        cfg = ssr.space.sample(rng)
        assert ssr.space.fits(cfg) and min(r for _, r in cfg.ratios) >= 0.4
    assert ssr.space.feasible_resolutions(1.0, 1.0) == [32]  # 64px's cap excludes the full network


def test_cardinality_counts_the_allowed_drop_sets(base):
    """(That mutation and crossover stay in the space is a family contract: see ``test_families``.)"""
    # Drop sets counted by brute force: at most max_drops dropped, never every cross-attention.
    comps, text, k = base.space.droppable(), base.space.text_paths(), base.space.max_drops
    drop_sets = sum(
        1 for n in range(k + 1) for drop in itertools.combinations(comps, n) if not text <= set(drop)
    )
    assert base.space.cardinality() == 7 ** len(base.space.layers) * drop_sets


def test_text_conditioned_subnets_keep_a_cross_attention(base):
    """A subnet without any cross-attention cannot see its prompt: the space excludes it everywhere."""
    space = base.space
    text = sorted(space.text_paths())
    assert len(text) >= 2 and all(c == "temporal_cross" for _, c in text)
    with pytest.raises(ConfigError, match="drops every temporal_cross"):
        space.validate(space._make(None, 0.4, set(text)))
    space.validate(space._make(None, 0.4, set(text[:-1])))
    keep = space.smallest().keep_map
    assert sum(keep[b][c] for b, c in text) == 1
    rng = np.random.default_rng(4)
    for _ in range(200):
        cfg = space.sample(rng)
        assert any(cfg.keep_map[b][c] for b, c in text)
    assert not build_supernet("latent-unet", "tiny").space.text_paths()  # unconditional: no constraint


def test_subnets_keep_the_trained_fraction_of_components(base):
    """The warm-up trains down to 40% kept components: the space ends there, and smallest() is its corner."""
    space = base.space
    assert space.max_drops == int(0.6 * len(space.droppable()))
    too_many = space._make(None, 0.4, set(space.droppable()[: space.max_drops + 1]))
    with pytest.raises(ConfigError, match="keeping at least 40%"):
        space.validate(too_many)
    smallest = space.validate(space.smallest())
    assert smallest.num_dropped == space.max_drops and smallest.mean_ratio == pytest.approx(0.4)
    rng = np.random.default_rng(3)
    for _ in range(30):
        assert space.param_fraction(space.sample(rng)) >= space.param_fraction(smallest)


@pytest.mark.parametrize("fraction", [0.4, 0.6, 0.8, 1.0])
def test_subnets_at_target_fractions(base, fraction):
    cfg = base.space.subnet_at_fraction(fraction)
    assert abs(base.space.param_fraction(cfg) - fraction) < 0.03
