"""Conditioning extras: the registry, preset validation, legacy configs and parameter names, and a new
extra plugged in without touching the UNet."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from search_spaces import (
    UNetHyper,
    UNetSpec,
    build_supernet,
    legacy_key_map,
    list_conditioning,
    load_static,
    register_conditioning,
    save_static,
    upgrade_state_dict,
)
from search_spaces import conditioning as cond
from search_spaces.blocks import zero_
from search_spaces.ops import DynamicLinear
from search_spaces.registry import preset_hyper
from search_spaces.supernet import static_config_dict

from .conftest import randomize_

CHECKPOINTS = "results/checkpoints"
LEGACY_FLAGS = (
    "frame_embedding",
    "pooled_text",
    "position_embedding",
    "position_modulation",
    "position_velocity",
)


@pytest.fixture(scope="module")
def base():
    return randomize_(build_supernet("pixel-base", "tiny"), seed=3)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so a test's extras leave the others' untouched."""
    monkeypatch.setattr(cond, "_EXTRAS", dict(cond._EXTRAS))


class ChannelBias(cond.ConditioningExtra):
    """A test extra: a per-channel bias of the features read from the time embedding, sliced with conv_in."""

    def __init__(self, spec):
        super().__init__(spec)
        self.proj = zero_(DynamicLinear(spec.temb_dim, spec.conv_in))

    def plan(self, spec):
        return {"proj": ((spec.temb_dim,), spec.conv_in)}

    def features(self, x, temb, context, spec, extras):
        bias = self.proj(temb, self.plan(spec)["proj"])  # (B, C) or (B, T, C)
        bias = bias[:, :, None] if bias.dim() == 2 else bias.transpose(1, 2)
        return x + bias[..., None, None]


# -- registry and validation -------------------------------------------------------------------------
def test_registry_lists_the_built_in_extras_in_application_order():
    assert list_conditioning()[:5] == [
        "pooled_text",
        "frame_embedding",
        "position_embedding",
        "position_modulation",
        "position_velocity",
    ]


def test_registering_twice_or_a_non_extra_is_refused(registry):
    with pytest.raises(ValueError, match="'pooled_text' is already registered"):
        register_conditioning("pooled_text", ChannelBias)
    with pytest.raises(TypeError, match="must be a ConditioningExtra subclass"):
        register_conditioning("not_an_extra", torch.nn.Linear)


@pytest.mark.parametrize(
    "changes,needle",
    [
        (
            {"conditioning": ("shadows",)},
            "unknown conditioning extra 'shadows' (known: pooled_text, frame_embedding",
        ),
        ({"conditioning": ("position_modulation",)}, "'position_modulation' needs 'position_embedding'"),
        (
            {"conditioning": ("position_embedding", "position_velocity"), "context_dim": 0},
            "'position_velocity' needs a text-conditioned model (context_dim > 0)",
        ),
        (
            {"conditioning": ("pooled_text",), "context_dim": 0},
            "'pooled_text' needs a text-conditioned model",
        ),
        ({"conditioning": ("pooled_text", "pooled_text")}, "lists an extra twice"),
    ],
)
def test_invalid_conditioning_is_a_one_line_error(base, changes, needle):
    for build in (lambda: UNetHyper(**changes), lambda: dataclasses.replace(base.spec, **changes)):
        with pytest.raises(ValueError) as e:
            build()
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TypeError, match="got the string"):
        UNetHyper(conditioning="pooled_text")


def test_the_order_a_preset_lists_its_extras_in_does_not_matter():
    tiny = preset_hyper("pixel-base", "tiny")
    shuffled = dataclasses.replace(tiny, conditioning=tuple(reversed(tiny.conditioning)))
    assert shuffled == tiny and hash(shuffled) == hash(tiny) and shuffled.to_dict() == tiny.to_dict()


def test_frame_embedding_refuses_more_frames_than_it_has(base):
    cfg = base.space.smallest()
    with pytest.raises(ValueError, match="frames exceed the model's max_frames"):
        base(**base.dummy_inputs(cfg, frames=base.hyper.max_frames + 1), subnet=cfg)


# -- legacy configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["pixel-base", "pixel-ssr", "latent-unet"])
def test_shipped_configs_read_as_their_presets(family):
    with open(f"{CHECKPOINTS}/{family}-tiny/config.json") as f:
        hyper = UNetHyper.from_dict(json.load(f)["hyper"])
    assert hyper == preset_hyper(family, "tiny")
    written = hyper.to_dict()
    assert written["conditioning"] == hyper.conditioning and not set(LEGACY_FLAGS) & set(written)


def test_legacy_spec_flags_read_as_conditioning(base):
    spec = base.spec
    legacy = {k: v for k, v in spec.to_dict().items() if k != "conditioning"}
    legacy |= dict.fromkeys(LEGACY_FLAGS, True) | {"position_velocity": False}
    read = UNetSpec.from_dict(json.loads(json.dumps(legacy)))
    assert read == dataclasses.replace(
        spec, conditioning=tuple(n for n in spec.conditioning if n != "position_velocity")
    )
    assert UNetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="both 'conditioning' and the legacy flags"):
        UNetHyper.from_dict({"conditioning": ["pooled_text"], "pooled_text": True})


# -- legacy parameter names --------------------------------------------------------------------------
def test_legacy_key_map():
    assert legacy_key_map() == {
        "pooled_text": "conditioning.pooled_text.proj",
        "frame_embed": "conditioning.frame_embedding.embed",
        "position_embed": "conditioning.position_embedding.embed",
        "position_film": "conditioning.position_modulation.film",
        "velocity": "conditioning.position_velocity.velocity",
        "moving_position_embed": "conditioning.position_velocity.embed",
    }
    names = [
        "frame_embed",
        "frame_embed.ema_count",
        "position_embed.weight.exp_avg",
        "moving_position_embed.bias",
        "velocity.weight",
        "time_embed.0.weight",
        "conditioning.pooled_text.proj.bias",
        "position_embedding_x",
    ]
    assert upgrade_state_dict(names) == [
        "conditioning.frame_embedding.embed",
        "conditioning.frame_embedding.embed.ema_count",
        "conditioning.position_embedding.embed.weight.exp_avg",
        "conditioning.position_velocity.embed.bias",
        "conditioning.position_velocity.velocity.weight",
        "time_embed.0.weight",
        "conditioning.pooled_text.proj.bias",
        "position_embedding_x",
    ]
    with pytest.raises(ValueError, match="under both its legacy and its current name"):
        upgrade_state_dict({"frame_embed": 0, "conditioning.frame_embedding.embed": 1})


def test_shipped_weights_load_under_the_new_names(base):
    weights = load_file(f"{CHECKPOINTS}/pixel-base-tiny/model.safetensors")
    assert "frame_embed" in weights and not any(k.startswith("conditioning.") for k in weights)
    own = base.state_dict()
    assert set(upgrade_state_dict(weights)) == set(own)
    fresh = build_supernet("pixel-base", "tiny")
    fresh.load_state_dict(weights)  # strict: the load_state_dict pre-hook renames
    assert torch.equal(fresh.conditioning.frame_embedding.embed, weights["frame_embed"].float())
    nested = torch.nn.Sequential(build_supernet("pixel-base", "tiny"))
    nested.load_state_dict({f"0.{k}": v for k, v in weights.items()})  # under a prefix too
    assert torch.equal(
        nested[0].conditioning.position_velocity.velocity.weight, weights["velocity.weight"].float()
    )


def test_a_subnet_exported_before_the_rename_loads(base, tmp_path):
    cfg = base.space.sample(4)
    static = base.extract(cfg)
    save_static(static, tmp_path)
    old_names = {new: old for old, new in legacy_key_map().items()}
    weights = {
        cond.upgrade_key(k, old_names): v for k, v in load_file(str(tmp_path / "model.safetensors")).items()
    }
    assert "frame_embed" in weights and "velocity.weight" in weights
    save_file(weights, str(tmp_path / "model.safetensors"))
    config = static_config_dict(static)
    names = config["spec"].pop("conditioning")
    config["spec"] |= {flag: flag in names for flag in LEGACY_FLAGS}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_static(tmp_path)
    inputs = base.dummy_inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), static(**inputs))
    assert loaded.spec == static.spec and loaded.subnet_config == cfg


# -- a new extra -------------------------------------------------------------------------------------
def test_a_registered_extra_is_sliced_counted_and_extracted_like_any_layer(registry):
    register_conditioning("channel_bias", ChannelBias)
    hyper = dataclasses.replace(preset_hyper("pixel-ssr", "tiny"), conditioning=("channel_bias",))
    net = randomize_(build_supernet("pixel-ssr", "tiny", hyper=hyper), seed=1)
    assert {n for n, _ in net.named_parameters() if n.startswith("conditioning.")} == {
        "conditioning.channel_bias.proj.weight",
        "conditioning.channel_bias.proj.bias",
    }
    cfg = net.space.smallest()
    static = net.extract(cfg)
    inputs = net.dummy_inputs(cfg, frames=4)
    with torch.no_grad():
        torch.testing.assert_close(net(**inputs, subnet=cfg), static(**inputs), atol=1e-5, rtol=0)
    assert static.conditioning.channel_bias.proj.weight.shape == (static.spec.conv_in, static.spec.temb_dim)
    assert static.spec.conv_in < net.spec.conv_in
    assert net.count_params(cfg) == sum(p.numel() for p in static.parameters())
    assert sum(int(m.sum()) for m in net.active_masks(cfg).values()) == net.count_params(cfg)
