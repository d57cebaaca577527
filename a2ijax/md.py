"""Running jax-md integrators in compiled chunks, with the neighbour list checked between chunks.

Steps run inside ``lax.scan`` chunks; the host looks at the result once per chunk, never once per
step. Every driver of the package (``run`` and ``simulate`` here, :mod:`a2ijax.diffmd`,
:mod:`a2ijax.bench`) advances by :func:`step`: the integrator steps, then the neighbour list is
brought up to date with the new positions (and the new box, where the box changes).

If the list needs reallocating anywhere in a chunk (too few neighbour slots, cell-list capacity
or attention-key slots, or a box that narrowed below the cells: the list's error bits,
:func:`a2ijax.neighbors.describe`), the chunk's result is discarded, the list is reallocated with
more capacity (:func:`a2ijax.neighbors.reallocate`) and the same chunk runs again from its starting
state, so no step is lost or computed with truncated neighbours. Positions that stop being finite
end the run with an error naming the first step and the atoms.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax_md import partition, quantity

from a2ijax.errors import InputError
from a2ijax.geometry import lattice_matrix, neighbor_pairs
from a2ijax.neighbors import describe, masked_displacements, reallocate
from a2ijax.parallel import split_leading
from a2ijax.potential import Potential


@dataclasses.dataclass
class MDRun:
    """What :func:`run` returns: the final state and list, and per-step observables ``[n_steps]``."""

    state: Any
    neighbor: partition.NeighborList
    observables: dict[str, np.ndarray]
    reallocations: int


def energy_observables(energy: Callable[..., jax.Array]) -> Callable[..., dict[str, jax.Array]]:
    """Per-step potential, kinetic and total energy and temperature (k_B T) of a jax-md state."""

    def observe(state, neighbor):
        potential = energy(state.position, neighbor=neighbor)
        kinetic = quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)
        kT = quantity.temperature(momentum=state.momentum, mass=state.mass)
        return dict(potential=potential, kinetic=kinetic, total=potential + kinetic, kT=kT)

    return observe


def step(apply_fn: Callable, box_fn: Callable[[Any], Any] | None = None, **kwargs) -> Callable:
    """``(state, neighbor) -> (state, neighbor)``: one integrator step, then the list updated for the
    new positions (``neighbor.update(R, box=box_fn(state))`` where the box changes, e.g.
    ``jax_md.simulate.npt_box``). The list a state is carried with always belongs to its positions."""

    def advance(state: Any, neighbor: partition.NeighborList) -> tuple[Any, partition.NeighborList]:
        state = apply_fn(state, neighbor=neighbor, **kwargs)
        box = {} if box_fn is None else dict(box=box_fn(state))
        return state, neighbor.update(state.position, **box)

    return advance


def make_chunk(apply_fn: Callable, n_records: int, observe: Callable | None = None, stride: int = 1,
               replicas: bool = False, box_fn: Callable[[Any], Any] | None = None, **kwargs) -> Callable:
    """A jitted ``chunk(state, neighbor) -> (state, neighbor, records, bad)`` advancing by
    ``n_records * stride`` :func:`step` s.

    ``observe(state, neighbor)`` is recorded after every ``stride`` steps, giving arrays with a
    leading ``[n_records]`` axis. ``bad`` is ``[step, atom]``: the first step (counted from 1 in the
    chunk) after which an atom's position was not finite, and that atom (``[0, -1]``: none). With
    ``replicas``, state and list carry a leading replica axis ``[B, ...]`` and the chunk is vmapped
    over it: all replicas advance in one compiled step, and records are ``[B, n_records]``.
    """
    advance = step(apply_fn, box_fn, **kwargs)

    def one(k, carry):
        state, neighbor, bad = carry
        state, neighbor = advance(state, neighbor)
        finite = jnp.all(jnp.isfinite(state.position), axis=-1)  # [N]
        first = (bad[0] == 0) & ~jnp.all(finite)
        bad = jnp.where(first, jnp.stack([k + 1, jnp.argmin(finite).astype(k.dtype)]), bad)
        return state, neighbor, bad

    def chunk(state, neighbor):
        def record(carry, r):
            carry = jax.lax.fori_loop(r * stride, (r + 1) * stride, one, carry)
            return carry, ({} if observe is None else observe(*carry[:2]))

        start = (state, neighbor, jnp.asarray([0, -1], jnp.int32))
        (state, neighbor, bad), records = jax.lax.scan(record, start, jnp.arange(n_records, dtype=jnp.int32))
        return state, neighbor, records, bad

    return jax.jit(jax.vmap(chunk) if replicas else chunk)


def allocate(neighbor_fn: partition.NeighborFn, R: jax.Array, max_reallocations: int = 10
             ) -> tuple[partition.NeighborList, int]:
    """A list for ``R`` that holds every neighbour (a ``capacity_multiplier`` below 1, say, grows before
    the first force call), and how many reallocations that took; ``RuntimeError`` naming the cause
    after ``max_reallocations``."""
    neighbor, reallocations = neighbor_fn.allocate(R), 0
    while bool(neighbor.did_buffer_overflow):
        if reallocations == max_reallocations:
            raise RuntimeError(f"the neighbour list still needs reallocating after {max_reallocations} "
                               f"reallocations at the start: {describe(neighbor.error.code)}")
        neighbor, reallocations = reallocate(neighbor_fn, R, neighbor), reallocations + 1
    return neighbor, reallocations


def allocate_replicas(neighbor_fn: partition.NeighborFn, R: jax.Array,
                      overflowed: partition.NeighborList | None = None) -> partition.NeighborList:
    """One neighbour list per replica of ``R [B, N, dim]``, batched ``[B, N, K]`` with one set of
    capacities, the largest any replica needs; ``overflowed``: the batched list that needed
    reallocating, whose capacities then grow where they overflowed (:func:`a2ijax.neighbors.reallocate`)."""
    if overflowed is None:
        lists = [neighbor_fn.allocate(r) for r in R]
    else:
        lists = [reallocate(neighbor_fn, r, jax.tree.map(lambda a, b=b: a[b], overflowed)) for b, r in enumerate(R)]
    widest = max(range(len(lists)), key=lambda b: lists[b].idx.shape[1])
    base = lists[widest]
    keys = max(getattr(lst, "key_capacity", 0) for lst in lists)
    if keys > getattr(base, "key_capacity", 0):
        base = neighbor_fn.allocate(R[widest], extra_capacity=base.idx.shape[1] - lists[widest].idx.shape[1],
                                    key_capacity=keys)
    return jax.vmap(lambda r: base.update(r))(R)


def run(apply_fn: Callable, state: Any, neighbor_fn: partition.NeighborFn, neighbor: partition.NeighborList,
        n_steps: int, *, chunk_steps: int = 100, stride: int = 1, observe: Callable | None = None,
        max_reallocations: int = 10, progress: Callable[[int], Any] | None = None,
        on_chunk: Callable[[int, Any, Any, dict[str, np.ndarray]], Any] | None = None, replicas: bool = False,
        mesh: Mesh | None = None, box_fn: Callable[[Any], Any] | None = None,
        until: Callable[[dict[str, np.ndarray]], bool] | None = None, **kwargs) -> MDRun:
    """Advances ``state`` by ``n_steps`` integrator steps, ``chunk_steps`` per compiled chunk.

    ``observe`` is recorded every ``stride`` steps (``n_steps`` and ``chunk_steps`` are multiples of
    it). With ``replicas``, state and list carry a leading replica axis (see
    :func:`allocate_replicas`) and observables are ``[B, n_records]``. ``progress(steps)`` and
    ``on_chunk(steps_done, state, neighbor, records)`` are called after each accepted chunk (to write output
    as the run goes, so that an interrupted run keeps it). ``box_fn(state)``: the current box of an
    integrator whose box changes (``jax_md.simulate.npt_box``), for the list's updates.
    ``until(records)``: after each accepted chunk, whether to stop early (a minimiser that has
    converged); the run then ends with the steps done so far.

    Raises ``FloatingPointError`` naming the first step and the atoms whose positions stopped being
    finite (the returned state is never a poisoned one), and ``RuntimeError`` naming what
    overflowed after ``max_reallocations`` reallocations.

    ``mesh`` (replicas only; :func:`a2ijax.parallel.make_mesh`): the replicas are split over its
    devices, each device advancing its own (their number a multiple of the device count). One system
    is split over devices by its potential instead (``a2i_neighbor_list(..., mesh=)``).
    """
    if n_steps < 0 or chunk_steps < 1 or stride < 1 or n_steps % stride or chunk_steps % stride:
        raise InputError(f"need n_steps >= 0, chunk_steps >= 1 and both multiples of stride >= 1; got "
                         f"n_steps={n_steps}, chunk_steps={chunk_steps}, stride={stride}")
    if mesh is not None:
        if not replicas:
            raise InputError("run(mesh=) splits replicas over devices; to split one system's atoms give the "
                             "potential the mesh (a2i_neighbor_list(..., mesh=mesh))")
        count = state.position.shape[0]
        if count % mesh.size:
            raise InputError(f"{count} replicas cannot be split evenly over {mesh.size} devices")
    place = (lambda tree: tree) if mesh is None else (lambda tree: jax.device_put(tree, split_leading(mesh)))
    state, neighbor = place(state), place(neighbor)
    chunks: dict[int, Callable] = {}
    records: list[dict[str, np.ndarray]] = []
    done, reallocations = 0, 0
    while done < n_steps:
        length = min(chunk_steps, n_steps - done)
        if length not in chunks:
            chunks[length] = make_chunk(apply_fn, length // stride, observe, stride, replicas, box_fn, **kwargs)
        new_state, new_neighbor, record, bad = chunks[length](state, neighbor)
        if bool(jnp.any(new_neighbor.did_buffer_overflow)):
            cause = describe(new_neighbor.error.code)
            if reallocations == max_reallocations:
                raise RuntimeError(f"the neighbour list needed reallocating {reallocations + 1} times, allowed "
                                   f"{max_reallocations}; giving up at step {done}: {cause}")
            if replicas:
                neighbor = place(allocate_replicas(neighbor_fn, state.position, new_neighbor))
            else:  # a changing box: the new list is laid out for the box at the chunk's start
                box = {} if box_fn is None else dict(box=box_fn(state))
                neighbor = reallocate(neighbor_fn, state.position, new_neighbor, **box)
            reallocations += 1  # the chunk functions recompile once for the new list shape
            continue
        bad = np.asarray(bad).reshape(-1, 2)
        if np.any(bad[:, 0] > 0):
            first = int(bad[bad[:, 0] > 0, 0].min())
            atoms = sorted({int(a) for s, a in bad if s == first})
            which = f"atom {atoms[0]}" if len(atoms) == 1 else f"atoms {atoms}"  # one per replica that broke
            positions = np.asarray(new_state.position).reshape(-1, *np.shape(new_state.position)[-2:])
            broken = np.flatnonzero(np.any(~np.isfinite(positions).all(-1), axis=0))
            raise FloatingPointError(
                f"positions stopped being finite at step {done + first} ({which}; "
                f"{len(broken)} atoms non-finite by step {done + length}): the forces blew up; the last good state "
                f"is from step {done}")
        state, neighbor = new_state, new_neighbor
        records.append(jax.tree.map(np.asarray, record))
        done += length
        if on_chunk is not None:
            on_chunk(done, state, neighbor, records[-1])
        if progress is not None:
            progress(length)
        if until is not None and until(records[-1]):
            break
    axis = 1 if replicas else 0
    observables = {key: np.concatenate([r[key] for r in records], axis) for key in (records[0] if records else {})}
    return MDRun(state, neighbor, observables, reallocations)


# ----------------------------------------------------------------------------------------------
# Simulations with observables and output files

ENSEMBLES = ("nve", "nose-hoover", "langevin", "npt")
THERMO_COLUMNS = ("step", "time", "potential", "kinetic", "total", "temperature", "pressure", "volume",
                  "min_distance")
#: Extra thermo columns of a run with a committee's force disagreement (``simulate(disagreement=)``).
DISAGREEMENT_COLUMNS = ("disagreement_max", "disagreement_mean")


@dataclasses.dataclass
class Simulation:
    """What :func:`simulate` returns.

    ``thermo`` holds one row per ``thermo_every`` steps (columns ``THERMO_COLUMNS``; temperature is
    k_B T in energy units, pressure from the virial, the box's volume; with a committee also
    ``DISAGREEMENT_COLUMNS``, the largest and the mean per-atom force disagreement), ``drift`` the
    linear-fit slope of the total energy per atom per unit time, ``rate`` the atom-steps per second
    after compilation. The trajectory (one frame per ``trajectory_every`` steps) is in
    ``trajectory`` (an extended-XYZ file) when the run wrote one, else in memory: ``positions``
    ``[F, N, 3]``, ``boxes`` ``[F, 3, 3]`` and ``disagreement`` ``[F, N]`` (a committee's per-atom
    force disagreement; None without one) read it from wherever it is.
    """

    state: Any
    neighbor: partition.NeighborList
    thermo: dict[str, np.ndarray]
    drift: float
    rate: float
    reallocations: int
    seconds: float
    trajectory: Path | None = None
    frames: list[dict[str, np.ndarray]] | None = None  # in memory when there is no trajectory file

    def _frames(self) -> list[dict[str, np.ndarray]]:
        if self.frames is not None:
            return self.frames
        import ase.io

        return [dict(positions=a.positions, box=np.asarray(a.cell[:]).T, disagreement=a.arrays.get("disagreement"))
                for a in ase.io.iread(self.trajectory, format="extxyz")]

    @property
    def positions(self) -> np.ndarray:
        return np.asarray([f["positions"] for f in self._frames()])

    @property
    def boxes(self) -> np.ndarray:
        return np.asarray([f["box"] for f in self._frames()])

    @property
    def disagreement(self) -> np.ndarray | None:
        frames = self._frames()
        if not frames or frames[0]["disagreement"] is None:
            return None
        return np.asarray([f["disagreement"] for f in frames])


def thermo_observables(energy_fn: Callable[..., jax.Array], displacement_fn: Callable, box: Any,
                       disagreement: Callable[..., jax.Array] | None = None,
                       box_fn: Callable[[Any], Any] | None = None) -> Callable[..., dict[str, jax.Array]]:
    """Per-record potential, kinetic and total energy, temperature, virial pressure, volume and closest
    pair; ``box_fn(state)``: the current box where it changes (NPT), else ``box``. With
    ``disagreement(R, neighbor) -> [N]`` (:meth:`a2ijax.committee.Committee.disagreement`) also
    the largest and the mean per-atom force disagreement (per-atom values are not kept per record:
    that memory would grow with N times the records)."""

    def observe(state, neighbor):
        R = state.position
        now = box if box_fn is None else box_fn(state)
        potential = energy_fn(R, neighbor=neighbor, box=now)
        kinetic = quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)
        pressure = quantity.pressure(energy_fn, R, now, kinetic_energy=kinetic, neighbor=neighbor)
        records = dict(potential=potential, kinetic=kinetic, total=potential + kinetic,
                       temperature=quantity.temperature(momentum=state.momentum, mass=state.mass), pressure=pressure,
                       volume=quantity.volume(R.shape[-1], now), min_distance=closest_neighbor(R, neighbor,
                                                                                                 displacement_fn, now))
        if disagreement is not None:
            sigma = disagreement(R, neighbor=neighbor, box=now)
            records.update(disagreement_max=jnp.max(sigma), disagreement_mean=jnp.mean(sigma))
        return records

    return observe


def closest_neighbor(R: jax.Array, neighbor: partition.NeighborList, displacement_fn: Callable, box: Any) -> jax.Array:
    """The smallest distance between an atom and its listed neighbours (inf if none)."""
    dR, real = masked_displacements(R, neighbor.idx, displacement_fn, box=box)
    return jnp.sqrt(jnp.min(jnp.where(real, jnp.sum(dR * dR, -1), jnp.inf)))


def energy_drift(time: np.ndarray, total: np.ndarray, n_atoms: int) -> float:
    """Slope of a straight-line fit of the total energy per atom against time."""
    if len(time) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(time, np.float64), np.asarray(total, np.float64) / n_atoms, 1)[0])


def radial_distribution(positions: np.ndarray, box: np.ndarray, species: np.ndarray, r_max: float, bins: int = 100
                        ) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
    """Radial distribution functions ``g_ab(r)`` for every species pair, averaged over frames.

    Args:
      positions: ``[F, N, 3]`` positions of ``F`` frames in a periodic ``box`` (``[3, 3]``, lattice
        vectors as columns) whose perpendicular widths exceed ``2 * r_max``.
      species: ``[N]`` species ids.
    Returns:
      bin centres ``[bins]`` and ``{(a, b): g [bins]}`` for ``a <= b`` present in ``species``.
    Pairs come from a linear-time cell list (:func:`a2ijax.geometry.neighbor_pairs`).
    """
    cell = np.asarray(box, np.float64).T
    volume = abs(np.linalg.det(cell))
    edges = np.linspace(0.0, r_max, bins + 1)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    species = np.asarray(species)
    kinds = np.unique(species)
    counts = {(a, b): np.zeros(bins) for a in kinds for b in kinds if a <= b}
    for R in np.asarray(positions, np.float64):
        i, j, d = neighbor_pairs(R, cell, True, r_max)
        for a, b in counts:
            counts[a, b] += np.histogram(d[(species[i] == a) & (species[j] == b)], edges)[0]
    g = {}
    for (a, b), c in counts.items():
        n_a, n_b = np.sum(species == a), np.sum(species == b)
        pairs = n_a * (n_a - 1) if a == b else n_a * n_b
        g[a, b] = c / (len(positions) * pairs / volume * shell)
    return 0.5 * (edges[1:] + edges[:-1]), g


def rdf_difference(r: np.ndarray, g: dict, g_reference: dict) -> dict[tuple[int, int], float]:
    """Integrated absolute difference ``int |g - g_ref| dr / r_max`` per species pair (a mean over r)."""
    dr = r[1] - r[0]
    r_max = r[-1] + 0.5 * dr
    return {k: float(np.sum(np.abs(g[k] - g_reference[k])) * dr / r_max) for k in g}


class _Output:
    """Thermo CSV and extended-XYZ trajectory, appended and flushed after every chunk; with a committee
    the thermo rows have ``DISAGREEMENT_COLUMNS`` and the frames a per-atom ``disagreement`` array."""

    def __init__(self, out: str | None, symbols: list[str], columns: tuple[str, ...]):
        self.out = None if out is None else Path(out)
        self.symbols, self.columns = symbols, columns
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "thermo.csv").write_text(",".join(columns) + "\n")
            (self.out / "trajectory.extxyz").write_text("")

    def write(self, rows: dict[str, np.ndarray], R: np.ndarray, box: np.ndarray, step: int, time: float,
              disagreement: np.ndarray | None = None) -> None:
        if self.out is None:
            return
        import ase
        import ase.io

        with open(self.out / "thermo.csv", "a") as f:
            for k in range(len(rows["step"])):
                f.write(",".join(f"{rows[c][k]:.10g}" for c in self.columns) + "\n")
            f.flush()
            os.fsync(f.fileno())
        atoms = ase.Atoms(symbols=self.symbols, positions=R, cell=np.asarray(box, np.float64).T, pbc=True,
                          info=dict(step=step, time=time))
        if disagreement is not None:
            atoms.arrays["disagreement"] = np.asarray(disagreement, np.float64)
        with open(self.out / "trajectory.extxyz", "a") as f:
            ase.io.write(f, atoms, format="extxyz")
            f.flush()
            os.fsync(f.fileno())


def check_positive(name: str, value: Any) -> None:
    """A ``ValueError`` naming ``name`` unless ``value`` is a finite number > 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (np.isfinite(number) and number > 0):
        raise InputError(f"{name} must be a positive number, got {value!r}")


class Integrator(NamedTuple):
    """jax-md's ``init(key, R, mass=, kT=, neighbor=)`` and ``apply(state, neighbor=)`` of an ensemble, and
    ``box_fn(state)``: the current box where the ensemble changes it (NPT), else None."""

    init: Callable
    apply: Callable
    box_fn: Callable[[Any], Any] | None = None


def integrator(energy_fn: Callable[..., jax.Array], shift_fn: Callable, ensemble: str, dt: float,
               kT: float | None, *, tau: float = 100.0, friction: float = 1.0, pressure: float | None = None,
               barostat_tau: float = 1000.0, box: Any = None, ensembles: tuple[str, ...] = ENSEMBLES) -> Integrator:
    """jax-md's integrator for ``ensemble`` (one of ``ensembles``): ``"nve"`` (velocity Verlet),
    ``"nose-hoover"`` (a chain thermostat, ``tau`` in units of ``dt``), ``"langevin"`` (``friction``
    in inverse time units) or ``"npt"`` (``simulate.npt_nose_hoover``: Nose-Hoover chains on the
    particles, ``tau``, and on an isotropic barostat at ``pressure``, ``barostat_tau``, both in units
    of ``dt``; positions in real coordinates of ``box`` at the start). The numbers are checked first."""
    if ensemble not in ensembles:
        raise InputError(f"ensemble must be one of {ensembles}, got {ensemble!r}")
    for name, value in (("dt", dt), ("tau", tau), ("friction", friction), ("barostat_tau", barostat_tau)):
        check_positive(name, value)
    from jax_md import simulate as integrators

    if ensemble == "nve":
        return Integrator(*integrators.nve(energy_fn, shift_fn, dt))
    if ensemble == "nose-hoover":
        return Integrator(*integrators.nvt_nose_hoover(energy_fn, shift_fn, dt, kT, tau=tau * dt))
    if ensemble == "langevin":
        return Integrator(*integrators.nvt_langevin(energy_fn, shift_fn, dt, kT, gamma=friction))
    if pressure is None or not np.isfinite(pressure):
        raise InputError(f"NPT needs a finite pressure, got {pressure!r}")
    if box is None:
        raise InputError("NPT needs the starting box")
    init, apply = integrators.npt_nose_hoover(energy_fn, shift_fn, dt, pressure, kT,
                                              barostat_kwargs=dict(tau=barostat_tau * dt),
                                              thermostat_kwargs=dict(tau=tau * dt))
    start = jnp.asarray(box, jnp.result_type(float))

    def init_npt(key, R, mass=1.0, kT=None, **kwargs):  # kT: the integrator's own
        return init(key, R, start, mass=mass, **kwargs)

    return Integrator(init_npt, apply, integrators.npt_box)


def check_output_steps(steps: int, thermo_every: int, trajectory_every: int) -> None:
    """Raises unless ``steps``, ``thermo_every`` and ``trajectory_every`` are positive integers and
    ``steps`` and ``trajectory_every`` multiples of ``thermo_every`` (what :func:`simulate` needs)."""
    for name, value in (("steps", steps), ("thermo_every", thermo_every), ("trajectory_every", trajectory_every)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if trajectory_every % thermo_every or steps % thermo_every:
        raise InputError(f"steps ({steps}) and trajectory_every ({trajectory_every}) must be multiples of "
                         f"thermo_every ({thermo_every})")


def simulate(potential: Potential, R: jax.Array, box: Any, *, steps: int, dt: float, ensemble: str = "nve",
             kT: float | None = None, pressure: float | None = None, mass: Any = 1.0, seed: int = 0,
             thermo_every: int = 10, trajectory_every: int = 100, tau: float = 100.0, barostat_tau: float = 1000.0,
             friction: float = 1.0, out: str | None = None, symbols: list[str] | None = None, progress: bool = True,
             time_unit: str = "time unit", disagreement: Callable[..., jax.Array] | None = None) -> Simulation:
    """Molecular dynamics with a potential on a Dense neighbour list updated every step.

    Args:
      potential: a :class:`a2ijax.potential.Potential` for ``box`` (``Checkpoint.potential(box)``, or
        any jax-md ``neighbor_fn`` and ``energy_fn(R, neighbor=..., **kw)`` with the box's
        ``displacement_fn`` and ``shift_fn``; ``kw`` reach the displacement: ``box`` and
        ``perturbation`` give the virial pressure, and NPT needs both, and a list that takes ``box=``).
      R: ``[N, 3]`` starting positions; velocities are drawn at ``kT`` (0 if ``kT`` is None, NVE).
      box: the starting box, ``[3, 3]`` lattice vectors as columns (or sides).
      steps, dt: number of steps and time step. ``steps`` and ``trajectory_every`` are multiples of
        ``thermo_every``; steps run in compiled chunks of ``trajectory_every`` with the neighbour list
        checked (and reallocated, rerunning the chunk) between chunks.
      ensemble: ``"nve"``, ``"nose-hoover"`` (chain thermostat, ``tau`` in units of ``dt``),
        ``"langevin"`` (``friction`` in inverse time units) or ``"npt"`` (at ``pressure``, with a
        barostat of ``barostat_tau`` steps; the box changes and is written with every row and frame).
      out: directory for ``thermo.csv`` and ``trajectory.extxyz`` (positions and box every
        ``trajectory_every`` steps), both appended and flushed after every chunk: if the run stops
        (NaN positions raise ``FloatingPointError`` naming the step), what was written stays. The
        frames are then on disk only (``Simulation.positions`` reads them); without ``out`` they
        are kept in memory.
      disagreement: a committee's ``fn(R, neighbor) -> [N]`` per-atom force disagreement
        (:meth:`a2ijax.committee.Committee.disagreement`), recorded with every thermo row (its
        largest and mean value) and every trajectory frame (per atom); the potential is then the
        committee's mean energy (:meth:`a2ijax.committee.Committee.potential`).
    """
    neighbor_fn, energy_fn, displacement_fn, shift_fn = potential
    box = jnp.asarray(lattice_matrix(box, R.shape[-1]), jnp.result_type(float))
    dynamics = integrator(energy_fn, shift_fn, ensemble, dt, kT, tau=tau, friction=friction, pressure=pressure,
                          barostat_tau=barostat_tau, box=box)  # checks them
    check_output_steps(steps, thermo_every, trajectory_every)
    if kT is not None and (not np.isfinite(kT) or kT < 0):
        raise InputError(f"kT must be >= 0, got {kT!r}")
    if ensemble != "nve" and kT is None:
        raise InputError(f"the {ensemble} thermostat needs kT")
    n = R.shape[0]
    neighbor, reallocations = allocate(neighbor_fn, R)
    state = dynamics.init(jax.random.PRNGKey(seed), R, mass=mass, kT=0.0 if kT is None else kT, neighbor=neighbor)
    columns = THERMO_COLUMNS + (DISAGREEMENT_COLUMNS if disagreement is not None else ())
    output = _Output(out, symbols or ["X"] * n, columns)
    frames: list[dict[str, np.ndarray]] = []
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, unit="step", desc=f"md {ensemble}", dynamic_ncols=True)
    t0, t_first = time.perf_counter(), None
    box_of = (lambda state: box) if dynamics.box_fn is None else dynamics.box_fn

    frame_disagreement = None if disagreement is None else jax.jit(
        lambda R, neighbor, box: disagreement(R, neighbor=neighbor, box=box))

    def on_chunk(done: int, state: Any, neighbor: Any, records: dict[str, np.ndarray]) -> None:
        nonlocal t_first
        k = len(records["potential"])
        records = dict(records, step=done - thermo_every * (k - 1 - np.arange(k)))
        records["time"] = records["step"] * dt
        rows.append(records)
        R, now = np.asarray(state.position, np.float64), np.asarray(box_of(state), np.float64)
        sigma = None if disagreement is None else np.asarray(frame_disagreement(state.position, neighbor, now))
        if out is None:
            frames.append(dict(positions=R, box=now, disagreement=sigma))
        output.write(records, R, now, done, done * dt, sigma)
        stamp = time.perf_counter()
        if t_first is None:
            t_first = (stamp, done)  # the first chunk includes compilation
        elif bar is not None:
            rate = n * (done - t_first[1]) / (stamp - t_first[0])
            bar.set_postfix_str(f"{rate:.3g} atom-steps/s, {rate / n * dt * 86400:.3g} {time_unit}/day, "
                                f"E {records['total'][-1] / n:.5g}/atom")
        if bar is not None:
            bar.update(done - bar.n)

    try:
        md = run(dynamics.apply, state, neighbor_fn, neighbor, steps, chunk_steps=trajectory_every,
                 stride=thermo_every, observe=thermo_observables(energy_fn, displacement_fn, box, disagreement,
                                                                 dynamics.box_fn),
                 on_chunk=on_chunk, box_fn=dynamics.box_fn)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    thermo = {c: np.concatenate([r[c] for r in rows]) for c in columns} if rows else {}
    rate = float("nan")
    if t_first is not None and steps > t_first[1]:
        rate = n * (steps - t_first[1]) / (t0 + seconds - t_first[0])
    drift = energy_drift(thermo["time"], thermo["total"], n) if thermo else float("nan")
    return Simulation(md.state, md.neighbor, thermo, drift, rate, reallocations + md.reallocations, seconds,
                      None if out is None else Path(out) / "trajectory.extxyz", frames if out is None else None)


def relax(potential: Potential, R: jax.Array, *, max_force: float = 1e-3, max_steps: int = 10000,
          chunk_steps: int = 100, dt_start: float = 0.1, dt_max: float = 0.4, mass: Any = 1.0) -> Relaxation:
    """Minimises the energy of ``R`` at fixed box with jax-md's FIRE (``minimize.fire_descent``) until
    the largest force on any atom is below ``max_force`` or ``max_steps`` have run.

    Steps run in compiled chunks of ``chunk_steps`` with the neighbour list updated every step and
    checked between chunks, as in MD. ``dt_start`` and ``dt_max`` are FIRE's time steps, in the
    potential's time unit, and ``mass`` the atoms' masses in its mass unit: FIRE is MD with a
    steering force, so ``dt_max`` must stay below the stiffest vibration's stability limit, which
    scales with the square root of the mass. jax-md's defaults (0.1 and 0.4) are set for LJ units
    with mass 1; silicon under the shipped SW model needs its 28.09 amu (``tests/test_ensembles.py``).
    """
    from jax_md import minimize

    for name, value in (("max_force", max_force), ("dt_start", dt_start), ("dt_max", dt_max)):
        check_positive(name, value)
    for name, value in (("max_steps", max_steps), ("chunk_steps", chunk_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    neighbor_fn, energy_fn, _, shift_fn = potential
    init, apply = minimize.fire_descent(energy_fn, shift_fn, dt_start=dt_start, dt_max=dt_max)
    neighbor, _ = allocate(neighbor_fn, R)
    state = init(R, mass=mass, neighbor=neighbor)

    def observe(state, neighbor):
        return dict(energy=energy_fn(state.position, neighbor=neighbor),
                    max_force=jnp.sqrt(jnp.max(jnp.sum(state.force**2, -1))))

    steps = -(-max_steps // chunk_steps) * chunk_steps
    done = run(apply, state, neighbor_fn, neighbor, steps, chunk_steps=chunk_steps, stride=chunk_steps,
               observe=observe, until=lambda records: bool(records["max_force"][-1] < max_force))
    forces = done.observables["max_force"]
    return Relaxation(np.asarray(done.state.position), float(done.observables["energy"][-1]), float(forces[-1]),
                      len(forces) * chunk_steps, bool(forces[-1] < max_force))


class Relaxation(NamedTuple):
    """What :func:`relax` returns: the final positions, energy and largest force per atom, the steps
    run and whether the largest force fell below the threshold."""

    positions: np.ndarray
    energy: float
    max_force: float
    steps: int
    converged: bool
