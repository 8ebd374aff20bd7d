"""Timestep-aware subnet sampling (an option beyond the paper, off by default).

Trajectory schedules (issue 20) run different subnets for different segments of the DDIM steps, and
follow T-Stitch (Pan et al., trajectory stitching): small subnets for the early, high-noise steps, where
the coarse layout is decided and small networks already do well; large ones for the late, low-noise
steps, where the detail is.
SNED's Algorithm 1 trains every subnet on uniformly drawn timesteps, so a small subnet spends most of
its updates on steps a schedule will never give it. With ``TrainOptions.timestep_aware = P``, each
sample's timestep is, with probability ``P``, drawn from the *band* of the timesteps where schedules
place subnets of that size instead of from the usual distribution:

* a subnet's size is its parameter fraction ``f``, normalised over its resolution's range,
  ``s = (f - f_min) / (f_max - f_min)`` clamped to ``[0, 1]``, with ``f_min`` the fraction of
  ``space.smallest(resolution)`` and ``f_max = min(1, size cap)``: schedules pick among the subnets of
  one resolution, so the largest one allowed there is the one that runs last;
* the band is ``W = timestep_band`` of the ``T`` timesteps, starting at ``(1 - s)(1 - W) T``: the
  smallest subnet's band is the noisiest ``[(1 - W) T, T)``, the largest's the cleanest ``[0, W T)``,
  linearly in between.

The per-sample choice between band and base is the mixture ``(1 - P) base + P band`` of the two
distributions, drawn with the step's existing per-sample generator (one ``multinomial`` draw, as for a
biased base): randomness still comes from ``(seed, step, sample index)`` alone, so ranks agree and a
resume is exact, and with ``P = 0`` nothing changes (the caller then keeps the base weights).

The sandwich (largest + smallest + random subnet per step) shares one batch, one noisy input and
timestep per sample, which in-place distillation needs (the largest subnet's prediction is the others'
target at the same timestep): a sandwich step draws its timesteps from the band of its random subnet.
"""

from __future__ import annotations

import torch

from harness.diffusion import NUM_TRAIN_TIMESTEPS


def check_timestep_options(aware: float, band: float) -> None:
    """Raise ``ValueError`` (one line, naming the flag) unless ``aware`` is in ``[0, 1]``, ``band`` in
    ``(0, 1]``."""
    if not 0.0 <= aware <= 1.0:
        raise ValueError(
            f"--timestep-aware {aware} is not a probability; pass 0 (off, the paper's) up to 1 (every "
            f"sample from its subnet's band)"
        )
    if not 0.0 < band <= 1.0:
        raise ValueError(
            f"--timestep-band {band} is not a fraction of the timesteps; pass a width in (0, 1], e.g. 0.5"
        )


def normalised_size(fraction: float, smallest: float, largest: float = 1.0) -> float:
    """A subnet's place in its resolution's size range: 0 for the smallest subnet, 1 for the largest."""
    if largest <= smallest:  # a resolution with a single size: every subnet is "the largest"
        return 1.0
    return min(1.0, max(0.0, (fraction - smallest) / (largest - smallest)))


def band_bounds(size: float, band: float, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, int]:
    """``[lo, hi)`` timesteps of a subnet of normalised ``size`` (0 smallest .. 1 largest): a ``band``
    fraction of the ``num_timesteps``, the noisiest for size 0, the cleanest for size 1."""
    width = max(1, round(band * num_timesteps))
    lo = round((1.0 - size) * (num_timesteps - width))
    return lo, lo + width


def band_timestep_weights(
    size: float,
    aware: float,
    band: float,
    base: torch.Tensor | None = None,
    num_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """Sampling weights ``(num_timesteps,)`` float64 summing to 1: with probability ``aware`` a timestep
    from the band of a subnet of normalised ``size`` (uniform within it), else from ``base``
    (``timestep_weights``; ``None``: uniform)."""
    check_timestep_options(aware, band)
    lo, hi = band_bounds(size, band, num_timesteps)
    in_band = torch.zeros(num_timesteps, dtype=torch.float64)
    in_band[lo:hi] = 1.0 / (hi - lo)
    if base is None:
        base = torch.full((num_timesteps,), 1.0 / num_timesteps, dtype=torch.float64)
    mixed = (1.0 - aware) * base.to(torch.float64) + aware * in_band
    return mixed / mixed.sum()


def subnet_timestep_weights(
    space, cfg, aware: float, band: float, base: torch.Tensor | None = None
) -> torch.Tensor:
    """``band_timestep_weights`` of subnet ``cfg`` of ``space`` (a ``SearchSpace``), its size normalised
    over the subnets of its resolution."""
    smallest = space.param_fraction(space.smallest(cfg.resolution))
    largest = min(1.0, space.size_caps[cfg.resolution])
    size = normalised_size(space.param_fraction(cfg), smallest, largest)
    return band_timestep_weights(size, aware, band, base)
