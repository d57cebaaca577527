"""The pair pathway (``A2IConfig.pair_radial``) and its least-squares start (a2ijax.pair_fit):
docs/design.md, "The pair pathway".

The pathway is an exact pair potential: its energy and forces are the fit's design rows times its
weights; the fit recovers a pair potential its basis holds; the trainer starts from the fit. With an
attention range, the transformer sees only the keys: an atom in the shell between ``r_att`` and
``r_c`` reaches the energy through the pair pathway alone, and the energy stays smooth and its
forces are its gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TRAIN_ATOM_CHUNK, assert_nontrivial, lj_frames, small_config, tiny_config
from jax_md import space
from test_invariants import (
    assert_continuous_at,
    assert_forces_are_central_differences,
    energy_and_forces,
    pair_model,
    periodic_model,
)

from a2ijax.batching import prepare
from a2ijax.dataset import read_dataset, write_dataset
from a2ijax.pair_fit import WEIGHT_BOUND, fit_pair_weights, frame_rows, species_pair_columns
from a2ijax.train import init_state, prepare_run

R_ATT = 1.3


def with_both_pathways(params, seed=0, pair_scale=0.05):
    """``params`` with a random readout kernel (which starts at zero) and random, asymmetric pair
    weights, so that the transformer and the pair pathway both shape the energy."""
    leaves = jax.tree_util.tree_map(lambda x: x, params)
    p = leaves["params"]
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    p["readout"]["kernel"] = jax.random.normal(k1, p["readout"]["kernel"].shape, p["readout"]["kernel"].dtype)
    p["pair_weights"] = pair_scale * jax.random.normal(k2, p["pair_weights"].shape, p["pair_weights"].dtype)
    return leaves


def test_pair_pathway_energy_and_forces_are_the_design_rows_times_the_weights(periodic_liquid):
    """With the readout at zero and no core wall, the model is the pair pathway alone; its total energy
    and its forces (jax.grad) equal the fit's rows times the symmetrised weights, per species pair."""
    R, side, species = periodic_liquid
    config = dict(pair_radial=8, core_radii=(), core_energy=0.0)
    _, _, nbrs, params, energy_fn = periodic_model("invariant", R, side, species, 3, **config)
    weights = jax.random.normal(jax.random.PRNGKey(4), params["params"]["pair_weights"].shape, jnp.float64)
    params["params"]["pair_weights"] = weights
    E, F = energy_and_forces(energy_fn, params, R, neighbor=nbrs)
    assert_nontrivial(F)
    symmetric = 0.5 * (weights + jnp.swapaxes(weights, 0, 1))
    blocks = species_pair_columns(3)
    per_block = np.zeros((int(blocks.max()) + 1, 8))
    for a in range(3):
        for b in range(3):
            per_block[blocks[a, b]] = symmetric[a, b]
    energy_row, force_rows = frame_rows(np.asarray(R), np.eye(3) * side, True, np.asarray(species), 2.0, 8, 3)
    np.testing.assert_allclose(energy_row @ per_block.ravel(), E, rtol=1e-10)
    np.testing.assert_allclose(force_rows @ per_block.ravel(), np.asarray(F).ravel(), rtol=1e-8, atol=1e-10)


def test_least_squares_start_recovers_a_pair_potential_its_basis_holds(tmp_path, x64):
    """Frames labelled by a pair pathway with known weights and per-species shifts (two species, their
    counts varying between frames): the fit finds both and leaves no residual."""
    side, n = 4.2, 40
    rng = np.random.default_rng(5)
    config = small_config(n_species=2, pair_radial=6, core_radii=(), core_energy=0.0)
    displacement, _ = space.periodic(side)
    frames = [(jnp.asarray(rng.uniform(0, side, (n, 3))), jnp.asarray(rng.integers(0, 2, n), jnp.int32))
              for _ in range(8)]
    init_fn, energy_fn = pair_model(displacement, side, config, None)
    params = init_fn(jax.random.PRNGKey(1), frames[0][0], species=frames[0][1])
    truth = jax.random.normal(jax.random.PRNGKey(2), (2, 2, 6), jnp.float64)
    truth = 0.5 * (truth + jnp.swapaxes(truth, 0, 1))
    params["params"]["pair_weights"] = truth
    params["params"]["energy_shift"] = jnp.asarray([-1.5, 0.7])
    import ase

    images = []
    for i, (R, species) in enumerate(frames):
        E, F = energy_and_forces(energy_fn, params, R, species=species)
        atoms = ase.Atoms(["Ar" if s == 0 else "Kr" for s in np.asarray(species)], positions=np.asarray(R),
                          cell=np.eye(3) * side, pbc=True)
        atoms.info.update(energy=float(E), split="train" if i < 6 else "valid", state_point="a", units="metal")
        atoms.arrays["forces"] = np.asarray(F)
        images.append(atoms)
    path = tmp_path / "pairs.xyz"
    write_dataset(path, images)
    experiment = tiny_config(path)
    experiment = experiment.__class__(experiment.data, config, experiment.train)
    dataset = read_dataset(path, ("Ar", "Kr"))
    fitted, shift, fit = fit_pair_weights(experiment, prepare(dataset, experiment))
    np.testing.assert_allclose(fitted, truth, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(shift, [-1.5, 0.7], rtol=1e-6)  # (the file holds positions to 1e-8)
    assert fit["force_rmse_over_rms"] < 1e-6 and fit["energy_rmse_per_atom"] < 1e-6


@pytest.fixture(scope="module")
def lj_data(tmp_path_factory):
    """Twelve LJ frames of 108 atoms (reference labels), all in the training split but two."""
    path = tmp_path_factory.mktemp("pair") / "lj.xyz"
    frames = lj_frames(108, 12, seed=7)
    for i, atoms in enumerate(frames):
        atoms.info.update(split="train" if i < 10 else "valid", state_point="rho0.8", system="lj", units="LJ reduced")
    write_dataset(path, frames)
    return path


def test_training_starts_from_the_pair_fit_and_it_holds_most_of_a_pair_potential(lj_data):
    """The trainer's initial parameters are the fit: the float32 model's force error on the training
    frames is the float64 fit's own, and for LJ, a pair potential, that error is small (the 2.0 cutoff
    leaves the tail from 2.0 to the reference's 2.5 out), with the transformer still at zero. The
    lattice frames sample narrow shells, where plain least squares needs weights of 3.6e4 that cancel:
    the fit takes a ridge and keeps them within its bound."""
    experiment = tiny_config(lj_data)
    experiment = experiment.__class__(experiment.data, small_config(n_species=1, x64=False, pair_radial=16,
                                                                    attention_cutoff=R_ATT, attention_keys=12,
                                                                    core_radii=()), experiment.train)
    run = prepare_run(read_dataset(lj_data), experiment, atom_chunk=TRAIN_ATOM_CHUNK)
    fit = run.data.statistics["pair_fit"]
    assert fit["frames"] == 10 and fit["force_rmse_over_rms"] < 0.05
    assert fit["ridge"] > 0
    bound = WEIGHT_BOUND * np.sqrt(run.data.statistics["force_mean_square"]) * run.config.model.cutoff
    assert np.max(np.abs(run.pair_start[0])) <= bound
    state = init_state(run)
    dataset = run.data.dataset
    from a2ijax.potential import fixed_neighbor_list

    @jax.jit
    def forces(R, idx, species, box):
        nbrs = fixed_neighbor_list(idx, R)
        return -jax.grad(lambda R: run.energy_fn(state.params, R, neighbor=nbrs, species=species, box=box))(R)

    squared, total = 0.0, 0.0
    for bucket in run.data.buckets["train"]:
        for row in range(len(bucket)):
            F = forces(jnp.asarray(bucket.R[row]), jnp.asarray(bucket.idx[row]), jnp.asarray(bucket.species[row]),
                       jnp.asarray(bucket.box[row]))
            n = int(bucket.n_atoms[row])
            squared += float(jnp.sum((F[:n] - bucket.forces[row, :n]) ** 2))
            total += float(np.sum(dataset.forces[int(bucket.frame_index[row])] ** 2))
    np.testing.assert_allclose(np.sqrt(squared / total), fit["force_rmse_over_rms"], rtol=2e-3)


def shell_system(d):
    """Atom 3 at distance ``d`` from atom 0, farther than ``R_ATT`` from every atom while ``d`` is in
    (1.4, 1.9), and within the 2.0 cutoff of atom 0."""
    base = jnp.array([[0.0, 0.0, 0.0], [1.0, 0.1, 0.0], [-0.2, 1.1, 0.1]])
    direction = jnp.array([-0.5, -0.6, -0.62])
    return jnp.concatenate([base, d * (direction / jnp.linalg.norm(direction))[None]], 0)


def test_with_an_attention_range_an_atom_beyond_it_reaches_the_energy_through_the_pair_pathway_alone(x64):
    """Atom 3 moves through the shell between r_att and r_c: the transformer's part of the energy
    (pair weights zeroed) does not change, the pair pathway's does; the same model without the pair
    pathway (every neighbour a token) does change."""
    displacement, _ = space.free()
    species = jnp.array([0, 1, 2, 1])
    kw = dict(attention_cutoff=R_ATT, attention_keys=3)
    init_fn, energy_fn = pair_model(displacement, 100.0, small_config(pair_radial=6, **kw), species)
    params = with_both_pathways(init_fn(jax.random.PRNGKey(3), shell_system(1.5)))
    for a, b in [(0, 3), (1, 3), (2, 3)]:
        for d in (1.45, 1.85):
            assert float(jnp.linalg.norm(shell_system(d)[a] - shell_system(d)[b])) > R_ATT
    no_pairs = jax.tree_util.tree_map(lambda x: x, params)
    no_pairs["params"]["pair_weights"] = jnp.zeros_like(params["params"]["pair_weights"])
    transformer = [float(energy_fn(no_pairs, shell_system(d))) for d in (1.45, 1.65, 1.85)]
    both = [float(energy_fn(params, shell_system(d))) for d in (1.45, 1.65, 1.85)]
    np.testing.assert_allclose(transformer, transformer[0], rtol=0, atol=1e-12)
    assert max(both) - min(both) > 1e-3
    all_tokens_init, all_tokens = pair_model(displacement, 100.0, small_config(**kw), species)
    p = all_tokens_init(jax.random.PRNGKey(3), shell_system(1.5))
    full = [float(all_tokens(p, shell_system(d))) for d in (1.45, 1.65, 1.85)]
    assert max(full) - min(full) > 1e-4


def test_with_an_attention_range_the_energy_is_smooth_where_tokens_fade_and_forces_are_its_gradient(
        periodic_liquid):
    """Key tokens fade at r_att and the pair pathway at r_c: E and F stay continuous through both (atom
    3 of the shell system); in a periodic liquid the forces equal central differences."""
    displacement, _ = space.free()
    species = jnp.array([0, 1, 2, 1])
    init_fn, energy_fn = pair_model(displacement, 100.0, small_config(pair_radial=6, layers=2,
                                                                      attention_cutoff=R_ATT, attention_keys=3),
                                    species)
    params = with_both_pathways(init_fn(jax.random.PRNGKey(5), shell_system(1.5)))

    def toward_atom_1(d):  # atom 3 along the line from atom 1: crosses r_att of atom 1
        R = shell_system(1.6)
        u = (R[3] - R[1]) / jnp.linalg.norm(R[3] - R[1])
        return R.at[3].set(R[1] + d * u)

    assert_continuous_at(energy_fn, params, toward_atom_1, R_ATT)
    assert_continuous_at(energy_fn, params, shell_system, 2.0)

    R, side, species = periodic_liquid
    _, _, nbrs, params, energy_fn = periodic_model("invariant", R, side, species, 6, layers=2, pair_radial=6,
                                                   attention_cutoff=R_ATT, attention_keys=16)
    params = with_both_pathways(params, seed=1)
    _, F = energy_and_forces(energy_fn, params, R, neighbor=nbrs)
    assert_forces_are_central_differences(energy_fn, params, R, nbrs, F, samples=4, seed=2)
