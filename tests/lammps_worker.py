"""NVE in LAMMPS with an A2I checkpoint through ``fix external`` (a2ijax.lammps), on however many ranks
``mpiexec`` started; rank 0 writes what the tests compare to a JSON file.

    mpiexec -n 2 python tests/lammps_worker.py CHECKPOINT DATA STEPS OUT.json

Run directly by ``tests/test_lammps.py`` for one rank (:func:`lammps_nve`) and under ``mpiexec -n 2``
for two. Records: the forces after ``run 0`` (ordered by atom ID), the potential energy LAMMPS's
thermo shows and the one the callback set at every step, positions after ``STEPS`` steps, the
pressure, how many local atoms have a neighbour within the cutoff owned by another rank, and how
many atoms a rank owns after the run that it did not own before (moved between ranks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

DT = 0.005
INPUT = """units lj
atom_style atomic
boundary p p p
atom_modify map array
read_data {data}
timestep {dt!r}
fix integrate all nve
thermo_style custom step pe ke etotal press
thermo 10
run 0
"""


def write_data(path: Path, R: np.ndarray, V: np.ndarray, side: float) -> None:
    """A LAMMPS data file of one atom type (mass 1) with positions and velocities."""
    side = f"{float(side):.17g}"
    lines = ["A2I test system", "", f"{len(R)} atoms", "1 atom types", "", f"0 {side} xlo xhi",
             f"0 {side} ylo yhi", f"0 {side} zlo zhi", "", "Masses", "", "1 1.0", "", "Atoms # atomic", ""]
    lines += [f"{k + 1} 1 {x:.17g} {y:.17g} {z:.17g}" for k, (x, y, z) in enumerate(np.asarray(R, np.float64))]
    lines += ["", "Velocities", ""] + [f"{k + 1} {x:.17g} {y:.17g} {z:.17g}"
                                       for k, (x, y, z) in enumerate(np.asarray(V, np.float64))]
    path.write_text("\n".join(lines) + "\n")


def lammps_nve(checkpoint, data: Path, steps: int, elements=("Ar",)) -> dict:
    """Runs the input on every rank; returns the record (complete on rank 0)."""
    from a2ijax.lammps import run_input

    script = data.with_suffix(".in")
    # jax-md's integrators keep dt as a float32 number (0.005 -> 0.004999999888...), in float64 runs
    # too: LAMMPS gets the same step, so that the two trajectories compare to float64 rounding.
    script.write_text(INPUT.format(data=data, dt=float(np.float32(DT))))
    fix = run_input(checkpoint, script, list(elements))
    lmp = fix.lmp
    forces = np.ctypeslib.as_array(lmp.gather_atoms("f", 1, 3), shape=(lmp.get_natoms() * 3,)).reshape(-1, 3).copy()
    crossing = crossing_count(fix)
    owned = local_tags(lmp)
    pe_start = float(lmp.get_thermo("pe"))
    pressure_start = float(lmp.get_thermo("press"))
    lmp.command(f"run {steps}")
    arrived = int(np.count_nonzero(~np.isin(local_tags(lmp), owned)))
    if fix.comm is not None:
        arrived = fix.comm.allreduce(arrived)
    positions = np.ctypeslib.as_array(lmp.gather_atoms("x", 1, 3), shape=(lmp.get_natoms() * 3,)).reshape(-1, 3)
    record = dict(ranks=int(lmp.extract_setting("world_size")), forces=forces.tolist(), pe_start=pe_start,
                  pressure_start=pressure_start, pe_end=float(lmp.get_thermo("pe")),
                  pressure_end=float(lmp.get_thermo("press")), positions=positions.tolist(),
                  energies={str(k): v for k, v in sorted(fix.energies.items())}, crossing=crossing,
                  arrived=arrived, calls=fix.calls, programs=len(fix.programs))
    lmp.close()
    return record


def local_tags(lmp) -> np.ndarray:
    """The IDs of the atoms this rank owns now (a copy: LAMMPS's array is rewritten as atoms migrate)."""
    return np.array(lmp.numpy.extract_atom("id", nelem=int(lmp.extract_global("nlocal"))))


def crossing_count(fix) -> int:
    """Local atoms (summed over ranks) with a neighbour within the cutoff that another rank owns: the
    environments that cross a rank boundary."""
    from a2ijax.geometry import neighbor_pairs

    lmp = fix.lmp
    nlocal, nghost = int(lmp.extract_global("nlocal")), int(lmp.extract_global("nghost"))
    x = np.asarray(lmp.numpy.extract_atom("x", nelem=nlocal + nghost))
    tags = np.asarray(lmp.numpy.extract_atom("id", nelem=nlocal + nghost))
    i, j, _ = neighbor_pairs(x, None, False, fix.cutoff)
    own = set(tags[:nlocal].tolist())
    foreign = np.asarray([t not in own for t in tags])
    count = len(np.unique(i[(i < nlocal) & foreign[j]]))
    if fix.comm is not None:
        count = fix.comm.allreduce(count)
    return int(count)


if __name__ == "__main__":
    checkpoint, data, steps, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    result = lammps_nve(checkpoint, data, steps)
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank == 0:
        out.write_text(json.dumps(result))
