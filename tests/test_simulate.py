"""MD with a trained potential: output files, no lost steps, pressure, RDF, NaN handling, bad input."""

from __future__ import annotations

import ase.io
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lj_frames

from a2ijax import cli
from a2ijax.checkpoint import load_checkpoint
from a2ijax.md import THERMO_COLUMNS, energy_drift, radial_distribution, simulate


@pytest.fixture
def checkpoint(trained):
    return load_checkpoint(trained[1])


def _start():
    atoms = lj_frames(125, 1, seed=11)[0]
    atoms.calc = None
    return atoms


def test_md_writes_every_step_it_ran_and_survives_a_reallocation(checkpoint, tmp_path):
    """Mid-run reallocation and rerun of a chunk is tested on the driver in test_md.py; here a list
    allocated far too small is grown before the first step and nothing is lost from the output."""
    atoms = _start()
    box = jnp.asarray(atoms.cell[:].T)
    potential = checkpoint.potential(box, dr_threshold=0.1, capacity_multiplier=0.3)
    run = simulate(potential, jnp.asarray(atoms.positions, jnp.float32), box,
                   steps=60, dt=0.002, ensemble="nve", kT=0.5, thermo_every=5, trajectory_every=20,
                   out=str(tmp_path), symbols=atoms.get_chemical_symbols(), progress=False)
    assert run.reallocations >= 1
    np.testing.assert_array_equal(run.thermo["step"], np.arange(5, 65, 5))
    table = np.loadtxt(tmp_path / "thermo.csv", delimiter=",", skiprows=1)
    assert table.shape == (12, len(THERMO_COLUMNS))
    np.testing.assert_array_equal(table[:, 0], np.arange(5, 65, 5))
    frames = ase.io.read(tmp_path / "trajectory.extxyz", index=":")
    assert [f.info["step"] for f in frames] == [20, 40, 60]
    np.testing.assert_allclose(frames[-1].positions, np.asarray(run.state.position), atol=1e-6)
    # The kinetic energy column is consistent with the temperature column (3N/2 kT, jax-md's convention).
    np.testing.assert_allclose(table[:, 3], 1.5 * 125 * table[:, 5], rtol=1e-4)


def test_virial_pressure_matches_the_volume_derivative(checkpoint, x64):
    atoms = _start()
    R = jnp.asarray(atoms.positions)
    side = atoms.cell[0, 0]

    def potential(scale):
        box = jnp.eye(3) * side * scale
        neighbor_fn, energy_fn, _, _ = checkpoint.potential(box)
        return energy_fn(R * scale, neighbor=neighbor_fn.allocate(R * scale))

    from jax_md import quantity

    box = jnp.eye(3) * side
    neighbor_fn, energy_fn, _, _ = checkpoint.potential(box)
    virial = float(quantity.pressure(energy_fn, R, box, neighbor=neighbor_fn.allocate(R)))
    h = 1e-6
    volume = side**3
    finite = -(float(potential(1 + h)) - float(potential(1 - h))) / (2 * h) / (3 * volume)  # dV = 3 V dscale
    assert abs(virial) > 1e-3
    assert virial == pytest.approx(finite, rel=1e-6)


def test_rdf_of_an_ideal_gas_is_one_and_of_a_lattice_is_not():
    rng = np.random.default_rng(0)
    side = 10.0
    frames = rng.uniform(0, side, (40, 400, 3))
    species = np.repeat([0, 1], [320, 80])
    r, g = radial_distribution(frames, np.eye(3) * side, species, r_max=4.0, bins=20)
    assert set(g) == {(0, 0), (0, 1), (1, 1)}
    for key, values in g.items():
        tail = values[r > 1.5]
        assert abs(tail.mean() - 1.0) < 0.03, key
    grid = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(1, -1, 3) * 2.0
    r, g_lattice = radial_distribution(grid, np.eye(3) * side, np.zeros(125, int), r_max=4.1, bins=20)
    # Simple cubic, spacing 2: nothing closer, then 6 neighbours per atom in the bin [1.845, 2.05).
    shell = 4 / 3 * np.pi * (2.05**3 - 1.845**3)
    assert g_lattice[0, 0][:9].max() == 0.0
    assert g_lattice[0, 0][9] == pytest.approx(125 * 6 / (125 * 124 / side**3 * shell))


def test_energy_drift_is_the_slope_per_atom():
    t = np.linspace(0, 10, 50)
    assert energy_drift(t, 100 * (3.0 + 0.02 * t), 100) == pytest.approx(0.02)


def test_nan_during_md_stops_and_keeps_the_last_good_frame(checkpoint, tmp_path):
    atoms = _start()
    box = jnp.asarray(atoms.cell[:].T)
    potential = checkpoint.potential(box, dr_threshold=0.1)
    energy_fn, displacement = potential.energy_fn, potential.displacement_fn
    R = jnp.asarray(atoms.positions, jnp.float32)

    def pushed(R_, neighbor=None, **kwargs):
        # A constant pull on atom 0 along +x; energy and forces turn NaN once it is 0.3 from its start.
        energy = energy_fn(R_, neighbor=neighbor, **kwargs) - 50.0 * R_[0, 0]
        moved = jnp.linalg.norm(displacement(R_[0], R[0]))
        return energy * jnp.where(moved > 0.3, jnp.nan, 1.0)

    with pytest.raises(FloatingPointError, match=r"at step \d+ \(atom 0; .* the last good state is from step \d+"):
        simulate(potential._replace(energy_fn=pushed), R, box, steps=2000, dt=0.002, thermo_every=10,
                 trajectory_every=50, out=str(tmp_path), progress=False)
    frames = ase.io.read(tmp_path / "trajectory.extxyz", index=":")
    assert frames and all(np.isfinite(f.positions).all() for f in frames)
    rows = np.loadtxt(tmp_path / "thermo.csv", delimiter=",", skiprows=1, ndmin=2)
    assert np.isfinite(rows).all() and rows[-1, 0] == frames[-1].info["step"]


def test_md_command_names_bad_input(trained, tmp_path, capsys):
    workdir = str(trained[1])
    missing = tmp_path / "none.xyz"
    assert cli.main(["md", workdir, "--structure", str(missing)]) == 2
    assert "No such file" in capsys.readouterr().err
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not\na structure\n")
    assert cli.main(["md", workdir, "--structure", str(garbage)]) == 2
    assert "cannot read a structure" in capsys.readouterr().err
    small = _start()[:30]
    small.set_cell([3.5, 3.5, 3.5])
    ase.io.write(tmp_path / "small.xyz", small)
    assert cli.main(["md", workdir, "--structure", str(tmp_path / "small.xyz")]) == 2
    assert "box too small for the cutoff" in capsys.readouterr().err
    foreign = _start()
    foreign.symbols[:3] = "Kr"
    ase.io.write(tmp_path / "foreign.xyz", foreign)
    assert cli.main(["md", workdir, "--structure", str(tmp_path / "foreign.xyz")]) == 2
    assert "['Kr'] that the potential was not trained on" in capsys.readouterr().err
    ase.io.write(tmp_path / "start.xyz", _start())
    assert cli.main(["md", workdir, "--structure", str(tmp_path / "start.xyz"), "--devices", "2"]) == 2
    assert "asked for 2 devices, this process has 1" in capsys.readouterr().err


def test_md_command_from_a_reference_state_point(trained, tmp_path, capsys):
    out = tmp_path / "md"
    assert cli.main(["md", str(trained[1]), "--state-point", "rho0.84_T0.85", "--equilibrate", "200",
                     "--steps", "40", "--thermo-every", "10", "--trajectory-every", "20", "--out", str(out),
                     "--capacity-multiplier", "1.05"]) == 0
    printed = capsys.readouterr().out
    assert "nve MD: 256 atoms, 40 steps" in printed
    # The trimmed list: K is 1.05x the densest atom's neighbour count (x 1.25 would be ~20% more slots),
    # or more after a reallocation, which the summary counts.
    slots = int(printed.split("neighbour slots per atom (K): ")[1].split()[0])
    reallocations = int(printed.split(" reallocations)")[0].split()[-1])
    frame = ase.io.read(out / "trajectory.extxyz", index=0)
    reach = load_checkpoint(trained[1]).config.model.cutoff * 1.1  # cutoff + the default skin of 0.1 cutoff
    d = frame.get_all_distances(mic=True)
    densest = int(np.max(np.sum(d < reach, axis=1) - 1))
    assert reallocations > 0 or slots < 1.15 * densest, (slots, densest)
    rows = np.loadtxt(out / "thermo.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(rows[:, 0], [10, 20, 30, 40])
    assert len(ase.io.read(out / "trajectory.extxyz", index=":")) == 2
