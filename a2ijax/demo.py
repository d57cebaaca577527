"""``a2ijax demo``: the default A2I potential on an embedded Lennard-Jones liquid, in a minute.

It builds the potential (nothing to download), checks it against its own all-pairs path and
``-grad E``, and runs jit-compiled NVE with a neighbour list, reporting energy conservation. The
weights are untrained: the demo shows the machinery, not a fitted model (``a2ijax quickstart``
trains one; ``a2ijax bench`` measures speed against baselines).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import simulate as integrators
from jax_md import space

from a2ijax.errors import InputError
from a2ijax.md import energy_drift, energy_observables, run
from a2ijax.model import A2IConfig
from a2ijax.potential import a2i_neighbor_list, a2i_pair
from a2ijax.systems import lattice_positions


def demo(n_atoms: int = 128, steps: int = 200, dt: float = 0.002, kT: float = 1.0, density: float = 0.84,
         seed: int = 0) -> dict[str, float]:
    """Builds, checks and runs the default A2I potential; returns the figures it prints."""
    for name, value in (("n_atoms", n_atoms), ("steps", steps)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if not dt > 0:
        raise InputError(f"dt must be positive, got {dt}")
    box = (n_atoms / density) ** (1 / 3)
    R = lattice_positions(n_atoms, box, jitter=0.05, seed=seed)
    displacement, shift = space.periodic(box)
    config = A2IConfig()
    neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement, box, config, dr_threshold=0.3)
    nbrs = neighbor_fn.allocate(R)
    params = init_fn(jax.random.PRNGKey(seed), R, nbrs)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    potential = lambda R, **kw: energy_fn(params, R, **kw)  # noqa: E731
    t0 = time.perf_counter()
    E, G = jax.block_until_ready(jax.jit(jax.value_and_grad(potential))(R, neighbor=nbrs))
    compile_s = time.perf_counter() - t0
    _, pair_energy = a2i_pair(displacement, box, config)
    E_pairs = jax.jit(lambda R: pair_energy(params, R))(R)
    h = 1e-2  # float32: a coarse step, central difference of one force component
    step = jnp.zeros_like(R).at[0, 0].set(h)
    energy = jax.jit(potential)
    fd = -(energy(R + step, neighbor=nbrs) - energy(R - step, neighbor=nbrs)) / (2 * h)

    init, apply = integrators.nve(potential, shift, dt)
    state = init(jax.random.PRNGKey(seed + 1), R, kT=kT, neighbor=nbrs)
    t0 = time.perf_counter()
    md = run(apply, state, neighbor_fn, nbrs, steps, chunk_steps=max(1, steps // 4),
             observe=energy_observables(potential))
    md_s = time.perf_counter() - t0
    total = md.observables["total"]
    drift = energy_drift(np.arange(steps) * dt, total, n_atoms)

    figures = {
        "atoms": n_atoms, "neighbour slots K": nbrs.idx.shape[1], "parameters": n_params,
        "energy per atom": float(E) / n_atoms,
        "|E(list) - E(all pairs)| per atom": abs(float(E - E_pairs)) / n_atoms,
        "force: |-dE/dx - finite difference| / |F|": abs(float(-G[0, 0] - fd)) / float(jnp.max(jnp.abs(G))),
        "|sum of forces|": float(jnp.linalg.norm(jnp.sum(G, 0))),
        "first compile + call (s)": compile_s,
        "NVE steps": steps, "NVE energy drift per atom per time": float(drift),
        "NVE total-energy std per atom": float(np.std(total) / n_atoms),
        "neighbour-list reallocations": md.reallocations,
        "MD atom-steps/s (compile included)": n_atoms * steps / md_s,
    }
    width = max(map(len, figures))
    print(f"a2ijax demo: untrained A2I potential on an LJ liquid (density {density}, kT {kT}, dt {dt})")
    for key, value in figures.items():
        print(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    return figures
