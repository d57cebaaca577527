"""Differentiable MD (a2ijax.diffmd, a2ijax.observables): gradients through trajectories checked
against finite differences, reweighted gradients against an analytic answer, observables against
independent computations. float64 throughout; small systems, short segments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_md import space

from a2ijax import diffmd, fitting, observables
from a2ijax.model import A2IConfig
from a2ijax.potential import NeighborListOverflowError, a2i_neighbor_list
from a2ijax.systems import diamond_positions, lattice_positions, parametric_energy, truncated_shifted_lj

N_LJ = 108  # at density 0.8 the box (5.13) is wider than twice the LJ cutoff


def lj_box(x64_ready, jitter=0.05, seed=0, density=0.8):
    side = (N_LJ / density) ** (1 / 3)
    box = jnp.eye(3) * side
    R = jnp.asarray(lattice_positions(N_LJ, side, jitter=jitter, seed=seed))
    displacement, shift = space.periodic_general(box, fractional_coordinates=False)
    return R, box, displacement, shift


def segment_loss(segment, key):
    def loss(params, neighbor, R):
        result = segment(params, R, neighbor, key)
        return jnp.mean(result.energies) / R.shape[0], dict(overflow=result.overflow)
    return loss


def test_backprop_through_md_matches_finite_differences_for_lj_parameters(x64):
    """40 Nose-Hoover steps (blocks of 5, rematerialised) of the LJ fluid: d<U>/d(sigma, epsilon) by
    backpropagation equals central differences. The step h is small because the textbook LJ force
    jumps at the cutoff: a pair crossing it inside a wider FD interval would bias the difference."""
    R, box, displacement, shift = lj_box(True)
    neighbor_fn, params, energy_fn = parametric_energy("lj", displacement, box, dr_threshold=0.3)
    segment = diffmd.make_segment(energy_fn, shift, steps=40, dt=0.005, kT=1.0, ensemble="nose-hoover", block=5)
    loss = segment_loss(segment, jax.random.PRNGKey(0))
    gradient = diffmd.CheckedGradient(loss, neighbor_fn, neighbor_fn.allocate(R))
    _, aux, grads = gradient(params, R)
    assert not bool(aux["overflow"])
    value = jax.jit(lambda p: loss(p, gradient.neighbor, R)[0])
    h = 1e-6
    for name in ("sigma", "epsilon"):
        fd = (value({**params, name: params[name] + h}) - value({**params, name: params[name] - h})) / (2 * h)
        assert abs(float(grads[name])) > 0.1
        np.testing.assert_allclose(grads[name], fd, rtol=1e-6)


def test_backprop_through_md_matches_finite_differences_for_a2i_parameters(x64):
    """The same for an A2I model (NVE: the thermostat's part of the graph is checked above, and
    compiles slowly under A2I's second derivatives), along a random direction in parameter space.
    All atoms in one program (``atom_chunk=0``: chunks give the same numbers, test_invariants.py, and
    a chunk loop inside the segment's loop compiles slowly)."""
    R, box, displacement, shift = lj_box(True)
    config = A2IConfig(cutoff=2.0, width=8, heads=2, layers=1, n_radial=4, angular_order=1, avg_neighbors=30.0,
                       param_dtype="float64")
    neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement, box, config, dr_threshold=0.3, atom_chunk=0)
    neighbor = neighbor_fn.allocate(R)
    params = init_fn(jax.random.PRNGKey(1), R, neighbor)
    segment = diffmd.make_segment(energy_fn, shift, steps=16, dt=0.005, kT=1.0, ensemble="nve")
    loss = segment_loss(segment, jax.random.PRNGKey(2))
    checked = diffmd.CheckedGradient(loss, neighbor_fn, neighbor)
    _, aux, grads = checked(params, R)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    direction = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype)
                                          for k, x in zip(keys, leaves, strict=True)])
    directional = sum(float(jnp.vdot(g, d))
                      for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True))

    def value(t):  # the loss's value from the same compiled program (its gradient is not used here)
        return float(checked(jax.tree.map(lambda p, d: p + t * d, params, direction), R)[0])

    h = 1e-5
    fd = (value(h) - value(-h)) / (2 * h)
    assert checked.reallocations == 0  # every run on the list the gradient used
    assert abs(directional) > 1e-3
    np.testing.assert_allclose(directional, fd, rtol=1e-6)


def test_overflow_inside_a_differentiated_segment_is_rerun_with_a_larger_list(x64):
    """A list sized for a perfect lattice overflows on the jittered start: the gradient is rerun with
    a larger list and equals the gradient computed with an ample list from the start; without
    reallocations allowed it is an error, never a truncated result."""
    R, box, displacement, shift = lj_box(True, jitter=0.12)
    neighbor_fn, params, energy_fn = parametric_energy("lj", displacement, box, dr_threshold=0.3,
                                                       capacity_multiplier=1.0)
    lattice = jnp.asarray(lattice_positions(N_LJ, float(box[0, 0]), jitter=0.0))
    tight = neighbor_fn.allocate(lattice)
    segment = diffmd.make_segment(energy_fn, shift, steps=10, dt=0.005, kT=1.0, ensemble="nve")
    loss = segment_loss(segment, jax.random.PRNGKey(0))
    checked = diffmd.CheckedGradient(loss, neighbor_fn, tight)
    value, _, grads = checked(params, R)
    assert checked.reallocations >= 1 and checked.neighbor.idx.shape[1] > tight.idx.shape[1]
    # a list of the capacity the rerun reached, built for the start (one program for both runs)
    ample = checked.neighbor.update(R)
    assert ample.idx.shape == checked.neighbor.idx.shape
    fresh = diffmd.CheckedGradient(loss, neighbor_fn, ample)
    value2, _, grads2 = fresh(params, R)
    assert fresh.reallocations == 0
    np.testing.assert_allclose(value, value2, rtol=1e-12)
    np.testing.assert_allclose(grads["sigma"], grads2["sigma"], rtol=1e-10)
    with pytest.raises(NeighborListOverflowError, match="still overflowed"):
        diffmd.CheckedGradient(loss, neighbor_fn, tight, max_reallocations=0)(params, R)


# Reweighting ---------------------------------------------------------------------------------------
def trap_energy(params, R, neighbor=None):
    return 0.5 * params["k"] * jnp.sum(R**2)


@pytest.fixture
def trap_sample(x64):
    """20,000 exact Boltzmann frames of 8 particles in a 3D harmonic trap, k = 2, kT = 0.7."""
    k0, kT = 2.0, 0.7
    frames = jax.random.normal(jax.random.PRNGKey(4), (20000, 8, 3)) * np.sqrt(kT / k0)
    return diffmd.sample_from_frames(frames, trap_energy, {"k": jnp.asarray(k0)}, kT, chunk=1000)


def mean_square(params, R, neighbor):
    return jnp.mean(R**2)


def test_reweighting_at_the_sampled_parameters_is_the_plain_average(trap_sample):
    mean, n_eff = diffmd.reweighted_mean(mean_square, trap_energy, trap_sample.params, trap_sample)
    np.testing.assert_allclose(mean, jnp.mean(trap_sample.frames**2), rtol=1e-12)
    np.testing.assert_allclose(n_eff, trap_sample.frames.shape[0], rtol=1e-12)


def test_reweighted_gradient_matches_the_harmonic_trap(trap_sample):
    """<x^2> = kT / k, so d<x^2>/dk = -kT / k^2: the reweighted gradient (which comes from the
    weights alone, the observable does not depend on k) matches within its sampling error."""
    k0, kT = float(trap_sample.params["k"]), trap_sample.kT
    grad = jax.grad(lambda p: diffmd.reweighted_mean(mean_square, trap_energy, p, trap_sample)[0])(trap_sample.params)
    np.testing.assert_allclose(grad["k"], -kT / k0**2, rtol=0.05)
    # Away from k0 the reweighted average still follows kT / k while N_eff falls.
    fractions = []
    for factor in (1.0, 1.05, 1.2, 1.5):
        mean, n_eff = diffmd.reweighted_mean(mean_square, trap_energy, {"k": jnp.asarray(k0 * factor)}, trap_sample)
        fractions.append(diffmd.effective_fraction(n_eff, trap_sample))
        if factor <= 1.05:
            np.testing.assert_allclose(mean, kT / (k0 * factor), rtol=0.02)
    assert fractions[0] == pytest.approx(1.0) and all(a > b for a, b in zip(fractions, fractions[1:], strict=False))
    assert fractions[-1] < 0.5


# Observables ---------------------------------------------------------------------------------------
def test_pressure_equals_the_pair_virial(x64):
    """The strain-derivative pressure of the LJ fluid equals N kT / V + sum_pairs r . f / (3 V)
    from an all-pairs NumPy sum."""
    R, box, displacement, _ = lj_box(True, jitter=0.1)
    neighbor_fn, params, energy_fn = parametric_energy("lj", displacement, box)
    neighbor = neighbor_fn.allocate(R)
    kT = 1.3
    P = observables.pressure(lambda R, **kw: energy_fn(params, R, neighbor, **kw), R, box, kT)
    side = float(box[0, 0])
    Rn = np.asarray(R)
    d = Rn[None, :] - Rn[:, None]
    d -= side * np.round(d / side)
    r = np.linalg.norm(d, axis=-1)
    iu = np.triu_indices(N_LJ, 1)
    r = r[iu]
    energy = jax.grad(lambda x: jnp.sum(truncated_shifted_lj(x)))
    f_dot_r = -np.asarray(energy(jnp.asarray(r))) * r  # r . f for each pair (f = -dU/dr along r)
    volume = side**3
    expected = N_LJ * kT / volume + np.sum(f_dot_r) / (3 * volume)
    np.testing.assert_allclose(P, expected, rtol=1e-10)
    assert abs(P - N_LJ * kT / volume) > 0.1  # the virial part is not trivial


def test_smoothed_pair_correlation_equals_all_pairs_and_is_one_for_an_ideal_gas(x64):
    """On a two-species liquid frame the neighbour-list g_ab(r) equals the same sum over all pairs in
    NumPy, with a finite, non-zero gradient; over uniformly random frames (an ideal gas) it is 1."""
    R, box, displacement, _ = lj_box(True, jitter=0.15, seed=3)
    species = jnp.asarray(np.arange(N_LJ) % 3 == 0, jnp.int32)
    neighbor_fn, _, _ = parametric_energy("lj", displacement, box)
    neighbor = neighbor_fn.allocate(R)
    side = float(box[0, 0])
    grid, smearing = jnp.linspace(0.6, 2.2, 81), 0.05

    @jax.jit
    def g_of(R, neighbor):
        return observables.pair_correlation(R, neighbor, displacement, side**3, grid, smearing, species, 2)

    g = g_of(R, neighbor)
    Rn, s, x = np.asarray(R), np.asarray(species), np.asarray(grid)
    d = Rn[None, :] - Rn[:, None]
    r = np.linalg.norm(d - side * np.round(d / side), axis=-1)
    np.fill_diagonal(r, np.inf)
    for a in range(2):
        for b in range(2):
            rij = r[np.ix_(s == a, s == b)].ravel()
            rij = rij[np.isfinite(rij)]
            gauss = np.exp(-0.5 * ((x[:, None] - rij[None]) / smearing) ** 2) / (smearing * np.sqrt(2 * np.pi))
            norm = np.sum(s == a) * (np.sum(s == b) - (a == b)) * 4 * np.pi * x**2
            # rtol: pairs beyond the list's cutoff (2.5) add at most exp(-18) at the grid's end.
            np.testing.assert_allclose(g[a, b], side**3 * gauss.sum(1) / norm, rtol=1e-7, atol=1e-12)
    grad = jax.jit(jax.grad(lambda R: jnp.sum(g_of(R, neighbor) ** 2)))(R)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad))) > 1e-3
    gas = jax.random.uniform(jax.random.PRNGKey(5), (20, N_LJ, 3)) * side
    roomy = neighbor_fn.allocate(gas[0], extra_capacity=16)  # one capacity for every frame: one compilation
    lists = [roomy.update(frame) for frame in gas]
    assert not any(bool(n.did_buffer_overflow) for n in lists)
    mean = np.mean([np.asarray(g_of(frame, n)) for frame, n in zip(gas, lists, strict=True)], 0)
    inner = (x > 1.0) & (x < 2.0)
    np.testing.assert_allclose(mean[:, :, inner].mean(-1), 1.0, rtol=0.05)


def test_bond_angle_distribution_of_diamond_peaks_at_the_tetrahedral_angle(x64):
    R, side = diamond_positions(2)
    box = jnp.eye(3) * side
    displacement, _ = space.periodic_general(box, fractional_coordinates=False)
    neighbor_fn, _, _ = parametric_energy("sw", displacement, box)
    neighbor = neighbor_fn.allocate(R)
    grid = jnp.linspace(-1.0, 1.0, 201)
    density = observables.bond_angle_distribution(R, neighbor, displacement, 2.8, grid, 0.02)
    assert float(grid[jnp.argmax(density)]) == pytest.approx(-1 / 3, abs=0.01)
    np.testing.assert_allclose(jnp.sum(density) * (grid[1] - grid[0]), 1.0, rtol=1e-3)


def test_observable_loss_names_what_is_missing():
    loss, terms = observables.observable_loss({"p": jnp.array(2.0)}, {"p": 1.5}, {"p": 4.0})
    assert float(loss) == pytest.approx(1.0) and set(terms) == {"p"}
    with pytest.raises(ValueError, match="no prediction for the observable 'rdf'"):
        observables.observable_loss({"p": jnp.array(2.0)}, {"rdf": np.zeros(3)})
    with pytest.raises(ValueError, match=r"prediction shape \(2,\) != target shape \(3,\)"):
        observables.observable_loss({"g": jnp.zeros(2)}, {"g": np.zeros(3)})


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps must be an int >= 1"), (dict(dt=0.0), "dt must be a positive number"),
    (dict(kT=-1.0), "kT must be a positive number"), (dict(block=7), r"block \(7\) must divide steps \(40\)"),
    (dict(ensemble="npt"), "ensemble must be one of"),
])
def test_segment_options_are_checked(kwargs, match):
    options = dict(steps=40, dt=0.005, kT=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        diffmd.make_segment(trap_energy, lambda R, dR: R + dR, **options)


def test_fit_by_reweighting_recovers_the_trap_stiffness(x64):
    """DiffTRe's loop on the harmonic trap: from k = 1 to the k = 2 whose <x^2> = kT / k is the
    target, redrawing a sample whenever N_eff / N falls below 0.9 (and only then)."""
    kT, truth = 0.7, 2.0

    def draw(params, k):
        frames = jax.random.normal(jax.random.PRNGKey(10 + k), (2000, 8, 3)) * jnp.sqrt(kT / params["k"])
        return diffmd.sample_from_frames(frames, trap_energy, params, kT, chunk=500)

    target = kT / truth
    fit = fitting.fit_by_reweighting({"k": 1.0}, trap_energy, draw, lambda p, R, n: dict(x2=mean_square(p, R, n)),
                                     dict(x2=target), optax.sgd(0.3), 60, weights=dict(x2=1 / target**2),
                                     track=lambda p: float(p["k"]))
    assert float(fit.params["k"]) == pytest.approx(truth, rel=0.01)
    assert 2 <= fit.samples < 60 and fit.samples == sum(row["resampled"] for row in fit.history)
    for row, before in zip(fit.history[1:], fit.history[:-1], strict=True):
        if row["resampled"]:
            assert row["n_eff_fraction"] == pytest.approx(1.0)
        else:
            assert row["n_eff_fraction"] >= 0.9 and row["tracked"] != before["tracked"]
    with pytest.raises(ValueError, match=r"n_eff_threshold must lie in \(0, 1\]"):
        fitting.fit_by_reweighting({"k": 1.0}, trap_energy, draw, mean_square, {}, optax.adam(0.1), 1,
                                   n_eff_threshold=0.0)
