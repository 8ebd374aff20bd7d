"""Trajectory candidates (issue 20): serialisation, validation, the union of their weights, and their cost
(FLOPs and modelled latency of a schedule = the sum of its segments' over their steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.candidates import Candidate, Segment
from harness.measurement.cost import FlopCount, ParamCount
from harness.measurement.generation import Generation
from harness.models import load_bundle
from harness.paths import DEFAULT_BASE
from search_spaces import ConfigError


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEFAULT_BASE)


@pytest.fixture(scope="module")
def subnets(bundle):
    space = bundle.supernet.space
    return space.smallest(), space.subnet_at_fraction(0.6), space.largest()


def test_schedule_round_trips_and_hashes_by_content(bundle, subnets):
    small, mid, large = subnets
    cand = Candidate.schedule(8, [(3, small), (8, large)])
    assert cand.is_schedule and cand.num_segments == 2 and cand.base == small
    back = Candidate.from_json(cand.to_json())
    assert back == cand and back.key == cand.key
    assert json.loads(cand.to_json())["format"] == "sned-trajectory/1"
    # Every part of the trajectory is in the key: steps, split and each segment's subnet.
    others = [
        Candidate.schedule(8, [(4, small), (8, large)]),
        Candidate.schedule(9, [(3, small), (9, large)]),
        Candidate.schedule(8, [(3, mid), (8, large)]),
        Candidate.schedule(8, [(3, small), (8, mid)]),
        Candidate(small),
    ]
    assert len({c.key for c in [cand, *others]}) == 6
    assert cand.subnet_per_step(20) == [small] * 3 + [large] * 5


def test_one_segment_forms_are_canonical(subnets):
    small, _, large = subnets
    # Equal adjacent segments merge, so one trajectory has one key.
    assert Candidate.schedule(8, [(3, small), (8, small)]) == Candidate(small, None, 8)
    own_steps = Candidate(small, None, 8)
    assert not own_steps.is_schedule and own_steps.key != Candidate(small).key
    # At the protocol's own step count, a one-segment trajectory is today's candidate (shares its rows).
    assert own_steps.normalized(8) == Candidate(small) and own_steps.normalized(4) == own_steps
    schedule = Candidate.schedule(8, [(3, small), (8, large)])
    assert schedule.normalized(8) == schedule
    # Today's candidates serialise exactly as before: a plain subnet config.
    assert Candidate(small).to_json() == small.to_json() and Candidate(small).key == small.key


def test_describe_says_the_schedule_briefly(bundle, subnets):
    small, _, large = subnets
    net = bundle.supernet
    text = Candidate.schedule(8, [(3, small), (8, large)]).describe(net, None)
    frac = net.space.param_fraction(small)
    assert text == f"8 steps: {frac:.0%} params for steps 1-3, 100% for 4-8"
    assert Candidate(large, None, 4).describe(net, None).startswith("4 steps: 100% params")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["segments"][1].update(first_step=5), "a gap at step 4"),
        (lambda d: d["segments"][1].update(first_step=3), "an overlap"),
        (lambda d: d["segments"][1].update(last_step=7), "they end at step 7 of 8"),
        (lambda d: d.update(steps="8"), "steps must be an integer"),
        (lambda d: d.update(segments=[]), "segments must be a non-empty list"),
        (lambda d: d["segments"][0].pop("subnet"), "each needs first_step, last_step and subnet"),
    ],
)
def test_malformed_trajectories_are_one_line_errors(subnets, edit, message):
    small, _, large = subnets
    d = json.loads(Candidate.schedule(8, [(3, small), (8, large)]).to_json())
    edit(d)
    with pytest.raises(ConfigError, match=message) as err:
        Candidate.from_json(json.dumps(d))
    assert "\n" not in str(err.value)


def test_validation_names_the_step_count_and_the_subnet(bundle, subnets):
    small, _, large = subnets
    net = bundle.supernet
    cand = Candidate.schedule(8, [(3, small), (8, large)])
    assert cand.validate(net, None, (4, 8)) is cand
    with pytest.raises(ConfigError, match="8 sampling steps is not among the step choices 4,6"):
        cand.validate(net, None, (4, 6))
    elsewhere = large.replace(resolution=large.resolution * 2)
    with pytest.raises(ConfigError, match="every segment runs at one resolution"):
        Candidate.schedule(8, [(3, small), (8, elsewhere)]).validate(net, None)
    off_space = small.replace(ratios={name: 0.123 for name in small.ratio_map})
    with pytest.raises(ConfigError):
        Candidate.schedule(8, [(3, off_space), (8, large)]).validate(net, None)
    with pytest.raises(ConfigError, match="at least 1 sampling step"):
        Candidate(small, None, 0)
    with pytest.raises(ConfigError, match="first segment must run the candidate's base"):
        Candidate(large, None, 2, (Segment(1, 1, small), Segment(2, 2, large)))


def test_schedule_params_are_the_union_of_its_segments_weights(bundle, subnets):
    small, mid, large = subnets
    net = bundle.supernet
    nested = Candidate.schedule(8, [(3, small), (8, large)])
    assert nested.params(net, None) == net.count_params(large)  # small's weights lie inside large's
    pair = Candidate.schedule(8, [(3, small), (8, mid)])
    n_small, n_mid = net.count_params(small), net.count_params(mid)
    assert max(n_small, n_mid) <= pair.params(net, None) <= n_small + n_mid
    # A subnet that keeps what another drops uses weights the other does not: the union is larger.
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = net.space.sample(rng), net.space.sample(rng)
        union = Candidate.schedule(4, [(2, a), (4, b)]).params(net, None)
        assert max(net.count_params(a), net.count_params(b)) <= union
        assert union <= net.count_params(a) + net.count_params(b)
        masks_a, masks_b = net.active_masks(a), net.active_masks(b)
        exact = sum(
            int((masks_a.get(k, 0) | masks_b[k]).sum()) if k in masks_b else int(masks_a[k].sum())
            for k in set(masks_a) | set(masks_b)
        )
        assert union == exact
    assert ParamCount(Generation(bundle, None, 8, 3.0)).compute(pair)[0]["params"] == pair.params(net, None)


def test_schedule_flops_are_the_sum_of_its_segments(bundle, subnets):
    small, mid, large = subnets
    flops = FlopCount(Generation(bundle, None, steps=8, guidance=3.0))

    def of(cand):
        return flops.compute(cand)[0]["flops"]

    schedule = Candidate.schedule(8, [(3, small), (6, mid), (8, large)])
    parts = of(Candidate(small, None, 3)) + of(Candidate(mid, None, 3)) + of(Candidate(large, None, 2))
    assert of(schedule) == pytest.approx(parts, rel=1e-12)
    # ... and a single subnet's step count scales its FLOPs (nothing is done once per video here).
    assert of(Candidate(small, None, 4)) == pytest.approx(of(Candidate(small)) / 2, rel=1e-12)
    assert of(Candidate(small)) < of(schedule) < of(Candidate(large))


def test_generation_lists_each_segment_with_its_steps(bundle, subnets):
    small, _, large = subnets
    g = Generation(bundle, None, steps=8, guidance=3.0)
    stages = g.denoisers(Candidate.schedule(6, [(2, small), (6, large)]))
    assert [(s.subnet, s.steps) for s in stages] == [(small, 2), (large, 4)]
    assert stages[0].name.endswith("[steps 1-2]") and stages[1].name.endswith("[steps 3-6]")
    (plain,) = g.denoisers(Candidate(small))
    assert plain.steps == 8 and "[" not in plain.name
    assert g.steps_of(Candidate(small, None, 4)) == 4 and g.steps_of(Candidate(small)) == 8


def test_modelled_latency_of_a_schedule_is_the_sum_of_its_segments(bundle, subnets):
    from harness.roofline.catalogue import get_device
    from harness.roofline.model import RooflineModel, modelled_generation

    small, _, large = subnets
    g = Generation(bundle, None, steps=8, guidance=3.0)
    model = RooflineModel(get_device("a100-sxm4-80gb"), "fp32")

    def ms(cand):
        return modelled_generation(model, g, cand).seconds

    schedule = Candidate.schedule(8, [(3, small), (8, large)])
    assert ms(schedule) == pytest.approx(ms(Candidate(small, None, 3)) + ms(Candidate(large, None, 5)))


def test_evaluate_measures_a_schedule_from_its_json(tmp_path, capsys, bundle, subnets):
    from harness.evaluate import main

    small, _, large = subnets
    cand = Candidate.schedule(6, [(2, small), (6, large)])
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"candidate": cand.to_dict(), "study": "s"}))  # harness.export's record
    url = f"sqlite:///{tmp_path}/h.db"
    main(["--candidate", str(path), "--metrics", "params,flops", "--storage", url, "--threads", "1"])
    out = capsys.readouterr().out
    assert out.startswith(cand.describe(bundle.supernet, None)) and cand.key[:12] in out
    flops = FlopCount(Generation(bundle, None, steps=8, guidance=3.0)).compute(cand)[0]["flops"]
    assert f"{flops:.6g}" in out
    with pytest.raises(ValueError, match="drop --subnet"):
        main(["--candidate", str(path), "--fraction", "0.4", "--storage", url])
    path.write_text(cand.to_json().replace('"last_step":6', '"last_step":5'))
    with pytest.raises(ConfigError, match="they end at step 5 of 6"):
        main(["--candidate", str(path), "--metrics", "params", "--storage", url])
