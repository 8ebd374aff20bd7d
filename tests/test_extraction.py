"""Sliced supernet == extracted static subnet, exact parameter counts, persistence (every family)."""

import numpy as np
import pytest
import torch

from search_spaces import build_supernet, list_families, load_static, load_supernet, save_static

FAMILIES = ["pixel-base", "pixel-ssr"]  # the latent family has its own file (autoencoder in the loop)
N_RANDOM = 50


def _configs(space, resolution, n, seed):
    rng = np.random.default_rng(seed)
    return [space.largest(resolution) if space.fits(space.largest(resolution)) else space.sample(rng, resolution=resolution),
            space.smallest(resolution)] + [space.sample(rng, resolution=resolution) for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_lists_family(family):
    assert family in list_families()


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_equals_extracted(family, tiny_nets):
    net = tiny_nets[family]
    for res in net.space.resolutions:
        for i, cfg in enumerate(_configs(net.space, res, N_RANDOM, seed=hash((family, res)) % 2**32)):
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
    from harness.training.masked_optim import box_to_mask

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
    assert loaded.subnet_config == cfg


@pytest.mark.parametrize("family,target,tol", [("pixel-base", 1.6e9, 0.05), ("pixel-ssr", 428e6, 0.05)])
def test_paper_preset_sizes_on_meta(family, target, tol):
    with torch.device("meta"):
        net = build_supernet(family, "paper")
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - target) / target <= tol, f"{family} paper preset has {n / 1e6:.1f}M parameters"
    assert net.space.total_params == n


@pytest.mark.parametrize("part", ["frame_embed", "pooled_text", "position_embed", "position_film",
                                  "moving_position_embed", "velocity"])
def test_zero_initialised_additions_are_the_network_without_them(tiny_nets, part):
    """The tiny base's frame embedding, pooled-text projection, position embedding, its modulation and the
    moving-coordinate embedding with its velocity start at zero, so a supernet saved without them (older
    checkpoints, ``--init``) computes exactly the same function after gaining them; trained, each changes
    it."""
    import dataclasses

    net = tiny_nets["pixel-base"]
    h = net.hyper
    assert h.frame_embedding and h.pooled_text and h.position_embedding and h.position_modulation
    assert h.position_velocity
    plain = build_supernet("pixel-base", "tiny", hyper=dataclasses.replace(
        h, frame_embedding=False, pooled_text=False, position_embedding=False, position_modulation=False,
        position_velocity=False))
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["frame_embed", "moving_position_embed.bias",
                                                  "moving_position_embed.weight", "pooled_text.bias",
                                                  "pooled_text.weight", "position_embed.bias",
                                                  "position_embed.weight", "position_film.bias",
                                                  "position_film.weight", "velocity.bias", "velocity.weight"]
    cfg = net.space.sample(2)
    inputs = net.dummy_inputs(cfg, batch_size=2, frames=12, seed=0)
    saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
    # A modulation acts through the embedding it modulates, so it is measured with that embedding in place.
    needs = {"position_film": ("position_embed", "position_film"),
             "velocity": ("moving_position_embed", "velocity")}.get(part, (part,))
    with torch.no_grad():
        for k in unexpected:
            net.state_dict()[k].zero_()
        # Equal up to float rounding: the time projection runs per frame, a differently shaped matmul.
        torch.testing.assert_close(net(**inputs, subnet=cfg), plain(**inputs, subnet=cfg), atol=1e-6, rtol=0)
        for k in unexpected:
            if k.startswith(needs):
                net.state_dict()[k].copy_(saved[k])
        with_part = net(**inputs, subnet=cfg)
        if len(needs) > 1:
            for k in unexpected:
                if k.startswith(part + "."):
                    net.state_dict()[k].zero_()
        assert (with_part - (net if len(needs) > 1 else plain)(**inputs, subnet=cfg)).abs().max() > 1e-3
        net.load_state_dict(saved)
        with pytest.raises(ValueError, match="frames exceed the model's max_frames"):
            net(**net.dummy_inputs(cfg, batch_size=1, frames=net.hyper.max_frames + 1), subnet=cfg)
