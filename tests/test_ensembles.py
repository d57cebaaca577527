"""What MD users expect beyond NVE and NVT: NPT that holds the density the NVT run had at its pressure
(the reference LJ potential and the shipped LJ model), and FIRE minimisation to a force threshold."""

import ase.io
import jax.numpy as jnp
import numpy as np
import pytest

from a2ijax import cli, md, pretrained
from a2ijax.neighbors import periodic_neighbor_list
from a2ijax.potential import Potential, periodic_space
from a2ijax.systems import diamond_positions, get_system, lattice_positions

N, DENSITY, KT = 180, 0.84, 0.85  # the smallest LJ box wider than 2 x (2.5 + skin 0.25): side 5.98


def npt_holds_the_nvt_density(potential_of, steps: int, seed: int = 0) -> tuple[float, float, float]:
    """NVT at (N, DENSITY, KT) measures a pressure; NPT at that pressure from the same start samples a
    density. Returns the NPT mean density, its standard deviation over the run, and the drift of
    the box size between the run's two halves over that deviation."""
    side = (N / DENSITY) ** (1 / 3)
    box = np.eye(3) * side
    R = jnp.asarray(lattice_positions(N, side, jitter=0.05, seed=seed))
    settings = dict(dt=0.005, kT=KT, thermo_every=10, trajectory_every=steps // 2, progress=False, seed=seed)
    nvt = md.simulate(potential_of(box), R, box, steps=steps, ensemble="nose-hoover", **settings)
    pressure = float(np.mean(nvt.thermo["pressure"][len(nvt.thermo["pressure"]) // 4:]))
    start = nvt.state.position
    npt = md.simulate(potential_of(box), start, box, steps=steps, ensemble="npt", pressure=pressure,
                      barostat_tau=100.0, **settings)
    density = N / npt.thermo["volume"][len(npt.thermo["volume"]) // 4:]
    assert np.ptp(npt.thermo["volume"]) > 0  # the box did move
    assert npt.boxes.shape == (2, 3, 3) and not np.allclose(npt.boxes[-1], box)  # and the frames carry it
    return float(np.mean(density)), float(np.std(density)), float(np.mean(npt.thermo["temperature"][steps // 40:]))


def reference_lj(box: np.ndarray) -> Potential:
    """The reference LJ on the periodic list, which follows a changing box."""
    displacement, shift = periodic_space(box)
    _, energy_fn = get_system("lj").neighbor_list(displacement, box)
    return Potential(periodic_neighbor_list(box, 2.5, dr_threshold=0.25, disable_cell_list=True), energy_fn,
                     displacement, shift)


def test_npt_keeps_the_nvt_density_with_the_reference_lj(x64):
    density, spread, kT = npt_holds_the_nvt_density(reference_lj, 4000)
    assert spread > 1e-3  # it fluctuates: a barostat at work
    assert abs(density - DENSITY) < 2 * spread, (density, spread)
    assert abs(kT - KT) < 0.1 * KT


@pytest.mark.slow  # 3 minutes of the shipped model's MD on 2 cores (python -m pytest -m slow)
def test_npt_keeps_the_nvt_density_with_the_shipped_lj_model():
    model = pretrained.load("lj")
    density, spread, kT = npt_holds_the_nvt_density(
        lambda box: model.potential(box, dr_threshold=0.25, disable_cell_list=True), 1200)
    assert spread > 1e-3
    assert abs(density - DENSITY) < 2 * spread, (density, spread)
    assert abs(kT - KT) < 0.15 * KT


def test_fire_relaxes_a_perturbed_sw_crystal_with_the_shipped_model(tmp_path, capsys):
    """``a2ijax relax --model sw``: a diamond crystal with every atom displaced by ~0.1 Angstrom comes
    back to max |F| < 1e-3 eV/Angstrom, near the perfect crystal, and stays there: the threshold is
    below float32's reach, so FIRE runs all 300 steps at its largest time step after converging
    (with unit masses instead of silicon's, it blew up within 10 steps of reaching it, about step
    200). The written frame holds the forces it reached."""
    R, side = diamond_positions(3)
    rng = np.random.default_rng(0)
    atoms = ase.Atoms("Si" * len(R), positions=np.asarray(R) + rng.normal(scale=0.1, size=(len(R), 3)),
                      cell=np.eye(3) * side, pbc=True)
    ase.io.write(tmp_path / "start.xyz", atoms)
    out = tmp_path / "relaxed.extxyz"
    assert cli.main(["relax", "--model", "sw", "--structure", str(tmp_path / "start.xyz"), "--out", str(out),
                     "--fmax", "1e-7", "--max-steps", "300"]) == 0
    assert "FIRE NOT converged after 300 steps" in capsys.readouterr().out
    relaxed = ase.io.read(out)
    assert np.max(np.linalg.norm(relaxed.get_forces(), axis=1)) < 1e-3
    def off_lattice(positions):  # RMS distance from the perfect crystal, the rigid shift taken out
        d = np.asarray(positions) - np.asarray(R)
        d -= np.round(d / side) * side
        return float(np.sqrt(np.mean(np.sum((d - d.mean(0)) ** 2, -1))))

    assert off_lattice(atoms.positions) > 0.15 and off_lattice(relaxed.positions) < 0.02


def test_npt_and_relax_options_are_checked(tmp_path, capsys):
    assert cli.main(["md", "--model", "lj", "--state-point", "rho0.84_T0.85", "--ensemble", "npt"]) == 2
    assert "--ensemble npt needs --pressure" in capsys.readouterr().err
    assert cli.main(["md", "--model", "lj", "--state-point", "rho0.84_T0.85", "--pressure", "1.0"]) == 2
    assert "--pressure applies to --ensemble npt, not nve" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["relax", "--model", "sw", "--structure", "x.xyz", "--fmax", "0"])
