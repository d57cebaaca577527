"""A2I as LAMMPS's force field (a2ijax.lammps, fix external) and the exported model (a2ijax.export).

The independent engine is LAMMPS itself: its velocity Verlet, its ghost atoms and, on two ranks, its
spatial decomposition. The same model, start and time step in ``a2ijax.md.run`` must give the same
trajectory (float64: 1e-10 of the box), energies and pressure; two ranks must give the forces and
trajectory of one, with environments that cross the rank boundary and atoms that move between ranks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import child_env, shared_directory
from jax_md import quantity, simulate, space
from lammps_worker import lammps_nve, write_data

from a2ijax import a2i_neighbor_list, pretrained
from a2ijax.checkpoint import load_checkpoint
from a2ijax.export import ExportError, export_model, ghost_form, load_exported
from a2ijax.geometry import neighbor_index
from a2ijax.lammps import LammpsError, run_input
from a2ijax.md import energy_observables, run
from a2ijax.potential import fixed_neighbor_list
from a2ijax.systems import lattice_positions

# 40 steps: the fastest atoms cross half the skin within about 10, so LAMMPS rebuilds its ghosts and
# moves atoms between ranks within the run (checked); each callback costs 0.2-0.5 s here in float64.
N, STEPS = 256, 40
SIDE = (N / 0.84) ** (1 / 3)  # 6.73: wider than the tiny model's ghost shell, 2 x 2.0 + 0.2


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A jittered LJ lattice with Maxwell velocities at kT 0.5 (no drift), as a LAMMPS data file."""
    R = np.asarray(lattice_positions(N, SIDE, jitter=0.08, seed=4), np.float64)
    V = np.random.default_rng(5).normal(scale=np.sqrt(0.5), size=(N, 3))
    V -= V.mean(0)
    data = tmp_path_factory.mktemp("lammps") / "start.data"
    write_data(data, R, V, SIDE)
    return R, V, data


@pytest.fixture(scope="module")
def one_rank(trained, start, tmp_path_factory):
    """The one-rank LAMMPS run's record, run once per test session (shared by the xdist workers: both
    tests below read it, and a second run would cost as much as the first)."""
    with shared_directory(tmp_path_factory, "lammps-one-rank") as (directory, ready):
        record = directory / "one.json"
        if not ready:
            with jax.enable_x64(True):
                record.write_text(json.dumps(lammps_nve(trained[1], start[2], STEPS)))  # floats exactly, as repr
    return json.loads(record.read_text())


def test_one_rank_lammps_run_is_the_a2ijax_md_run(x64, trained, start, one_rank):
    """LAMMPS NVE through the fix against a2ijax.md.run with the same model, start and step: positions
    after ``STEPS`` steps within 1e-10 of the box, the potential energy at every step (the callback's
    and LAMMPS's thermo) within 1e-10, and the pressure (LAMMPS: fix virial + kinetic) within 1e-8."""
    R, V, _ = start
    checkpoint = load_checkpoint(trained[1])
    potential = checkpoint.potential(np.eye(3) * SIDE, dr_threshold=0.2)
    init, apply = simulate.nve(potential.energy_fn, potential.shift_fn, 0.005)
    neighbor = potential.neighbor_fn.allocate(jnp.asarray(R))
    state = init(jax.random.PRNGKey(0), jnp.asarray(R), kT=0.0, neighbor=neighbor).set(momentum=jnp.asarray(V))
    e0 = float(potential.energy_fn(jnp.asarray(R), neighbor=neighbor))
    md = run(apply, state, potential.neighbor_fn, neighbor, STEPS, chunk_steps=STEPS,
             observe=energy_observables(potential.energy_fn))
    energies = one_rank["energies"]
    assert one_rank["ranks"] == 1 and len(energies) == STEPS + 1 and abs(e0) > 1.0
    np.testing.assert_allclose(energies["0"], e0, rtol=1e-12)
    np.testing.assert_allclose([energies[str(k)] for k in range(1, STEPS + 1)], md.observables["potential"],
                               rtol=1e-10)
    np.testing.assert_allclose([one_rank["pe_start"] * N, one_rank["pe_end"] * N], [e0, energies[str(STEPS)]],
                               rtol=1e-10)  # thermo normalises pe by N in lj units
    d = np.asarray(one_rank["positions"]) - np.asarray(md.state.position)
    d -= SIDE * np.round(d / SIDE)
    assert np.max(np.abs(d)) < 1e-10 * SIDE and np.max(np.linalg.norm(np.asarray(V), axis=1)) * STEPS * 0.005 > 0.1
    kinetic = quantity.kinetic_energy(momentum=md.state.momentum, mass=md.state.mass)
    pressure = quantity.pressure(potential.energy_fn, md.state.position, jnp.eye(3) * SIDE, kinetic_energy=kinetic,
                                 neighbor=md.neighbor)
    np.testing.assert_allclose(one_rank["pressure_end"], float(pressure), rtol=1e-8)
    # Padded sizes with room (a2ijax.lammps.ATOM_ROOM, SLOT_ROOM): one compilation for every callback,
    # while LAMMPS's ghost count moves by several percent.
    assert one_rank["calls"] > STEPS and one_rank["programs"] == 1


def test_two_ranks_give_the_forces_and_the_trajectory_of_one(trained, start, one_rank, tmp_path):
    """``mpiexec -n 2``: LAMMPS splits the box in two, environments cross the boundary, atoms move
    from one rank to the other during the run, and the step-0 forces (float rounding) and the
    trajectory after ``STEPS`` steps (1e-10 of the box) are one rank's."""
    out = tmp_path / "two.json"
    mpiexec = Path(sys.executable).parent / "mpiexec"
    worker = Path(__file__).with_name("lammps_worker.py")
    subprocess.run([str(mpiexec), "-n", "2", sys.executable, str(worker), str(trained[1]), str(start[2]), str(STEPS),
                    str(out)], check=True, timeout=600, env=child_env(JAX_ENABLE_X64="1"))
    two = json.loads(out.read_text())
    assert two["ranks"] == 2 and two["crossing"] > 0 and one_rank["crossing"] == 0
    assert two["arrived"] > 0 and one_rank["arrived"] == 0
    forces = np.asarray(one_rank["forces"])
    assert np.max(np.abs(forces)) > 1.0  # non-trivial forces
    np.testing.assert_allclose(two["forces"], forces, rtol=0, atol=1e-11 * np.max(np.abs(forces)))
    d = np.asarray(two["positions"]) - np.asarray(one_rank["positions"])
    d -= SIDE * np.round(d / SIDE)
    assert np.max(np.abs(d)) < 1e-10 * SIDE
    np.testing.assert_allclose([two["pe_start"], two["pe_end"], two["pressure_end"]],
                               [one_rank["pe_start"], one_rank["pe_end"], one_rank["pressure_end"]], rtol=1e-10)


@pytest.mark.parametrize("problem", ["units", "element", "types", "box"])
def test_inputs_the_fix_cannot_serve_are_named(trained, tmp_path, problem):
    R = np.asarray(lattice_positions(64, 4.0, jitter=0.05, seed=1), np.float64) if problem == "box" else \
        np.asarray(lattice_positions(N, SIDE, jitter=0.05, seed=1), np.float64)
    data = tmp_path / "start.data"
    write_data(data, R, np.zeros_like(R), 4.0 if problem == "box" else SIDE)
    script = tmp_path / "in.lammps"
    units = "metal" if problem == "units" else "lj"
    script.write_text(f"units {units}\natom_style atomic\nread_data {data}\nfix 1 all nve\nrun 1\n")
    elements = {"element": ["Xe"], "types": ["Ar", "Ar"]}.get(problem, ["Ar"])
    expected = {"units": "uses units 'metal', the checkpoint was trained in 'LJ reduced': it needs 'units lj'",
                "element": r"elements \['Xe'\] are not species of the checkpoint, whose symbols are \['Ar'\]",
                "types": "has 1 atom types but 2 elements",
                "box": "the box is 4 wide, narrower than the A2I fix's ghost shell 2 x cutoff \\+ skin = 4.2"}[problem]
    with pytest.raises(LammpsError, match=expected):
        run_input(trained[1], script, elements)


def test_the_exported_model_is_the_live_model_and_names_shapes_it_was_not_exported_for(trained, tmp_path):
    """``jax.export`` round trip with symbolic sizes: two clusters of different sizes through the one
    deserialized artefact give the live model's energies and forces; an A2I neighbour-list potential
    in free space gives the same; inputs outside the export are a named error."""
    checkpoint = load_checkpoint(trained[1])
    meta = export_model(checkpoint, tmp_path / "tiny.a2i", dtype="float32", platforms=("cpu",))
    exported = load_exported(tmp_path / "tiny.a2i")
    assert meta["symbols"] == ["Ar"] and exported.meta["cutoff"] == 2.0
    live = jax.jit(ghost_form(checkpoint, dtype=jnp.float32))
    displacement, _ = space.free()
    _, _, energy_fn = a2i_neighbor_list(displacement, 100.0, checkpoint.config.model)
    for n in (40, 90):
        R = np.asarray(lattice_positions(n, (n / 0.8) ** (1 / 3), jitter=0.1, seed=n), np.float32)
        idx = neighbor_index(R, None, False, checkpoint.config.model.cutoff)  # [n, K], empty slots hold n
        inputs = (R, np.zeros(n, np.int32), np.ones(n, bool), idx, np.arange(n, dtype=np.int32), np.ones(n, bool),
                  np.ones(n, bool), np.arange(n, dtype=np.int32))
        energy, forces, virial = exported(*inputs)
        expected = live(*inputs)
        np.testing.assert_allclose(energy, expected[0], rtol=1e-6)
        np.testing.assert_allclose(forces, expected[1], rtol=1e-5, atol=1e-6 * np.max(np.abs(expected[1])))
        direct = energy_fn(checkpoint.params, jnp.asarray(R), neighbor=fixed_neighbor_list(jnp.asarray(idx), R))
        np.testing.assert_allclose(energy, direct, rtol=1e-5)
        assert np.max(np.abs(np.asarray(forces))) > 1e-2
    with pytest.raises(ExportError, match="R is float64, the model was exported for float32"):
        exported(R.astype(np.float64), *inputs[1:])
    lj = export_model(pretrained.load("lj"), tmp_path / "lj.a2i", platforms=("cpu",))
    assert lj["min_slots"] == 24
    with pytest.raises(ExportError, match=r"idx has shape \(90, 10\): .* K >= 24"):
        load_exported(tmp_path / "lj.a2i")(R, *inputs[1:3], np.full((90, 10), 90, np.int32), *inputs[4:])
    (tmp_path / "broken.a2i").write_bytes(b"not an artefact")
    (tmp_path / "broken.a2i.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="broken.a2i is not a readable exported model"):
        load_exported(tmp_path / "broken.a2i")
