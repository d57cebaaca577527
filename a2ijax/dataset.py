"""Labelled datasets: extended XYZ through ASE, splits, per-state-point statistics.

A dataset is an extended XYZ file that ASE reads: per frame the positions, cell, pbc, chemical
symbols, energy, forces, per-atom energies (``energies``) and stress (ASE's convention,
``(1/V) dE/d(strain)``, Voigt order xx yy zz yz xz xy), and in the header the system, state point,
temperature, density, seed, segment, split, units and code version (``a2ijax.sampling`` writes
them). Any ASE-readable file with energies and forces (DFT data, say) loads through the same reader.

Splits go by whole segments of consecutive frames, never by neighbouring frames (they are
correlated): from the ``split`` header where every frame has one, else by ``segment`` header groups
(or single frames where there is none), drawn at random. A file where only some frames carry a
valid ``split`` is an error naming them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import ase
import ase.io
import numpy as np

from a2ijax.errors import InputError
from a2ijax.files import atomic_write
from a2ijax.geometry import check_widths, neighbor_pairs

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass
class Dataset:
    """Labelled frames as arrays; per-frame lists, since frames may differ in size.

    ``species`` maps chemical symbols to ids through ``symbols`` (id = position in the tuple);
    ``cells`` hold the lattice vectors as rows (ASE). ``per_atom_energies`` and ``stress`` are None
    where the file has none.
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
            raise InputError(f"split must be one of {SPLITS}, got {name!r}")
        return self.subset([i for i, info in enumerate(self.info) if info.get("split") == name])


def write_dataset(path: str | os.PathLike, atoms: Iterable[ase.Atoms]) -> None:
    """Writes ASE frames as extended XYZ, atomically."""
    atomic_write(path, lambda f: ase.io.write(f, list(atoms), format="extxyz"))


def read_dataset(path: str | os.PathLike, symbols: Sequence[str] | None = None) -> Dataset:
    """Reads any ASE-readable file of labelled frames; errors name the file and the frame.

    ``symbols`` fixes the species ids (id = index); by default they come from the header's
    ``species_symbols``, else from the sorted chemical symbols found in the file.
    """
    path = str(path)
    try:
        images = ase.io.read(path, index=":")
    except FileNotFoundError:
        raise
    except Exception as error:  # ASE raises many types for malformed files
        raise InputError(f"{path}: cannot read as an ASE dataset: {error}") from error
    if not images:
        raise InputError(f"{path}: no frames")
    if symbols is None:
        header = images[0].info.get("species_symbols")
        found = sorted({s for atoms in images for s in atoms.get_chemical_symbols()})
        symbols = tuple(header.split()) if header else tuple(found)
    symbols = tuple(symbols)
    ids = {s: i for i, s in enumerate(symbols)}
    out: dict[str, list] = {k: [] for k in ("positions", "species", "cells", "pbc", "energy", "forces", "per_atom",
                                             "stress", "info")}
    for index, atoms in enumerate(images):
        where = f"{path}, frame {index}"
        unknown = sorted(set(atoms.get_chemical_symbols()) - set(ids))
        if unknown:
            raise InputError(f"{where}: unknown chemical symbols {unknown}; known: {list(symbols)}")
        if atoms.calc is None:
            raise InputError(f"{where}: no energy or forces")
        results = atoms.calc.results
        for key in ("energy", "forces"):
            if key not in results:
                raise InputError(f"{where}: missing {key}")
        forces = np.asarray(results["forces"], np.float64)
        if forces.shape != (len(atoms), 3):
            raise InputError(f"{where}: forces have shape {forces.shape} for {len(atoms)} atoms")
        if atoms.pbc.any() and np.linalg.matrix_rank(atoms.cell[:]) < 3:
            raise InputError(f"{where}: periodic (pbc={atoms.pbc.tolist()}) but the cell {atoms.cell[:].tolist()} "
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
            raise InputError(f"{path}, frame {present.index(False)}: missing {what} that other frames have")
    per_atom = out["per_atom"] if out["per_atom"][0] is not None else None
    stress = np.stack(out["stress"]) if out["stress"][0] is not None else None
    return Dataset(path, symbols, out["positions"], out["species"], out["cells"], out["pbc"], np.asarray(out["energy"]),
                   out["forces"], per_atom, stress, out["info"])


def structure_dataset(atoms: ase.Atoms, symbols: tuple[str, ...]) -> Dataset:
    """One unlabelled structure as a :class:`Dataset` (zero energy and forces), species ids from
    ``symbols``; chemical symbols not among them are an error naming them."""
    ids = {s: i for i, s in enumerate(symbols)}
    unknown = sorted(set(atoms.get_chemical_symbols()) - set(ids))
    if unknown:
        raise InputError(f"the structure has chemical symbols {unknown} that the potential was not trained on "
                         f"(it knows {list(symbols)})")
    n = len(atoms)
    species = np.asarray([ids[s] for s in atoms.get_chemical_symbols()], np.int32)
    return Dataset("structure", symbols, [atoms.get_positions()], [species], [np.asarray(atoms.cell[:])],
                   [np.asarray(atoms.pbc)], np.zeros(1), [np.zeros((n, 3))], None, None, [{}])


def check_cutoff(dataset: Dataset, cutoff: float) -> None:
    """Raises, naming the file and frame, if a periodic cell is too narrow for ``cutoff``."""
    for index, (cell, pbc) in enumerate(zip(dataset.cells, dataset.pbc, strict=True)):
        try:
            check_widths(cell, pbc, cutoff)
        except ValueError as error:
            raise InputError(f"{dataset.path}, frame {index}: {error}") from None


def assign_splits(n_groups: int, fractions: Sequence[float], rng: np.random.Generator) -> list[str]:
    """Split labels for ``n_groups`` groups of frames (segments): each split gets at least one group,
    and the fractions must leave the training split one too."""
    if n_groups < len(SPLITS):
        raise InputError(f"need at least {len(SPLITS)} segments to split into {SPLITS}, got {n_groups}")
    fractions = np.asarray(fractions, np.float64)
    if fractions.shape != (3,) or fractions.min() < 0 or abs(fractions.sum() - 1) > 1e-9:
        raise InputError(f"split fractions must be three non-negative numbers summing to 1, got {fractions.tolist()}")
    counts = np.maximum(1, np.floor(fractions * n_groups).astype(int))
    counts[0] = n_groups - counts[1:].sum()
    if counts[0] < 1:
        raise InputError(f"split fractions {fractions.tolist()} leave no training segment of {n_groups} "
                         f"(valid {counts[1]}, test {counts[2]})")
    labels = np.repeat(SPLITS, counts)
    return list(labels[rng.permutation(n_groups)])


def split_indices(dataset: Dataset, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Frame indices per split.

    Every frame's ``split`` header when all have a valid one; none: whole ``segment`` groups (single
    frames where there is no ``segment`` header) drawn at random with ``fractions``. Some frames
    with and some without a valid header is an error naming the frames without.
    """
    labels = [info.get("split") for info in dataset.info]
    valid = [label in SPLITS for label in labels]
    if all(valid):
        names = np.asarray(labels)
    elif any(label is not None for label in labels):
        bad = [i for i, ok in enumerate(valid) if not ok]
        shown = ", ".join(f"{i} ({labels[i]!r})" for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise InputError(f"{dataset.path}: {len(bad)} of {len(dataset)} frames have no valid split header "
                         f"(one of {SPLITS}): frames {shown}. Give every frame a split, or none (then whole "
                         "segments are split at random)")
    else:
        segments = [str(info.get("segment", f"frame {i}")) for i, info in enumerate(dataset.info)]
        groups = list(dict.fromkeys(segments))
        label_of = dict(zip(groups, assign_splits(len(groups), fractions, np.random.default_rng(seed)), strict=True))
        names = np.asarray([label_of[s] for s in segments])
    return {name: np.flatnonzero(names == name) for name in SPLITS}


def state_point_groups(dataset: Dataset) -> dict[str, list[int]]:
    """Frame indices per state point (the ``state_point`` header), never mixing atom counts.

    A fluctuation of the total energy is only meaningful among frames of one size, so frames without
    a header are grouped by atom count (``"N=125"``), and a state point whose frames differ in size
    is split by it (``"liquid N=125"``).
    """
    sizes: dict[str, set[int]] = {}
    keys = []
    for i, info in enumerate(dataset.info):
        n = len(dataset.positions[i])
        name = str(info["state_point"]) if "state_point" in info else None
        keys.append((name, n))
        sizes.setdefault(name, set()).add(n)
    groups: dict[str, list[int]] = {}
    for i, (name, n) in enumerate(keys):
        key = f"N={n}" if name is None else (f"{name} N={n}" if len(sizes[name]) > 1 else name)
        groups.setdefault(key, []).append(i)
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
        counts = np.concatenate([
            np.bincount(neighbor_pairs(dataset.positions[i], dataset.cells[i], dataset.pbc[i], cutoff)[0],
                        minlength=len(dataset.positions[i])) for i in indices])
        row = table[name]
        atoms = np.asarray([len(dataset.positions[i]) for i in indices])
        row.update(atoms=float(atoms.mean()), energy_per_atom_mean=float(np.mean(dataset.energy[indices] / atoms)),
                   neighbors_mean=float(counts.mean()), neighbors_max=int(counts.max()))
        if dataset.per_atom_energies is not None:
            row["atom_energy_std"] = float(np.std(np.concatenate([dataset.per_atom_energies[i] for i in indices])))
    return table


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
