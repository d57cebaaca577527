"""jax-md's own potentials in this package's builder shape, and the one trainer fitting them."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lj_frames, tiny_config
from jax_md import energy, partition, space

from a2ijax.baselines import BASELINES, DESCRIPTIONS, baseline_neighbor_list, sparse_from_dense
from a2ijax.checkpoint import load_checkpoint
from a2ijax.config import BaselineConfig
from a2ijax.dataset import write_dataset
from a2ijax.report import evaluate
from a2ijax.systems import lattice_positions
from a2ijax.train import train_and_evaluate

CUTOFF = 1.5


def small_liquid():
    side = (27 / 0.84) ** (1 / 3)  # 27 atoms; the box (3.18) is wider than twice the cutoff
    return jnp.asarray(lattice_positions(27, side, jitter=0.15, seed=3)), side


# NequIP one message-passing step wide enough for l = 0, 1, 2 (jax-md's default: 5 steps,
# 128x0e + 64x1e + 4x2e, 4x the compilation time): the conversions under test are the same.
NEQUIP_SIZES = dict(graph_net_steps=1, hidden_irreps="16x0e + 8x1e + 2x2e")


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_equals_jax_md_own_energy_and_forces(x64, name):
    """Split-out parameters (nnx models) and a Dense list converted to Sparse (NequIP) give what
    jax-md's own energy function gives on its own neighbour list; the nnx models refuse a species
    at the call, which they would ignore."""
    R, side = small_liquid()
    species = jnp.asarray(np.arange(27) % 2, jnp.int32)
    displacement, _ = space.periodic(side)
    key = jax.random.PRNGKey(1)
    sizes = dict(nequip_sizes=NEQUIP_SIZES) if name == "nequip" else {}
    neighbor_fn, init_fn, energy_fn = baseline_neighbor_list(name, displacement, side, cutoff=CUTOFF, species=species,
                                                             n_species=2, avg_neighbors=10.0, key=key, **sizes)
    params = init_fn(key, R, neighbor_fn.allocate(R))
    if name == "nequip":
        from jax_md.nn import nequip

        cfg = nequip.default_config()
        cfg.r_max, cfg.n_elements, cfg.n_neighbors, cfg.shift, cfg.scale = CUTOFF, 2, 10.0, 0.0, 1.0
        cfg.update(NEQUIP_SIZES)
        own_fn, _, own = energy.nequip_neighbor_list(displacement, side, cfg)
        dense_fn = partition.neighbor_list(displacement, side, CUTOFF, format=partition.Dense)
        atoms = jax.nn.one_hot(species, 2)

        def reference(R, nbrs):
            return own(params, R, nbrs, atoms=atoms)

        ours = lambda R, nbrs: energy_fn(params, R, nbrs, species=species)  # noqa: E731
        lists = own_fn.allocate(R), dense_fn.allocate(R)
        assert sparse_from_dense(lists[1]).idx.shape[0] == 2
    else:
        build = (energy.graph_network_neighbor_list if name == "graph_network"
                 else energy.behler_parrinello_neighbor_list)
        if name == "graph_network":
            own_fn, own = build(displacement, side, CUTOFF, 0.0, key=key, nodes=jax.nn.one_hot(species, 2),
                                format=partition.Dense)
        else:
            own_fn, own = build(displacement, side, key=key, species=species, sym_kwargs=dict(cutoff_distance=CUTOFF),
                                format=partition.Dense)
        reference = lambda R, nbrs: own(R, nbrs)  # noqa: E731
        ours = lambda R, nbrs: energy_fn(params, R, nbrs)  # noqa: E731
        lists = own_fn.allocate(R), neighbor_fn.allocate(R)
    # Lists allocated outside, one compilation each instead of op-by-op dispatch.
    e_ref, g_ref = jax.jit(jax.value_and_grad(reference))(R, lists[0])
    e, g = jax.jit(jax.value_and_grad(ours))(R, lists[1])
    assert float(jnp.max(jnp.abs(g_ref))) > 1e-6  # non-trivial forces
    np.testing.assert_allclose(e, e_ref, rtol=1e-9)
    np.testing.assert_allclose(g, g_ref, rtol=1e-7, atol=1e-9 * float(jnp.max(jnp.abs(g_ref))))
    if name != "nequip":
        with pytest.raises(ValueError, match=f"jax-md's {name} takes its species when it is built"):
            energy_fn(params, R, lists[1], species=1 - species)
    else:
        with pytest.raises(ValueError, match="'r_max' is not a size"):
            baseline_neighbor_list(name, displacement, side, cutoff=CUTOFF, nequip_sizes=dict(r_max=3.0))
        with pytest.raises(ValueError, match="nequip_sizes are NequIP's"):
            baseline_neighbor_list("behler_parrinello", displacement, side, cutoff=CUTOFF, nequip_sizes=NEQUIP_SIZES)


@pytest.fixture(scope="module")
def baseline_data(tmp_path_factory):
    frames = lj_frames(125, 14, seed=7)
    for atoms, split in zip(frames, ["train"] * 10 + ["valid"] * 2 + ["test"] * 2, strict=True):
        atoms.info.update(split=split, state_point="s", system="lj", units="LJ reduced")
    path = tmp_path_factory.mktemp("baseline") / "lj.xyz"
    write_dataset(path, frames)
    return path


def test_the_trainer_fits_a_jax_md_baseline(baseline_data, tmp_path):
    """jax-md's graph network through the same loop as A2I: validation error drops, the checkpoint
    evaluates to the report's figures, no per-atom energies are claimed, MD refuses it clearly."""
    config = dataclasses.replace(tiny_config(baseline_data, steps=30, eval_every=10, checkpoint_every=10,
                                             learning_rate=1e-2), baseline=BaselineConfig("graph_network"))
    result = train_and_evaluate(config, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["valid_force_rmse"] < rows[0]["valid_force_rmse"]
    assert "per_atom_energy" not in result.report and result.report["parameters"] > 1000
    report, _ = evaluate(tmp_path / "run", baseline_data, split="test")
    assert report["force_rmse"] == pytest.approx(result.report["force_rmse"], rel=1e-5)
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.config.baseline.name == "graph_network" and checkpoint.config.model.core_radii == ()
    with pytest.raises(ValueError, match="holds jax-md's graph_network, not an A2I model"):
        checkpoint.potential(np.eye(3) * 6.0)


def test_baseline_needs_the_same_atoms_in_every_frame(tmp_path):
    frames = lj_frames(125, 6, seed=0) + lj_frames(120, 2, seed=50)
    for atoms, split in zip(frames, ["train"] * 4 + ["valid"] * 2 + ["test"] * 2, strict=True):
        atoms.info.update(split=split)
    path = tmp_path / "mixed.xyz"
    write_dataset(path, frames)
    config = dataclasses.replace(tiny_config(path), baseline=BaselineConfig("nequip"))
    with pytest.raises(ValueError, match=r"frame 6: jax-md's nequip cannot pad or mask atoms"):
        train_and_evaluate(config, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"\[baseline\] name must be one of"):
        BaselineConfig("mace")


def test_the_config_names_exactly_the_baselines_this_module_builds():
    assert tuple(DESCRIPTIONS) == BASELINES == ("nequip", "graph_network", "behler_parrinello")
