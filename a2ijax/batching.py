"""From a dataset to padded batches: splits, host-side neighbour indices, size buckets, statistics.

Words used throughout: a *frame* is one labelled structure of a dataset, named by its index in the
file; a *bucket* holds the frames of one split padded to the same atom count ``N`` and neighbour
capacity ``K`` (one compilation each); a *batch* is ``batch_size`` rows of one bucket as arrays.

1. Splits come from :func:`a2ijax.dataset.split_indices` (whole segments, never neighbouring frames).
2. Every frame's neighbours within the cutoff are found once on the host (a linear-time cell list,
   :mod:`a2ijax.geometry`).
3. Frames are padded to at most ``size_buckets`` atom counts with masks, and the frames of each
   size to at most ``neighbor_buckets`` neighbour capacities ``K`` (frames grouped by the largest
   neighbour count of any of their atoms): each bucket's ``K`` is the largest count among its own
   frames, so no training step can overflow and dense frames do not pad sparse ones.
4. The training statistics: the per-species energy shift (least squares), the variances and the
   per-state-point fluctuations that normalise the loss (:func:`frame_scales`), the closest
   approach of each species pair (the core repulsion's radii).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from a2ijax.config import LOSS_NORMALIZATIONS, ExperimentConfig
from a2ijax.dataset import Dataset, check_cutoff, fluctuations, split_indices, state_point_groups
from a2ijax.errors import InputError
from a2ijax.geometry import dense_index, neighbor_pairs
from a2ijax.model import A2IConfig


@dataclasses.dataclass
class Bucket:
    """Frames padded to one atom count ``N`` and one neighbour capacity ``K`` (host arrays).

    R ``[B, N, 3]``, species ``[B, N]``, mask ``[B, N]`` (True: a real atom), idx ``[B, N, K]`` (empty
    slots and padded atoms hold ``N``), box ``[B, 3, 3]`` (lattice vectors as columns, jax-md's
    convention), forces ``[B, N, 3]``, n_atoms ``[B]``, frame_index ``[B]`` (the frames' indices in
    the dataset), energy_scale and force_scale ``[B]`` (what the loss divides each frame's
    total-energy and force errors by, :func:`frame_scales`).

    Energies are residuals: ``energy`` ``[B]`` is the reference total minus ``energy_offset`` ``[B]``,
    the sum of the training data's per-species shift over the frame's atoms, and ``atom_shift``
    ``[B, N]`` is that shift per atom. The subtraction happens here, in float64, before anything is
    float32: a total of -1e5 eV has a float32 spacing of 0.008 eV, its residual a thousand times
    less. The loss compares the model's per-atom energies minus ``atom_shift``, summed, with
    ``energy``; the report adds ``energy_offset`` back in float64 (``energy_offset`` stays on the host).
    """

    R: np.ndarray
    species: np.ndarray
    mask: np.ndarray
    idx: np.ndarray
    box: np.ndarray
    energy: np.ndarray
    forces: np.ndarray
    n_atoms: np.ndarray
    frame_index: np.ndarray
    energy_scale: np.ndarray
    force_scale: np.ndarray
    atom_shift: np.ndarray
    energy_offset: np.ndarray

    def __len__(self) -> int:
        return len(self.frame_index)

    def rows(self, rows: np.ndarray) -> Bucket:
        """The bucket restricted to ``rows``."""
        return Bucket(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def batch(self, rows: np.ndarray, size: int) -> dict[str, np.ndarray]:
        """A batch of ``size`` rows from ``rows``, filled up with empty rows of ``weight`` 0."""
        rows = np.asarray(rows, int)
        pad = size - len(rows)
        batch = {}
        for field in dataclasses.fields(self):
            a = getattr(self, field.name)[rows]
            if pad:
                copied = field.name in ("box", "idx", "energy_scale", "force_scale")  # valid cells, nonzero scales
                filler = np.repeat(a[:1], pad, 0) if copied else np.zeros((pad,) + a.shape[1:], a.dtype)
                a = np.concatenate([a, filler])
            batch[field.name] = a
        batch["mask"][len(rows):] = False
        batch["weight"] = (np.arange(size) < len(rows)).astype(np.float32)
        return batch


def frame_box(dataset: Dataset, index: int, cutoff: float) -> np.ndarray:
    """The jax-md box (lattice vectors as columns) of a frame; free frames get a cube wide enough
    that minimum-image displacements equal plain differences."""
    pbc = dataset.pbc[index]
    if pbc.all():
        return dataset.cells[index].T.copy()
    if pbc.any():
        raise InputError(f"{dataset.path}, frame {index}: partly periodic frames (pbc={pbc.tolist()}) are not "
                         "supported; use fully periodic or fully free frames")
    R = dataset.positions[index]
    return np.eye(3) * (2.0 * (np.ptp(R, axis=0).max() + cutoff) + 1.0)


def frame_pairs(dataset: Dataset, cutoff: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For every frame, its pairs ``(i, j, d)`` within ``cutoff`` (:func:`a2ijax.geometry.neighbor_pairs`:
    minimum image, one image per neighbour), the boxes checked first with errors naming the frame.
    ``dense_index(i, j, n)`` makes a frame's ``[n, K_frame]`` neighbour index."""
    check_cutoff(dataset, cutoff)
    return [neighbor_pairs(R, cell, pbc, cutoff)
            for R, cell, pbc in zip(dataset.positions, dataset.cells, dataset.pbc, strict=True)]


def check_attention_keys(dataset: Dataset, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                         model: A2IConfig) -> None:
    """No atom of any frame has more than ``attention_keys`` neighbours inside ``attention_cutoff``
    (the model's energy is NaN there, ``a2ijax.model.A2IConfig``); an error names the first frame that does."""
    if not model.attention_keys:
        return
    for index, ((i, _, d), R) in enumerate(zip(pairs, dataset.positions, strict=True)):
        most = int(np.bincount(i[d < model.attention_cutoff], minlength=len(R)).max(initial=0))
        if most > model.attention_keys:
            raise InputError(f"{dataset.path}, frame {index}: an atom has {most} neighbours within "
                             f"attention_cutoff = {model.attention_cutoff}, more than [model] attention_keys = "
                             f"{model.attention_keys}; raise attention_keys (with a margin for the denser "
                             "configurations of MD) or lower attention_cutoff")


def bucket_sizes(sizes: np.ndarray, n_buckets: int) -> np.ndarray:
    """At most ``n_buckets`` padded sizes, each an actual frame size, covering every frame."""
    distinct = np.unique(sizes)
    if len(distinct) <= n_buckets:
        return distinct
    return np.unique(np.quantile(distinct, np.linspace(0, 1, n_buckets + 1)[1:], method="higher"))


def pad_frames(dataset: Dataset, frames: np.ndarray, neighbors: list[np.ndarray], size: int, capacity: int,
               cutoff: float, scales: tuple[np.ndarray, np.ndarray] | None = None,
               shift: np.ndarray | None = None) -> Bucket:
    """The frames ``frames`` (indices) of ``dataset`` padded to ``size`` atoms and ``capacity`` slots;
    ``scales``: the loss scales of every dataset frame (:func:`frame_scales`; default 1); ``shift``:
    the per-species energy shift taken out of the energies (float64; default 0)."""
    if shift is None:
        shift = np.zeros(1 + max((int(s.max(initial=0)) for s in dataset.species), default=0))
    shift = np.asarray(shift, np.float64)
    f = len(frames)
    frames = np.asarray(frames, np.int64)
    energy_scale, force_scale = (np.ones(f), np.ones(f)) if scales is None else (s[frames] for s in scales)
    out = Bucket(R=np.zeros((f, size, 3), np.float32), species=np.zeros((f, size), np.int32),
                 mask=np.zeros((f, size), bool), idx=np.full((f, size, capacity), size, np.int32),
                 box=np.zeros((f, 3, 3), np.float32), energy=np.zeros((f,), np.float32),
                 forces=np.zeros((f, size, 3), np.float32), n_atoms=np.zeros((f,), np.int32),
                 frame_index=frames, energy_scale=np.asarray(energy_scale, np.float32),
                 force_scale=np.asarray(force_scale, np.float32), atom_shift=np.zeros((f, size), np.float32),
                 energy_offset=np.zeros((f,), np.float64))
    for row, index in enumerate(frames):
        n = len(dataset.positions[index])
        out.R[row, :n] = dataset.positions[index]
        out.species[row, :n] = dataset.species[index]
        out.mask[row, :n] = True
        idx = neighbors[index]
        out.idx[row, :n, :idx.shape[1]] = np.where(idx == n, size, idx)
        out.box[row] = frame_box(dataset, index, cutoff)
        own = shift[dataset.species[index]]
        out.atom_shift[row, :n] = own
        out.energy_offset[row] = np.sum(own)
        out.energy[row] = dataset.energy[index] - out.energy_offset[row]  # float64, then float32
        out.forces[row, :n] = dataset.forces[index]
        out.n_atoms[row] = n
    return out


@dataclasses.dataclass
class PreparedData:
    """A dataset split, neighbour-searched and padded into buckets, with the training statistics."""

    dataset: Dataset
    splits: dict[str, np.ndarray]  # split -> frame indices
    bucket_sizes: np.ndarray  # padded atom counts
    capacity: int  # neighbour slots K of the densest bucket
    buckets: dict[str, list[Bucket]]  # split -> one Bucket per non-empty (size, capacity)
    statistics: dict[str, Any]
    frame_scales: tuple[np.ndarray, np.ndarray]  # the loss's energy and force scale of every frame


def fit_energy_shift(dataset: Dataset, frames: np.ndarray, n_species: int) -> np.ndarray:
    """Per-species energy shift: least squares of frame energies on species counts."""
    counts = np.stack([np.bincount(dataset.species[i], minlength=n_species) for i in frames]).astype(np.float64)
    shift, *_ = np.linalg.lstsq(counts, dataset.energy[frames], rcond=None)
    return shift


def training_statistics(dataset: Dataset, train: np.ndarray, n_species: int,
                        pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Energy shift, per-atom energy variance after the shift, force variance and closest pair distance
    within the cutoff of ``pairs`` (:func:`frame_pairs`; below it the model extrapolates) of the
    training frames, and, per state point of the whole dataset, the total-energy fluctuation and the
    force std."""
    shift = fit_energy_shift(dataset, train, n_species)
    residual = np.asarray([(dataset.energy[i] - shift[dataset.species[i]].sum()) / len(dataset.species[i])
                           for i in train])
    forces = np.concatenate([dataset.forces[i].ravel() for i in train])
    pair_closest = np.full((n_species, n_species), np.inf)
    for frame in train:
        i, j, d = pairs[frame]
        species = dataset.species[frame]
        np.minimum.at(pair_closest, (species[i], species[j]), d)
    closest = float(pair_closest.min())
    return dict(energy_shift=shift.tolist(), energy_var=float(max(np.var(residual), 1e-12)),
                force_mean_square=float(max(np.mean(forces**2), 1e-12)), min_distance=closest,
                pair_min_distance=np.where(np.isfinite(pair_closest), pair_closest, closest).tolist(),
                fluctuations=fluctuations(dataset), train_fluctuations=fluctuations(dataset.subset(train)))


def frame_scales(dataset: Dataset, statistics: dict[str, Any], normalization: str) -> tuple[np.ndarray, np.ndarray]:
    """What the loss divides each frame's total-energy error and force errors by: ``[n_frames]`` each.

    ``"state_point"``: the std of the total energy and of the force components over the training
    frames of the frame's state point (the scales the report measures errors against, so the loss
    is the sum of the squared ratios it shows). A state point with fewer than two training frames,
    or no energy spread, takes the ``"dataset"`` scales: ``N sqrt(energy_var)`` (the per-atom
    energy std over all training frames, times the frame's atom count) and ``sqrt(force_mean_square)``.
    """
    if normalization not in LOSS_NORMALIZATIONS:
        raise InputError(f"loss normalization must be one of {LOSS_NORMALIZATIONS}, got {normalization!r}")
    atoms = np.asarray([len(R) for R in dataset.positions], np.float64)
    energy = atoms * math.sqrt(statistics["energy_var"])
    force = np.full(len(dataset), math.sqrt(statistics["force_mean_square"]))
    if normalization == "state_point":
        table = statistics.get("train_fluctuations", {})
        for name, indices in state_point_groups(dataset).items():
            row = table.get(name)
            if row and row["frames"] >= 2 and row["energy_std"] > 0 and row["force_std"] > 0:
                energy[indices], force[indices] = row["energy_std"], row["force_std"]
    return energy, force


def capacity_groups(counts: np.ndarray, n_groups: int) -> np.ndarray:
    """A group number per frame from its largest neighbour count ``counts``: at most ``n_groups``
    groups of consecutive counts (one per distinct count if there are no more), else split at
    quantiles so that they hold similar numbers of frames."""
    if n_groups <= 1 or len(counts) == 0:
        return np.zeros(len(counts), int)
    distinct = np.unique(counts)
    if len(distinct) <= n_groups:
        edges = distinct[:-1]  # a group per count
    else:
        edges = np.unique(np.quantile(counts, np.linspace(0, 1, n_groups + 1)[1:-1], method="lower"))
        edges = edges[edges < distinct[-1]]
    return np.searchsorted(edges, counts, side="left")  # group g: edges[g - 1] < count <= edges[g]


def with_core_repulsion(config: ExperimentConfig, statistics: dict[str, Any]) -> ExperimentConfig:
    """``config`` with the model's core repulsion set from the training data (``[train] core_repulsion``):
    radii = the closest approach of each species pair (pairs that never meet: the closest of any), so
    no training pair feels the wall; energy scale = force RMS x smallest radius. A config that already
    names ``core_radii`` keeps them."""
    model = config.model
    if not config.train.core_repulsion or model.core_radii or config.baseline.name:
        return config
    radii = np.asarray(statistics["pair_min_distance"], np.float64)
    if not np.all(np.isfinite(radii)):
        raise InputError("no two training atoms are within the cutoff: the core repulsion has no radius; set "
                         "[train] core_repulsion = false or give [model] core_radii")
    core_energy = math.sqrt(statistics["force_mean_square"]) * float(radii.min())
    model = dataclasses.replace(model, core_radii=tuple(float(r) for r in radii.ravel()), core_energy=core_energy)
    return dataclasses.replace(config, model=model)


def prepare(dataset: Dataset, config: ExperimentConfig, statistics: dict[str, Any] | None = None,
            splits: dict[str, np.ndarray] | None = None) -> PreparedData:
    """Splits, neighbour search over every frame, capacity, buckets and statistics."""
    model, train = config.model, config.train
    n_species = model.n_species
    for index, species in enumerate(dataset.species):
        if species.size and species.max() >= n_species:
            raise InputError(f"{dataset.path}, frame {index}: species {dataset.symbols[species.max()]!r} has id "
                             f"{species.max()}, but the model knows n_species = {n_species} species; raise "
                             "[model] n_species or give [data] symbols")
    if splits is None:
        splits = split_indices(dataset, config.data.split_fractions, train.seed)
        if config.data.max_train_frames and len(splits["train"]) > config.data.max_train_frames:
            rng = np.random.default_rng(train.seed)
            splits["train"] = np.sort(rng.choice(splits["train"], config.data.max_train_frames, replace=False))
    pairs = frame_pairs(dataset, model.cutoff)
    check_attention_keys(dataset, pairs, model)
    neighbors = [dense_index(i, j, len(R)) for (i, j, _), R in zip(pairs, dataset.positions, strict=True)]
    counts = np.asarray([max(1, idx.shape[1]) for idx in neighbors])
    sizes = np.asarray([len(R) for R in dataset.positions])
    padded_sizes = bucket_sizes(sizes, train.size_buckets)
    if statistics is None:
        if not len(splits["train"]):
            raise InputError(f"{dataset.path}: no training frames")
        statistics = training_statistics(dataset, splits["train"], n_species, pairs)
    scales = frame_scales(dataset, statistics, train.loss_normalization)
    # Capacity groups per size bucket, from every frame of the dataset: all splits share the shapes.
    size_of = np.searchsorted(padded_sizes, sizes)
    group_of = np.zeros(len(dataset), int)
    capacity_of = {}
    for b in range(len(padded_sizes)):
        members = np.flatnonzero(size_of == b)
        group_of[members] = capacity_groups(counts[members], train.neighbor_buckets)
        for g in np.unique(group_of[members]):
            capacity_of[b, g] = int(counts[members[group_of[members] == g]].max())
    buckets = {}
    for name, indices in splits.items():
        buckets[name] = []
        for (b, g), capacity in sorted(capacity_of.items()):
            members = indices[(size_of[indices] == b) & (group_of[indices] == g)]
            if len(members):
                buckets[name].append(pad_frames(dataset, members, neighbors, int(padded_sizes[b]), capacity,
                                                model.cutoff, scales, statistics["energy_shift"]))
    return PreparedData(dataset, splits, padded_sizes, max(capacity_of.values()), buckets, statistics, scales)


def epoch_batches(buckets: list[Bucket], batch_size: int, seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
    """The batches of one epoch as ``(bucket number, rows)``, shuffled by ``(seed, epoch)`` alone."""
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for b, bucket in enumerate(buckets):
        rows = rng.permutation(len(bucket))
        batches += [(b, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batches_in_order(buckets: list[Bucket], batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Every row of every bucket once, in order, as ``(bucket number, rows)``."""
    for b, bucket in enumerate(buckets):
        for i in range(0, len(bucket), batch_size):
            yield b, np.arange(i, min(i + batch_size, len(bucket)))


def fixed_species(dataset: Any, config: ExperimentConfig) -> np.ndarray | None:
    """The species ``[N]`` shared by every frame of ``dataset``, for a ``[baseline]`` potential (None
    for A2I, which pads and masks atoms); frames that differ in atoms are an error naming the first."""
    if not config.baseline.name:
        return None
    first = dataset.species[0]
    for index, species in enumerate(dataset.species):
        if len(species) != len(first) or np.any(species != first):
            raise InputError(f"{dataset.path}, frame {index}: jax-md's {config.baseline.name} cannot pad or mask "
                             f"atoms, so every frame must hold the same atoms in the same order; frame 0 has "
                             f"{len(first)} atoms, frame {index} has {len(species)} (or another species order)")
    return first
