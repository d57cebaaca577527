"""Bad input gets a clear error naming the problem; inside jit, a NaN instead of a wrong number."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_nontrivial, jittered_lattice, random_species, small_config
from jax_md import space

from a2ijax import A2IConfig, a2i_neighbor_list, a2i_pair
from a2ijax.config import from_dict


@pytest.fixture
def setup(x64):
    side = 4.6
    R = jittered_lattice((4, 4, 4), side / 4, 0.2, seed=0)
    species = random_species(R.shape[0])
    displacement, _ = space.periodic(side)
    neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement, side, small_config(), species)
    nbrs = neighbor_fn.allocate(R)
    params = init_fn(jax.random.PRNGKey(0), R, nbrs)
    return R, species, neighbor_fn, nbrs, params, energy_fn


def test_wrong_position_shapes_and_dtypes(setup):
    R, species, neighbor_fn, nbrs, params, energy_fn = setup
    with pytest.raises(ValueError, match=r"shape \[n_atoms, spatial_dim\]"):
        energy_fn(params, R.reshape(-1), nbrs)
    with pytest.raises(ValueError, match="floating point"):
        energy_fn(params, jnp.round(R).astype(jnp.int32), nbrs)
    with pytest.raises(ValueError, match="neighbour list is for 64 atoms, R has 63"):
        energy_fn(params, R[:-1], nbrs, species=species[:-1])


def test_nan_positions_are_named(setup):
    R, species, neighbor_fn, nbrs, params, energy_fn = setup
    with pytest.raises(ValueError, match=r"NaN or inf for atoms \[5, 9\]"):
        energy_fn(params, R.at[5, 1].set(jnp.nan).at[9, 0].set(jnp.inf), nbrs)


def test_species_out_of_range_raises_eagerly_and_poisons_under_jit(setup):
    R, species, neighbor_fn, nbrs, params, energy_fn = setup
    bad = species.at[3].set(3)  # config.n_species = 3: ids 0, 1, 2
    with pytest.raises(ValueError, match=r"species ids must lie in \[0, 3\)"):
        energy_fn(params, R, nbrs, species=bad)
    with pytest.raises(ValueError, match="species ids"):
        energy_fn(params, R, nbrs, species=species.at[0].set(-1))
    E = jax.jit(lambda p, R, n, s: energy_fn(p, R, n, species=s))(params, R, nbrs, bad)
    assert np.isnan(E)  # never a silently clamped embedding row


def test_species_shape_dtype_and_presence(setup):
    R, species, neighbor_fn, nbrs, params, energy_fn = setup
    with pytest.raises(ValueError, match="species must have shape"):
        energy_fn(params, R, nbrs, species=species[:10])
    with pytest.raises(ValueError, match="integer ids"):
        energy_fn(params, R, nbrs, species=species.astype(jnp.float32))
    displacement, _ = space.periodic(4.6)
    _, init_fn, _ = a2i_neighbor_list(displacement, 4.6, small_config())  # three species, none given
    with pytest.raises(ValueError, match="pass species"):
        init_fn(jax.random.PRNGKey(0), R, nbrs)


def test_mask_shape_and_dtype(setup):
    R, species, neighbor_fn, nbrs, params, energy_fn = setup
    with pytest.raises(ValueError, match="mask must have shape"):
        energy_fn(params, R, nbrs, mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="mask must be boolean"):
        energy_fn(params, R, nbrs, mask=jnp.ones(R.shape[0]))


@pytest.mark.parametrize("builder", ["neighbor_list", "pair"])
def test_box_too_small_for_cutoff(x64, builder):
    displacement, _ = space.periodic(3.9)
    config = small_config()  # cutoff 2.0 needs a box wider than 4.0
    build = a2i_neighbor_list if builder == "neighbor_list" else a2i_pair
    with pytest.raises(ValueError, match=r"box too small.*3\.9 wide.*2 x cutoff = 4"):
        build(displacement, 3.9, config)


def test_box_check_uses_perpendicular_width_of_triclinic_cells(x64):
    """Sides 5, 5.1, 5 all exceed 4, but the sheared cell is only 2.43 wide across one pair of faces."""
    T = jnp.array([[5.0, 4.5, 0.0], [0.0, 2.5, 0.0], [0.0, 0.0, 5.0]])
    displacement, _ = space.periodic_general(T)
    with pytest.raises(ValueError, match="along lattice vector 0"):
        a2i_neighbor_list(displacement, T, small_config(), fractional_coordinates=True)


def test_box_check_holds_for_fractional_displacements(x64):
    """space.periodic_general is fractional by default: probing it with a real lattice vector that is
    not a whole number of cells saw no periodic direction, and the width check was skipped. Both
    conventions are now recognised, and a builder told the wrong one says so."""
    T = jnp.array([[5.5, 4.9, 0.0], [0.0, 2.5, 0.0], [0.0, 0.0, 5.5]])  # 2.5 wide across two pairs of faces
    displacement, _ = space.periodic_general(T)
    for build in (a2i_neighbor_list, a2i_pair):
        with pytest.raises(ValueError, match="box too small"):
            build(displacement, T, small_config(), fractional_coordinates=True)
        with pytest.raises(ValueError, match="box too small|displacement_fn takes fractional coordinates"):
            build(displacement, T, small_config())
    wide = T * 3
    displacement, _ = space.periodic_general(wide)
    with pytest.raises(ValueError, match="displacement_fn takes fractional coordinates"):
        a2i_neighbor_list(displacement, wide, small_config())
    real, _ = space.periodic_general(wide, fractional_coordinates=False)
    with pytest.raises(ValueError, match="fractional_coordinates=True but displacement_fn takes real"):
        a2i_pair(real, wide, small_config(), fractional_coordinates=True)


def test_run_settings_are_checked(x64):
    displacement, _ = space.periodic(4.6)
    for chunk in (-1, 2.5, True):
        with pytest.raises(ValueError, match="atom_chunk must be an int >= 0"):
            a2i_neighbor_list(displacement, 4.6, small_config(), atom_chunk=chunk)
    with pytest.raises(ValueError, match="dtype must name a floating compute dtype"):
        a2i_pair(displacement, 4.6, small_config(), dtype="int8")


def test_free_space_accepts_any_box_and_the_box_changes_nothing(x64, free_cluster):
    """No periodic direction: a "box" narrower than 2 r_c is no error, and the energy and forces of a
    cluster wider than it are those with a box that holds it (the box is never used in free space)."""
    R, species = free_cluster
    displacement, _ = space.free()
    assert float(jnp.max(R) - jnp.min(R)) > 2.0  # wider than the narrow "box" below
    init_fn, narrow = a2i_pair(displacement, 1.0, small_config(), species)
    params = init_fn(jax.random.PRNGKey(3), R)
    _, wide = a2i_pair(displacement, 1000.0, small_config(), species)
    forces = jax.grad(lambda R: narrow(params, R))(R)
    assert_nontrivial(forces)
    np.testing.assert_allclose(narrow(params, R), wide(params, R), rtol=1e-14)
    np.testing.assert_allclose(forces, jax.grad(lambda R: wide(params, R))(R), rtol=1e-12)


def test_neighbor_list_must_be_given_and_dense(setup):
    R, species, neighbor_fn, nbrs, params, energy_fn = setup
    with pytest.raises(ValueError, match="needs neighbor="):
        energy_fn(params, R)
    from jax_md import partition

    displacement, _ = space.periodic(4.6)
    with pytest.raises(ValueError, match="format=partition.Dense"):
        a2i_neighbor_list(displacement, 4.6, small_config(), species, format=partition.Sparse)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"width \(30\) must be divisible by heads \(4\)"):
        A2IConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="featurization must be one of"):
        A2IConfig(featurization="spherical")
    with pytest.raises(ValueError, match="cutoff must be positive"):
        A2IConfig(cutoff=0.0)
    with pytest.raises(ValueError, match="param_dtype must name a floating dtype"):
        A2IConfig(param_dtype="int32")
    with pytest.raises(ValueError, match=r"core_radii must hold n_species\*\*2 = 4 radii"):
        A2IConfig(n_species=2, core_radii=(0.8, 0.7, 0.7))
    with pytest.raises(ValueError, match="core_radii must be a symmetric matrix"):
        A2IConfig(n_species=2, core_radii=(0.8, 0.7, 0.6, 0.9))
    with pytest.raises(ValueError, match="core_radii must be positive"):
        A2IConfig(core_radii=(0.0,))
    with pytest.raises(ValueError, match="core_energy must be >= 0"):
        A2IConfig(core_radii=(0.9,), core_energy=-1.0)
    with pytest.raises(ValueError, match=r"unknown keys \['widht'\]"):
        from_dict(A2IConfig, {"widht": 32}, "model")
    with pytest.raises(ValueError, match=r"\[model\] cutoff must be float, got '2.5' \(str\)"):
        from_dict(A2IConfig, {"cutoff": "2.5"}, "model")
    assert from_dict(A2IConfig, A2IConfig(width=8, heads=2).to_dict()) == A2IConfig(width=8, heads=2)
