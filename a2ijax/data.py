"""Reference data: sampling with jax-md, float64 labels, extended XYZ through ASE, splits, statistics.

A dataset is an extended XYZ file that ASE reads: per frame the positions, cell, pbc, chemical
symbols, energy, forces, per-atom energies (``energies``) and stress (ASE's convention,
``(1/V) dE/d(strain)``, Voigt order xx yy zz yz xz xy), and in the header the system, state point,
temperature, density, seed, segment, split, units and code version. Any ASE-readable file with
energies and forces (DFT data, say) loads through the same reader.

Frames are sampled from thermostatted MD (Langevin), equilibration discarded, one frame every
``stride`` steps. Splits go by whole trajectory segments (``segment_frames`` consecutive frames),
never by neighbouring frames, and every state point gets segments in every split.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import ase
import ase.io
import ase.neighborlist
import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from jax_md import quantity, simulate, space

from a2ijax.md import run
from a2ijax.potential import check_box, perpendicular_widths
from a2ijax.systems import ReferenceSystem, StatePoint, diamond_positions, get_system, lattice_positions

SPLITS = ("train", "valid", "test")
EXTXYZ_DECIMALS = 8  # ASE writes per-atom columns as %16.8f


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How many frames to take and how far apart. Defaults give a dataset in minutes on 2 cores.

    Attributes:
      frames_per_point: frames kept per state point.
      stride: MD steps between kept frames (decorrelation).
      equilibration: MD steps discarded at the start of each state point.
      segment_frames: consecutive frames per segment, the unit of the train/valid/test split.
      split_fractions: fractions of segments for train, valid and test.
      friction: Langevin friction (inverse time units of the system).
      seed: seeds the starting configurations, velocities, thermostat noise and the split.
    """

    frames_per_point: int = 200
    stride: int = 50
    equilibration: int = 20000
    segment_frames: int = 20
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    friction: float = 1.0
    seed: int = 0

    @property
    def equilibration_steps(self) -> int:
        """``equilibration`` rounded up to whole strides (MD runs in chunks of strides)."""
        return -(-self.equilibration // self.stride) * self.stride

    @property
    def steps_per_point(self) -> int:
        return self.equilibration_steps + self.frames_per_point * self.stride


def initial_positions(system: ReferenceSystem, point: StatePoint, seed: int) -> tuple[jax.Array, float]:
    """Starting positions and box side: a diamond crystal, or a jittered grid to melt."""
    if point.phase == "crystal":
        return diamond_positions(round((system.n_atoms / 8) ** (1 / 3)), lattice=(8 / point.density) ** (1 / 3))
    side = (system.n_atoms / point.density) ** (1 / 3)
    return lattice_positions(system.n_atoms, side, jitter=0.05 * side / system.n_atoms ** (1 / 3), seed=seed), side


def sample_state_point(system: ReferenceSystem, point: StatePoint, config: SamplingConfig, seed: int,
                       progress: Callable[[int], Any] | None = None) -> list[ase.Atoms]:
    """Frames of NVT Langevin MD at ``point``, labelled in float64."""
    with jax.enable_x64(True):
        R, side = initial_positions(system, point, seed)
        R = jnp.asarray(R, jnp.float64)
        species = jnp.asarray(system.species(R.shape[0]))
        displacement, shift = space.periodic(side)
        check_box(displacement, side, system.cutoff)
        neighbor_fn, energy_fn = system.neighbor_list(displacement, side, species, dr_threshold=0.12 * system.cutoff)
        nbrs = neighbor_fn.allocate(R)
        init, apply = simulate.nvt_langevin(energy_fn, shift, system.dt, point.kT, gamma=config.friction)
        state = init(jax.random.PRNGKey(seed), R, mass=system.mass, neighbor=nbrs)
        stride, equilibration = config.stride, config.equilibration_steps
        if equilibration:
            warm = run(apply, state, neighbor_fn, nbrs, equilibration, chunk_steps=min(equilibration, 50 * stride),
                       stride=stride, progress=progress)
            state, nbrs = warm.state, warm.neighbor
        total = config.frames_per_point * stride
        sampled = run(apply, state, neighbor_fn, nbrs, total, chunk_steps=min(total, 50 * stride), stride=stride,
                      observe=lambda state, neighbor: {"position": state.position}, progress=progress)
        return label(system, sampled.observables["position"], species, side)


def label(system: ReferenceSystem, positions: np.ndarray, species: jax.Array, side: float) -> list[ase.Atoms]:
    """ASE frames with float64 energy, forces, per-atom energies and stress from the reference."""
    with jax.enable_x64(True):
        displacement, _ = space.periodic(side)
        neighbor_fn, energy_fn = system.neighbor_list(displacement, side, species)
        box = jnp.eye(3) * side

        @jax.jit
        def labels(R, nbrs):
            energy, grad = jax.value_and_grad(lambda R: energy_fn(R, nbrs))(R)
            per_atom = energy_fn(R, nbrs, per_atom=True)
            virial = quantity.stress(lambda R, **kw: energy_fn(R, **kw), R, box, neighbor=nbrs)
            return energy, -grad, per_atom, -virial  # ASE stress = -(jax-md's potential stress)

        frames = []
        nbrs = None
        symbols = [system.symbols[s] for s in np.asarray(species)]
        for R in np.asarray(positions, np.float64):
            # Label the positions exactly as extended XYZ stores them (8 decimals), so that file
            # positions and labels agree to float64 precision.
            R = jnp.asarray(np.round(np.mod(R, side), EXTXYZ_DECIMALS))
            nbrs = neighbor_fn.allocate(R) if nbrs is None else nbrs.update(R)
            if bool(nbrs.did_buffer_overflow):
                nbrs = neighbor_fn.allocate(R)
            energy, forces, per_atom, stress = (np.asarray(x) for x in labels(R, nbrs))
            atoms = ase.Atoms(symbols=symbols, positions=np.asarray(R), cell=np.eye(3) * side, pbc=True)
            atoms.calc = SinglePointCalculator(atoms, energy=float(energy), forces=forces, energies=per_atom,
                                               stress=stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]])
            frames.append(atoms)
    return frames


def assign_splits(n_segments: int, fractions: Sequence[float], rng: np.random.Generator) -> list[str]:
    """Split labels for the segments of one state point: each split gets at least one segment."""
    if n_segments < len(SPLITS):
        raise ValueError(f"need at least {len(SPLITS)} segments per state point to split, got {n_segments}")
    counts = np.maximum(1, np.floor(np.asarray(fractions) * n_segments).astype(int))
    counts[0] = n_segments - counts[1:].sum()
    labels = np.repeat(SPLITS, counts)
    return list(labels[rng.permutation(n_segments)])


def generate(system_name: str, config: SamplingConfig = SamplingConfig(),
             state_points: Sequence[str] | None = None, progress: bool = True) -> list[ase.Atoms]:
    """Reference frames for every state point of a system, labelled, segmented and split."""
    from a2ijax import __version__

    system = get_system(system_name)
    points = system.state_points if state_points is None else [system.state_point(p) for p in state_points]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps_per_point * len(points), unit="step", desc=f"generate {system_name}")
    rng = np.random.default_rng(config.seed)
    frames: list[ase.Atoms] = []
    try:
        for index, point in enumerate(points):
            if bar is not None:
                bar.set_postfix_str(point.name)
            point_frames = sample_state_point(system, point, config, seed=config.seed * 1000 + index,
                                              progress=None if bar is None else bar.update)
            n_segments = len(point_frames) // config.segment_frames
            splits = assign_splits(n_segments, config.split_fractions, rng)
            for i, atoms in enumerate(point_frames[: n_segments * config.segment_frames]):
                segment = i // config.segment_frames
                atoms.info.update(system=system.name, state_point=point.name, kT=point.kT, density=point.density,
                                  phase=point.phase, seed=config.seed, frame=i, segment=f"{point.name}/{segment}",
                                  split=splits[segment], split_seed=config.seed, units=system.units,
                                  species_symbols=" ".join(system.symbols), code_version=f"a2ijax {__version__}",
                                  stride=config.stride, dt=system.dt)
                frames.append(atoms)
    finally:
        if bar is not None:
            bar.close()
    return frames


def atomic_write(path: str | os.PathLike, write: Callable[[TextIO], None]) -> None:
    """Writes a text file through ``write(file)`` into a temporary file beside ``path``, then renames
    it over ``path``: an interrupted write leaves the old file (or none), never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make datasets private
        with os.fdopen(handle, "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dataset(path: str | os.PathLike, frames: Iterable[ase.Atoms]) -> None:
    """Writes frames as extended XYZ, atomically."""
    atomic_write(path, lambda f: ase.io.write(f, list(frames), format="extxyz"))


@dataclasses.dataclass
class Dataset:
    """Frames as arrays. Per-frame lists, since frames may differ in size.

    ``species`` maps chemical symbols to ids through ``symbols`` (id = position in the tuple).
    ``per_atom_energies`` and ``stress`` are None where the file has none.
    """

    path: str
    symbols: tuple[str, ...]
    positions: list[np.ndarray]
    species: list[np.ndarray]
    cells: list[np.ndarray]
    pbc: list[np.ndarray]
    energy: np.ndarray
    forces: list[np.ndarray]
    per_atom_energies: list[np.ndarray] | None
    stress: np.ndarray | None
    info: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.positions)

    def subset(self, indices: Sequence[int]) -> Dataset:
        pick = lambda xs: None if xs is None else [xs[i] for i in indices]  # noqa: E731
        return Dataset(self.path, self.symbols, pick(self.positions), pick(self.species), pick(self.cells),
                       pick(self.pbc), self.energy[list(indices)], pick(self.forces),
                       pick(self.per_atom_energies), None if self.stress is None else self.stress[list(indices)],
                       pick(self.info))

    def split(self, name: str) -> Dataset:
        """The frames whose header says ``split=name``."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.subset([i for i, info in enumerate(self.info) if info.get("split") == name])


def read_dataset(path: str | os.PathLike, symbols: Sequence[str] | None = None) -> Dataset:
    """Reads any ASE-readable file of labelled frames; errors name the file and the frame.

    ``symbols`` fixes the species ids (id = index); by default they come from the header's
    ``species_symbols``, else from the sorted chemical symbols found in the file.
    """
    path = str(path)
    try:
        frames = ase.io.read(path, index=":")
    except FileNotFoundError:
        raise
    except Exception as error:  # ASE raises many types for malformed files
        raise ValueError(f"{path}: cannot read as an ASE dataset: {error}") from error
    if not frames:
        raise ValueError(f"{path}: no frames")
    if symbols is None:
        header = frames[0].info.get("species_symbols")
        found = sorted({s for atoms in frames for s in atoms.get_chemical_symbols()})
        symbols = tuple(header.split()) if header else tuple(found)
    symbols = tuple(symbols)
    ids = {s: i for i, s in enumerate(symbols)}
    out: dict[str, list] = {k: [] for k in ("positions", "species", "cells", "pbc", "energy", "forces", "per_atom",
                                             "stress", "info")}
    for index, atoms in enumerate(frames):
        where = f"{path}, frame {index}"
        unknown = sorted(set(atoms.get_chemical_symbols()) - set(ids))
        if unknown:
            raise ValueError(f"{where}: unknown chemical symbols {unknown}; known: {list(symbols)}")
        if atoms.calc is None:
            raise ValueError(f"{where}: no energy or forces")
        results = atoms.calc.results
        for key in ("energy", "forces"):
            if key not in results:
                raise ValueError(f"{where}: missing {key}")
        forces = np.asarray(results["forces"], np.float64)
        if forces.shape != (len(atoms), 3):
            raise ValueError(f"{where}: forces have shape {forces.shape} for {len(atoms)} atoms")
        if atoms.pbc.any() and np.linalg.matrix_rank(atoms.cell[:]) < 3:
            raise ValueError(f"{where}: periodic (pbc={atoms.pbc.tolist()}) but the cell {atoms.cell[:].tolist()} "
                             "is missing or singular")
        out["positions"].append(atoms.get_positions())
        out["species"].append(np.asarray([ids[s] for s in atoms.get_chemical_symbols()], np.int32))
        out["cells"].append(np.asarray(atoms.cell[:]))
        out["pbc"].append(np.asarray(atoms.pbc))
        out["energy"].append(float(results["energy"]))
        out["forces"].append(forces)
        out["per_atom"].append(None if "energies" not in results else np.asarray(results["energies"], np.float64))
        out["stress"].append(None if "stress" not in results else np.asarray(results["stress"], np.float64))
        out["info"].append(dict(atoms.info))
    for key, what in (("per_atom", "per-atom energies"), ("stress", "stress")):
        present = [x is not None for x in out[key]]
        if any(present) and not all(present):
            raise ValueError(f"{path}, frame {present.index(False)}: missing {what} that other frames have")
    per_atom = out["per_atom"] if out["per_atom"][0] is not None else None
    stress = np.stack(out["stress"]) if out["stress"][0] is not None else None
    return Dataset(path, symbols, out["positions"], out["species"], out["cells"], out["pbc"], np.asarray(out["energy"]),
                   out["forces"], per_atom, stress, out["info"])


def check_cutoff(dataset: Dataset, cutoff: float) -> None:
    """Raises, naming the file and frame, if a periodic cell is too narrow for ``cutoff``."""
    for index, (cell, pbc) in enumerate(zip(dataset.cells, dataset.pbc, strict=True)):
        if not pbc.any():
            continue
        widths = perpendicular_widths(cell.T)  # ASE cells hold lattice vectors as rows
        narrow = [axis for axis in range(3) if pbc[axis] and widths[axis] <= 2 * cutoff]
        if narrow:
            raise ValueError(f"{dataset.path}, frame {index}: box too small for the cutoff: width "
                             f"{widths[narrow[0]]:.6g} along cell vector {narrow[0]} <= 2 x cutoff = {2 * cutoff:.6g}")


def state_point_groups(dataset: Dataset) -> dict[str, list[int]]:
    """Frame indices per state point (from the ``state_point`` header; ``"all"`` where there is none)."""
    groups: dict[str, list[int]] = {}
    for i, info in enumerate(dataset.info):
        groups.setdefault(str(info.get("state_point", "all")), []).append(i)
    return groups


def fluctuations(dataset: Dataset) -> dict[str, dict[str, float]]:
    """Per state point: the std of the total energy over its frames (the MD fluctuation, the scale
    the paper measures errors against) and the std of the force components."""
    table = {}
    for name, indices in state_point_groups(dataset).items():
        forces = np.concatenate([dataset.forces[i].ravel() for i in indices])
        table[name] = dict(frames=len(indices), energy_std=float(np.std(dataset.energy[indices])),
                           force_std=float(np.std(forces)))
    return table


def statistics(dataset: Dataset, cutoff: float) -> dict[str, dict[str, float]]:
    """Per state point: frames, atoms, the fluctuations, mean energy per atom, per-atom energy std, neighbours."""
    table = fluctuations(dataset)
    for name, indices in state_point_groups(dataset).items():
        counts = np.concatenate([neighbor_matrix(dataset.positions[i], dataset.cells[i], dataset.pbc[i], cutoff).sum(1)
                                 for i in indices])
        row = table[name]
        atoms = np.asarray([len(dataset.positions[i]) for i in indices])
        row.update(atoms=float(atoms.mean()), energy_per_atom_mean=float(np.mean(dataset.energy[indices] / atoms)),
                   neighbors_mean=float(counts.mean()), neighbors_max=int(counts.max()))
        if dataset.per_atom_energies is not None:
            row["atom_energy_std"] = float(np.std(np.concatenate([dataset.per_atom_energies[i] for i in indices])))
    return table


def pair_distances(R: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """``[n, n]`` distances between atoms, minimum image along periodic axes (every periodic width
    must exceed twice the largest distance of interest: see :func:`check_cutoff`); ``inf`` on the diagonal."""
    d = R[None, :, :] - R[:, None, :]
    if pbc.any():
        frac = d @ np.linalg.inv(cell)
        frac -= pbc * np.round(frac)
        d = frac @ cell
    r = np.sqrt(np.sum(d * d, -1))
    np.fill_diagonal(r, np.inf)
    return r


def neighbor_matrix(R: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """``[n, n]`` True where two distinct atoms are within ``cutoff`` (minimum image). Frames of more
    than 4,000 atoms go through ASE's linear-time search instead of all pairs."""
    n = len(R)
    if n > 4000:
        i, j = ase.neighborlist.primitive_neighbor_list("ij", pbc, cell if pbc.any() else np.eye(3), R, cutoff)
        within = np.zeros((n, n), bool)
        within[i, j] = True
        return within
    return pair_distances(R, cell, pbc) < cutoff


def format_statistics(table: dict[str, dict[str, float]]) -> str:
    columns = ["frames", "atoms", "energy_std", "energy_per_atom_mean", "atom_energy_std", "force_std",
               "neighbors_mean", "neighbors_max"]
    columns = [c for c in columns if any(c in row for row in table.values())]
    lines = ["state point".ljust(16) + "".join(c.rjust(22) for c in columns)]
    for name, row in table.items():
        lines.append(name.ljust(16) + "".join(f"{row.get(c, float('nan')):22.6g}" for c in columns))
    return "\n".join(lines)


def write_statistics(path: str | os.PathLike, table: dict[str, Any]) -> None:
    """Writes the statistics as JSON, atomically."""
    atomic_write(path, lambda f: json.dump(table, f, indent=1))
