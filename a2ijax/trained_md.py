"""MD and minimisation with a trained checkpoint (``a2ijax md``, ``a2ijax relax``).

The structure (a file, or a state point of the checkpoint's reference system) is checked against
the checkpoint (species it knows, a periodic cell wide enough for the cutoff), a warning says when
atoms are closer than any pair in the training data (the model extrapolates there), and
:func:`a2ijax.md.simulate` runs with ``thermo.csv`` and ``trajectory.extxyz`` written as it goes
(NVE, Nose-Hoover or Langevin NVT, or NPT). A committee (:mod:`a2ijax.committee`) drives the MD with
its mean force and records the members' force disagreement in both files. :func:`relax_structure`
minimises a structure with jax-md's FIRE at fixed cell.
"""

from __future__ import annotations

from typing import Any

import ase
import ase.io
import jax
import jax.numpy as jnp
import numpy as np

from a2ijax.checkpoint import Checkpoint, unit_style
from a2ijax.committee import Committee, load_potential
from a2ijax.dataset import check_cutoff, structure_dataset
from a2ijax.errors import InputError
from a2ijax.geometry import closest_distance
from a2ijax.md import Relaxation, Simulation, allocate, check_output_steps, relax, simulate
from a2ijax.parallel import make_mesh
from a2ijax.sampling import SamplingConfig, sample_state_point
from a2ijax.systems import SYSTEMS, ReferenceSystem, get_system


def read_structure(path: str) -> ase.Atoms:
    """The last frame of an ASE-readable file; errors name the file."""
    try:
        return ase.io.read(path, index=-1)
    except FileNotFoundError:
        raise
    except Exception as error:  # ASE raises many types for unreadable files
        raise InputError(f"{path}: cannot read a structure: {error}") from error


def units_of(checkpoint: Checkpoint | Committee) -> dict[str, str]:
    """The units of ``dt``, ``kT`` and ``pressure`` in the checkpoint's data (its ``meta["units"]``)."""
    style = unit_style(checkpoint.meta)
    if style == "metal":
        return dict(time="Angstrom sqrt(amu / eV) = 10.18 fs", energy="eV", pressure="eV / Angstrom^3")
    if style == "lj":
        return dict(time="reduced time", energy="reduced energy", pressure="reduced pressure")
    return dict(time="the data's time unit", energy="the data's energy unit", pressure="energy / length^3")


def prepared(checkpoint: Checkpoint | Committee, atoms: ase.Atoms) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(box [3, 3], species [N], R [N, 3])`` of ``atoms`` after the checks the module docstring names."""
    cutoff = checkpoint.config.model.cutoff
    frame = structure_dataset(atoms, checkpoint.symbols)  # unknown species: an error naming them
    if not atoms.pbc.all():
        raise InputError(f"MD needs a fully periodic cell, the structure has pbc={atoms.pbc.tolist()}")
    check_cutoff(frame, cutoff)
    checkpoint.warn_if_closer_than_training(
        closest_distance(frame.positions[0], frame.cells[0], frame.pbc[0], cutoff), "the structure")
    dtype = jnp.result_type(float)
    return (jnp.asarray(atoms.cell[:].T, dtype), jnp.asarray(frame.species[0]),
            jnp.asarray(atoms.get_positions(), dtype))


def reference_system(checkpoint: Checkpoint | Committee) -> ReferenceSystem | None:
    """The reference system the checkpoint's data came from, or None for data from elsewhere."""
    name = checkpoint.meta.get("system", "")
    return get_system(name) if name in SYSTEMS else None


def masses(system: ReferenceSystem | None, atoms: ase.Atoms) -> Any:
    """The masses MD and FIRE move the atoms with: the reference ``system``'s (in its units), else the
    structure's own (ASE's, in amu)."""
    return system.mass if system is not None else jnp.asarray(atoms.get_masses())


def run_md(checkpoint: Checkpoint | Committee, atoms: ase.Atoms, *, steps: int, dt: float, kT: float | None,
           ensemble: str, pressure: float | None = None, mass: Any = 1.0, thermo_every: int = 10,
           trajectory_every: int = 100, skin: float | None = None, capacity_multiplier: float = 1.25,
           atom_chunk: int | None = None, devices: int = 1, seed: int = 0, out: str | None = None,
           progress: bool = True) -> Simulation:
    """Checks ``atoms`` against the checkpoint, runs :func:`a2ijax.md.simulate`, prints a summary.

    ``skin`` is the neighbour-list skin as a length (default: a tenth of the model's cutoff);
    ``capacity_multiplier`` the neighbour slots over the densest atom's count (an overflow reruns the
    chunk at a larger capacity); ``atom_chunk`` a run setting of the potential; ``devices`` > 1
    splits the atoms over that many local devices (:func:`a2ijax.parallel.make_mesh`; the same
    trajectory up to float rounding; one device for a committee); ``pressure`` the NPT target.
    """
    cutoff = checkpoint.config.model.cutoff
    skin = 0.1 * cutoff if skin is None else skin
    if not skin >= 0:
        raise InputError(f"skin must be a length >= 0, got {skin!r}")
    if not capacity_multiplier > 0:
        raise InputError(f"capacity_multiplier must be positive, got {capacity_multiplier!r}")
    box, species, R = prepared(checkpoint, atoms)
    committee = isinstance(checkpoint, Committee)
    if committee and devices != 1:
        raise InputError("committee MD runs on one device (devices=1)")
    mesh = make_mesh(devices, "atoms") if devices != 1 else None
    potential = checkpoint.potential(box, species, atom_chunk=atom_chunk, mesh=mesh, dr_threshold=skin,
                                     capacity_multiplier=capacity_multiplier)
    disagreement = checkpoint.disagreement(box, species, atom_chunk=atom_chunk) if committee else None
    units = units_of(checkpoint)
    if progress:
        print(f"{ensemble} MD in the checkpoint's units: dt = {dt:g} ({units['time']}), kT = "
              f"{'-' if kT is None else f'{kT:g}'} ({units['energy']})"
              + ("" if pressure is None else f", pressure = {pressure:g} ({units['pressure']})"))
    result = simulate(potential, R, box, steps=steps, dt=dt, ensemble=ensemble, kT=kT, pressure=pressure, mass=mass,
                      seed=seed, thermo_every=thermo_every, trajectory_every=trajectory_every, out=out,
                      symbols=atoms.get_chemical_symbols(), progress=progress, disagreement=disagreement,
                      time_unit=units["time"].split(" = ")[0])
    n, thermo = len(atoms), result.thermo
    checkpoint.warn_if_closer_than_training(float(thermo["min_distance"].min()), "the MD trajectory")
    print(f"{ensemble} MD: {n} atoms, {steps} steps of {dt:g} in {result.seconds:.1f} s "
          f"({result.rate:.4g} atom-steps/s after compilation, {result.reallocations} reallocations)")
    print(f"  neighbour slots per atom (K): {result.neighbor.idx.shape[-1]}")
    if committee:
        print(f"  committee of {checkpoint.size}: per-atom force disagreement mean "
              f"{thermo['disagreement_mean'].mean():.4g}, largest {thermo['disagreement_max'].max():.4g} (force units)")
    print(f"  temperature (kT) mean {thermo['temperature'].mean():.5g}, pressure mean {thermo['pressure'].mean():.5g}, "
          f"volume mean {thermo['volume'].mean():.6g}")
    print(f"  total energy per atom: start {thermo['total'][0] / n:.6g}, end {thermo['total'][-1] / n:.6g}, "
          f"drift {result.drift:.3g} per atom per time unit")
    if out is not None:
        print(f"  wrote {out}/thermo.csv and {out}/trajectory.extxyz ({steps // trajectory_every} frames)")
    return result


def relax_structure(checkpoint: Checkpoint | Committee, structure: str, *, max_force: float = 1e-3,
                    max_steps: int = 10000, skin: float | None = None, out: str | None = None) -> Relaxation:
    """``a2ijax relax``: the last frame of ``structure`` minimised at fixed cell with FIRE
    (:func:`a2ijax.md.relax`) moving the atoms with the :func:`masses` MD uses, written to ``out`` (extended
    XYZ with energy and forces) if given."""
    atoms = read_structure(structure)
    box, species, R = prepared(checkpoint, atoms)
    skin = 0.1 * checkpoint.config.model.cutoff if skin is None else skin
    potential = checkpoint.potential(box, species, dr_threshold=skin)
    result = relax(potential, R, max_force=max_force, max_steps=max_steps,
                    mass=masses(reference_system(checkpoint), atoms))
    units = units_of(checkpoint)
    state = "converged" if result.converged else "NOT converged"
    print(f"FIRE {state} after {result.steps} steps: energy {result.energy:.8g} ({units['energy']}), largest force "
          f"{result.max_force:.3g} (target {max_force:g})")
    if out is not None:
        from ase.calculators.singlepoint import SinglePointCalculator

        relaxed = atoms.copy()
        relaxed.positions = result.positions
        final = jnp.asarray(result.positions, R.dtype)
        neighbor, _ = allocate(potential.neighbor_fn, final)
        forces = -jax.grad(lambda R: potential.energy_fn(R, neighbor=neighbor))(final)
        relaxed.calc = SinglePointCalculator(relaxed, energy=result.energy, forces=np.asarray(forces, np.float64))
        ase.io.write(out, relaxed, format="extxyz")
        print(f"  wrote {out}")
    return result


def md_from_checkpoint(checkpoint: str | Checkpoint | Committee, *, structure: str | None = None,
                       state_point: str | None = None, equilibrate: int = 5000, steps: int, dt: float | None = None,
                       kT: float | None = None,
                       thermo_every: int = 10, trajectory_every: int = 100, seed: int = 0, **kwargs) -> Simulation:
    """``a2ijax md``: MD with ``checkpoint`` (a path: a work directory, checkpoint or committee's work
    directory; or a loaded one such as ``a2ijax.pretrained.load(name)``) from a ``structure`` file, or from
    a ``state_point`` of the checkpoint's reference system equilibrated with the reference potential
    for ``equilibrate`` steps (a lattice start would melt and heat up under the model). ``dt`` and
    ``kT`` default to the reference system's; other keywords go to :func:`run_md`."""
    if (structure is None) == (state_point is None):
        raise InputError("give exactly one of a structure file and a state point")
    if equilibrate < 0:
        raise InputError(f"equilibrate must be >= 0, got {equilibrate}")
    check_output_steps(steps, thermo_every, trajectory_every)  # before any MD
    if not isinstance(checkpoint, (Checkpoint, Committee)):
        checkpoint = load_potential(checkpoint)
    # Independent streams for the equilibration and the velocities, both from one seed.
    sampler_seed, velocity_seed = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(2))
    system = reference_system(checkpoint)
    if structure is not None:
        atoms = read_structure(structure)
    else:
        if system is None:
            raise InputError(f"the checkpoint's data has no reference system ({checkpoint.meta.get('system', '')!r}): "
                             "use a structure")
        point = system.state_point(state_point)
        sampling = SamplingConfig(frames_per_point=1, stride=50, equilibration=equilibrate, seed=sampler_seed)
        atoms = sample_state_point(system, point, sampling, seed=sampler_seed)[-1]
        atoms.calc = None
        kT = point.kT if kT is None else kT
    dt = dt if dt is not None else (system.dt if system is not None else None)
    if dt is None:
        raise InputError("give dt: the checkpoint's data has no reference system to take it from")
    return run_md(checkpoint, atoms, steps=steps, dt=dt, kT=kT, mass=masses(system, atoms), seed=velocity_seed,
                  thermo_every=thermo_every, trajectory_every=trajectory_every, **kwargs)
