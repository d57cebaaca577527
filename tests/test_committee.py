"""Committees: members vmapped over their parameters, the mean force, the force disagreement."""

from __future__ import annotations

import json

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lj_frames, tiny_config

from a2ijax import cli, committee
from a2ijax.dataset import write_dataset
from a2ijax.md import DISAGREEMENT_COLUMNS, THERMO_COLUMNS, allocate_replicas, run
from a2ijax.potential import a2i_periodic, default_float
from a2ijax.train import train_committee


def _start(seed: int = 11):
    atoms = lj_frames(125, 1, seed=seed)[0]
    atoms.calc = None
    return atoms, jnp.asarray(atoms.cell[:].T), jnp.asarray(atoms.positions)


def test_member_forces_are_each_models_own_the_mean_force_their_mean(trained_committee, x64):
    group = committee.load(trained_committee)
    _, box, R = _start()
    neighbor_fn, _, energy_fn = a2i_periodic(box, group.config.model)
    nbrs = neighbor_fn.allocate(R)
    alone = jax.jit(lambda p, R: -jax.grad(lambda R: energy_fn(p, R, neighbor=nbrs))(R))
    alone = np.stack([alone(default_float(member.params), R) for member in group.members])
    assert float(np.max(np.abs(alone[1] - alone[0]))) > 1e-2  # the members differ
    members = jax.jit(lambda p, R: committee.member_forces(energy_fn, p, R, neighbor=nbrs)[1])
    np.testing.assert_allclose(members(default_float(group.params), R), alone, rtol=1e-10, atol=1e-10)
    _, mean_energy, _, _ = group.potential(box)
    mean_force = jax.jit(jax.grad(lambda R: -mean_energy(R, neighbor=nbrs)))(R)
    np.testing.assert_allclose(mean_force, alone.mean(0), rtol=1e-10, atol=1e-10)
    disagreement = group.disagreement(box)
    sigma = jax.jit(lambda R: disagreement(R, neighbor=nbrs))(R)
    expected = np.sqrt(np.mean(np.var(alone, axis=0, ddof=1), axis=-1))
    assert sigma.shape == (len(R),) and float(np.min(sigma)) > 0
    np.testing.assert_allclose(sigma, expected, rtol=1e-9)
    # Identical members: the same forces, bit for bit, so a disagreement of exactly zero.
    twins = committee.from_checkpoints([group.members[0]] * 2)
    assert float(np.max(committee.force_disagreement(members(default_float(twins.params), R)))) == 0.0


@pytest.mark.slow  # four / one MD programs compiled (python -m pytest -m slow)
def test_committee_md_in_one_compiled_step_replicas_times_members(trained_committee):
    """Two identical members follow the single model's trajectory; B = 2 replicas x M = 2 members in
    one vmapped step follow each replica run alone, disagreement included."""
    group = committee.load(trained_committee)
    _, box, R0 = _start(11)
    from jax_md import simulate as integrators

    def setup(potential):
        neighbor_fn, energy, _, shift = potential(box, dr_threshold=0.2)
        init, apply = integrators.nve(energy, shift, 0.002)
        return neighbor_fn, init, apply

    trajectories = []
    for potential in (group.members[0].potential, committee.from_checkpoints([group.members[0]] * 2).potential):
        neighbor_fn, init, apply = setup(potential)
        nbrs = neighbor_fn.allocate(R0)
        trajectories.append(run(apply, init(jax.random.PRNGKey(3), R0, kT=0.5, neighbor=nbrs), neighbor_fn, nbrs,
                                40, chunk_steps=20).state.position)
    assert float(jnp.max(jnp.abs(trajectories[0] - R0))) > 1e-2
    np.testing.assert_allclose(trajectories[1], trajectories[0], rtol=0, atol=1e-5)

    neighbor_fn, init, apply = setup(group.potential)
    disagreement = group.disagreement(box)
    observe = lambda state, neighbor: dict(sigma=disagreement(state.position, neighbor=neighbor))  # noqa: E731
    Rs = jnp.stack([R0, _start(12)[2]])
    lists = allocate_replicas(neighbor_fn, Rs)
    states = jax.vmap(lambda k, r, n: init(k, r, kT=0.5, neighbor=n))(jax.random.split(jax.random.PRNGKey(3), 2),
                                                                        Rs, lists)
    together = run(apply, states, neighbor_fn, lists, 20, chunk_steps=20, stride=10, observe=observe, replicas=True)
    assert together.observables["sigma"].shape == (2, 2, 125) and float(np.min(together.observables["sigma"])) > 0
    for b in range(2):
        pick = lambda tree, b=b: jax.tree_util.tree_map(lambda a: a[b], tree)  # noqa: E731
        alone = run(apply, pick(states), neighbor_fn, pick(lists), 20, chunk_steps=20, stride=10, observe=observe)
        np.testing.assert_allclose(together.state.position[b], alone.state.position, atol=1e-5)
        np.testing.assert_allclose(together.observables["sigma"][b], alone.observables["sigma"], rtol=1e-4)


@pytest.mark.slow  # four / one MD programs compiled (python -m pytest -m slow)
def test_committee_md_from_the_command_line(tiny_data, trained_committee, tmp_path, capsys):
    """``md`` of a committee's work directory records the disagreement in thermo.csv and the
    trajectory; ``train --members --resume`` of a finished committee retrains nothing."""
    index = json.loads((trained_committee / committee.INDEX).read_text())
    assert index["members"] == ["member_0", "member_1"] and index["seeds"] == [0, 1]
    assert train_committee(tiny_config(tiny_data), trained_committee, 2, resume=True, progress=False) == [None, None]
    with pytest.raises(ValueError, match="already holds a committee"):
        train_committee(tiny_config(tiny_data), trained_committee, 2, progress=False)
    atoms, _, _ = _start()
    write_dataset(tmp_path / "start.xyz", [atoms])
    out = tmp_path / "md"
    assert cli.main(["md", str(trained_committee), "--structure", str(tmp_path / "start.xyz"), "--steps", "20",
                     "--dt", "0.002", "--kT", "0.5", "--thermo-every", "5", "--trajectory-every", "10",
                     "--out", str(out)]) == 0
    assert "committee of 2" in capsys.readouterr().out
    header = (out / "thermo.csv").read_text().splitlines()[0].split(",")
    assert header == list(THERMO_COLUMNS + DISAGREEMENT_COLUMNS)
    table = np.loadtxt(out / "thermo.csv", delimiter=",", skiprows=1)
    assert table.shape == (4, len(header)) and np.all(table[:, -2] >= table[:, -1]) and np.all(table[:, -1] > 0)
    frames = ase.io.read(out / "trajectory.extxyz", index=":")
    assert [f.arrays["disagreement"].shape for f in frames] == [(125,), (125,)]
    np.testing.assert_allclose([f.arrays["disagreement"].max() for f in frames], table[1::2, -2], rtol=1e-5)


def test_members_must_share_their_splits(tmp_path):
    frames = lj_frames(125, 6, seed=0)  # no split headers: each seed would split them differently
    write_dataset(tmp_path / "plain.xyz", frames)
    config = tiny_config(tmp_path / "plain.xyz")
    with pytest.raises(ValueError, match="different splits"):
        train_committee(config, tmp_path / "run", 2, progress=False)
    with pytest.raises(ValueError, match="at least 2 members"):
        committee.from_checkpoints([])
