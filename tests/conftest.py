"""Shared fixtures: small systems, small models, float64 where derivatives are checked.

``jax_debug_nans`` stays off: the potential deliberately produces NaN to signal an overflowed
neighbour list or an unknown species inside jit, and tests assert finiteness explicitly instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2ijax import A2IConfig

CUTOFF = 2.0
N_SPECIES = 3


@pytest.fixture
def x64():
    """float64 for one test; the global config is restored afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def small_config(featurization: str = "invariant", *, x64: bool = True, **overrides) -> A2IConfig:
    """A small model for tests: two blocks, width 16, three species."""
    values = dict(cutoff=CUTOFF, n_species=N_SPECIES, width=16, heads=2, layers=2, n_radial=6,
                  angular_order=2, avg_neighbors=16.0, featurization=featurization,
                  param_dtype="float64" if x64 else "float32")
    values.update(overrides)
    return A2IConfig(**values)


def jittered_lattice(n_side: tuple[int, int, int], spacing: float, jitter: float, seed: int = 0,
                     dtype=None) -> jax.Array:
    """Atoms on a simple cubic lattice, displaced by uniform noise of amplitude ``jitter``."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in n_side], indexing="ij"), -1).reshape(-1, 3)
    R = (grid + 0.5) * spacing + rng.uniform(-jitter, jitter, grid.shape)
    return jnp.asarray(R, dtype or jnp.result_type(float))


def random_species(n: int, seed: int = 1) -> jax.Array:
    """Species ids covering all ``N_SPECIES`` kinds."""
    s = np.random.default_rng(seed).integers(0, N_SPECIES, n)
    s[:N_SPECIES] = np.arange(N_SPECIES)
    return jnp.asarray(s, jnp.int32)


@pytest.fixture
def periodic_liquid(x64):
    """64 atoms in a periodic box of side 4.6 (density 0.66, about 22 neighbours within 2.0)."""
    side = 4.6
    R = jittered_lattice((4, 4, 4), side / 4, 0.2, seed=0)
    return R, side, random_species(R.shape[0])


@pytest.fixture
def free_cluster(x64):
    """18 atoms in free space."""
    R = jittered_lattice((3, 3, 2), 1.1, 0.15, seed=2)
    return R, random_species(R.shape[0], seed=3)


def assert_nontrivial(forces, floor: float = 1e-2):
    """Symmetry tests are only meaningful if the forces are not (close to) zero."""
    assert float(jnp.max(jnp.abs(forces))) > floor, "forces are trivial: the test would pass vacuously"
