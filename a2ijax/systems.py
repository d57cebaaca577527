"""Reference systems of the paper's three challenges, as jax-md energy functions, and their state points.

* ``lj``: Lennard-Jones fluid, reduced units (sigma = epsilon = mass = 1), truncated at 2.5 and
  shifted to zero there (LAMMPS ``pair_style lj/cut 2.5`` with ``pair_modify shift yes``). The force
  is not shifted, so it jumps by 0.039 at the cutoff, as in the textbook model. Periodic boundaries.
* ``ka``: Kob-Andersen 80:20 binary mixture, reduced units of the A-A pair: eps_AA = 1, eps_AB =
  1.5, eps_BB = 0.5, sigma_AA = 1, sigma_AB = 0.8, sigma_BB = 0.88, each pair truncated at
  2.5 sigma_ab and shifted; number density 1.2; equal masses.
* ``sw``: Stillinger-Weber silicon, metal units (eV, Angstrom, amu; the time unit is
  Angstrom sqrt(amu / eV) = 10.18 fs): sigma = 2.0951, eps = 2.16826, a = 1.8, lambda = 21,
  gamma = 1.2, cos(theta0) = -1/3, A = 7.049556277, B = 0.6022245584, p = 4, q = 0 (jax-md's
  defaults; LAMMPS' ``Si.sw`` rounds eps to 2.1683). Cutoff a sigma = 3.77118 Angstrom.

Every energy function has the jax-md shape ``energy_fn(R, neighbor, per_atom=False, **kw)`` on a
Dense neighbour list, ``**kw`` reaching the displacement function (``box``, ``perturbation``, so
``jax_md.quantity.stress`` works). Per-atom energies: pair potentials give each atom half of each of
its pair terms (exact and unique); for Stillinger-Weber the two-body terms are halved and each
three-body term ``j-i-k`` goes to its central atom ``i``, the decomposition a model of atom ``i``'s
neighbourhood can represent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import partition, smap, space

from a2ijax.errors import InputError
from a2ijax.neighbors import masked_displacements

Array = jax.Array

SW_PARAMETERS = dict(epsilon=2.16826, sigma=2.0951, a=1.8, lam=21.0, gamma=1.2, cos_theta0=-1.0 / 3.0,
                     A=7.049556277, B=0.6022245584, p=4.0, q=0.0)
SI_MASS = 28.0855  # amu
SI_LATTICE = 5.431  # Angstrom, diamond conventional cell
BOLTZMANN_EV = 8.617333262e-5  # eV / K
EV_PER_A3_IN_BAR = 1.602176634e6


@dataclasses.dataclass(frozen=True)
class StatePoint:
    """A thermodynamic state: temperature ``kT`` (energy units), number density, phase label."""

    name: str
    kT: float
    density: float
    phase: str = "liquid"


@dataclasses.dataclass(frozen=True)
class ReferenceSystem:
    """A reference potential with its conventions and the state points sampled for data.

    ``symbols`` are the chemical symbols used in files for species ids ``0, 1, ...`` (LJ and KA
    particles are written as Ar and Ne: placeholders, the units are reduced). ``composition``
    gives the fraction of each species. ``cutoff`` is the largest interaction range.
    """

    name: str
    description: str
    symbols: tuple[str, ...]
    composition: tuple[float, ...]
    mass: float
    cutoff: float
    dt: float
    units: str
    state_points: tuple[StatePoint, ...]
    n_atoms: int
    builder: Callable[..., tuple[partition.NeighborFn, Callable[..., Array]]]

    def neighbor_list(self, displacement_fn: Callable, box: Any, species: Array | None = None,
                      **nl_kwargs) -> tuple[partition.NeighborFn, Callable[..., Array]]:
        """``(neighbor_fn, energy_fn)`` on a Dense neighbour list; ``energy_fn(R, neighbor, per_atom=False)``."""
        return self.builder(displacement_fn, box, species, **nl_kwargs)

    def state_point(self, name: str) -> StatePoint:
        """The state point called ``name``; an error lists the known ones."""
        for point in self.state_points:
            if point.name == name:
                return point
        raise InputError(f"unknown state point {name!r} for {self.name}; known: {[p.name for p in self.state_points]}")

    def species(self, n_atoms: int) -> np.ndarray:
        """Species ids for ``n_atoms`` atoms in the system's composition (ids sorted ascending)."""
        counts = np.floor(np.asarray(self.composition) * n_atoms + 0.5).astype(int)
        counts[0] += n_atoms - counts.sum()
        return np.repeat(np.arange(len(counts)), counts).astype(np.int32)


def truncated_shifted_lj(dr: Array, sigma: Array = 1.0, epsilon: Array = 1.0, cutoff: Array = 2.5) -> Array:
    """``4 eps [(sigma/r)^12 - (sigma/r)^6] - (the same at r = cutoff)`` for ``r < cutoff``, else 0."""
    inside = (dr < cutoff) & (dr > 0)
    r = jnp.where(inside, dr, cutoff)  # finite everywhere, gradients included
    idr6 = (sigma / r) ** 6
    icut6 = (sigma / cutoff) ** 6
    energy = 4.0 * epsilon * ((idr6 * idr6 - idr6) - (icut6 * icut6 - icut6))
    return jnp.where(inside, energy, 0.0)


def _lj_mixture(sigma: np.ndarray, epsilon: np.ndarray, cutoff_factor: float = 2.5):
    """Builder for a truncated-and-shifted LJ mixture with per-pair ``cutoff_factor * sigma_ab``."""
    sigma, epsilon = np.asarray(sigma, float), np.asarray(epsilon, float)

    def build(displacement_fn, box, species=None, **nl_kwargs):
        cutoff = cutoff_factor * sigma
        neighbor_fn = partition.neighbor_list(displacement_fn, box, float(cutoff.max()),
                                              format=partition.Dense, **nl_kwargs)
        if sigma.ndim == 0:
            species_kw = dict(sigma=float(sigma), epsilon=float(epsilon), cutoff=float(cutoff))
            species = None
        else:
            if species is None:
                raise InputError(f"a mixture of {sigma.shape[0]} species needs species=[n_atoms] ids")
            species_kw = dict(sigma=jnp.asarray(sigma), epsilon=jnp.asarray(epsilon), cutoff=jnp.asarray(cutoff))
        metric = space.canonicalize_displacement_or_metric(displacement_fn)
        total_fn = smap.pair_neighbor_list(truncated_shifted_lj, metric, species=species, ignore_unused_parameters=True,
                                            **species_kw)
        per_atom_fn = smap.pair_neighbor_list(truncated_shifted_lj, metric, species=species, reduce_axis=(1,),
                                              ignore_unused_parameters=True,
                                              **species_kw)

        def energy_fn(R, neighbor, per_atom: bool = False, **kwargs):
            return (per_atom_fn if per_atom else total_fn)(R, neighbor=neighbor, **kwargs)

        return neighbor_fn, energy_fn

    return build


def _stillinger_weber(displacement_fn, box, species=None, **nl_kwargs):
    """Stillinger-Weber silicon on a Dense neighbour list, with per-atom energies."""
    sigma, a = SW_PARAMETERS["sigma"], SW_PARAMETERS["a"]
    cutoff = a * sigma
    neighbor_fn = partition.neighbor_list(displacement_fn, box, cutoff, format=partition.Dense, **nl_kwargs)

    def energy_fn(R, neighbor, per_atom: bool = False, **kwargs):
        # Energy parameters may be given per call (traced: differentiable); sigma and a fix the
        # cutoff of the neighbour list and cannot change. The other keywords reach the displacement.
        fixed = [name for name in ("sigma", "a") if name in kwargs]
        if fixed:
            raise InputError(f"Stillinger-Weber {fixed} set the neighbour-list cutoff and cannot change per call")
        sw = {**SW_PARAMETERS, **{k: kwargs.pop(k) for k in list(kwargs) if k in SW_PARAMETERS}}
        dR, mask = masked_displacements(R, neighbor.idx, displacement_fn, **kwargs)  # [N, K, 3], [N, K]
        r2 = jnp.sum(dR * dR, -1)
        near = mask & (r2 < cutoff**2)
        r = jnp.sqrt(jnp.where(near, r2, (0.5 * cutoff) ** 2))  # [N, K], safe where unused
        # In float32, sqrt can round r2 < cutoff^2 up to r == cutoff: sigma / 0 would then make the
        # force 0 * inf = NaN. Such a pair contributes exactly 0, so it is left out, and the gap
        # r - cutoff is replaced by a harmless -1 wherever it is not used.
        inside = near & (r < cutoff)
        gap = jnp.where(inside, r - cutoff, -1.0)
        # Two-body: A eps (B (sigma/r)^p - (sigma/r)^q) exp(sigma / (r - a sigma)), halved per atom.
        decay = jnp.exp(sigma / gap)
        pair = sw["A"] * sw["epsilon"] * (sw["B"] * (sigma / r) ** sw["p"] - (sigma / r) ** sw["q"]) * decay
        two_body = 0.5 * jnp.sum(jnp.where(inside, pair, 0.0), -1)  # [N]
        # Three-body on central atom i: lambda eps sum_{j<k} g_j g_k (cos_jik - cos0)^2.
        g = jnp.where(inside, jnp.exp(sw["gamma"] * sigma / gap), 0.0)  # [N, K]
        unit = dR / r[..., None]
        cos = jnp.einsum("nkd,nld->nkl", unit, unit)  # [N, K, K]
        off_diagonal = 1.0 - jnp.eye(cos.shape[-1], dtype=cos.dtype)
        triple = g[:, :, None] * g[:, None, :] * (cos - sw["cos_theta0"]) ** 2 * off_diagonal
        three_body = 0.5 * sw["lam"] * sw["epsilon"] * jnp.sum(triple, (-1, -2))  # [N]
        energies = two_body + three_body
        return energies if per_atom else jnp.sum(energies)

    return neighbor_fn, energy_fn


KA_SIGMA = np.array([[1.0, 0.8], [0.8, 0.88]])
KA_EPSILON = np.array([[1.0, 1.5], [1.5, 0.5]])

SYSTEMS: dict[str, ReferenceSystem] = {
    "lj": ReferenceSystem(
        name="lj", description="Lennard-Jones fluid, truncated and shifted at 2.5 sigma, periodic",
        symbols=("Ar",), composition=(1.0,), mass=1.0, cutoff=2.5, dt=0.005,
        units="reduced LJ units: sigma, epsilon, mass = 1; time sigma sqrt(m / epsilon)",
        state_points=(StatePoint("rho0.75_T1.0", 1.0, 0.75), StatePoint("rho0.84_T0.85", 0.85, 0.84),
                      StatePoint("rho0.84_T1.5", 1.5, 0.84), StatePoint("rho0.90_T1.2", 1.2, 0.90),
                      StatePoint("rho0.80_T2.0", 2.0, 0.80)),
        n_atoms=256, builder=_lj_mixture(np.array(1.0), np.array(1.0))),
    "ka": ReferenceSystem(
        name="ka", description="Kob-Andersen 80:20 binary Lennard-Jones mixture, each pair cut at 2.5 sigma_ab "
                               "and shifted, density 1.2",
        symbols=("Ar", "Ne"), composition=(0.8, 0.2), mass=1.0, cutoff=2.5, dt=0.005,
        units="reduced units of the A-A pair: sigma_AA, epsilon_AA, mass = 1",
        state_points=tuple(StatePoint(f"rho1.2_T{t}", t, 1.2) for t in (0.6, 0.8, 1.0, 1.5, 2.0)),
        n_atoms=250, builder=_lj_mixture(KA_SIGMA, KA_EPSILON)),
    "sw": ReferenceSystem(
        name="sw", description="Stillinger-Weber silicon: diamond crystal at several temperatures and the liquid",
        symbols=("Si",), composition=(1.0,), mass=SI_MASS, cutoff=SW_PARAMETERS["a"] * SW_PARAMETERS["sigma"],
        dt=0.1, units="metal: eV, Angstrom, amu; time Angstrom sqrt(amu / eV) = 10.18 fs",
        state_points=(StatePoint("crystal_300K", 300 * BOLTZMANN_EV, 8 / SI_LATTICE**3, "crystal"),
                      StatePoint("crystal_900K", 900 * BOLTZMANN_EV, 8 / SI_LATTICE**3, "crystal"),
                      StatePoint("crystal_1500K", 1500 * BOLTZMANN_EV, 8 / SI_LATTICE**3, "crystal"),
                      StatePoint("liquid_2500K", 2500 * BOLTZMANN_EV, 0.0542, "liquid")),
        n_atoms=216, builder=_stillinger_weber),
}


#: The physical parameters each reference potential exposes to gradients (``parametric_energy``).
PHYSICAL_PARAMETERS = {
    "lj": dict(sigma=1.0, epsilon=1.0),
    "ka": dict(sigma=KA_SIGMA, epsilon=KA_EPSILON),
    "sw": dict(lam=SW_PARAMETERS["lam"], epsilon=SW_PARAMETERS["epsilon"]),
}


def parametric_energy(name: str, displacement_fn: Callable, box: Any, species: Array | None = None,
                      **nl_kwargs) -> tuple[partition.NeighborFn, dict[str, Array], Callable[..., Array]]:
    """The reference potential ``name`` in the builder shape, its physical parameters as arguments:
    ``(neighbor_fn, params, energy_fn)`` with ``energy_fn(params, R, neighbor, **kw)`` and ``params``
    the reference values (LJ and KA: ``sigma``, ``epsilon``, per species pair for KA; SW: ``lam``,
    ``epsilon``), so ``jax.grad`` reaches them. The cutoffs stay the reference's (2.5 sigma_ab of
    the reference sigma; SW's a sigma) whatever the parameters."""
    neighbor_fn, energy = get_system(name).neighbor_list(displacement_fn, box, species, **nl_kwargs)
    params = {k: jnp.asarray(v, jnp.result_type(float)) for k, v in PHYSICAL_PARAMETERS[name].items()}

    def energy_fn(params, R, neighbor, **kwargs):
        return energy(R, neighbor, **params, **kwargs)

    return neighbor_fn, params, energy_fn


def get_system(name: str) -> ReferenceSystem:
    """The reference system called ``name``; the error lists the known names."""
    try:
        return SYSTEMS[name]
    except KeyError:
        raise InputError(f"unknown system {name!r}; known systems: {sorted(SYSTEMS)}") from None


def diamond_positions(n_cells: int, lattice: float = SI_LATTICE) -> tuple[jax.Array, float]:
    """Diamond-cubic crystal of ``n_cells**3`` conventional cells (8 atoms each) and its box side."""
    basis = np.array([[0, 0, 0], [0, 2, 2], [2, 0, 2], [2, 2, 0], [1, 1, 1], [1, 3, 3], [3, 1, 3], [3, 3, 1]]) / 4
    cells = np.stack(np.meshgrid(*[np.arange(n_cells)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    R = ((cells + basis[None]) * lattice).reshape(-1, 3)
    return jnp.asarray(R, dtype=jnp.result_type(float)), n_cells * lattice


def lattice_positions(n_atoms: int, box: float, jitter: float = 0.0, seed: int = 0) -> jax.Array:
    """``[n_atoms, 3]`` positions on a simple cubic grid filling a cubic ``box``, for starting MD.

    The grid has the smallest cube number of sites that holds ``n_atoms``; a seeded random subset
    of sites is occupied and each atom is displaced uniformly by up to ``jitter`` along each axis.
    Positions lie in ``[0, box)``.
    """
    if n_atoms < 1 or box <= 0:
        raise InputError(f"need n_atoms >= 1 and box > 0, got n_atoms={n_atoms}, box={box}")
    rng = np.random.default_rng(seed)
    m = int(np.ceil(n_atoms ** (1 / 3) - 1e-9))
    grid = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = np.sort(rng.choice(grid.shape[0], n_atoms, replace=False))
    R = (grid[sites] + 0.5) * (box / m) + rng.uniform(-jitter, jitter, (n_atoms, 3))
    return jnp.asarray(np.mod(R, box), dtype=jnp.result_type(float))
