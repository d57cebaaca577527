"""The potential inside jitted jax-md integrators, with neighbour lists updated every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jittered_lattice, random_species, small_config
from jax_md import quantity, simulate, space

from a2ijax import a2i_neighbor_list
from a2ijax.md import allocate_replicas, energy_observables, make_chunk, run


def md_setup(R, box, species, periodic: bool, featurization: str = "invariant", **nl_kwargs):
    displacement, shift = space.periodic(box) if periodic else space.free()
    # One block: the driver is under test here, and a shallower model compiles faster.
    neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(
        displacement, box, small_config(featurization, layers=1), species, dr_threshold=0.3, **nl_kwargs)
    nbrs = neighbor_fn.allocate(R)
    params = init_fn(jax.random.PRNGKey(0), R, nbrs)
    return shift, neighbor_fn, nbrs, (lambda R, **kw: energy_fn(params, R, **kw))


def test_nve_conserves_energy_with_second_order_error(periodic_liquid):
    """Velocity Verlet: the largest energy error over a fixed time shrinks ~4x when dt is halved
    (dt and the number of steps are arguments of one compiled loop)."""
    R, side, species = periodic_liquid
    shift, neighbor_fn, nbrs, energy = md_setup(R, side, species, True)
    init, apply = simulate.nve(energy, shift, 0.004)
    state = init(jax.random.PRNGKey(1), R, kT=0.5, neighbor=nbrs)
    e0 = energy(R, neighbor=nbrs) + quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)

    @jax.jit
    def largest_error(state, nbrs, dt, steps):
        def step(_, carry):
            state, nbrs, worst = carry
            nbrs = nbrs.update(state.position)
            state = apply(state, neighbor=nbrs, dt=dt)
            total = energy(state.position, neighbor=nbrs) + quantity.kinetic_energy(momentum=state.momentum,
                                                                                    mass=state.mass)
            return state, nbrs, jnp.maximum(worst, jnp.abs(total - e0))

        _, nbrs, worst = jax.lax.fori_loop(0, steps, step, (state, nbrs, jnp.zeros_like(e0)))
        return worst, nbrs.did_buffer_overflow

    errors = []
    for dt in (0.004, 0.002):
        worst, overflow = largest_error(state, nbrs, jnp.asarray(dt), int(round(0.4 / dt)))
        assert not bool(overflow) and np.isfinite(float(worst))
        errors.append(float(worst))
    assert largest_error._cache_size() == 1
    n = R.shape[0]
    assert errors[0] / n < 1e-3, errors  # small next to kT = 0.5 per atom
    assert 3.0 < errors[0] / errors[1] < 5.0, errors


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "free"])
def test_nose_hoover_conserves_its_invariant(x64, periodic):
    if periodic:
        side = 4.6
        R = jittered_lattice((4, 4, 4), side / 4, 0.2, seed=0)
        box = side
    else:
        R = jittered_lattice((3, 3, 2), 1.1, 0.15, seed=2)
        box, side = 30.0, None
    species = random_species(R.shape[0])
    shift, neighbor_fn, nbrs, energy = md_setup(R, box, species, periodic, "coordinates")
    kT, dt = 0.4, 0.002
    init, apply = simulate.nvt_nose_hoover(energy, shift, dt, kT)
    state = init(jax.random.PRNGKey(2), R, neighbor=nbrs)

    def invariant(state, neighbor):
        return simulate.nvt_nose_hoover_invariant(energy, state, kT, neighbor=neighbor)

    h0 = invariant(state, nbrs)
    state, nbrs, h, _ = make_chunk(apply, 150, invariant)(state, nbrs)
    assert not bool(nbrs.did_buffer_overflow)
    assert bool(jnp.all(jnp.isfinite(state.position)))
    moved = jnp.max(jnp.abs(state.position - R))
    assert float(moved) > 0.05  # the atoms did move
    assert float(jnp.max(jnp.abs(h - h0))) < 1e-3 * R.shape[0] * kT


def test_no_recompilation_after_the_first_md_chunk(periodic_liquid):
    """Invariant 9 in MD: fixed shapes compile once (the training step's count:
    tests/test_train.py::test_one_compilation_per_size_bucket)."""
    R, side, species = periodic_liquid
    shift, neighbor_fn, nbrs, energy = md_setup(R, side, species, True)
    init, apply = simulate.nve(energy, shift, 0.002)
    state = init(jax.random.PRNGKey(3), R, kT=0.5, neighbor=nbrs)
    chunk = make_chunk(apply, 5, energy_observables(energy))
    for _ in range(3):
        state, nbrs, _, _ = chunk(state, nbrs)
    assert chunk._cache_size() == 1


def test_overflow_in_a_chunk_reallocates_and_reruns_the_chunk(periodic_liquid):
    """Invariant 10 in MD: a list too small for the start overflows in the first chunk; the driver
    reallocates, reruns, and the trajectory equals one that started with an adequate list."""
    R, side, species = periodic_liquid
    R_spread = jittered_lattice((4, 4, 4), side / 4, 0.0)  # fewer neighbours than the start R
    squeezed = side / 2 + 0.85 * (R - side / 2)
    shift, neighbor_fn, _, energy = md_setup(R, side, species, True)
    init, apply = simulate.nve(energy, shift, 0.002)
    small = neighbor_fn.allocate(R_spread, capacity_multiplier=1.0)
    adequate = neighbor_fn.allocate(squeezed)
    state = init(jax.random.PRNGKey(5), squeezed, kT=0.3, neighbor=adequate)
    observe = energy_observables(energy)
    reference = run(apply, state, neighbor_fn, adequate, 30, chunk_steps=10, observe=observe)
    result = run(apply, state, neighbor_fn, small, 30, chunk_steps=10, observe=observe)
    assert reference.reallocations == 0 and result.reallocations >= 1
    assert result.observables["total"].shape == (30,)
    np.testing.assert_allclose(result.state.position, reference.state.position, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.observables["total"], reference.observables["total"], rtol=1e-10)


def test_non_finite_positions_stop_the_run_at_the_last_good_chunk():
    """A potential that turns NaN part-way: run() raises and names the first bad step, the atom (0
    reaches x = 0 first) and the last good step."""
    displacement, shift = space.free()
    from jax_md import partition

    neighbor_fn = partition.neighbor_list(displacement, 10.0, 1.0, format=partition.Dense)
    R = jnp.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])

    def energy(R, **kwargs):  # force -1/(2 sqrt x) drives x through 0, where the force turns NaN
        return jnp.sum(jnp.sqrt(R[:, 0]))

    init, apply = simulate.nve(energy, shift, 0.01)
    state = init(jax.random.PRNGKey(0), R, kT=0.0)
    named = r"stopped being finite at step \d+ \(atom 0; .* the last good state is from step \d+"
    with pytest.raises(FloatingPointError, match=named):
        run(apply, state, neighbor_fn, neighbor_fn.allocate(R), 2000, chunk_steps=50)


def test_replicas_in_one_compiled_step_equal_independent_runs(periodic_liquid):
    """vmap over positions, velocities and neighbour lists: each replica follows its own trajectory,
    the same as when it runs alone; a capacity too small for one replica reallocates all of them."""
    R, side, species = periodic_liquid
    shift, neighbor_fn, _, energy = md_setup(R, side, species, True)
    init, apply = simulate.nve(energy, shift, 0.002)
    squeezed = side / 2 + 0.85 * (R - side / 2)  # more neighbours: overflows a list sized for R
    Rs = jnp.stack([R, jnp.mod(R + 0.3, side), squeezed])
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    small = allocate_replicas(neighbor_fn, Rs[:2])
    small = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a[:1]]), small)  # replica 3 gets replica 1's list
    states = jax.vmap(lambda k, r: init(k, r, kT=0.3, neighbor=neighbor_fn.allocate(squeezed)))(keys, Rs)
    observe = energy_observables(energy)
    together = run(apply, states, neighbor_fn, small, 20, chunk_steps=10, observe=observe, replicas=True)
    assert together.reallocations >= 1 and together.observables["total"].shape == (3, 20)
    assert float(jnp.std(together.observables["total"][:, 0])) > 1e-3  # the replicas differ
    ample = neighbor_fn.allocate(squeezed)  # one capacity for the three runs alone: one compilation
    for b in range(3):
        state = jax.tree_util.tree_map(lambda a, b=b: a[b], states)
        alone = run(apply, state, neighbor_fn, ample.update(Rs[b]), 20, chunk_steps=10, observe=observe)
        np.testing.assert_allclose(together.state.position[b], alone.state.position, atol=1e-9)
        np.testing.assert_allclose(together.observables["total"][b], alone.observables["total"], rtol=1e-9)


def _soft_spheres_on_the_periodic_list(side: float, **nl_kwargs):
    """A soft pair energy (bounded forces, whatever the crowding) on this package's periodic list,
    the list under test, in real coordinates."""
    from a2ijax.neighbors import masked_displacements, periodic_neighbor_list
    from a2ijax.potential import periodic_space

    displacement, shift = periodic_space(side)

    def energy_fn(R, neighbor, **kwargs):
        dR, real = masked_displacements(R, neighbor.idx, displacement, **kwargs)
        r = jnp.sqrt(jnp.sum(dR * dR, -1) + 1e-12)
        return 0.25 * jnp.sum(jnp.where(real & (r < 2.5), (1.0 - r / 2.5) ** 2, 0.0))

    return periodic_neighbor_list(side, 2.5, dr_threshold=0.3, **nl_kwargs), energy_fn, shift


@pytest.mark.parametrize("cause", ["slots", "cells", "narrowed", "keys"])
def test_every_list_error_stops_a_run_that_may_not_reallocate_and_names_it(x64, cause):
    """Each error bit of the list, triggered by its own input, stops md.run (no reallocation allowed)
    with a message naming that cause; allowed to reallocate, the same run goes through."""
    side = 12.0
    grid = jittered_lattice((8, 8, 8), side / 8, 0.05, seed=3)  # 512 atoms, density 0.3
    settings = dict(attention_cutoff=1.2, attention_keys=2) if cause == "keys" else {}
    neighbor_fn, energy_fn, shift = _soft_spheres_on_the_periodic_list(side, capacity_multiplier=1.0, **settings)
    start = grid
    if cause == "slots":  # more neighbours per atom than the list was allocated with
        start = side / 2 + 0.8 * (grid - side / 2)
    if cause in ("cells", "keys"):  # a crowd of atoms packed around atom 0
        start = grid.at[1:40].set(grid[0] + 0.35 * jax.random.normal(jax.random.PRNGKey(0), (39, 3)))
    init, apply = simulate.nve(energy_fn, shift, 0.01)
    neighbor = neighbor_fn.allocate(grid)
    state = init(jax.random.PRNGKey(1), start, kT=0.1, neighbor=neighbor_fn.allocate(start))
    # A box that keeps 75% of its width: 4 cells of 2.25 < cutoff + skin = 2.8.
    box_fn = (lambda state: 0.75 * side * jnp.eye(3)) if cause == "narrowed" else None
    expected = {"slots": "more neighbours than the list's slots", "cells": "holds more atoms than its capacity",
                "narrowed": "narrowed below the cell list's cells",
                "keys": "inside the attention range than key slots"}[cause]
    with pytest.raises(RuntimeError, match=f"giving up at step 0: .*{expected}"):
        run(apply, state, neighbor_fn, neighbor, 4, chunk_steps=2, max_reallocations=0, box_fn=box_fn)
    if cause != "narrowed":  # (the box_fn above is no real box: nothing to finish)
        done = run(apply, state, neighbor_fn, neighbor, 4, chunk_steps=2)
        assert done.reallocations >= 1 and bool(jnp.all(jnp.isfinite(done.state.position)))
        assert not bool(done.neighbor.did_buffer_overflow)


def test_allocate_grows_a_list_too_small_for_its_atoms_until_it_holds_every_neighbour():
    """md.allocate: a list whose capacity multiplier (0.5) leaves it short of its own atoms' neighbours
    grows (counted) until it overflows no more, and then holds the pairs of a list with room to spare;
    with no reallocation allowed it stops with the cause."""
    from a2ijax.md import allocate

    side = 12.0
    R = jittered_lattice((8, 8, 8), side / 8, 0.05, seed=3)
    short_fn, _, _ = _soft_spheres_on_the_periodic_list(side, capacity_multiplier=0.5)
    assert bool(short_fn.allocate(R).did_buffer_overflow)
    with pytest.raises(RuntimeError, match="after 0 reallocations at the start: .*more neighbours than"):
        allocate(short_fn, R, max_reallocations=0)
    grown, reallocations = allocate(short_fn, R)
    assert reallocations >= 1 and not bool(grown.did_buffer_overflow)
    roomy = _soft_spheres_on_the_periodic_list(side, capacity_multiplier=1.5)[0].allocate(R)
    pairs = lambda lst: {(i, int(j)) for i, row in enumerate(np.asarray(lst.idx)) for j in row if j < len(R)}  # noqa: E731
    assert pairs(grown) == pairs(roomy)
