"""Input embeddings beyond the paper's UNet, as named extras that a preset switches on as data.

A preset lists the extras it uses (``UNetHyper.conditioning``, a tuple of registered names, order
irrelevant). ``VideoUNet`` holds them as one module, ``self.conditioning = ConditioningExtras(spec)``, and
calls it at exactly two points of ``forward``:

1. ``time_embedding(temb, context, frames)``, right after the time (and noise-level) embedding: extras may
   add to it, or give it a frame axis: ``(B, D)`` in, ``(B, D)`` or ``(B, T, D)`` out.
2. ``features(x, temb, context, spec)``, right after ``conv_in``: extras may add to the features
   ``(B, C, T, H, W)``, ``C`` the subnet's ``conv_in`` width.

Contract of an extra (a ``ConditioningExtra`` registered with ``register_conditioning(name, cls)``):

- it is built as ``cls(spec)`` from the *full* ``UNetSpec`` and starts as the identity at both entry points
  (its last layer zero-initialised), so that adding it to a trained network, e.g. ``--init`` from a
  supernet saved without it, leaves the network's function unchanged;
- ``plan(spec)`` gives the sizes its children run at in the subnet of ``spec``: ``FULL`` (all of it, not
  searched) or ``{child: sizes}`` as in ``DynamicModule.plan``. ``VideoUNet.plan`` includes these entries,
  so parameter counts, optimizer masks and ``extract`` cover the extra like any other layer;
- ``requires`` names the extras it builds on and ``needs_text`` says it reads the text tokens; presets that
  break either are refused with a one-line ``ValueError`` (``validate_conditioning``);
- ``legacy_flag`` is the boolean that switched it on in configs saved before extras were named, and
  ``legacy_keys`` maps the parameter-name prefixes it had then (attributes of ``VideoUNet``) to its
  children (see ``legacy_key_map``).

The extras of a network run in registration order, whatever order the preset lists them in: float addition
is not associative, so one fixed order keeps a network's outputs the same for every spelling of its preset.

General extras live here; priors that encode how a particular data set is generated live in
``search_spaces.priors``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .blocks import FULL, zero_

if TYPE_CHECKING:
    from .unet import UNetSpec


class ConditioningExtra(nn.Module):
    """One extra input embedding (see the module docstring for the contract). Both entry points default
    to the identity; an extra overrides the one(s) it acts at."""

    requires: ClassVar[tuple[str, ...]] = ()
    needs_text: ClassVar[bool] = False
    legacy_flag: ClassVar[str | None] = None
    legacy_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, spec: UNetSpec):
        super().__init__()

    def plan(self, spec: UNetSpec) -> object:
        """Sizes of the children at ``spec``: ``FULL`` or ``{child name: sizes}``."""
        return FULL

    def time_embedding(self, temb: torch.Tensor, context: torch.Tensor | None, frames: int) -> torch.Tensor:
        """``temb`` ``(B, D)`` or ``(B, T, D)``, text tokens ``context`` ``(B, L, context_dim)`` or ``None``
        -> the new time embedding ``(B, D)`` or ``(B, T, D)``."""
        return temb

    def features(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor | None,
        spec: UNetSpec,
        extras: ConditioningExtras,
    ) -> torch.Tensor:
        """Features ``x`` ``(B, C, T, H, W)`` after ``conv_in`` at ``spec`` -> the same shape; ``temb`` as
        the time-embedding entry point returned it; ``extras``: the network's extras (``extras.get(name)``,
        for one that acts through another: see ``requires``)."""
        return x


_EXTRAS: dict[str, type[ConditioningExtra]] = {}


def register_conditioning(name: str, cls: type[ConditioningExtra]) -> None:
    """Make ``cls`` available to presets as ``conditioning=(..., name)``."""
    if name in _EXTRAS:
        raise ValueError(f"conditioning extra '{name}' is already registered")
    if not (isinstance(cls, type) and issubclass(cls, ConditioningExtra)):
        raise TypeError(f"conditioning extra '{name}' must be a ConditioningExtra subclass, got {cls!r}")
    taken = {old for other in _EXTRAS.values() for old in other.legacy_keys}
    if taken & set(cls.legacy_keys):
        raise ValueError(
            f"conditioning extra '{name}' claims legacy keys {sorted(taken & set(cls.legacy_keys))} "
            f"of another extra"
        )
    _EXTRAS[name] = cls


def list_conditioning() -> list[str]:
    """Registered extras, in registration (= application) order."""
    return list(_EXTRAS)


def validate_conditioning(names: Iterable[str], context_dim: int) -> tuple[str, ...]:
    """``names`` checked (known, no repeats, dependencies met) and put in application order."""
    if isinstance(names, str):
        raise TypeError(f"conditioning must be a tuple of extra names, got the string {names!r}")
    names = tuple(names)
    unknown = [n for n in names if n not in _EXTRAS]
    if unknown:
        raise ValueError(
            f"unknown conditioning extra '{unknown[0]}' (known: {', '.join(list_conditioning())})"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"conditioning lists an extra twice: {names}")
    for name in names:
        cls = _EXTRAS[name]
        missing = [r for r in cls.requires if r not in names]
        if missing:
            raise ValueError(f"conditioning extra '{name}' needs '{missing[0]}'; add it to conditioning")
        if cls.needs_text and not context_dim:
            raise ValueError(f"conditioning extra '{name}' needs a text-conditioned model (context_dim > 0)")
    return tuple(n for n in _EXTRAS if n in names)


def upgrade_config(d: Mapping) -> dict:
    """A ``UNetHyper`` / ``UNetSpec`` dict with the legacy booleans (``frame_embedding=True``, ...) of
    configs saved before extras were named replaced by the ``conditioning`` tuple they mean."""
    flags = {cls.legacy_flag: name for name, cls in _EXTRAS.items() if cls.legacy_flag}
    d = dict(d)
    present = [f for f in flags if f in d]
    if not present:
        return d
    if "conditioning" in d:
        raise ValueError(
            f"config has both 'conditioning' and the legacy flags {present}; keep 'conditioning'"
        )
    d["conditioning"] = tuple(flags[f] for f in present if d.pop(f))
    return d


# -- legacy parameter names --------------------------------------------------------------------------
PREFIX = "conditioning"  # VideoUNet's attribute holding the extras


def legacy_key_map() -> dict[str, str]:
    """Old parameter-name prefix -> new one, for checkpoints saved when the extras were attributes of
    ``VideoUNet`` (e.g. ``frame_embed`` -> ``conditioning.frame_embedding.embed``). A prefix matches a
    whole dotted component: ``position_embed.weight`` and ``position_embed.weight.ema`` map, while
    ``moving_position_embed.weight`` is another prefix's."""
    return {
        old: f"{PREFIX}.{name}.{child}"
        for name, cls in _EXTRAS.items()
        for old, child in cls.legacy_keys.items()
    }


def upgrade_key(key: str, key_map: Mapping[str, str] | None = None) -> str:
    key_map = legacy_key_map() if key_map is None else key_map
    for old, new in key_map.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return key


def upgrade_state_dict(keys_or_dict: Mapping[str, object] | Iterable[str]) -> dict[str, object] | list[str]:
    """Legacy parameter names mapped to the current ones: a dict keyed by names (model weights, and also
    the EMA's ``{name}.ema`` / optimizer's ``{name}.exp_avg`` tensors) gives a dict with the same values,
    a list of names gives a list. Current names pass unchanged."""
    key_map = legacy_key_map()
    if isinstance(keys_or_dict, Mapping):
        out = {upgrade_key(k, key_map): v for k, v in keys_or_dict.items()}
        if len(out) != len(keys_or_dict):
            raise ValueError("state dict holds a parameter under both its legacy and its current name")
        return out
    return [upgrade_key(k, key_map) for k in keys_or_dict]


def upgrade_legacy_keys_hook(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """``load_state_dict`` pre-hook: renames the legacy keys under ``prefix`` in place (torch passes its
    own copy of the caller's dict)."""
    key_map = legacy_key_map()
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + upgrade_key(key[len(prefix) :], key_map)
        if new != key:
            if new in state_dict:
                raise ValueError(f"state dict holds {new!r} under both its legacy and its current name")
            state_dict[new] = state_dict.pop(key)


# -- the container VideoUNet holds -------------------------------------------------------------------
class ConditioningExtras(nn.ModuleDict):
    """The extras a spec names (``spec.conditioning``), by name; the one hook object of ``VideoUNet``."""

    def __init__(self, spec: UNetSpec):
        names = validate_conditioning(spec.conditioning, spec.context_dim)
        super().__init__({name: _EXTRAS[name](spec) for name in names})

    def get(self, name: str) -> ConditioningExtra | None:
        """The extra of that name, or ``None`` when the network has none."""
        return self._modules.get(name)

    def plan(self, spec: UNetSpec) -> dict[str, object]:
        """Entries for ``VideoUNet.plan``, by dotted path under the UNet (``conditioning.<name>[.<child>]``)."""
        out: dict[str, object] = {}
        for name, extra in self.items():
            sizes = extra.plan(spec)
            if sizes is FULL:
                out[f"{PREFIX}.{name}"] = FULL
            else:
                out.update({f"{PREFIX}.{name}.{child}": s for child, s in sizes.items()})
        return out

    def time_embedding(self, temb: torch.Tensor, context: torch.Tensor | None, frames: int) -> torch.Tensor:
        """Entry point 1, after the time embedding: ``(B, D)`` -> ``(B, D)`` or ``(B, T, D)``."""
        for extra in self.values():
            temb = extra.time_embedding(temb, context, frames)
        return temb

    def features(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None, spec: UNetSpec
    ) -> torch.Tensor:
        """Entry point 2, after ``conv_in``: ``(B, C, T, H, W)`` -> the same shape."""
        for extra in self.values():
            x = extra.features(x, temb, context, spec, self)
        return x


# -- general extras ----------------------------------------------------------------------------------
class PooledText(ConditioningExtra):
    """The mean text token, projected, added to the time embedding (Imagen): every ResBlock, also those
    of levels without cross-attention, sees the prompt."""

    needs_text = True
    legacy_flag = "pooled_text"
    legacy_keys: ClassVar[dict[str, str]] = {"pooled_text": "proj"}

    def __init__(self, spec: UNetSpec):
        super().__init__(spec)
        self.proj = zero_(nn.Linear(spec.context_dim, spec.temb_dim))

    def time_embedding(self, temb: torch.Tensor, context: torch.Tensor | None, frames: int) -> torch.Tensor:
        pooled = self.proj(context.mean(dim=1))  # (B, D)
        return temb + (pooled if temb.dim() == 2 else pooled[:, None])


class FrameEmbedding(ConditioningExtra):
    """A learned vector per absolute frame index added to the time embedding, which becomes
    ``(B, T, D)``.

    Why: temporal convolutions and relative-position attention are (up to the clip's edges) blind to *which*
    frame they are at, and the first denoising step of a zero-terminal-SNR schedule sees noise that is
    alike in every frame; content that depends on time (where a moving object is at frame ``t``) needs
    ``t``."""

    legacy_flag = "frame_embedding"
    legacy_keys: ClassVar[dict[str, str]] = {"frame_embed": "embed"}

    def __init__(self, spec: UNetSpec):
        super().__init__(spec)
        self.max_frames = spec.max_frames
        self.embed = nn.Parameter(torch.zeros(spec.max_frames, spec.temb_dim))

    def time_embedding(self, temb: torch.Tensor, context: torch.Tensor | None, frames: int) -> torch.Tensor:
        if frames > self.max_frames:
            raise ValueError(f"{frames} frames exceed the model's max_frames {self.max_frames}")
        temb = temb[:, None, :] if temb.dim() == 2 else temb  # (B, 1 or T, D)
        return temb + self.embed[:frames]


# Registration order is application order: the pooled text joins the time embedding before it gains
# its frame axis.
register_conditioning("pooled_text", PooledText)
register_conditioning("frame_embedding", FrameEmbedding)
