"""Fitting a potential to energies and forces: batching, loss, optax, EMA, orbax checkpoints, reports.

The flow of :func:`train_and_evaluate`:

1. Read the frames, split them (by the file's ``split`` headers, else at random) and find every
   frame's neighbours within the cutoff on the host. The neighbour capacity ``K`` is the largest
   count over the whole dataset, so nothing can overflow inside a step.
2. Pad frames to a few size buckets (``TrainConfig.size_buckets``): one compilation per bucket.
3. Fit the per-species energy shift by least squares, set the energy scale to the force RMS, and
   normalise the loss by the training set's energy and force variances.
4. AdamW with warm-up, cosine decay and gradient clipping; an exponential moving average of the
   parameters is what gets evaluated, checkpointed as ``params`` and used for MD.
5. Orbax checkpoints: periodic ones (``checkpoints/periodic``, for ``resume``) and the best by
   validation loss (``checkpoints/best``), each with the config, the dataset statistics and the
   species symbols, so that a checkpoint alone rebuilds the potential (:func:`load_checkpoint`).
6. A report on the test split: energy and force errors, and per state point the total-energy RMSE
   over the MD total-energy fluctuation (the paper's measure) and the force RMSE over the force std.

The trainer sees the potential only through the jax-md builder shape: ``energy_fn(params, R,
neighbor=..., species=..., mask=..., box=..., per_atom=True)`` on a ``space.periodic_general``
displacement, with each frame's cell passed as ``box``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax_md import space

from a2ijax.baselines import baseline_neighbor_list
from a2ijax.config import ExperimentConfig, experiment_from_dict
from a2ijax.data import (
    Dataset,
    assign_splits,
    atomic_write,
    check_cutoff,
    fluctuations,
    neighbor_matrix,
    pair_distances,
    read_dataset,
    state_point_groups,
)
from a2ijax.model import A2IConfig
from a2ijax.potential import a2i_neighbor_list, fixed_neighbor_list

Array = jax.Array
SPLITS = ("train", "valid", "test")


class TrainingDivergedError(FloatingPointError):
    """The loss or the gradients became NaN or inf; the last good state was checkpointed."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the run that wants it."""


# ----------------------------------------------------------------------------------------------
# Frames -> padded, bucketed arrays


@dataclasses.dataclass
class Frames:
    """Frames padded to one atom count ``N`` and one neighbour capacity ``K`` (host arrays).

    R ``[F, N, 3]``, species ``[F, N]``, mask ``[F, N]`` (True: a real atom), idx ``[F, N, K]`` (empty
    slots and padded atoms hold ``N``), box ``[F, 3, 3]`` (lattice vectors as columns, jax-md's
    convention), energy ``[F]``, forces ``[F, N, 3]``, n_atoms ``[F]``, frame ``[F]`` (index in the
    dataset).
    """

    R: np.ndarray
    species: np.ndarray
    mask: np.ndarray
    idx: np.ndarray
    box: np.ndarray
    energy: np.ndarray
    forces: np.ndarray
    n_atoms: np.ndarray
    frame: np.ndarray

    def take(self, rows: np.ndarray, size: int) -> dict[str, np.ndarray]:
        """A batch of ``size`` frames from ``rows``, padded with empty frames (``weight`` 0)."""
        rows = np.asarray(rows, int)
        pad = size - len(rows)
        batch = {}
        for field in dataclasses.fields(self):
            a = getattr(self, field.name)[rows]
            if pad:
                filler = np.repeat(a[:1], pad, 0) if field.name in ("box", "idx") else np.zeros((pad,) + a.shape[1:],
                                                                                                  a.dtype)
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
        raise ValueError(f"{dataset.path}, frame {index}: partly periodic frames (pbc={pbc.tolist()}) are not "
                         "supported; use fully periodic or fully free frames")
    R = dataset.positions[index]
    return np.eye(3) * (2.0 * (np.ptp(R, axis=0).max() + cutoff) + 1.0)


def neighbor_indices(dataset: Dataset, cutoff: float) -> list[np.ndarray]:
    """For every frame, the ``[n, K_frame]`` neighbours within ``cutoff`` of each atom, in index order,
    padded with ``n`` (one image per neighbour: minimum image, the boxes having been checked)."""
    check_cutoff(dataset, cutoff)
    out = []
    for index in range(len(dataset)):
        R = dataset.positions[index]
        n = len(R)
        within = neighbor_matrix(R, dataset.cells[index], dataset.pbc[index], cutoff)
        counts = within.sum(1)
        k = int(counts.max()) if n else 0
        idx = np.argsort(~within, axis=1, kind="stable")[:, :k]  # neighbours first, in index order
        out.append(np.where(np.arange(k)[None, :] < counts[:, None], idx, n).astype(np.int32))
    return out


def bucket_sizes(sizes: np.ndarray, n_buckets: int) -> np.ndarray:
    """At most ``n_buckets`` padded sizes, each an actual frame size, covering every frame."""
    distinct = np.unique(sizes)
    if len(distinct) <= n_buckets:
        return distinct
    return np.unique(np.quantile(distinct, np.linspace(0, 1, n_buckets + 1)[1:], method="higher"))


def pad_frames(dataset: Dataset, frames: np.ndarray, neighbors: list[np.ndarray], size: int, capacity: int,
               cutoff: float) -> Frames:
    """The frames ``frames`` of ``dataset`` padded to ``size`` atoms and ``capacity`` neighbour slots."""
    f = len(frames)
    out = Frames(R=np.zeros((f, size, 3), np.float32), species=np.zeros((f, size), np.int32),
                 mask=np.zeros((f, size), bool), idx=np.full((f, size, capacity), size, np.int32),
                 box=np.zeros((f, 3, 3), np.float32), energy=np.zeros((f,), np.float32),
                 forces=np.zeros((f, size, 3), np.float32), n_atoms=np.zeros((f,), np.int32),
                 frame=np.asarray(frames, np.int64))
    for row, index in enumerate(frames):
        n = len(dataset.positions[index])
        out.R[row, :n] = dataset.positions[index]
        out.species[row, :n] = dataset.species[index]
        out.mask[row, :n] = True
        idx = neighbors[index]
        out.idx[row, :n, :idx.shape[1]] = np.where(idx == n, size, idx)
        out.box[row] = frame_box(dataset, index, cutoff)
        out.energy[row] = dataset.energy[index]
        out.forces[row, :n] = dataset.forces[index]
        out.n_atoms[row] = n
    return out


@dataclasses.dataclass
class PreparedData:
    """A dataset split, neighbour-searched and padded into buckets, with the training statistics."""

    dataset: Dataset
    splits: dict[str, np.ndarray]  # split -> frame indices
    buckets: np.ndarray  # padded sizes
    capacity: int
    frames: dict[str, list[Frames]]  # split -> one Frames per non-empty bucket
    statistics: dict[str, Any]


def split_indices(dataset: Dataset, fractions: tuple[float, ...], seed: int) -> dict[str, np.ndarray]:
    """Frame indices per split: from the ``split`` headers, else random whole frames."""
    labels = [info.get("split") for info in dataset.info]
    if all(label in SPLITS for label in labels):
        names = np.asarray(labels)
    else:
        names = np.asarray(assign_splits(len(dataset), fractions, np.random.default_rng(seed)))
    return {name: np.flatnonzero(names == name) for name in SPLITS}


def fit_energy_shift(dataset: Dataset, frames: np.ndarray, n_species: int) -> np.ndarray:
    """Per-species energy shift: least squares of frame energies on species counts."""
    counts = np.stack([np.bincount(dataset.species[i], minlength=n_species) for i in frames]).astype(np.float64)
    shift, *_ = np.linalg.lstsq(counts, dataset.energy[frames], rcond=None)
    return shift


def training_statistics(dataset: Dataset, train: np.ndarray, n_species: int) -> dict[str, Any]:
    """Energy shift, per-atom energy variance after the shift, force variance and closest pair distance
    (below it the model extrapolates) of the training frames, and, per state point of the whole dataset,
    the total-energy fluctuation and the force std."""
    shift = fit_energy_shift(dataset, train, n_species)
    residual = np.asarray([(dataset.energy[i] - shift[dataset.species[i]].sum()) / len(dataset.species[i])
                           for i in train])
    forces = np.concatenate([dataset.forces[i].ravel() for i in train])
    pair_closest = np.full((n_species, n_species), np.inf)
    for i in train:
        d, s = pair_distances(dataset.positions[i], dataset.cells[i], dataset.pbc[i]), dataset.species[i]
        np.minimum.at(pair_closest, (s[:, None], s[None, :]), d)
    closest = float(pair_closest.min())
    return dict(energy_shift=shift.tolist(), energy_var=float(max(np.var(residual), 1e-12)),
                force_var=float(max(np.mean(forces**2), 1e-12)), min_distance=closest,
                pair_min_distance=np.where(np.isfinite(pair_closest), pair_closest, closest).tolist(),
                fluctuations=fluctuations(dataset))


def with_core_repulsion(config: ExperimentConfig, statistics: dict[str, Any]) -> ExperimentConfig:
    """``config`` with the model's core repulsion set from the training data (``[train] core_repulsion``):
    radii = the closest approach of each species pair (pairs that never meet: the closest of any), so
    no training pair feels the wall; energy scale = force RMS x smallest radius. A config that already
    names ``core_radii`` keeps them."""
    model = config.model
    if not config.train.core_repulsion or model.core_radii or config.baseline.name:
        return config
    radii = np.asarray(statistics["pair_min_distance"], np.float64)
    core_energy = math.sqrt(statistics["force_var"]) * float(radii.min())
    model = dataclasses.replace(model, core_radii=tuple(float(r) for r in radii.ravel()), core_energy=core_energy)
    return dataclasses.replace(config, model=model)


def prepare(dataset: Dataset, config: ExperimentConfig, statistics: dict[str, Any] | None = None,
            splits: dict[str, np.ndarray] | None = None) -> PreparedData:
    """Splits, neighbour search over every frame, capacity, buckets and statistics."""
    model, train = config.model, config.train
    n_species = model.n_species
    for index, species in enumerate(dataset.species):
        if species.size and species.max() >= n_species:
            raise ValueError(f"{dataset.path}, frame {index}: species {dataset.symbols[species.max()]!r} has id "
                             f"{species.max()}, but the model knows n_species = {n_species} species; raise "
                             "[model] n_species or give [data] symbols")
    if splits is None:
        splits = split_indices(dataset, config.data.split_fractions, train.seed)
        if config.data.max_train_frames and len(splits["train"]) > config.data.max_train_frames:
            rng = np.random.default_rng(train.seed)
            splits["train"] = np.sort(rng.choice(splits["train"], config.data.max_train_frames, replace=False))
    neighbors = neighbor_indices(dataset, model.cutoff)
    capacity = max(1, max(idx.shape[1] for idx in neighbors))
    sizes = np.asarray([len(R) for R in dataset.positions])
    buckets = bucket_sizes(sizes, train.size_buckets)
    frames = {}
    for name, indices in splits.items():
        frames[name] = []
        bucket_of = np.searchsorted(buckets, sizes[indices])
        for b, size in enumerate(buckets):
            members = indices[bucket_of == b]
            if len(members):
                frames[name].append(pad_frames(dataset, members, neighbors, int(size), capacity, model.cutoff))
    if statistics is None:
        if not len(splits["train"]):
            raise ValueError(f"{dataset.path}: no training frames")
        statistics = training_statistics(dataset, splits["train"], n_species)
    return PreparedData(dataset, splits, buckets, capacity, frames, statistics)


def epoch_batches(frames: list[Frames], batch_size: int, seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
    """The batches of one epoch as ``(bucket, rows)``, shuffled by ``(seed, epoch)`` alone."""
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for b, bucket in enumerate(frames):
        rows = rng.permutation(len(bucket.frame))
        batches += [(b, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batches_in_order(frames: list[Frames], batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    for b, bucket in enumerate(frames):
        for i in range(0, len(bucket.frame), batch_size):
            yield b, np.arange(i, min(i + batch_size, len(bucket.frame)))


# ----------------------------------------------------------------------------------------------
# Potential, loss, optimiser


def _training_space(cutoff: float) -> tuple[Callable, Array]:
    """A ``periodic_general`` displacement whose cell comes with every call as ``box=``, and a
    placeholder cell wide enough for the builders' box checks."""
    box = jnp.eye(3) * 4.0 * cutoff
    return space.periodic_general(box, fractional_coordinates=False)[0], box


def a2i_builder(config: A2IConfig) -> tuple[Callable, Callable]:
    """``(init_fn, energy_fn)`` of the A2I potential for training (the cell comes with every call as ``box=``)."""
    _, init_fn, energy_fn = a2i_neighbor_list(*_training_space(config.cutoff), config)
    return init_fn, energy_fn


def fixed_species(dataset: Dataset, config: ExperimentConfig) -> np.ndarray | None:
    """The species ``[N]`` shared by every frame, for a ``[baseline]`` potential (None for A2I, which
    pads and masks atoms); a dataset whose frames differ in atoms is an error naming the first such frame."""
    if not config.baseline.name:
        return None
    first = dataset.species[0]
    for index, species in enumerate(dataset.species):
        if len(species) != len(first) or np.any(species != first):
            raise ValueError(f"{dataset.path}, frame {index}: jax-md's {config.baseline.name} cannot pad or mask "
                             f"atoms, so every frame must hold the same atoms in the same order; frame 0 has "
                             f"{len(first)} atoms, frame {index} has {len(species)} (or another species order)")
    return first


def potential_builder(config: ExperimentConfig, species: np.ndarray | None = None) -> tuple[Callable, Callable, bool]:
    """``(init_fn, energy_fn, per_atom)`` of the potential that ``config`` trains: A2I, or the jax-md
    potential named in ``[baseline]`` (``per_atom``: whether it gives per-atom energies).

    A baseline is wrapped as ``E = s * E_net + sum_i shift[species_i]`` with the trainer's per-species
    shift and a scale ``s``, as A2I carries them inside, so both start from the same fitted offsets.
    ``species`` (``[N]``) is fixed into GraphNetwork and Behler-Parrinello when they are built.
    """
    name = config.baseline.name
    if not name:
        return (*a2i_builder(config.model), True)
    model = config.model
    _, net_init, net_energy = baseline_neighbor_list(
        name, *_training_space(model.cutoff), cutoff=model.cutoff, species=species, n_species=model.n_species,
        avg_neighbors=model.avg_neighbors, key=jax.random.PRNGKey(config.train.seed))

    def init_fn(key, R, neighbor, species=None, box=None):
        net = net_init(key, R, neighbor, species=species, box=box)
        dtype = jnp.result_type(float)
        return {"params": dict(net=net, energy_shift=jnp.zeros((model.n_species,), dtype),
                               energy_scale=jnp.ones((1,), dtype))}

    def energy_fn(params, R, neighbor, species=None, mask=None, box=None, per_atom=False):
        del mask  # every frame has the same atoms (fixed_species checks); padding frames carry zero weight
        if per_atom:
            raise ValueError(f"jax-md's {name} gives no per-atom energies")
        p = params["params"]
        species = jnp.zeros(R.shape[:1], jnp.int32) if species is None else species
        return p["energy_scale"][0] * net_energy(p["net"], R, neighbor, species=species, box=box) + jnp.sum(
            p["energy_shift"][species])

    return init_fn, energy_fn, False


def predict_fn(energy_fn: Callable, per_atom: bool = True) -> Callable:
    """``predict(params, batch) -> (E [B], F [B, N, 3], E_i [B, N] or None)`` over a padded batch
    (``per_atom=False``: for potentials without per-atom energies, ``E_i`` is None)."""

    def one(params, R, species, mask, idx, box):
        neighbor = fixed_neighbor_list(idx, R)

        def total(R):
            if not per_atom:
                return energy_fn(params, R, neighbor=neighbor, species=species, mask=mask, box=box), None
            energies = energy_fn(params, R, neighbor=neighbor, species=species, mask=mask, box=box, per_atom=True)
            return jnp.sum(energies), energies

        (energy, energies), grad = jax.value_and_grad(total, has_aux=True)(R)
        return energy, -grad, energies

    def predict(params, batch):
        return jax.vmap(one, (None, 0, 0, 0, 0, 0))(params, batch["R"], batch["species"], batch["mask"],
                                                    batch["idx"], batch["box"])

    return predict


def random_rotations(key: Array, n: int) -> Array:
    """``[n, 3, 3]`` rotation matrices, uniform over SO(3) (QR of Gaussian matrices, signs fixed)."""
    q, r = jnp.linalg.qr(jax.random.normal(key, (n, 3, 3)))
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    return q * jnp.linalg.det(q)[:, None, None]  # det -1 -> +1 by flipping every axis (3 is odd)


def rotate_batch(batch: dict[str, Array], key: Array) -> dict[str, Array]:
    """Rotates positions, forces and cells of every frame: energies are unchanged."""
    q = random_rotations(key, batch["R"].shape[0])
    out = dict(batch)
    out["R"] = jnp.einsum("bij,bnj->bni", q, batch["R"])
    out["forces"] = jnp.einsum("bij,bnj->bni", q, batch["forces"])
    out["box"] = jnp.einsum("bij,bjk->bik", q, batch["box"])
    return out


def batch_errors(predict: Callable, params: Any, batch: dict[str, Array]) -> dict[str, Array]:
    """Weighted squared errors of one batch: energy per atom and force components, summed."""
    energy, forces, _ = predict(params, batch)
    w = batch["weight"]
    n = jnp.maximum(batch["n_atoms"], 1).astype(energy.dtype)
    e_err = (energy - batch["energy"]) / n
    f_err = (forces - batch["forces"]) * batch["mask"][..., None]
    return dict(energy_se=jnp.sum(w * e_err**2), force_se=jnp.sum(w[:, None, None] * f_err**2),
                frames=jnp.sum(w), components=3.0 * jnp.sum(w * batch["n_atoms"]))


def normalised_loss(errors: dict[str, Array], statistics: dict[str, Any], weights: tuple[Any, Any]) -> Array:
    e_mse = errors["energy_se"] / jnp.maximum(errors["frames"], 1.0)
    f_mse = errors["force_se"] / jnp.maximum(errors["components"], 1.0)
    return weights[0] * e_mse / statistics["energy_var"] + weights[1] * f_mse / statistics["force_var"]


def make_optimizer(train) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate, max(train.warmup_steps, 1), max(train.steps, train.warmup_steps + 1),
        end_value=train.learning_rate * train.final_lr_fraction)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731 (matrices only)
    chain = [optax.clip_by_global_norm(train.clip_norm)] if train.clip_norm > 0 else []
    return optax.chain(*chain, optax.adamw(schedule, weight_decay=train.weight_decay, mask=decay_mask))


def make_train_step(config: ExperimentConfig, energy_fn: Callable, statistics: dict[str, Any],
                    per_atom: bool = True) -> Callable:
    """``step(state, batch) -> (state, metrics)``: one jitted AdamW step with EMA and NaN guard."""
    train = config.train
    predict = predict_fn(energy_fn, per_atom)
    optimizer = make_optimizer(train)
    rotate = config.rotate()
    stats = dict(energy_var=statistics["energy_var"], force_var=statistics["force_var"])

    @jax.jit
    def step(state, batch):
        key, sub = jax.random.split(state["key"])
        if rotate:
            batch = rotate_batch(batch, sub)
        weights = train.loss_weights(state["step"])

        def loss_fn(params):
            errors = batch_errors(predict, params, batch)
            return normalised_loss(errors, stats, weights), errors

        (loss, errors), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        decay = jnp.minimum(train.ema_decay, (1.0 + state["step"]) / (10.0 + state["step"]))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        grad_norm = optax.tree.norm(grads)
        new = dict(step=state["step"] + 1, params=params, opt_state=opt_state, ema=ema, key=key)
        return new, dict(loss=loss, finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm), grad_norm=grad_norm,
                         **errors)

    return step


def init_state(config: ExperimentConfig, init_fn: Callable, data: PreparedData) -> dict[str, Any]:
    """Initial parameters with the fitted shift and the force-RMS scale, optimiser state, EMA, key."""
    key = jax.random.PRNGKey(config.train.seed)
    key, init_key = jax.random.split(key)
    bucket = data.frames["train"][0]
    params = init_fn(init_key, jnp.asarray(bucket.R[0]), neighbor=fixed_neighbor_list(jnp.asarray(bucket.idx[0]),
                                                                                      bucket.R[0]),
                     species=jnp.asarray(bucket.species[0]), box=jnp.asarray(bucket.box[0]))
    leaves = params["params"]
    dtype = leaves["energy_shift"].dtype
    leaves["energy_shift"] = jnp.asarray(data.statistics["energy_shift"], dtype)
    leaves["energy_scale"] = jnp.full_like(leaves["energy_scale"], math.sqrt(data.statistics["force_var"]))
    optimizer = make_optimizer(config.train)
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                ema=jax.tree_util.tree_map(jnp.copy, params), key=key)


# ----------------------------------------------------------------------------------------------
# Evaluation and reports


@dataclasses.dataclass
class Predictions:
    """Per-frame predictions (lists over the evaluated frames, in ``frames`` order)."""

    frames: np.ndarray
    energy: np.ndarray
    forces: list[np.ndarray]
    per_atom: list[np.ndarray] | None  # None: the potential gives no per-atom energies


def predict_frames(predict: Callable, params: Any, frames: list[Frames], batch_size: int) -> Predictions:
    """Predictions for every frame of the buckets ``frames`` (padding frames dropped)."""
    index, energy, forces, per_atom = [], [], [], []
    for b, rows in batches_in_order(frames, batch_size):
        bucket = frames[b]
        batch = {k: jnp.asarray(v) for k, v in bucket.take(rows, batch_size).items()}
        E, F, Ei = (None if x is None else np.asarray(x, np.float64) for x in predict(params, batch))
        for r, row in enumerate(rows):
            n = int(bucket.n_atoms[row])
            index.append(int(bucket.frame[row]))
            energy.append(E[r])
            forces.append(F[r, :n])
            per_atom.append(None if Ei is None else Ei[r, :n])
    order = np.argsort(index, kind="stable")
    per_atom = None if any(e is None for e in per_atom) else [per_atom[i] for i in order]
    return Predictions(np.asarray(index)[order], np.asarray(energy)[order], [forces[i] for i in order], per_atom)


def _rmse(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if np.size(x) else float("nan")


def error_report(dataset: Dataset, predictions: Predictions, fluctuation: dict[str, dict[str, float]]) -> dict:
    """Errors of ``predictions`` against ``dataset``: overall, per state point against the MD
    fluctuations ``fluctuation`` (from :func:`fluctuations`), and per-atom energies where known."""
    frames = predictions.frames
    n = np.asarray([len(dataset.positions[i]) for i in frames])
    e_err = predictions.energy - dataset.energy[frames]
    f_err = np.concatenate([(predictions.forces[k] - dataset.forces[i]).ravel() for k, i in enumerate(frames)])
    report: dict[str, Any] = dict(
        frames=len(frames), atoms=int(n.sum()),
        energy_rmse_per_atom=_rmse(e_err / n), energy_mae_per_atom=float(np.mean(np.abs(e_err / n))),
        force_rmse=_rmse(f_err), force_mae=float(np.mean(np.abs(f_err))), state_points={})
    position = {i: k for k, i in enumerate(frames)}
    for name, indices in state_point_groups(dataset).items():
        rows = [position[i] for i in indices if i in position]
        if not rows:
            continue
        ref = fluctuation.get(name, {})
        sp_f = np.concatenate([(predictions.forces[k] - dataset.forces[frames[k]]).ravel() for k in rows])
        row = dict(frames=len(rows), energy_rmse=_rmse(e_err[rows]), energy_fluctuation=ref.get("energy_std", np.nan),
                   force_rmse=_rmse(sp_f), force_std=ref.get("force_std", np.nan))
        row["energy_ratio"] = row["energy_rmse"] / row["energy_fluctuation"]
        row["force_ratio"] = row["force_rmse"] / row["force_std"]
        report["state_points"][name] = row
    if dataset.per_atom_energies is not None and predictions.per_atom is not None:
        exact = np.concatenate([dataset.per_atom_energies[i] for i in frames])
        model = np.concatenate(predictions.per_atom)
        report["per_atom_energy"] = dict(pearson=float(np.corrcoef(model, exact)[0, 1]), rmse=_rmse(model - exact))
    return report


def format_report(report: dict, units: str = "") -> str:
    """The report as Markdown tables."""
    u = f" ({units})" if units else ""
    lines = [f"{report['frames']} frames, {report['atoms']} atoms{u}",
             f"energy per atom: RMSE {report['energy_rmse_per_atom']:.4g}, MAE {report['energy_mae_per_atom']:.4g}; "
             f"forces: RMSE {report['force_rmse']:.4g}, MAE {report['force_mae']:.4g}"]
    if "per_atom_energy" in report:
        p = report["per_atom_energy"]
        lines.append(f"per-atom energies vs exact: Pearson r {p['pearson']:.4f}, RMSE {p['rmse']:.4g}")
    lines += ["", "| state point | frames | E RMSE (total) | E fluctuation | ratio | F RMSE | F std | ratio |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["state_points"].items():
        lines.append(f"| {name} | {r['frames']} | {r['energy_rmse']:.4g} | {r['energy_fluctuation']:.4g} | "
                     f"{100 * r['energy_ratio']:.2f}% | {r['force_rmse']:.4g} | {r['force_std']:.4g} | "
                     f"{100 * r['force_ratio']:.2f}% |")
    return "\n".join(lines)


def parity_plot(path: Path, dataset: Dataset, predictions: Predictions, title: str = "") -> None:
    """Energy-per-atom and force-component parity plots, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = predictions.frames
    n = np.asarray([len(dataset.positions[i]) for i in frames])
    ref_f = np.concatenate([dataset.forces[i].ravel() for i in frames])
    pred_f = np.concatenate([f.ravel() for f in predictions.forces])
    pick = np.random.default_rng(0).permutation(len(ref_f))[:20000]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, x, y, what in ((axes[0], dataset.energy[frames] / n, predictions.energy / n, "energy per atom"),
                           (axes[1], ref_f[pick], pred_f[pick], "force component")):
        ax.scatter(x, y, s=3, alpha=0.5)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"reference {what}")
        ax.set_ylabel(f"model {what}")
        ax.set_title(f"{what}: RMSE {_rmse(y - x):.3g}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_curve_plot(path: Path, metrics_path: Path) -> None:
    """Training loss and validation errors against step, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    step = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, label in (("train_loss", "training loss (normalised)"), ("valid_loss", "validation loss (normalised)"),
                       ("valid_energy_rmse_per_atom", "validation E RMSE per atom"),
                       ("valid_force_rmse", "validation F RMSE")):
        ax.plot(step, [r[key] for r in rows], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _managers(workdir: Path) -> dict[str, ocp.CheckpointManager]:
    items = ("state", "params", "meta")
    periodic = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    best = ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["valid_loss"], best_mode="min",
                                        keep_checkpoints_without_metrics=False, enable_async_checkpointing=False)
    root = workdir.absolute() / "checkpoints"
    return dict(periodic=ocp.CheckpointManager(root / "periodic", options=periodic, item_names=items),
                best=ocp.CheckpointManager(root / "best", options=best, item_names=items))


def _save(manager: ocp.CheckpointManager, state: dict, meta: dict, metrics: dict | None = None) -> None:
    step = int(state["step"])
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               params=ocp.args.StandardSave(state["ema"]),
                                               meta=ocp.args.JsonSave(meta)), metrics=metrics)
    manager.wait_until_finished()


@dataclasses.dataclass
class Checkpoint:
    """What a checkpoint holds for users of the potential: config, EMA parameters, metadata."""

    path: Path
    step: int
    config: ExperimentConfig
    params: Any
    meta: dict[str, Any]

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(self.meta["symbols"])

    def require_a2i(self, what: str) -> None:
        """Raises if this checkpoint holds a jax-md baseline: ``what`` serves A2I checkpoints only."""
        if self.config.baseline.name:
            raise ValueError(f"checkpoint {self.path} holds jax-md's {self.config.baseline.name}, not an A2I model; "
                             f"{what} serves A2I checkpoints (build the baseline with "
                             "a2ijax.baselines.baseline_neighbor_list and load its params from the checkpoint)")

    def potential(self, box: Any, species: Array | None = None, **nl_kwargs
                  ) -> tuple[Any, Callable[..., Array], Callable, Callable]:
        """The trained potential in a periodic ``box`` (``[3, 3]``, lattice vectors as columns; real
        coordinates) for MD: ``(neighbor_fn, energy_fn(R, neighbor, **kw), displacement_fn, shift_fn)``.

        Parameters are cast to JAX's default float (float64 under ``jax_enable_x64``).
        """
        self.require_a2i("Checkpoint.potential (MD)")
        box = jnp.asarray(box, jnp.result_type(float))
        displacement, shift = space.periodic_general(box, fractional_coordinates=False)
        if not np.allclose(np.asarray(box), np.diag(np.diag(np.asarray(box)))):
            nl_kwargs.setdefault("disable_cell_list", True)  # jax-md's cell list assumes an orthorhombic box
        neighbor_fn, _, energy_fn = a2i_neighbor_list(displacement, box, self.config.model, species=species,
                                                      **nl_kwargs)
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.result_type(float)), self.params)

        def energy(R: Array, neighbor: Any = None, **kwargs) -> Array:
            return energy_fn(params, R, neighbor=neighbor, **kwargs)

        return neighbor_fn, energy, displacement, shift


def _step_dir(path: Path) -> Path:
    """The step directory that ``path`` names: a step directory, a manager directory (its latest
    step), a ``checkpoints`` directory or a work directory (best, else latest periodic)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / "meta").exists():
        return path
    for sub in ("checkpoints", "best", "periodic"):
        if (path / sub).is_dir() and any(p.name.isdigit() for p in (path / sub).rglob("*") if p.is_dir()):
            return _step_dir(path / sub)
    steps = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not steps:
        raise CheckpointError(f"no checkpoint found in {path}")
    return steps[-1]


def _restore(step_dir: Path, item: str, args: Any) -> Any:
    try:
        with ocp.Checkpointer(_handler(args)) as checkpointer:
            return checkpointer.restore(step_dir.absolute() / item, args=args)
    except Exception as error:  # orbax, tensorstore and json raise many types for damaged files
        raise CheckpointError(f"checkpoint {step_dir} is corrupt or unreadable ({item}: "
                              f"{type(error).__name__}: {str(error)[:300]})") from error


def _handler(args: Any):
    return ocp.JsonCheckpointHandler() if isinstance(args, ocp.args.JsonRestore) else ocp.StandardCheckpointHandler()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Config, EMA parameters and metadata from a checkpoint, a checkpoint directory or a workdir."""
    step_dir = _step_dir(Path(path))
    meta = _restore(step_dir, "meta", ocp.args.JsonRestore())
    if not isinstance(meta, dict) or "config" not in meta or "symbols" not in meta:
        raise CheckpointError(f"checkpoint {step_dir} has no config or species symbols in its metadata")
    config = experiment_from_dict(meta["config"])
    params = _restore(step_dir, "params", ocp.args.StandardRestore())
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return Checkpoint(step_dir, int(step_dir.name), config, params, meta)


def _config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _config_differences(x, y, f"{prefix}{key}.")
        elif x != y and not (isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and list(x) == list(y)):
            out.append(f"{prefix}{key}: checkpoint {x!r}, now {y!r}")
    return out


# ----------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class TrainResult:
    state: dict[str, Any]
    report: dict[str, Any] | None
    workdir: Path
    seconds: float


def _evaluate_split(predict: Callable, params: Any, data: PreparedData, split: str, batch_size: int,
                    max_frames: int = 0) -> tuple[Predictions, dict[str, float]]:
    frames = data.frames[split]
    total = sum(len(bucket.frame) for bucket in frames)
    if max_frames and total > max_frames:  # evenly spread over the split, so every state point is seen
        keep = set(np.unique(np.linspace(0, total - 1, max_frames).round().astype(int)).tolist())
        subset, offset = [], 0
        for bucket in frames:
            rows = np.asarray([r for r in range(len(bucket.frame)) if offset + r in keep], int)
            offset += len(bucket.frame)
            if len(rows):
                subset.append(Frames(**{f.name: getattr(bucket, f.name)[rows] for f in dataclasses.fields(bucket)}))
        frames = subset
    predictions = predict_frames(predict, params, frames, batch_size)
    report = error_report(data.dataset, predictions, {})
    return predictions, dict(energy_rmse_per_atom=report["energy_rmse_per_atom"], force_rmse=report["force_rmse"])


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def setup(dataset: Dataset, config: ExperimentConfig
          ) -> tuple[ExperimentConfig, PreparedData, Callable, Callable, bool]:
    """What a run needs before its first step: the config completed from the data (core repulsion),
    the prepared splits, and the potential's ``(init_fn, energy_fn, per_atom)``."""
    data = prepare(dataset, config)
    if not len(data.splits["valid"]):
        raise ValueError(f"{dataset.path}: no validation frames")
    config = with_core_repulsion(config, data.statistics)
    return (config, data, *potential_builder(config, fixed_species(dataset, config)))


def train_and_evaluate(config: ExperimentConfig, workdir: str | Path, *, resume: bool = False,
                       stop_after: int | None = None, progress: bool = True, dataset: Dataset | None = None
                       ) -> TrainResult:
    """Trains, checkpoints and reports into ``workdir``.

    Args:
      config: the experiment (data, model, training).
      workdir: checkpoints, ``metrics.jsonl``, ``report.json``/``report.md`` and plots go here.
      resume: continue from the latest periodic checkpoint in ``workdir``: parameters, optimiser
        state, EMA, step, RNG key and data order, so the result equals an uninterrupted run.
      stop_after: stop (and checkpoint) once this many steps are done, as if interrupted; the
        schedule still spans ``config.train.steps``. No report is written then.
      progress: show a progress bar with live metrics.
      dataset: frames already read (default: read ``config.data.path``).
    """
    t_start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train = config.train
    if dataset is None:
        dataset = read_dataset(config.data.path, config.data.symbols or None)
    config, data, init_fn, energy_fn, per_atom = setup(dataset, config)
    meta = dict(config=config.to_dict(), symbols=list(dataset.symbols), statistics=data.statistics,
                capacity=data.capacity, buckets=data.buckets.tolist(), data_path=str(dataset.path),
                units=str(dataset.info[0].get("units", "")), system=str(dataset.info[0].get("system", "")),
                splits={k: v.tolist() for k, v in data.splits.items()})
    state = init_state(config, init_fn, data)
    managers = _managers(workdir)
    metrics_path = workdir / "metrics.jsonl"
    if resume:
        state = _resume(managers["periodic"], state, meta, metrics_path)
    elif managers["periodic"].latest_step() is not None:
        raise CheckpointError(f"{workdir} already holds checkpoints: pass resume (--resume) to continue, or use a "
                              "new work directory")
    else:
        metrics_path.write_text("")
    step_fn = make_train_step(config, energy_fn, data.statistics, per_atom)
    predict = jax.jit(predict_fn(energy_fn, per_atom))
    steps_per_epoch = sum(-(-len(b.frame) // train.batch_size) for b in data.frames["train"])
    final_weights = train.loss_weights(train.steps - 1)
    stats = dict(energy_var=data.statistics["energy_var"], force_var=data.statistics["force_var"])

    start = int(state["step"])
    end = train.steps if stop_after is None else min(train.steps, stop_after)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=train.steps, initial=start, unit="step", desc="train", dynamic_ncols=True)
    running, last_valid = [], {}
    order: list[tuple[int, np.ndarray]] = []
    epoch_of_order = -1
    step = start
    try:
        while step < end:
            epoch, position = divmod(step, steps_per_epoch)
            if epoch != epoch_of_order:
                order, epoch_of_order = epoch_batches(data.frames["train"], train.batch_size, train.seed, epoch), epoch
            b, rows = order[position]
            bucket = data.frames["train"][b]
            batch = {k: jnp.asarray(v) for k, v in bucket.take(rows, train.batch_size).items()}
            new_state, metrics = step_fn(state, batch)
            if not bool(metrics["finite"]):
                _save(managers["periodic"], state, meta)
                raise TrainingDivergedError(
                    f"loss or gradients are not finite at step {step} (epoch {epoch}, batch of frames "
                    f"{bucket.frame[rows].tolist()} of {dataset.path}); the last good state, step {step}, is "
                    f"checkpointed in {workdir / 'checkpoints' / 'periodic'}. Lower learning_rate or clip_norm.")
            state, step = new_state, step + 1
            running.append(float(metrics["loss"]))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(running[-20:]):.3g}", **last_valid)
            if step % train.eval_every == 0 or step == train.steps:
                _, valid = _evaluate_split(predict, state["ema"], data, "valid", train.batch_size, train.eval_frames)
                errors = dict(energy_se=valid["energy_rmse_per_atom"] ** 2, force_se=valid["force_rmse"] ** 2,
                              frames=1.0, components=1.0)
                valid_loss = float(normalised_loss(errors, stats, final_weights))
                row = dict(step=step, epoch=step / steps_per_epoch, seconds=time.perf_counter() - t_start,
                           train_loss=float(np.mean(running)), valid_loss=valid_loss,
                           valid_energy_rmse_per_atom=valid["energy_rmse_per_atom"],
                           valid_force_rmse=valid["force_rmse"])
                running = []
                _append_jsonl(metrics_path, row)
                _save(managers["best"], state, meta, metrics=dict(valid_loss=valid_loss))
                last_valid = dict(val_E=f"{valid['energy_rmse_per_atom']:.3g}", val_F=f"{valid['force_rmse']:.3g}")
            if step % train.checkpoint_every == 0 or step == end:
                _save(managers["periodic"], state, meta)
    except KeyboardInterrupt:
        _save(managers["periodic"], state, meta)
        raise
    finally:
        if bar is not None:
            bar.close()
    report = None
    if step == train.steps:
        report = final_report(workdir, data, predict, train.batch_size)
    return TrainResult(state, report, workdir, time.perf_counter() - t_start)


def _resume(manager: ocp.CheckpointManager, state: dict, meta: dict, metrics_path: Path) -> dict:
    """The state of the latest periodic checkpoint, checked against this run's config and data."""
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"nothing to resume: no checkpoint in {manager.directory}")
    step_dir = Path(manager.directory) / str(step)
    stored = _restore(step_dir, "meta", ocp.args.JsonRestore())
    problems = _config_differences(stored.get("config", {}), meta["config"])
    if stored.get("symbols") != meta["symbols"]:
        problems.append(f"species symbols: checkpoint {stored.get('symbols')}, now {meta['symbols']}")
    if stored.get("splits") != meta["splits"]:
        problems.append("the data splits differ (another dataset or split seed)")
    if problems:
        raise CheckpointError(f"checkpoint {step_dir} does not match this run: " + "; ".join(problems))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    restored = _restore(step_dir, "state", ocp.args.StandardRestore(abstract))
    if metrics_path.exists():  # drop metrics logged after the checkpoint: they will be logged again
        rows = [line for line in metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(metrics_path, lambda f: f.write("".join(r + "\n" for r in rows)))
    return restored


def final_report(workdir: Path, data: PreparedData, predict: Callable, batch_size: int) -> dict:
    """Evaluates the best checkpoint on the test split (validation if there is none) with ``predict``
    (from :func:`predict_fn`); writes ``report.json``, ``report.md``, ``parity.png`` and ``learning_curve.png``."""
    checkpoint = load_checkpoint(workdir / "checkpoints" / "best")
    split = "test" if len(data.splits["test"]) else "valid"
    predictions = predict_frames(predict, checkpoint.params, data.frames[split], batch_size)
    report = error_report(data.dataset, predictions, data.statistics["fluctuations"])
    report.update(split=split, checkpoint=str(checkpoint.path), step=checkpoint.step,
                  parameters=int(sum(np.size(p) for p in jax.tree_util.tree_leaves(checkpoint.params))))
    write_report(workdir, report, data.dataset, predictions, units=checkpoint.meta.get("units", ""))
    learning_curve_plot(workdir / "learning_curve.png", workdir / "metrics.jsonl")
    return report


def write_report(out: Path, report: dict, dataset: Dataset, predictions: Predictions, units: str = "") -> str:
    """Writes ``report.json``, ``report.md`` and ``parity.png`` into ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = format_report(report, units)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(text + "\n")
    parity_plot(out / "parity.png", dataset, predictions, title=f"{dataset.path} ({report.get('split', 'all')})")
    return text


def evaluate(checkpoint_path: str | Path, data_path: str | Path, split: str | None = None,
             out: str | Path | None = None, batch_size: int = 4) -> tuple[dict, str]:
    """Error report of a checkpoint on any labelled dataset (all frames, or one ``split``).

    Fluctuations are taken from every frame of the file at each state point.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    config = checkpoint.config
    dataset = read_dataset(data_path, checkpoint.symbols)
    if split is not None:
        indices = split_indices(dataset, config.data.split_fractions, config.train.seed)[split]
        if not len(indices):
            raise ValueError(f"{data_path}: no frames in split {split!r}")
    else:
        indices = np.arange(len(dataset))
    data = prepare(dataset, config, statistics=checkpoint.meta["statistics"],
                   splits=dict(train=np.zeros(0, int), valid=np.zeros(0, int), test=indices))
    _, energy_fn, per_atom = potential_builder(config, fixed_species(dataset, config))
    predictions = predict_frames(jax.jit(predict_fn(energy_fn, per_atom)), checkpoint.params, data.frames["test"],
                                 batch_size)
    report = error_report(dataset, predictions, fluctuations(dataset))
    report.update(split=split or "all", checkpoint=str(checkpoint.path), step=checkpoint.step)
    text = format_report(report, checkpoint.meta.get("units", ""))
    if out is not None:
        write_report(Path(out), report, dataset, predictions, checkpoint.meta.get("units", ""))
    return report, text
