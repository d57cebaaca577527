"""The invariants of docs/design.md, each checked so that it fails when the property is broken.

Numbers refer to the list in docs/design.md. Both featurisations where the property applies; periodic and
free boundaries; three species; float64 wherever derivatives are compared.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CORE_RADII, CUTOFF, N_SPECIES, assert_nontrivial, jittered_lattice, random_species, small_config
from jax_md import quantity, space

from a2ijax import a2i_neighbor_list, a2i_pair, batched_energy_and_forces, reallocate
from a2ijax.model import core_repulsion
from a2ijax.potential import NeighborListOverflowError

FEATURIZATIONS = ["invariant", "coordinates"]


def jitted(energy_fn):
    """One compilation per shape instead of op-by-op dispatch: the tests stay fast."""
    return jax.jit(energy_fn, static_argnames="per_atom")


def periodic_model(featurization, R, side, species, seed=0, atom_chunk=None, **cfg):
    """``(displacement, neighbor_fn, nbrs, params, jitted energy_fn)`` for a periodic box."""
    displacement, shift = space.periodic(side)
    neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement, side, small_config(featurization, **cfg), species,
                                                        atom_chunk=atom_chunk)
    nbrs = neighbor_fn.allocate(R)
    return displacement, neighbor_fn, nbrs, init_fn(jax.random.PRNGKey(seed), R, nbrs), jitted(energy_fn)


def pair_model(displacement, box, config, species, **kw):
    init_fn, energy_fn = a2i_pair(displacement, box, config, species, **kw)
    return init_fn, jitted(energy_fn)


@partial(jax.jit, static_argnums=0)
def _value_and_grad(energy_fn, params, R, kw):
    return jax.value_and_grad(lambda R: energy_fn(params, R, **kw))(R)


def energy_and_forces(energy_fn, params, R, **kw):
    E, G = _value_and_grad(energy_fn, params, R, kw)
    return E, -G


@partial(jax.jit, static_argnums=0)
def atom_energies_and_forces(energy_fn, params, R, neighbor, species):
    """``(per-atom energies, their sum, forces)`` in one program (species an argument, not a constant:
    one compilation serves a system and its permutation)."""
    def total(R):
        energies = energy_fn(params, R, neighbor, species=species, per_atom=True)
        return jnp.sum(energies), energies

    (E, energies), G = jax.value_and_grad(total, has_aux=True)(R)
    return energies, E, -G


# 1. Permutation --------------------------------------------------------------------------------
@pytest.mark.parametrize("featurization", FEATURIZATIONS)
def test_permutation_permutes_atom_energies_and_forces(periodic_liquid, featurization):
    R, side, species = periodic_liquid
    _, neighbor_fn, nbrs, params, energy_fn = periodic_model(featurization, R, side, species, 0, layers=2)
    E_i, E, F = atom_energies_and_forces(energy_fn, params, R, nbrs, species)
    assert_nontrivial(F)

    perm = jnp.asarray(np.random.default_rng(5).permutation(R.shape[0]))
    Rp, sp = R[perm], species[perm]
    nbrs_p = neighbor_fn.allocate(Rp)
    assert nbrs_p.idx.shape == nbrs.idx.shape  # the same program for both
    E_ip, Ep, Fp = atom_energies_and_forces(energy_fn, params, Rp, nbrs_p, sp)
    np.testing.assert_allclose(E_ip, E_i[perm], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(Ep, E, rtol=1e-12)
    np.testing.assert_allclose(Fp, F[perm], rtol=1e-9, atol=1e-11)


# 2. Translation and periodic images -----------------------------------------------------------
@pytest.mark.parametrize("featurization", FEATURIZATIONS)
def test_translation_and_periodic_images(periodic_liquid, featurization):
    R, side, species = periodic_liquid
    displacement, neighbor_fn, nbrs, params, energy_fn = periodic_model(featurization, R, side, species, 1)
    E, F = energy_and_forces(energy_fn, params, R, neighbor=nbrs)
    assert_nontrivial(F)

    Rt = jnp.mod(R + jnp.array([0.37, -1.91, 2.55]), side)  # translated and wrapped back
    Et, Ft = energy_and_forces(energy_fn, params, Rt, neighbor=neighbor_fn.allocate(Rt))
    np.testing.assert_allclose(Et, E, rtol=1e-12)
    np.testing.assert_allclose(Ft, F, rtol=1e-9, atol=1e-11)

    # One atom replaced by a periodic image of itself (all-pairs path: no cell list involved).
    _, pair_energy = pair_model(displacement, side, small_config(featurization), species)
    Ri = R.at[7].add(jnp.array([side, 0.0, -2 * side]))
    np.testing.assert_allclose(pair_energy(params, Ri), E, rtol=1e-12)


@pytest.mark.parametrize("featurization", FEATURIZATIONS)
def test_translation_free_space(free_cluster, featurization):
    R, species = free_cluster
    displacement, _ = space.free()
    init_fn, energy_fn = pair_model(displacement, 100.0, small_config(featurization), species)
    params = init_fn(jax.random.PRNGKey(2), R)
    E, F = energy_and_forces(energy_fn, params, R)
    assert_nontrivial(F)
    Et, Ft = energy_and_forces(energy_fn, params, R + jnp.array([10.3, -4.1, 7.7]))
    np.testing.assert_allclose(Et, E, rtol=1e-12)
    np.testing.assert_allclose(Ft, F, rtol=1e-9, atol=1e-11)


# 3. Rotation ------------------------------------------------------------------------------------
def random_orthogonal(seed: int, proper: bool = True) -> jax.Array:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 0] *= -1
    return jnp.asarray(q)


@pytest.mark.parametrize("proper", [True, False], ids=["rotation", "reflection"])
def test_invariant_featurization_is_e3_invariant_free(free_cluster, proper):
    R, species = free_cluster
    displacement, _ = space.free()
    init_fn, energy_fn = pair_model(displacement, 100.0, small_config("invariant", layers=2), species)
    params = init_fn(jax.random.PRNGKey(3), R)
    E, F = energy_and_forces(energy_fn, params, R)
    assert_nontrivial(F)
    Q = random_orthogonal(11, proper)
    Er, Fr = energy_and_forces(energy_fn, params, R @ Q.T)
    np.testing.assert_allclose(Er, E, rtol=1e-12)
    np.testing.assert_allclose(Fr, F @ Q.T, rtol=1e-9, atol=1e-11)


def test_invariant_featurization_rotation_periodic_general(periodic_liquid):
    """Rotating a triclinic periodic cell (and so every image) leaves E unchanged."""
    R, side, species = periodic_liquid
    T = jnp.array([[side, 0.3, -0.2], [0.0, side, 0.4], [0.0, 0.0, side]])
    Q = random_orthogonal(12)
    frac = R / side
    energies = []
    for box in (T, Q @ T):
        displacement, _ = space.periodic_general(box)
        init_fn, energy_fn = pair_model(displacement, box, small_config("invariant"), species,
                                      fractional_coordinates=True)
        params = init_fn(jax.random.PRNGKey(4), frac)
        energies.append(energy_fn(params, frac))
    np.testing.assert_allclose(energies[1], energies[0], rtol=1e-12)


def test_coordinates_featurization_is_not_rotation_invariant(free_cluster):
    """The rotation test above can fail: raw coordinates make E depend on orientation."""
    R, species = free_cluster
    displacement, _ = space.free()
    init_fn, energy_fn = pair_model(displacement, 100.0, small_config("coordinates"), species)
    params = init_fn(jax.random.PRNGKey(3), R)
    E, Er = energy_fn(params, R), energy_fn(params, R @ random_orthogonal(11).T)
    assert abs(float(Er - E)) > 1e-4 * (1 + abs(float(E)))


# 4. Forces are -grad E; total force zero; stress -------------------------------------------------
@pytest.mark.parametrize("featurization", FEATURIZATIONS)
def test_forces_match_finite_differences(periodic_liquid, featurization):
    R, side, species = periodic_liquid
    _, neighbor_fn, nbrs, params, energy_fn = periodic_model(featurization, R, side, species, 5, layers=2)
    F = quantity.force(lambda R, **kw: energy_fn(params, R, **kw))(R, neighbor=nbrs)
    assert_forces_are_central_differences(energy_fn, params, R, nbrs, F, samples=6, seed=0)
    # Newton's third law in aggregate: translation invariance makes the total force vanish.
    np.testing.assert_allclose(jnp.sum(F, 0), 0.0, atol=1e-10 * R.shape[0] * float(jnp.max(jnp.abs(F))))


@pytest.mark.parametrize("featurization", FEATURIZATIONS)
def test_stress_matches_strain_finite_differences(periodic_liquid, featurization):
    """jax_md.quantity.stress on a periodic_general box against dE/d(strain) by differences."""
    R, side, species = periodic_liquid
    T = jnp.array([[side, 0.2, 0.0], [0.0, side, -0.3], [0.0, 0.0, side]])
    frac = R / side
    displacement, _ = space.periodic_general(T)
    neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(
        displacement, T, small_config(featurization), species, fractional_coordinates=True)
    energy_fn = jitted(energy_fn)
    nbrs = neighbor_fn.allocate(frac)
    params = init_fn(jax.random.PRNGKey(6), frac, nbrs)
    sigma = quantity.stress(lambda R, **kw: energy_fn(params, R, **kw), frac, T, neighbor=nbrs)
    assert float(jnp.max(jnp.abs(sigma))) > 1e-3
    volume = float(jnp.linalg.det(T))
    h = 1e-6
    for a, b in [(0, 0), (1, 2), (2, 0), (2, 2)]:
        strain = jnp.zeros((3, 3)).at[a, b].set(h)
        plus = energy_fn(params, frac, nbrs, box=(jnp.eye(3) + strain) @ T)
        minus = energy_fn(params, frac, nbrs, box=(jnp.eye(3) - strain) @ T)
        np.testing.assert_allclose(sigma[a, b], -(plus - minus) / (2 * h) / volume, rtol=1e-5, atol=1e-9)


# 5. Neighbour-list path equals the all-pairs path ----------------------------------------------
@pytest.mark.parametrize("featurization", FEATURIZATIONS)
def test_neighbor_list_equals_all_pairs_periodic(periodic_liquid, featurization):
    R, side, species = periodic_liquid
    displacement, neighbor_fn, nbrs, params, energy_fn = periodic_model(featurization, R, side, species, 7)
    _, pair_energy = pair_model(displacement, side, small_config(featurization), species)
    e_nl, E_nl, F_nl = atom_energies_and_forces(energy_fn, params, R, nbrs, species)
    e_ap, _, F_ap = atom_energies_and_forces(pair_energy, params, R, None, species)
    assert_nontrivial(F_nl)
    assert nbrs.idx.shape[1] < R.shape[0] - 1  # the list really prunes
    np.testing.assert_allclose(e_nl, e_ap, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(F_nl, F_ap, rtol=1e-8, atol=1e-10)

    # More padding slots, and the slots of each atom in another order: nothing changes.
    bigger = neighbor_fn.allocate(R, extra_capacity=9)
    assert bigger.idx.shape[1] == nbrs.idx.shape[1] + 9
    np.testing.assert_allclose(energy_fn(params, R, bigger), E_nl, rtol=1e-12)
    order = jnp.asarray(np.random.default_rng(1).permutation(bigger.idx.shape[1]))
    shuffled = bigger.set(idx=bigger.idx[:, order])
    np.testing.assert_allclose(energy_fn(params, R, shuffled), E_nl, rtol=1e-12)


def test_neighbor_list_equals_all_pairs_free(free_cluster):
    R, species = free_cluster
    displacement, _ = space.free()
    config = small_config("invariant")
    box = 20.0
    neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement, box, config, species)
    energy_fn = jitted(energy_fn)
    nbrs = neighbor_fn.allocate(R)
    params = init_fn(jax.random.PRNGKey(8), R, nbrs)
    _, pair_energy = pair_model(displacement, box, config, species)
    np.testing.assert_allclose(energy_fn(params, R, nbrs, per_atom=True), pair_energy(params, R, per_atom=True),
                               rtol=1e-10, atol=1e-12)


def assert_forces_are_central_differences(energy_fn, params, R, nbrs, F, samples: int, seed: int, h: float = 1e-5):
    """Non-trivial forces ``F`` equal central differences of the energy at ``samples`` random (atom, axis)."""
    assert_nontrivial(F)
    rng = np.random.default_rng(seed)
    for atom, axis in zip(rng.integers(0, R.shape[0], samples), rng.integers(0, 3, samples), strict=True):
        dR = jnp.zeros_like(R).at[atom, axis].set(h)
        fd = -(energy_fn(params, R + dR, nbrs) - energy_fn(params, R - dR, nbrs)) / (2 * h)
        np.testing.assert_allclose(fd, F[atom, axis], rtol=1e-6, atol=1e-8)


# 6. Smooth cutoff ------------------------------------------------------------------------------
@pytest.mark.parametrize("envelope", ["polynomial", "cosine"])
@pytest.mark.parametrize("featurization", FEATURIZATIONS)
def test_energy_and_forces_continuous_through_cutoff(x64, featurization, envelope):
    """Move one atom radially through r_c of a neighbour: E and F change no more across the cutoff
    than across an equal step just inside it. A jump (no envelope, or one with c'(r_c) != 0) would
    stay O(1) while the reference change shrinks with the step.
    """
    displacement, _ = space.free()
    config = small_config(featurization, envelope=envelope, layers=2)
    species = jnp.array([0, 1, 2, 1])
    init_fn, energy_fn = pair_model(displacement, 100.0, config, species)
    base = jnp.array([[0.0, 0.0, 0.0], [1.1, 0.2, 0.0], [-0.3, 1.2, 0.1]])
    direction = jnp.array([0.6, -0.3, 0.74])
    direction = direction / jnp.linalg.norm(direction)

    def system(d):  # atom 3 at distance d from atom 0; at d = r_c it is still within r_c of atom 1
        return jnp.concatenate([base, d * direction[None]], 0)

    params = init_fn(jax.random.PRNGKey(9), system(1.5))
    E_inside = energy_fn(params, system(CUTOFF - 0.5))
    E_far = energy_fn(params, system(10.0))
    assert abs(float(E_inside - E_far)) > 1e-3  # the moving atom matters inside the cutoff
    assert_continuous_at(energy_fn, params, system, CUTOFF)


def assert_continuous_at(energy_fn, params, system, point):
    """E and F change no more across ``point`` (``system(d)``: positions at parameter ``d``) than
    over an equal step just before it, for two step sizes, with non-trivial forces."""
    for eps in (1e-3, 1e-4):
        E_in, F_in = energy_and_forces(energy_fn, params, system(point - 3 * eps))
        E_a, F_a = energy_and_forces(energy_fn, params, system(point - eps))
        E_b, F_b = energy_and_forces(energy_fn, params, system(point + eps))
        assert_nontrivial(F_a)
        assert abs(float(E_b - E_a)) <= 10 * abs(float(E_a - E_in)) + 1e-11
        assert float(jnp.max(jnp.abs(F_b - F_a))) <= 10 * float(jnp.max(jnp.abs(F_a - F_in))) + 1e-9


def test_core_repulsion_switches_on_smoothly(x64):
    """The wall and its first two derivatives vanish at x = 1 (they shrink with the distance to 1:
    a C2 switch-on) and stay 0 beyond; below 1 it is positive and repulsive."""
    f = core_repulsion
    df, d2f = jax.grad(f), jax.grad(jax.grad(f))
    c = 3 * 12 * 13 * 14  # above f'''(1) = p (p + 1) (p + 2) for p = 12: f ~ h^3, f' ~ h^2, f'' ~ h at x = 1 - h
    for h in (1e-3, 1e-4):
        x = 1.0 - h
        assert 0 < float(f(x)) < c * h**3 and 0 < -float(df(x)) < c * h**2 and abs(float(d2f(x))) < c * h
    for x in (1.0, 1.2, 3.0):
        assert float(f(x)) == float(df(x)) == float(d2f(x)) == 0.0
    xs = jnp.linspace(0.3, 0.99, 50)
    assert bool(jnp.all(jax.vmap(df)(xs) < 0)) and bool(jnp.all(jnp.diff(jax.vmap(f)(xs)) < 0))


@pytest.mark.parametrize("pair", [(0, 1), (1, 2), (2, 2)])
def test_core_repulsion_uses_the_radius_of_each_species_pair(x64, pair):
    """A dimer: the energy with the wall minus the energy without it is E_0 f(d / r_ab) for the pair's
    own radius (all radii differ, so a transposed or wrong lookup fails), and 0 above it."""
    displacement, _ = space.free()
    species = jnp.asarray(pair)
    config = small_config("invariant")
    init_fn, energy_fn = pair_model(displacement, 100.0, config, species)
    _, bare_fn = pair_model(displacement, 100.0, small_config("invariant", core_radii=()), species)
    r_ab = CORE_RADII[pair[0] * N_SPECIES + pair[1]]
    params = init_fn(jax.random.PRNGKey(4), jnp.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    for d in (0.6, 0.75, 0.84, 0.89, 0.97, 1.1):
        R = jnp.array([[0.0, 0.0, 0.0], [d, 0.3 * d, -0.2 * d]]) / jnp.sqrt(1.13)
        wall = energy_fn(params, R) - bare_fn(params, R)
        np.testing.assert_allclose(wall, config.core_energy * core_repulsion(d / r_ab), rtol=1e-9, atol=1e-14)
        if d < r_ab:
            assert float(wall) > 0


# 7. Locality and extensivity -------------------------------------------------------------------
def test_two_distant_copies_have_twice_the_energy(free_cluster):
    R, species = free_cluster
    displacement, _ = space.free()
    config = small_config("invariant")
    init_fn, energy_fn = pair_model(displacement, 1000.0, config, species, atom_chunk=0)  # no chunk boundary
    params = init_fn(jax.random.PRNGKey(10), R)
    E = energy_fn(params, R, per_atom=True)
    R2 = jnp.concatenate([R, R + jnp.array([50.0, 0.0, 0.0])], 0)
    s2 = jnp.concatenate([species, species])
    neighbor_fn, _, nl_energy = a2i_neighbor_list(displacement, 1000.0, config, s2, atom_chunk=0,
                                                  disable_cell_list=True)
    E2 = jitted(nl_energy)(params, R2, neighbor_fn.allocate(R2), per_atom=True)
    np.testing.assert_allclose(E2, jnp.concatenate([E, E]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("featurization", FEATURIZATIONS)
def test_periodic_supercell_is_extensive(periodic_liquid, featurization):
    R, side, species = periodic_liquid
    _, neighbor_fn, nbrs, params, energy_fn = periodic_model(featurization, R, side, species, 11, atom_chunk=0)
    E = energy_fn(params, R, nbrs)
    box2 = jnp.array([2 * side, side, side])
    R2 = jnp.concatenate([R, R + jnp.array([side, 0.0, 0.0])], 0)
    s2 = jnp.concatenate([species, species])
    displacement2, _ = space.periodic(box2)
    neighbor_fn2, _, energy_fn2 = a2i_neighbor_list(displacement2, box2, small_config(featurization), s2, atom_chunk=0)
    np.testing.assert_allclose(jitted(energy_fn2)(params, R2, neighbor_fn2.allocate(R2)), 2 * E, rtol=1e-11)


# 8. Padded atoms ----------------------------------------------------------------------------------
@pytest.mark.parametrize("featurization", FEATURIZATIONS)
def test_padded_atoms_contribute_nothing_and_have_finite_gradients(periodic_liquid, featurization):
    R, side, species = periodic_liquid
    _, neighbor_fn, nbrs, params, energy_fn = periodic_model(featurization, R, side, species, 12)
    E, F = energy_and_forces(energy_fn, params, R, neighbor=nbrs)

    n_pad = 5  # padding atoms stacked on one point that is also a real atom's position
    Rp = jnp.concatenate([R, jnp.broadcast_to(R[3], (n_pad, 3))], 0)
    sp = jnp.concatenate([species, jnp.zeros(n_pad, jnp.int32)])
    mask = jnp.arange(Rp.shape[0]) < R.shape[0]
    nbrs_p = neighbor_fn.allocate(Rp)

    def loss(params, Rp):
        return energy_fn(params, Rp, nbrs_p, species=sp, mask=mask)

    Ep, (g_params, g_R) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, Rp)
    np.testing.assert_allclose(Ep, E, rtol=1e-12)
    np.testing.assert_allclose(-g_R[: R.shape[0]], F, rtol=1e-9, atol=1e-11)
    np.testing.assert_array_equal(g_R[R.shape[0]:], 0.0)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g_params))


def test_batched_energy_and_forces_matches_single_systems(periodic_liquid):
    """Two systems of different sizes padded to one shape and evaluated by one vmap."""
    R, side, species = periodic_liquid
    _, neighbor_fn, nbrs, params, energy_fn = periodic_model("invariant", R, side, species, 13)
    n_small = 50
    R_small = R[:n_small]
    E_big, F_big = energy_and_forces(energy_fn, params, R, neighbor=nbrs)
    E_small, F_small = energy_and_forces(energy_fn, params, R_small, neighbor=neighbor_fn.allocate(R_small),
                                         species=species[:n_small])

    R_b = jnp.stack([R, R.at[n_small:].set(0.0)])
    mask_b = jnp.stack([jnp.ones(R.shape[0], bool), jnp.arange(R.shape[0]) < n_small])
    species_b = jnp.stack([species, species])
    capacity = nbrs.idx.shape[1] + 8
    lists = [neighbor_fn.allocate(r, extra_capacity=capacity) for r in R_b]
    width = min(lst.idx.shape[1] for lst in lists)
    nbrs_b = jax.tree.map(lambda *xs: jnp.stack(xs), *[lst.set(idx=lst.idx[:, :width]) for lst in lists])
    assert not bool(jnp.any(jax.vmap(lambda n: n.did_buffer_overflow)(nbrs_b)))
    E_b, F_b = jax.jit(batched_energy_and_forces(energy_fn))(params, R_b, nbrs_b, species_b, mask_b)
    np.testing.assert_allclose(E_b, jnp.stack([E_big, E_small]), rtol=1e-11)
    np.testing.assert_allclose(F_b[0], F_big, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(F_b[1, :n_small], F_small, rtol=1e-9, atol=1e-11)
    np.testing.assert_array_equal(F_b[1, n_small:], 0.0)


# 9. One compilation: a model's parameters do not depend on the system ------------------------------
def test_init_gives_one_set_of_parameters_for_every_system_from_one_program(periodic_liquid):
    """init_fn on a periodic liquid (64 atoms, its list's K) and on a free cluster of 18 atoms (all pairs)
    with one key: the same parameters to the bit, from one compiled program; another key draws every
    random one anew."""
    from a2ijax.potential import _init_program

    R, side, species = periodic_liquid
    config = small_config("invariant", attention_cutoff=1.5, attention_keys=6)
    before = _init_program._cache_size()
    params = periodic_model("invariant", R, side, species, 21, attention_cutoff=1.5, attention_keys=6)[3]
    init_fn, _ = pair_model(space.free()[0], 100.0, config, species[:18])
    cluster = init_fn(jax.random.PRNGKey(21), R[:18] * 0.9)
    assert _init_program._cache_size() == before + 1
    leaves, other = jax.tree.leaves(params), jax.tree.leaves(cluster)
    assert len(leaves) == len(other) > 10
    for a, b in zip(leaves, other, strict=True):
        np.testing.assert_array_equal(a, b)
    changed = jax.tree.leaves(init_fn(jax.random.PRNGKey(22), R[:18]))
    drawn = [np.ptp(np.asarray(a)) > 0 for a in leaves]  # random, not a constant (biases, scales)
    assert sum(drawn) > 5
    assert [not np.array_equal(a, b) for a, b in zip(leaves, changed, strict=True)] == drawn


# Chunked evaluation is an execution detail: it must not change the numbers ------------------------
@pytest.mark.parametrize("featurization", FEATURIZATIONS)
def test_atom_chunks_do_not_change_energy_or_forces(periodic_liquid, featurization):
    R, side, species = periodic_liquid
    _, neighbor_fn, nbrs, params, energy_fn = periodic_model(featurization, R, side, species, 14, atom_chunk=0)
    chunked_fn = periodic_model(featurization, R, side, species, atom_chunk=24)[-1]  # 3 chunks, padded
    E, F = energy_and_forces(energy_fn, params, R, neighbor=nbrs)
    Ec, Fc = energy_and_forces(chunked_fn, params, R, neighbor=nbrs)
    np.testing.assert_allclose(Ec, E, rtol=1e-12)
    np.testing.assert_allclose(Fc, F, rtol=1e-10, atol=1e-12)


# 10. Neighbour-list overflow is never silent ---------------------------------------------------------
def test_overflow_is_detected_and_reallocation_restores_the_energy(x64):
    side = 6.0
    R = jittered_lattice((3, 3, 3), side / 3, 0.1, seed=4)  # dilute: few neighbours within 2.0
    species = random_species(R.shape[0])
    displacement, _ = space.periodic(side)
    neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement, side, small_config("invariant"), species)
    nbrs = neighbor_fn.allocate(R)
    params = init_fn(jax.random.PRNGKey(15), R, nbrs)
    # Squeeze the atoms towards the box centre: many more neighbours than slots.
    R2 = side / 2 + 0.55 * (R - side / 2)
    nbrs2 = jax.jit(lambda R, n: n.update(R))(R2, nbrs)
    assert bool(nbrs2.did_buffer_overflow)
    with pytest.raises(NeighborListOverflowError, match="overflowed"):
        energy_fn(params, R2, nbrs2)
    E_jit = jax.jit(lambda p, R, n: energy_fn(p, R, n))(params, R2, nbrs2)
    F_jit = jax.jit(jax.grad(lambda R, n: energy_fn(params, R, n)))(R2, nbrs2)
    assert np.isnan(E_jit) and bool(jnp.all(jnp.isnan(F_jit)))  # poisoned, not truncated

    fresh = reallocate(neighbor_fn, R2, nbrs2)
    assert not bool(fresh.did_buffer_overflow)
    assert fresh.idx.shape[1] >= int(np.ceil(1.5 * nbrs.idx.shape[1]))
    _, pair_energy = pair_model(displacement, side, small_config("invariant"), species)
    np.testing.assert_allclose(jitted(energy_fn)(params, R2, fresh), pair_energy(params, R2), rtol=1e-10)


# 15. Attention range: the keys are the M nearest neighbours, weighted up to r_att < r_c ----------------
def test_attention_range_at_the_cutoff_is_full_attention(periodic_liquid):
    """With r_att = r_c and as many keys as the most crowded atom has neighbour slots in use, the keys
    are every real neighbour in another order and the padding is left out: E and F are the full
    attention's, with the same parameters (the key gather, its angular features and envelope are right)."""
    R, side, species = periodic_liquid
    _, neighbor_fn, nbrs, params, energy_fn = periodic_model("invariant", R, side, species, 16)
    most = int(jnp.max(jnp.sum(nbrs.idx < R.shape[0], 1)))
    assert most < nbrs.idx.shape[1]  # padded slots exist, and the M nearest leave them out
    ranged_fn = periodic_model("invariant", R, side, species, attention_cutoff=CUTOFF, attention_keys=most)[-1]
    E, F = energy_and_forces(energy_fn, params, R, neighbor=nbrs)
    Er, Fr = energy_and_forces(ranged_fn, params, R, neighbor=nbrs)
    assert_nontrivial(F)
    np.testing.assert_allclose(Er, E, rtol=1e-12)
    np.testing.assert_allclose(Fr, F, rtol=1e-10, atol=1e-12)


def test_attention_range_is_smooth_where_keys_fade_and_change_rank(x64):
    """Atom 3 moves away from atom 0 through r_att (its key weight fades to 0), then past atom 2's
    distance (it leaves the M = 2 nearest, atom 2 enters): E and F change no more across either point
    than across an equal step before it, while the key weights do matter inside r_att."""
    r_att = 1.3
    displacement, _ = space.free()
    species = jnp.array([0, 1, 2, 1])
    base = jnp.array([[0.0, 0.0, 0.0], [1.0, 0.1, 0.0], [-0.2, 1.5, 0.1]])  # atom 2: 1.516 from atom 0
    direction = jnp.array([-0.6, -0.6, -0.5])
    direction = direction / jnp.linalg.norm(direction)

    def system(d):
        return jnp.concatenate([base, d * direction[None]], 0)

    init_fn, energy_fn = pair_model(displacement, 100.0, small_config(attention_cutoff=r_att, attention_keys=2),
                                    species)
    params = init_fn(jax.random.PRNGKey(17), system(1.1))
    shorter = pair_model(displacement, 100.0, small_config(attention_cutoff=1.05, attention_keys=2), species)[1]
    assert abs(float(energy_fn(params, system(1.1)) - shorter(params, system(1.1)))) > 1e-4
    for point in (r_att, float(jnp.linalg.norm(base[2]))):
        assert_continuous_at(energy_fn, params, system, point)


def test_more_neighbours_inside_the_attention_range_than_keys_is_nan(x64):
    """Three neighbours inside r_att and M = 2 keys: a key with weight would be dropped, so the energy
    and every force it reaches are NaN, never a silently truncated attention; with M = 3 all is finite."""
    displacement, _ = space.free()
    species = jnp.array([0, 1, 2, 1])
    R = jnp.array([[0.0, 0.0, 0.0], [1.0, 0.1, 0.0], [-0.2, 1.1, 0.1], [-0.1, -0.3, -1.05]])
    init_fn, energy_fn = pair_model(displacement, 100.0, small_config(attention_cutoff=1.3, attention_keys=2),
                                    species)
    params = init_fn(jax.random.PRNGKey(18), R)
    E, F = energy_and_forces(energy_fn, params, R)
    assert np.isnan(E) and bool(jnp.all(jnp.isnan(F)))
    roomy = pair_model(displacement, 100.0, small_config(attention_cutoff=1.3, attention_keys=3), species)[1]
    E3, F3 = energy_and_forces(roomy, params, R)
    assert np.isfinite(E3)
    assert_nontrivial(F3)
