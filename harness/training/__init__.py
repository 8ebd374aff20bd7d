"""Supernet training: masked optimisation of the sampled subnet (Algorithm 1)."""
