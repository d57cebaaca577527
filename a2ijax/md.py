"""Running jax-md integrators in compiled chunks, with the neighbour list checked between chunks.

Steps run inside ``lax.scan`` chunks; the host looks at the result once per chunk, never once per
step. If the neighbour list overflowed anywhere in a chunk, the chunk's result is discarded, the list
is reallocated with more capacity (:func:`a2ijax.potential.reallocate`) and the same chunk runs again
from its starting state, so no step is lost or computed with truncated neighbours.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax_md import partition, quantity

from a2ijax.geometry import neighbor_pairs
from a2ijax.parallel import split_leading
from a2ijax.potential import reallocate


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


def make_chunk(apply_fn: Callable, n_records: int, observe: Callable | None = None, stride: int = 1,
               replicas: bool = False, **kwargs) -> Callable:
    """A jitted function advancing ``(state, neighbor)`` by ``n_records * stride`` steps.

    The neighbour list is updated before every step; ``observe(state, neighbor)`` is recorded after
    every ``stride`` steps, giving arrays with a leading ``[n_records]`` axis. With ``replicas``,
    state and list carry a leading replica axis ``[B, ...]`` and the chunk is vmapped over it: all
    replicas advance in one compiled step, and records are ``[B, n_records]``.
    """

    def one_step(_, carry):
        state, neighbor = carry
        neighbor = neighbor.update(state.position)
        return apply_fn(state, neighbor=neighbor, **kwargs), neighbor

    def chunk(state, neighbor):
        def record(carry, _):
            state, neighbor = jax.lax.fori_loop(0, stride, one_step, carry)
            return (state, neighbor), ({} if observe is None else observe(state, neighbor))

        (state, neighbor), records = jax.lax.scan(record, (state, neighbor), None, length=n_records)
        return state, neighbor, records

    return jax.jit(jax.vmap(chunk) if replicas else chunk)


def allocate_replicas(neighbor_fn: partition.NeighborFn, R: jax.Array, capacity: int = 0) -> partition.NeighborList:
    """One neighbour list per replica of ``R [B, N, dim]``, batched ``[B, N, K]`` with one capacity
    ``K`` (the largest any replica needs, at least ``capacity``), for :func:`run` with ``replicas``."""
    lists = [neighbor_fn.allocate(r) for r in R]
    widest = max(range(len(lists)), key=lambda b: lists[b].idx.shape[1])
    base = lists[widest]
    if base.idx.shape[1] < capacity:
        base = neighbor_fn.allocate(R[widest], extra_capacity=capacity - base.idx.shape[1])
    return jax.vmap(lambda r: base.update(r))(R)


def run(apply_fn: Callable, state: Any, neighbor_fn: partition.NeighborFn, neighbor: partition.NeighborList,
        n_steps: int, *, chunk_steps: int = 100, stride: int = 1, observe: Callable | None = None,
        max_reallocations: int = 10, progress: Callable[[int], Any] | None = None,
        on_chunk: Callable[[int, Any, Any, dict[str, np.ndarray]], Any] | None = None, replicas: bool = False,
        mesh: Mesh | None = None, **kwargs) -> MDRun:
    """Advances ``state`` by ``n_steps`` integrator steps, ``chunk_steps`` per compiled chunk.

    ``observe`` is recorded every ``stride`` steps (``n_steps`` and ``chunk_steps`` are multiples of
    it). With ``replicas``, state and list carry a leading replica axis (see
    :func:`allocate_replicas`) and observables are ``[B, n_records]``. ``progress(steps)`` and
    ``on_chunk(steps_done, state, neighbor, records)`` are called after each accepted chunk (to write output
    as the run goes, so that an interrupted run keeps it). Raises ``FloatingPointError`` naming the
    chunk if positions become NaN or inf (the returned state is never a poisoned one), and
    ``RuntimeError`` after ``max_reallocations`` overflows.

    ``mesh`` (replicas only; :func:`a2ijax.parallel.make_mesh`): the replicas are split over its
    devices, each device advancing its own (their number a multiple of the device count). One system
    is split over devices by its potential instead (``a2i_neighbor_list(..., mesh=)``).
    """
    if n_steps < 0 or chunk_steps < 1 or stride < 1 or n_steps % stride or chunk_steps % stride:
        raise ValueError(f"need n_steps >= 0, chunk_steps >= 1 and both multiples of stride >= 1; got "
                         f"n_steps={n_steps}, chunk_steps={chunk_steps}, stride={stride}")
    if mesh is not None:
        if not replicas:
            raise ValueError("run(mesh=) splits replicas over devices; to split one system's atoms give the "
                             "potential the mesh (a2i_neighbor_list(..., mesh=mesh))")
        count = state.position.shape[0]
        if count % mesh.size:
            raise ValueError(f"{count} replicas cannot be split evenly over {mesh.size} devices")
    place = (lambda tree: tree) if mesh is None else (lambda tree: jax.device_put(tree, split_leading(mesh)))
    state, neighbor = place(state), place(neighbor)
    chunks: dict[int, Callable] = {}
    records: list[dict[str, np.ndarray]] = []
    done, reallocations = 0, 0
    while done < n_steps:
        length = min(chunk_steps, n_steps - done)
        if length not in chunks:
            chunks[length] = make_chunk(apply_fn, length // stride, observe, stride, replicas, **kwargs)
        new_state, new_neighbor, record = chunks[length](state, neighbor)
        if bool(jnp.any(new_neighbor.did_buffer_overflow)):
            if reallocations == max_reallocations:
                raise RuntimeError(f"neighbour list overflowed {reallocations} times; giving up at step {done}")
            if replicas:
                capacity = int(np.ceil(1.5 * neighbor.idx.shape[-1]))
                neighbor = place(allocate_replicas(neighbor_fn, state.position, capacity))
            else:
                neighbor = reallocate(neighbor_fn, state.position, neighbor)
            reallocations += 1  # the chunk functions recompile once for the new list shape
            continue
        if not bool(jnp.all(jnp.isfinite(new_state.position))):
            raise FloatingPointError(f"non-finite positions in the chunk of steps {done}..{done + length}; "
                                     f"the last good state is from step {done}")
        state, neighbor = new_state, new_neighbor
        records.append(jax.tree.map(np.asarray, record))
        done += length
        if on_chunk is not None:
            on_chunk(done, state, neighbor, records[-1])
        if progress is not None:
            progress(length)
    axis = 1 if replicas else 0
    observables = {key: np.concatenate([r[key] for r in records], axis) for key in (records[0] if records else {})}
    return MDRun(state, neighbor, observables, reallocations)


# ----------------------------------------------------------------------------------------------
# Simulations with observables and output files

ENSEMBLES = ("nve", "nose-hoover", "langevin")
THERMO_COLUMNS = ("step", "time", "potential", "kinetic", "total", "temperature", "pressure", "min_distance")
#: Extra thermo columns of a run with a committee's force disagreement (``simulate(disagreement=)``).
DISAGREEMENT_COLUMNS = ("disagreement_max", "disagreement_mean")


@dataclasses.dataclass
class Simulation:
    """What :func:`simulate` returns.

    ``thermo`` holds one row per ``thermo_every`` steps (columns ``THERMO_COLUMNS``; temperature is
    k_B T in energy units, pressure from the virial; with a committee also ``DISAGREEMENT_COLUMNS``,
    the largest and the mean per-atom force disagreement), ``positions`` ``[F, N, 3]`` the frames
    written to the trajectory (one per ``trajectory_every`` steps) and ``disagreement`` ``[F, N]``
    their per-atom force disagreement (None without a committee), ``drift`` the linear-fit slope of
    the total energy per atom per unit time, ``rate`` the atom-steps per second after compilation.
    """

    state: Any
    neighbor: partition.NeighborList
    thermo: dict[str, np.ndarray]
    positions: np.ndarray
    drift: float
    rate: float
    reallocations: int
    seconds: float
    disagreement: np.ndarray | None = None


def thermo_observables(energy_fn: Callable[..., jax.Array], displacement_fn: Callable, box: Any,
                       disagreement: Callable[..., jax.Array] | None = None) -> Callable[..., dict[str, jax.Array]]:
    """Per-record potential, kinetic and total energy, temperature, virial pressure and closest pair;
    with ``disagreement(R, neighbor) -> [N]`` (:meth:`a2ijax.committee.Committee.disagreement`) also
    the largest and the mean per-atom force disagreement (per-atom values are not kept per record:
    that memory would grow with N times the records)."""

    def observe(state, neighbor):
        R = state.position
        potential = energy_fn(R, neighbor=neighbor)
        kinetic = quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)
        pressure = quantity.pressure(energy_fn, R, box, kinetic_energy=kinetic, neighbor=neighbor)
        records = dict(potential=potential, kinetic=kinetic, total=potential + kinetic,
                       temperature=quantity.temperature(momentum=state.momentum, mass=state.mass), pressure=pressure,
                       min_distance=closest_neighbor(R, neighbor, displacement_fn, box))
        if disagreement is not None:
            sigma = disagreement(R, neighbor=neighbor)
            records.update(disagreement_max=jnp.max(sigma), disagreement_mean=jnp.mean(sigma))
        return records

    return observe


def closest_neighbor(R: jax.Array, neighbor: partition.NeighborList, displacement_fn: Callable, box: Any) -> jax.Array:
    """The smallest distance between an atom and its listed neighbours (inf if none)."""
    n = R.shape[0]
    j = jnp.where(neighbor.idx < n, neighbor.idx, 0)
    dR = jax.vmap(jax.vmap(lambda a, b: displacement_fn(a, b, box=box), (0, None)))(R[j], R)
    d = jnp.sqrt(jnp.sum(dR * dR, -1))
    return jnp.min(jnp.where(neighbor.idx < n, d, jnp.inf))


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

    def __init__(self, out: str | None, symbols: list[str], box: np.ndarray, columns: tuple[str, ...]):
        self.out = None if out is None else Path(out)
        self.symbols, self.cell, self.columns = symbols, np.asarray(box, np.float64).T, columns
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "thermo.csv").write_text(",".join(columns) + "\n")
            (self.out / "trajectory.extxyz").write_text("")

    def write(self, rows: dict[str, np.ndarray], R: np.ndarray, step: int, time: float,
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
        atoms = ase.Atoms(symbols=self.symbols, positions=R, cell=self.cell, pbc=True, info=dict(step=step, time=time))
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
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def integrator(energy_fn: Callable[..., jax.Array], shift_fn: Callable, ensemble: str, dt: float,
               kT: float | None, *, tau: float = 100.0, friction: float = 1.0,
               ensembles: tuple[str, ...] = ENSEMBLES) -> tuple[Callable, Callable]:
    """jax-md's ``(init, apply)`` for ``ensemble`` (one of ``ensembles``): ``"nve"`` (velocity
    Verlet), ``"nose-hoover"`` (a chain thermostat, ``tau`` in units of ``dt``) or ``"langevin"``
    (``friction`` in inverse time units); ``init(key, R, mass=, kT=, neighbor=)``. The numbers are
    checked first."""
    if ensemble not in ensembles:
        raise ValueError(f"ensemble must be one of {ensembles}, got {ensemble!r}")
    for name, value in (("dt", dt), ("tau", tau), ("friction", friction)):
        check_positive(name, value)
    from jax_md import simulate as integrators

    if ensemble == "nve":
        return integrators.nve(energy_fn, shift_fn, dt)
    if ensemble == "nose-hoover":
        return integrators.nvt_nose_hoover(energy_fn, shift_fn, dt, kT, tau=tau * dt)
    return integrators.nvt_langevin(energy_fn, shift_fn, dt, kT, gamma=friction)


def check_output_steps(steps: int, thermo_every: int, trajectory_every: int) -> None:
    """Raises unless ``steps``, ``thermo_every`` and ``trajectory_every`` are positive integers and
    ``steps`` and ``trajectory_every`` multiples of ``thermo_every`` (what :func:`simulate` needs)."""
    for name, value in (("steps", steps), ("thermo_every", thermo_every), ("trajectory_every", trajectory_every)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if trajectory_every % thermo_every or steps % thermo_every:
        raise ValueError(f"steps ({steps}) and trajectory_every ({trajectory_every}) must be multiples of "
                         f"thermo_every ({thermo_every})")


def simulate(energy_fn: Callable[..., jax.Array], neighbor_fn: partition.NeighborFn, displacement_fn: Callable,
             shift_fn: Callable, R: jax.Array, box: Any, *, steps: int, dt: float, ensemble: str = "nve",
             kT: float | None = None, mass: Any = 1.0, seed: int = 0, thermo_every: int = 10,
             trajectory_every: int = 100, tau: float = 100.0, friction: float = 1.0, out: str | None = None,
             symbols: list[str] | None = None, progress: bool = True, time_unit: str = "time unit",
             disagreement: Callable[..., jax.Array] | None = None) -> Simulation:
    """Molecular dynamics with a potential on a Dense neighbour list updated every step.

    Args:
      energy_fn: ``energy_fn(R, neighbor=..., **kw)`` on a ``space.periodic_general`` displacement
        (``kw`` reach the displacement: ``box`` and ``perturbation`` give the virial pressure).
      neighbor_fn, displacement_fn, shift_fn: jax-md's neighbour-list builder and space for ``box``.
      R: ``[N, 3]`` starting positions; velocities are drawn at ``kT`` (0 if ``kT`` is None, NVE).
      steps, dt: number of steps and time step. ``steps`` and ``trajectory_every`` are multiples of
        ``thermo_every``; steps run in compiled chunks of ``trajectory_every`` with the neighbour list
        checked (and reallocated, rerunning the chunk) between chunks.
      ensemble: ``"nve"``, ``"nose-hoover"`` (chain thermostat, ``tau`` in units of ``dt``) or
        ``"langevin"`` (``friction`` in inverse time units).
      out: directory for ``thermo.csv`` and ``trajectory.extxyz`` (positions every
        ``trajectory_every`` steps), both appended and flushed after every chunk: if the run stops
        (NaN positions raise ``FloatingPointError`` naming the step), what was written stays.
      disagreement: a committee's ``fn(R, neighbor) -> [N]`` per-atom force disagreement
        (:meth:`a2ijax.committee.Committee.disagreement`), recorded with every thermo row (its
        largest and mean value) and every trajectory frame (per atom); ``energy_fn`` is then the
        committee's mean energy (:meth:`a2ijax.committee.Committee.potential`).
    """
    init, apply = integrator(energy_fn, shift_fn, ensemble, dt, kT, tau=tau, friction=friction)  # checks them
    check_output_steps(steps, thermo_every, trajectory_every)
    if kT is not None and (not np.isfinite(kT) or kT < 0):
        raise ValueError(f"kT must be >= 0, got {kT!r}")
    if ensemble != "nve" and kT is None:
        raise ValueError(f"the {ensemble} thermostat needs kT")
    n = R.shape[0]
    neighbor, reallocations = neighbor_fn.allocate(R), 0
    while bool(neighbor.did_buffer_overflow):  # a capacity_multiplier below 1: grow before the first force call
        if reallocations == 10:
            raise RuntimeError("the neighbour list still overflows after 10 reallocations at the start")
        neighbor, reallocations = reallocate(neighbor_fn, R, neighbor), reallocations + 1
    state = init(jax.random.PRNGKey(seed), R, mass=mass, kT=0.0 if kT is None else kT, neighbor=neighbor)
    columns = THERMO_COLUMNS + (DISAGREEMENT_COLUMNS if disagreement is not None else ())
    output = _Output(out, symbols or ["X"] * n, np.asarray(box), columns)
    positions, rows, sigmas = [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, unit="step", desc=f"md {ensemble}", dynamic_ncols=True)
    t0, t_first = time.perf_counter(), None

    frame_disagreement = None if disagreement is None else jax.jit(
        lambda R, neighbor: disagreement(R, neighbor=neighbor))

    def on_chunk(done: int, state: Any, neighbor: Any, records: dict[str, np.ndarray]) -> None:
        nonlocal t_first
        k = len(records["potential"])
        records = dict(records, step=done - thermo_every * (k - 1 - np.arange(k)))
        records["time"] = records["step"] * dt
        rows.append(records)
        R = np.asarray(state.position, np.float64)
        positions.append(R)
        sigma = None if disagreement is None else np.asarray(frame_disagreement(state.position, neighbor))
        sigmas.append(sigma)
        output.write(records, R, done, done * dt, sigma)
        now = time.perf_counter()
        if t_first is None:
            t_first = (now, done)  # the first chunk includes compilation
        elif bar is not None:
            rate = n * (done - t_first[1]) / (now - t_first[0])
            bar.set_postfix_str(f"{rate:.3g} atom-steps/s, {rate / n * dt * 86400:.3g} {time_unit}/day, "
                                f"E {records['total'][-1] / n:.5g}/atom")
        if bar is not None:
            bar.update(done - bar.n)

    try:
        md = run(apply, state, neighbor_fn, neighbor, steps, chunk_steps=trajectory_every, stride=thermo_every,
                 observe=thermo_observables(energy_fn, displacement_fn, box, disagreement), on_chunk=on_chunk)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    thermo = {c: np.concatenate([r[c] for r in rows]) for c in columns} if rows else {}
    rate = float("nan")
    if t_first is not None and steps > t_first[1]:
        rate = n * (steps - t_first[1]) / (t0 + seconds - t_first[0])
    drift = energy_drift(thermo["time"], thermo["total"], n) if thermo else float("nan")
    return Simulation(md.state, md.neighbor, thermo, np.asarray(positions), drift, rate,
                      reallocations + md.reallocations, seconds,
                      None if disagreement is None else np.asarray(sigmas))
