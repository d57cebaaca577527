"""The periodic neighbour list of the trained models' potentials (a2ijax.neighbors): the same pairs as
the host search in any box shape, a cell list wherever the box holds three cells, memory that does not
grow with N beyond the list, box changes, attention-key slots, and every error bit named."""

import warnings

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2ijax import committee, pretrained
from a2ijax.calculator import A2ICalculator
from a2ijax.geometry import neighbor_pairs
from a2ijax.neighbors import KEY_OVERFLOW, AllPairsWarning, describe, periodic_neighbor_list, reallocate

TRICLINIC = np.array([[12.0, 3.0, -2.0], [0.0, 11.0, 4.0], [0.0, 0.0, 13.0]])  # lattice vectors as columns
ROTATED = np.array([[11.0, 2.0, -3.0], [0.0, 12.0, 1.0], [0.5, 0.2, 12.5]])  # not upper triangular


def pairs_of(idx: np.ndarray) -> set[tuple[int, int]]:
    n = idx.shape[0]
    return {(i, int(j)) for i in range(n) for j in idx[i] if j < n}


def host_pairs(R: np.ndarray, box: np.ndarray, cutoff: float) -> set[tuple[int, int]]:
    i, j, _ = neighbor_pairs(np.asarray(R, np.float64), np.asarray(box, np.float64).T, True, cutoff)
    return set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize("box", [12.5, np.array([12.5, 11.5, 13.0]), np.diag([12.5, 11.5, 13.0]), TRICLINIC, ROTATED],
                         ids=["side", "sides", "diagonal", "triclinic", "rotated"])
def test_same_pairs_as_the_host_search_in_every_box_shape(x64, box):
    """Positions in any periodic image; the list holds exactly the pairs within cutoff + skin, through
    jax-md's cell list, and after moves its update still holds every pair within the cutoff."""
    lattice = np.eye(3) * box if np.ndim(box) == 0 else (np.diag(box) if np.ndim(box) == 1 else box)
    rng = np.random.default_rng(0)
    n = int(0.6 * abs(np.linalg.det(lattice)))
    R = rng.uniform(size=(n, 3)) @ lattice.T + rng.integers(-3, 4, size=(n, 3)) @ lattice.T  # any image
    neighbor_fn = periodic_neighbor_list(box, 2.5, dr_threshold=0.3, chunk=100)
    neighbors = neighbor_fn.allocate(jnp.asarray(R))
    assert neighbors.cell_list_fn is not None and not bool(neighbors.did_buffer_overflow)
    assert pairs_of(np.asarray(neighbors.idx)) == host_pairs(R, lattice, 2.8)
    moved = R + rng.normal(scale=0.12, size=R.shape)
    updated = jax.jit(lambda R, nbrs: nbrs.update(R))(jnp.asarray(moved), neighbors)
    assert not bool(updated.did_buffer_overflow)
    assert host_pairs(moved, lattice, 2.5) <= pairs_of(np.asarray(updated.idx))


def test_a_box_narrower_than_three_cells_compares_all_pairs_and_says_why(x64):
    with pytest.warns(AllPairsWarning, match="fewer than 3 cells of cutoff \\+ skin = 2.8.*N\\*\\*2"):
        neighbor_fn = periodic_neighbor_list(7.0, 2.5, dr_threshold=0.3)
    R = jnp.asarray(np.random.default_rng(1).uniform(0, 7.0, (100, 3)))
    neighbors = neighbor_fn.allocate(R)
    assert neighbors.cell_list_fn is None
    assert pairs_of(np.asarray(neighbors.idx)) == host_pairs(np.asarray(R), np.eye(3) * 7.0, 2.8)
    with pytest.raises(ValueError, match="box too small.*2 x cutoff = 5"):
        periodic_neighbor_list(4.9, 2.5, dr_threshold=0.3)


def test_memory_per_atom_does_not_grow_with_the_box(x64):
    """The triclinic case is linear: 8x the atoms in a box of the same shape keep the same cell
    capacity and slots per atom (what grows is the number of cells and rows)."""
    rng = np.random.default_rng(2)
    shapes = []
    for scale in (1, 2):
        lattice = TRICLINIC * scale
        n = int(0.6 * abs(np.linalg.det(lattice)))
        R = rng.uniform(size=(n, 3)) @ lattice.T
        neighbors = periodic_neighbor_list(lattice, 2.5, dr_threshold=0.3).allocate(jnp.asarray(R))
        assert neighbors.cell_list_fn is not None
        shapes.append((neighbors.cell_list_capacity, neighbors.idx.shape[1]))
    (cells_small, slots_small), (cells_large, slots_large) = shapes
    assert cells_large <= 1.5 * cells_small and slots_large <= 1.3 * slots_small


def test_a_changing_box_is_followed_and_a_box_too_narrow_for_the_cells_is_named(x64):
    lattice = np.eye(3) * 12.0
    rng = np.random.default_rng(3)
    R = rng.uniform(0, 12.0, (800, 3))
    neighbor_fn = periodic_neighbor_list(lattice, 2.5, dr_threshold=0.3)
    neighbors = neighbor_fn.allocate(jnp.asarray(R))
    update = jax.jit(lambda R, nbrs, box: nbrs.update(R, box=box))
    squeezed = 0.97 * lattice  # a 3% strain: the list rebuilds for the new box
    shrunk = update(jnp.asarray(0.97 * R), neighbors, jnp.asarray(squeezed))
    assert not bool(shrunk.did_buffer_overflow)
    assert host_pairs(0.97 * R, squeezed, 2.5) <= pairs_of(np.asarray(shrunk.idx))
    # A thin skin (0.1): a 5% strain brings pairs from 2.63 to 2.5, past the skin, with no atom moving
    # in fractional coordinates; the strain alone must trigger the rebuild.
    thin = periodic_neighbor_list(lattice, 2.5, dr_threshold=0.1)
    strained = jax.jit(lambda R, nbrs, box: nbrs.update(R, box=box))(jnp.asarray(0.95 * R), thin.allocate(
        jnp.asarray(R)), jnp.asarray(0.95 * lattice))
    assert host_pairs(0.95 * R, 0.95 * lattice, 2.5) <= pairs_of(np.asarray(strained.idx))
    narrow = update(jnp.asarray(0.8 * R), neighbors, jnp.asarray(0.8 * lattice))  # 4 cells of 2.4 < 2.8
    assert bool(narrow.did_buffer_overflow)
    assert "narrowed below the cell list's cells" in describe(narrow.error.code)


def test_key_slots_are_a_capacity_counted_at_every_update(x64):
    """A list for a model with an attention range carries key slots (at least the model's M); an atom
    with more neighbours inside the range sets KEY_OVERFLOW, and a reallocation grows the slots."""
    rng = np.random.default_rng(4)
    R = rng.uniform(0, 12.0, (500, 3))
    neighbor_fn = periodic_neighbor_list(12.0, 2.5, dr_threshold=0.3, attention_cutoff=1.5, attention_keys=6)
    neighbors = neighbor_fn.allocate(jnp.asarray(R))
    assert neighbors.key_capacity >= 6 and not bool(neighbors.did_buffer_overflow)
    crowded = R.copy()
    crowded[1:40] = R[0] + rng.normal(scale=0.4, size=(39, 3))  # dozens of atoms within 1.5 of atom 0
    updated = jax.jit(lambda R, nbrs: nbrs.update(R))(jnp.asarray(crowded), neighbors)
    assert int(updated.error.code) & KEY_OVERFLOW and bool(updated.did_buffer_overflow)
    assert "more neighbours inside the attention range than key slots (M)" in describe(updated.error.code)
    grown = reallocate(neighbor_fn, jnp.asarray(crowded), updated)
    assert grown.key_capacity > neighbors.key_capacity and not bool(grown.did_buffer_overflow)


def test_more_key_slots_change_no_energy_and_give_crowded_atoms_a_finite_one():
    """The shipped LJ model (M = 24): the same configuration with 24 and with 40 key slots has the same
    energy; a configuration with an atom crowded past 24 neighbours within r_att is NaN at 24 slots
    and finite with the slots its list reallocated, as through the ASE calculator."""
    checkpoint = pretrained.load("lj")
    side = (500 / 0.84) ** (1 / 3)
    potential = checkpoint.potential(np.eye(3) * side, dr_threshold=0.25)
    R = jnp.asarray(np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)[:500] * side / 8
                    + np.random.default_rng(5).normal(scale=0.05, size=(500, 3)), jnp.float32)
    neighbors = potential.neighbor_fn.allocate(R)
    assert neighbors.key_capacity == 24
    wide = potential.neighbor_fn.allocate(R, key_capacity=40)
    assert wide.key_capacity == 40
    np.testing.assert_allclose(potential.energy_fn(R, neighbor=wide), potential.energy_fn(R, neighbor=neighbors),
                               rtol=2e-6)
    crowded = R.at[1:30].set(R[0] + 0.4 * jax.random.normal(jax.random.PRNGKey(0), (29, 3)))
    narrow = jax.jit(lambda R, nbrs: nbrs.update(R))(crowded, neighbors)
    assert bool(narrow.did_buffer_overflow)
    assert np.isnan(float(jax.jit(lambda R, n: potential.energy_fn(R, neighbor=n))(crowded, narrow)))
    grown = reallocate(potential.neighbor_fn, crowded, narrow)
    energy = float(potential.energy_fn(crowded, neighbor=grown))
    assert grown.key_capacity > 24 and np.isfinite(energy)
    # The ASE calculator gives the crowded atom the key slots it needs too, and the same energy.
    atoms = ase.Atoms("Ar500", positions=np.asarray(crowded, np.float64), cell=np.eye(3) * side, pbc=True)
    atoms.calc = A2ICalculator(checkpoint)
    np.testing.assert_allclose(atoms.get_potential_energy(), energy, rtol=1e-5)


def test_checkpoint_and_committee_potentials_get_a_cell_list_in_every_box_shape():
    """The trained models' path (Checkpoint.potential, Committee.potential, what a2ijax md, learn and
    analysis use) gets a cell list for ~2,000 atoms whether the box is a side, sides, a diagonal
    [3, 3] matrix or triclinic, and its list holds the host search's pairs."""
    checkpoint = pretrained.load("lj")
    group = committee.from_checkpoints([checkpoint, checkpoint])
    side = (2000 / 0.84) ** (1 / 3)
    rng = np.random.default_rng(6)
    sheared = np.eye(3) * side
    sheared[0, 1] = 0.3 * side
    for box in (side, np.full(3, side), np.eye(3) * side, sheared):
        lattice = np.eye(3) * side if np.ndim(box) < 2 else box
        R = jnp.asarray(rng.uniform(size=(2000, 3)) @ lattice.T, jnp.float32)
        for source in (checkpoint, group):
            with warnings.catch_warnings():
                warnings.simplefilter("error", AllPairsWarning)  # a silent fallback would fail here
                neighbors = source.potential(box, dr_threshold=0.25).neighbor_fn.allocate(R)
            assert neighbors.cell_list_fn is not None
        listed = pairs_of(np.asarray(neighbors.idx))  # float32 positions: a margin for pairs at 2.75
        assert host_pairs(np.asarray(R), lattice, 2.749) <= listed <= host_pairs(np.asarray(R), lattice, 2.751)


def test_displacements_past_the_size_where_jaxlib_0_10_2_miscompiles_are_right():
    """jaxlib 0.10.2 on CPU returns wrong sums of vmapped matrix-vector products past 32,768 rows in
    float32 (jax-ml/jax#39103). The package's own such products, the displacements of a Dense list
    (60,000 pairs, jitted) and the list's distances (the search above), agree with NumPy."""
    from a2ijax.neighbors import masked_displacements
    from a2ijax.potential import periodic_space

    rng = np.random.default_rng(7)
    box = TRICLINIC
    R = rng.uniform(size=(600, 3)) @ box.T
    idx = rng.integers(0, 600, size=(600, 100)).astype(np.int32)
    displacement, _ = periodic_space(box)
    dR, _ = jax.jit(lambda R, idx: masked_displacements(R, idx, displacement))(jnp.asarray(R, jnp.float32),
                                                                               jnp.asarray(idx))
    d = R[idx] - R[:, None, :]
    frac = d @ np.linalg.inv(box).T
    expected = (frac - np.round(frac)) @ box.T
    squared = np.sum(np.asarray(dR, np.float64) ** 2, -1)
    np.testing.assert_allclose(squared, np.sum(expected**2, -1), rtol=2e-5, atol=1e-4)
