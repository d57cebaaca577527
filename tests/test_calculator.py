"""ASE calculator: ASE's own finite-difference forces and stress, per-atom energies, ase.md and
ase.optimize, and clear errors for structures the potential cannot take."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators import fd
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGSLineSearch
from conftest import lj_frames

from a2ijax.calculator import A2ICalculator
from a2ijax.checkpoint import ExtrapolationWarning, load_checkpoint


@pytest.fixture
def calculator(trained):
    return A2ICalculator(load_checkpoint(trained[1]))


def _atoms(seed: int = 5):
    atoms = lj_frames(120, 1, seed=seed)[0]
    atoms.calc = None
    return atoms


def test_forces_and_stress_match_ase_finite_differences(calculator, x64):
    """ASE's central differences (``ase.calculators.fd``) for the forces on 8 atoms spread over the
    frame (each takes 6 calls) and for the stress."""
    atoms = _atoms()
    atoms.calc = calculator
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-2
    some = np.arange(0, len(atoms), 15)
    numerical = fd.calculate_numerical_forces(atoms, eps=1e-4, iatoms=some)
    np.testing.assert_allclose(forces[some], numerical, atol=1e-6 * np.abs(forces).max() + 1e-7)
    stress = atoms.get_stress()
    assert np.abs(stress).max() > 1e-4
    np.testing.assert_allclose(stress, fd.calculate_numerical_stress(atoms, eps=1e-5), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(atoms.get_potential_energies().sum(), atoms.get_potential_energy(), rtol=1e-12)


@pytest.mark.filterwarnings("ignore::a2ijax.checkpoint.ExtrapolationWarning")  # a barely trained model
def test_ase_dynamics_and_optimizer_run_on_the_calculator(calculator, x64):
    atoms = _atoms(seed=6)
    atoms.calc = calculator
    start = atoms.get_potential_energy()
    # A line search: each accepted step lowers the energy, even next to the stiff core repulsion.
    BFGSLineSearch(atoms, logfile=None).run(fmax=1e-3, steps=5)
    assert atoms.get_potential_energy() < start
    atoms.set_momenta(np.random.default_rng(0).normal(0.0, 0.05, (len(atoms), 3)))
    total = lambda: atoms.get_potential_energy() + atoms.get_kinetic_energy()  # noqa: E731
    before = total()
    VelocityVerlet(atoms, timestep=2e-4, logfile=None).run(20)
    assert abs(total() - before) < 1e-4 * len(atoms)


def test_structures_the_potential_cannot_take_are_named(calculator):
    atoms = _atoms()
    atoms.symbols[0] = "Xe"
    atoms.calc = calculator
    with pytest.raises(ValueError, match=r"chemical symbols \['Xe'\] that the potential was not trained on"):
        atoms.get_potential_energy()
    small = _atoms()
    small.positions[1] = small.positions[0] + [0.5, 0.0, 0.0]
    small.calc = calculator
    with pytest.warns(ExtrapolationWarning, match="closer than any pair in the training data"):
        small.get_potential_energy()
    narrow = _atoms()[:20]
    narrow.set_cell([3.0, 3.0, 3.0])
    narrow.calc = calculator
    with pytest.raises(ValueError, match="box too small for the cutoff"):
        narrow.get_potential_energy()
