"""Experiment configuration: frozen dataclasses read from TOML.

A training run is described by one TOML file with three tables, each a frozen dataclass::

    [data]            # DataConfig: which labelled frames to fit
    path = "data/lj.xyz"

    [model]           # a2ijax.model.A2IConfig: the potential's hyperparameters
    cutoff = 2.5

    [train]           # TrainConfig: loss, optimiser, schedule, checkpoints
    steps = 3000

and, to fit one of jax-md's own potentials with the same trainer instead of A2I, a fourth::

    [baseline]        # BaselineConfig
    name = "nequip"   # or "graph_network", "behler_parrinello"

Every key is checked: an unknown key or a value of the wrong type is an error that names the table,
the key and the expected type. Paths are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from a2ijax.errors import InputError
from a2ijax.model import A2IConfig

#: jax-md's own potentials that ``[baseline] name`` may name (built by :mod:`a2ijax.baselines`).
BASELINES = ("nequip", "graph_network", "behler_parrinello")

T = TypeVar("T")

#: How the loss normalises errors (``TrainConfig.loss_normalization``).
LOSS_NORMALIZATIONS = ("state_point", "dataset")

#: Settings of how a model is run, which older configs kept in ``[model]``: where they went.
RUN_SETTINGS = {"atom_chunk": "the builders' atom_chunk= argument (a2ijax train/md/evaluate --atom-chunk)",
                "dtype": "the builders' dtype= argument (the compute dtype)"}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which frames to fit.

    Attributes:
      path: labelled frames (extended XYZ from ``a2ijax generate``, or any ASE-readable file with
        energies and forces). Frames whose header has ``split=train|valid|test`` are split by it;
        a file without split headers is split by whole ``segment`` groups (single frames where
        there is none) at random with ``split_fractions``; some frames with and some without is an
        error (``a2ijax.dataset.split_indices``).
      symbols: chemical symbols in species-id order (id = index). Empty: from the file's header.
      max_train_frames: use at most this many training frames (0: all), a fixed random subset.
      split_fractions: train/valid/test fractions for files without ``split`` headers; training must
        get a share.
    """

    path: str = ""
    symbols: tuple[str, ...] = ()
    max_train_frames: int = 0
    split_fractions: tuple[float, ...] = (0.8, 0.1, 0.1)

    def __post_init__(self):
        if not self.path:
            raise InputError("[data] path: give the labelled frames to fit (e.g. `a2ijax generate lj --out FILE`)")
        if self.max_train_frames < 0:
            raise InputError(f"[data] max_train_frames must be >= 0, got {self.max_train_frames}")
        if (len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or self.split_fractions[0] <= 0
                or abs(sum(self.split_fractions) - 1) > 1e-9):
            raise InputError(f"[data] split_fractions must be three non-negative fractions summing to 1, with a "
                             f"positive training share, "
                             f"got {self.split_fractions}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loss, optimiser and schedule.

    The loss is ``w_E * mean_frames((E - E_ref) / s_E)^2 + w_F * mean_components((F - F_ref) / s_F)^2``
    over the frames of a batch, each frame with its own scales ``s_E``, ``s_F``
    (``a2ijax.batching.frame_scales``), so the weights are dimensionless. ``loss_normalization``:

    * ``"state_point"`` (default): ``s_E`` is the std of the total energy over the training frames
      of the frame's state point (its MD fluctuation) and ``s_F`` the std of its force components:
      the loss is ``w_E`` times the mean squared energy ratio the report shows plus ``w_F`` times
      the squared force ratio, every state point weighted as the metric weights it.
    * ``"dataset"``: ``s_E = N sqrt(var_E)``, ``s_F = sqrt(var_F)`` with the per-atom energy variance
      (after the per-species shift) and the force variance over all training frames. Across state
      points ``var_E`` is dominated by their differences, so low-fluctuation state points get up to
      hundreds of times less weight than in the report; on one state point it gives energies far
      more weight than forces (lower ``energy_weight`` then).

    The weights move linearly from their initial to their final value over the run.

    Attributes:
      steps: optimiser steps (the run length; the learning-rate schedule spans it).
      batch_size: frames per step (fixed: short batches are padded with empty frames).
      learning_rate: peak learning rate of AdamW, reached after ``warmup_steps``, then cosine decay
        to ``learning_rate * final_lr_fraction``.
      weight_decay: AdamW decoupled weight decay.
      pair_lr_fraction: the pair pathway's weights (``[model] pair_radial``) move at this fraction of
        the learning rate: they start at their least-squares optimum (``a2ijax.pair_fit``), where Adam's
        steps of about the learning rate per weight would only add minibatch noise to a fitted potential.
      clip_norm: clip the global gradient norm to this value (0: no clipping).
      energy_weight, energy_weight_final, force_weight, force_weight_final: loss weights, initial
        and final; a final weight left out keeps the initial one for the whole run.
      ema_decay: decay of the exponential moving average of the parameters used for evaluation.
      loss_normalization: ``"state_point"`` or ``"dataset"`` (above).
      size_buckets: frames are padded to at most this many distinct atom counts (one compilation each).
      neighbor_buckets: the frames of each atom count are padded to at most this many neighbour
        capacities (grouped by their largest neighbour count; one compilation each), so frames
        from sparse state points do not pay for the densest frame's padding.
      sync_every: the host reads the losses and the finiteness flag every this many steps, not
        every step, so it queues the next steps while the device computes; a non-finite step
        stops the run with the state of the last check (at most this many steps back) saved.
      rotation_augmentation: rotate each frame (positions, forces, cell) at random every step.
        ``"auto"``: on for the ``coordinates`` featurisation, off for ``invariant``.
      core_repulsion: give the model a core repulsion below the closest approach of each species pair
        in the training data (see ``a2ijax.train.with_core_repulsion``), unless ``[model] core_radii``
        are set. It is zero on every training pair, so the fit is unchanged; it stops MD from
        collapsing pairs into distances the data never shows.
      eval_every: evaluate on the validation split (with the EMA parameters) every this many steps.
      checkpoint_every: write a periodic checkpoint every this many steps.
      eval_frames: validation frames used at each evaluation (0: all).
      seed: initialisation, data order and augmentation all derive from it.
    """

    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.01
    weight_decay: float = 1e-6
    pair_lr_fraction: float = 0.01
    clip_norm: float = 10.0
    energy_weight: float = 1.0
    energy_weight_final: float | None = None
    force_weight: float = 1.0
    force_weight_final: float | None = None
    ema_decay: float = 0.99
    loss_normalization: str = "state_point"
    size_buckets: int = 4
    neighbor_buckets: int = 1
    sync_every: int = 20
    rotation_augmentation: str = "auto"
    core_repulsion: bool = True
    eval_every: int = 100
    checkpoint_every: int = 500
    eval_frames: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "size_buckets", "neighbor_buckets", "sync_every", "eval_every",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(f"[train] {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_frames"):
            if getattr(self, name) < 0:
                raise InputError(f"[train] {name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise InputError(f"[train] learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"[train] ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.energy_weight < 0 or self.force_weight < 0 or self.energy_weight + self.force_weight == 0:
            raise InputError("[train] energy_weight and force_weight must be >= 0 and not both 0")
        for name in ("energy_weight_final", "force_weight_final"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise InputError(f"[train] {name} must be >= 0 (or left out: the initial weight throughout), "
                                 f"got {getattr(self, name)}")
        for name in ("learning_rate", "final_lr_fraction", "weight_decay", "clip_norm", "pair_lr_fraction"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"[train] {name} must be finite, got {getattr(self, name)}")
        if min(self.final_lr_fraction, self.weight_decay, self.clip_norm, self.pair_lr_fraction) < 0:
            raise InputError("[train] final_lr_fraction, weight_decay, clip_norm and pair_lr_fraction must be >= 0")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise InputError(f"[train] loss_normalization must be one of {LOSS_NORMALIZATIONS}, "
                             f"got {self.loss_normalization!r}")
        if self.rotation_augmentation not in ("auto", "on", "off"):
            raise InputError(f"[train] rotation_augmentation must be auto, on or off, "
                             f"got {self.rotation_augmentation!r}")

    def loss_weights(self, step: Any) -> tuple[Any, Any]:
        """``(w_E, w_F)`` at ``step``: linear from the initial to the final weights over the run."""
        t = step / max(self.steps - 1, 1)
        final_e = self.energy_weight if self.energy_weight_final is None else self.energy_weight_final
        final_f = self.force_weight if self.force_weight_final is None else self.force_weight_final
        return (self.energy_weight + t * (final_e - self.energy_weight),
                self.force_weight + t * (final_f - self.force_weight))


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Fit one of jax-md's own potentials (``a2ijax.baselines``) instead of A2I, for comparisons.

    Attributes:
      name: empty for A2I (the default), else one of :data:`BASELINES`. The baseline
        takes ``cutoff``, ``n_species`` and ``avg_neighbors`` from ``[model]`` (the other ``[model]``
        keys are A2I's and unused) and keeps jax-md's default sizes. It gives no per-atom energies
        and cannot pad atoms: every frame must have the same atoms.
    """

    name: str = ""

    def __post_init__(self):
        if self.name and self.name not in BASELINES:
            raise InputError(f"[baseline] name must be one of {BASELINES} (or empty for A2I), got {self.name!r}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One training run: data, model and training settings (and which potential, A2I by default)."""

    data: DataConfig
    model: A2IConfig
    train: TrainConfig
    baseline: BaselineConfig = BaselineConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def rotate(self) -> bool:
        """Whether training rotates frames at random (see ``TrainConfig.rotation_augmentation``)."""
        choice = self.train.rotation_augmentation
        return choice == "on" or (choice == "auto" and not self.baseline.name
                                  and self.model.featurization == "coordinates")


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(annotation)[0]
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def from_dict(cls: type[T], values: dict[str, Any], table: str = "") -> T:
    """A frozen config dataclass from a mapping; unknown keys and wrong types are named errors."""
    where = f"[{table}] " if table else f"{cls.__name__}: "
    if not isinstance(values, dict):
        raise InputError(f"{where}expected a table of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    moved = [key for key in unknown if cls is A2IConfig and key in RUN_SETTINGS]
    if moved:
        raise InputError(f"{where}{moved[0]} is how a model is run, not what it is, and no longer part of the "
                         f"model config: use {RUN_SETTINGS[moved[0]]}")
    if unknown:
        raise InputError(f"{where}unknown keys {unknown}; known keys are {known}")
    for key, value in values.items():
        if not _matches(value, hints[key]):
            expected = getattr(hints[key], "__name__", None) if isinstance(hints[key], type) else str(hints[key])
            raise InputError(f"{where}{key} must be {expected}, got {value!r} ({type(value).__name__})")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**converted)
    except ValueError as error:
        message = str(error)
        raise InputError(message if message.startswith("[") else f"{where}{message}") from error


def experiment_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from nested tables ``data``, ``model``, ``train`` and ``baseline``."""
    unknown = sorted(set(values) - {"data", "model", "train", "baseline"})
    if unknown:
        raise InputError(f"unknown tables {unknown}; a config has [data], [model], [train] and optionally [baseline]")
    return ExperimentConfig(data=from_dict(DataConfig, values.get("data", {}), "data"),
                            model=from_dict(A2IConfig, values.get("model", {}), "model"),
                            train=from_dict(TrainConfig, values.get("train", {}), "train"),
                            baseline=from_dict(BaselineConfig, values.get("baseline", {}), "baseline"))


def load_config(path: str | Path) -> ExperimentConfig:
    """Reads an experiment TOML file; errors name the file."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{path}: not valid TOML: {error}") from error
    try:
        return experiment_from_dict(values)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from error
