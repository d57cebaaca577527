"""Differentiable MD observables of one frame, and the loss that compares their averages to targets.

Every observable here is a smooth function of the positions (and, where the potential enters, of
its parameters), so ``jax.grad`` reaches through it: the histograms of ``a2ijax.md`` are step
functions, with zero gradient almost everywhere; these smear every pair or angle with a Gaussian.
They work on one frame and a Dense jax-md neighbour list; average them over a trajectory with
``a2ijax.diffmd`` (plain means for backpropagation through MD, Boltzmann weights for reweighting).

* :func:`pair_correlation`: g(r) per species pair, Gaussians of width ``smearing`` on a radial grid;
* :func:`pressure`: virial pressure plus the ideal-gas term at the thermostat's ``kT``;
* :func:`bond_angle_distribution`: density of ``cos(theta_jik)`` over triplets within ``r_max`` of
  the centre (Stillinger-Weber silicon's tetrahedral order);
* :func:`observable_loss`: the weighted sum of squared differences between observables and targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax_md import partition, quantity

from a2ijax.errors import InputError
from a2ijax.neighbors import masked_displacements

Array = jax.Array


def _safe_norm(dR: Array, mask: Array, fill: float) -> Array:
    r2 = jnp.sum(dR * dR, -1)
    return jnp.where(mask, jnp.sqrt(jnp.where(mask, r2, 1.0)), fill)


def _gaussians(x: Array, grid: Array, width: float) -> Array:
    """``[..., G]`` normalised Gaussians of ``x [...]`` on ``grid [G]``."""
    return jnp.exp(-0.5 * ((x[..., None] - grid) / width) ** 2) / (width * math.sqrt(2 * math.pi))


def pair_correlation(R: Array, neighbor: partition.NeighborList, displacement_fn: Callable, volume: float,
                     grid: Array, smearing: float, species: Array | None = None, n_species: int = 1) -> Array:
    """Smoothed radial distribution functions ``g_ab(r)`` on ``grid``: ``[n_species, n_species, G]``.

    ``g_ab(r) = V / (N_a (N_b - delta_ab)) sum_{i in a, j in b, j != i} G(r - r_ij) / (4 pi r^2)`` with
    ``G`` a Gaussian of width ``smearing``; 1 for an ideal gas, as ``a2ijax.md.radial_distribution``.
    The neighbour list must reach ``grid[-1] + 3 smearing``.
    """
    dR, mask = masked_displacements(R, neighbor.idx, displacement_fn)
    r = _safe_norm(dR, mask, 1e6)  # padded slots far beyond the grid: their Gaussians are 0
    smear = _gaussians(r, grid, smearing) * mask[..., None]  # [N, K, G]
    if species is None:
        species = jnp.zeros(R.shape[0], jnp.int32)
    own = jax.nn.one_hot(species, n_species, dtype=R.dtype)  # [N, S]
    other = own[jnp.where(mask, neighbor.idx, 0)] * mask[..., None]  # [N, K, S]
    counts = jnp.sum(own, 0)  # [S]
    pairs = jnp.einsum("na,nkb,nkg->abg", own, other, smear)
    norm = counts[:, None] * (counts[None, :] - jnp.eye(n_species, dtype=R.dtype))
    shell = 4.0 * math.pi * grid**2
    return volume * pairs / (jnp.maximum(norm, 1.0)[..., None] * shell)


def pressure(energy_fn: Callable[..., Array], R: Array, box: Array, kT: float, **kwargs) -> Array:
    """``P = N kT / V - dU/dV``: the virial pressure (jax-md's strain derivative; ``energy_fn(R, **kwargs)``
    must accept ``perturbation``, as every jax-md and a2ijax energy does) plus the ideal-gas term at
    the temperature ``kT`` the frames were sampled at."""
    n, dim = R.shape
    return quantity.pressure(energy_fn, R, box, kinetic_energy=0.5 * n * dim * kT, **kwargs)


def bond_angle_distribution(R: Array, neighbor: partition.NeighborList, displacement_fn: Callable, r_max: float,
                            grid: Array, smearing: float) -> Array:
    """Smoothed density of ``cos(theta_jik)`` on ``grid`` (in [-1, 1]) over the ordered triplets whose
    legs ``ij`` and ``ik`` are both shorter than ``r_max``, each weighted by a smooth switch that
    falls from 1 to 0 over the last 10% of ``r_max`` (so a leg crossing it changes nothing abruptly):
    ``[G]``, integrating to about 1."""
    dR, mask = masked_displacements(R, neighbor.idx, displacement_fn)
    r = _safe_norm(dR, mask, 2.0 * r_max)
    x = jnp.clip((r - 0.9 * r_max) / (0.1 * r_max), 0.0, 1.0)
    switch = jnp.where(mask, 1.0 - x * x * (3.0 - 2.0 * x), 0.0)  # [N, K], smoothstep down to 0 at r_max
    unit = dR / r[..., None]
    cos = jnp.einsum("nkd,nld->nkl", unit, unit)
    weight = switch[:, :, None] * switch[:, None, :] * (1.0 - jnp.eye(cos.shape[-1], dtype=R.dtype))
    density = jnp.einsum("nkl,nklg->g", weight, _gaussians(cos, grid, smearing))
    return density / jnp.maximum(jnp.sum(weight), 1e-12)


def observable_loss(predictions: dict[str, Array], targets: dict[str, Any],
                    weights: dict[str, float] | None = None) -> tuple[Array, dict[str, Array]]:
    """``sum_k weight_k mean((prediction_k - target_k)^2)`` over the targets' names, and each term.
    Every target needs a prediction of its shape; a weight left out is 1."""
    weights = weights or {}
    unknown = sorted(set(weights) - set(targets))
    if unknown:
        raise InputError(f"weights for observables without a target: {unknown}")
    terms = {}
    for name, target in targets.items():
        if name not in predictions:
            raise InputError(f"no prediction for the observable {name!r}; predicted: {sorted(predictions)}")
        prediction, target = predictions[name], jnp.asarray(target)
        if prediction.shape != target.shape:
            raise InputError(f"observable {name!r}: prediction shape {prediction.shape} != target shape {target.shape}")
        terms[name] = weights.get(name, 1.0) * jnp.mean((prediction - target) ** 2)
    return sum(terms.values()), terms
