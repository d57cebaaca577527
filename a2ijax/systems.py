"""Reference systems and their state points.

For now: starting configurations. The reference potentials (Lennard-Jones, Stillinger-Weber,
Kob-Andersen) join this module with the reference data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def lattice_positions(n_atoms: int, box: float, jitter: float = 0.0, seed: int = 0) -> jax.Array:
    """``[n_atoms, 3]`` positions on a simple cubic grid filling a cubic ``box``, for starting MD.

    The grid has the smallest cube number of sites that holds ``n_atoms``; a seeded random subset
    of sites is occupied and each atom is displaced uniformly by up to ``jitter`` along each axis.
    Positions lie in ``[0, box)``.
    """
    if n_atoms < 1 or box <= 0:
        raise ValueError(f"need n_atoms >= 1 and box > 0, got n_atoms={n_atoms}, box={box}")
    rng = np.random.default_rng(seed)
    m = int(np.ceil(n_atoms ** (1 / 3) - 1e-9))
    grid = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = np.sort(rng.choice(grid.shape[0], n_atoms, replace=False))
    R = (grid[sites] + 0.5) * (box / m) + rng.uniform(-jitter, jitter, (n_atoms, 3))
    return jnp.asarray(np.mod(R, box), dtype=jnp.result_type(float))
