"""Checkpoints: orbax save, load and resume.

A checkpoint step directory holds three items: ``state`` (the whole train state, for resuming),
``params`` (the EMA parameters, what MD and ASE use) and ``meta`` (JSON: the experiment config,
species symbols, dataset statistics, splits). ``load_checkpoint(path)`` alone rebuilds the potential,
and loading never imports optax: MD, the ASE calculator and the experiments need only this module.

Checkpoints written before the run settings left the model config (``[model] atom_chunk`` and
``dtype``, ``[train] energy_weight_final = -1`` as "unchanged") load unchanged: the stored config is
upgraded on reading (``tests/test_checkpoint.py`` loads one such checkpoint).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from a2ijax.config import ExperimentConfig, experiment_from_dict
from a2ijax.errors import InputError
from a2ijax.potential import Potential, a2i_periodic, bound, default_float

Array = jax.Array
ITEMS = ("state", "params", "meta")


class CheckpointError(InputError):
    """A checkpoint is missing, corrupt, or does not match the run that wants it."""


class ExtrapolationWarning(UserWarning):
    """Atoms are closer than any pair in the training data: the model is extrapolating."""


# ----------------------------------------------------------------------------------------------
# Reading


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
            raise InputError(f"checkpoint {self.path} holds jax-md's {self.config.baseline.name}, not an A2I model; "
                             f"{what} serves A2I checkpoints (build the baseline with "
                             "a2ijax.baselines.baseline_neighbor_list and load its params from the checkpoint)")

    def potential(self, box: Any, species: Array | None = None, **settings) -> Potential:
        """The trained potential in a periodic ``box`` (side, sides or ``[3, 3]`` lattice vectors as
        columns, any shape; real coordinates) for MD: a :class:`a2ijax.potential.Potential`,
        ``(neighbor_fn, energy_fn(R, neighbor, **kw), displacement_fn, shift_fn)``, on the linear-memory
        neighbour list of :func:`a2ijax.potential.a2i_periodic`.

        ``settings``: the run settings ``atom_chunk``, ``dtype`` and ``mesh`` (atoms split over
        devices) and the list's ``dr_threshold``, ``capacity_multiplier``, ``chunk``.
        Parameters are cast to JAX's default float (float64 under ``jax_enable_x64``).
        """
        self.require_a2i("Checkpoint.potential (MD)")
        neighbor_fn, _, energy_fn = a2i_periodic(box, self.config.model, species, **settings)
        return Potential.periodic(neighbor_fn, bound(energy_fn, default_float(self.params)), box)

    def warn_if_closer_than_training(self, closest: float, where: str) -> None:
        """Warns (:class:`ExtrapolationWarning`) if ``closest`` is below the closest pair of the training data."""
        trained = self.meta["statistics"].get("min_distance", 0.0)
        if closest < trained:
            warnings.warn(f"{where} has atoms {closest:.4g} apart, closer than any pair in the training data "
                          f"({trained:.4g}): the model is extrapolating", ExtrapolationWarning, stacklevel=3)


def unit_style(meta: dict[str, Any]) -> str:
    """The unit system of a checkpoint's data from its ``meta["units"]`` (the sampler writes
    "metal: ..." or "reduced ..."): ``"metal"``, ``"lj"`` (reduced LJ units) or ``""`` (unknown)."""
    text = str(meta.get("units", "")).lower()
    if text.startswith("metal"):
        return "metal"
    if "reduced" in text or text.startswith("lj"):
        return "lj"
    return ""


def step_directory(path: Path) -> Path:
    """The step directory that ``path`` names: a step directory, a manager directory (its latest
    step), a ``checkpoints`` directory or a work directory (best, else latest periodic)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / "meta").exists():
        return path
    for sub in ("checkpoints", "best", "periodic"):
        if (path / sub).is_dir() and any(p.name.isdigit() for p in (path / sub).rglob("*") if p.is_dir()):
            return step_directory(path / sub)
    steps = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not steps:
        raise CheckpointError(f"no checkpoint found in {path}")
    return steps[-1]


def restore(step_dir: Path, item: str, args: Any = None) -> Any:
    """One item of a step directory; damaged files are a :class:`CheckpointError` naming the item.
    ``args`` None: an array tree read into host NumPy arrays, whatever device wrote it (orbax would
    otherwise place each array on the device named in the checkpoint, which a machine without that
    device, or another jax that names its devices differently, does not have)."""
    handler = ocp.JsonCheckpointHandler() if isinstance(args, ocp.args.JsonRestore) else \
        ocp.StandardCheckpointHandler() if args is not None else ocp.PyTreeCheckpointHandler()
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            if args is None:
                stored = checkpointer.metadata(step_dir.absolute() / item)
                tree = getattr(getattr(stored, "item_metadata", stored), "tree", stored)  # orbax 0.12 / 0.11
                args = ocp.args.PyTreeRestore(restore_args=jax.tree_util.tree_map(
                    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
            return checkpointer.restore(step_dir.absolute() / item, args=args)
    except Exception as error:  # orbax, tensorstore and json raise many types for damaged files
        raise CheckpointError(f"checkpoint {step_dir} is corrupt or unreadable ({item}: "
                              f"{type(error).__name__}: {str(error)[:300]})") from error


def upgrade_stored_config(values: dict[str, Any]) -> dict[str, Any]:
    """A stored config dict in today's form: run settings that older versions kept in ``[model]``
    (``atom_chunk``, ``dtype``) are dropped, a final loss weight of -1 ("same as the initial
    weight") becomes None, and a run from before the state-point loss normalisation keeps the
    ``"dataset"`` one it was trained with."""
    values = {table: dict(entries) for table, entries in values.items()}
    model, train = values.get("model", {}), values.get("train", {})
    for key in ("atom_chunk", "dtype"):
        model.pop(key, None)
    for key in ("energy_weight_final", "force_weight_final"):
        if isinstance(train.get(key), (int, float)) and train[key] < 0:
            train[key] = None
    if train:
        train.setdefault("loss_normalization", "dataset")
    return values


def upgrade_stored_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Stored metadata in today's form: the config (:func:`upgrade_stored_config`), and the training
    statistics' mean square force under its name (older runs called it ``force_var``)."""
    meta["config"] = upgrade_stored_config(meta["config"])
    statistics = meta.get("statistics", {})
    if "force_var" in statistics:
        statistics.setdefault("force_mean_square", statistics.pop("force_var"))
    return meta


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Config, EMA parameters and metadata from a checkpoint, a checkpoint directory or a workdir."""
    step_dir = step_directory(Path(path))
    meta = restore(step_dir, "meta", ocp.args.JsonRestore())
    if not isinstance(meta, dict) or "config" not in meta or "symbols" not in meta:
        raise CheckpointError(f"checkpoint {step_dir} has no config or species symbols in its metadata")
    meta = upgrade_stored_meta(meta)
    config = experiment_from_dict(meta["config"])
    # Host arrays made uncommitted jax arrays: jit compiles a second program for arguments committed
    # to a device where the trainer's own (uncommitted) parameters were seen before.
    params = jax.tree_util.tree_map(jnp.asarray, restore(step_dir, "params"))
    return Checkpoint(step_dir, int(step_dir.name), config, params, meta)


# ----------------------------------------------------------------------------------------------
# Writing and resuming


def managers(workdir: Path) -> dict[str, ocp.CheckpointManager]:
    """The ``periodic`` (for resuming, last two kept) and ``best`` (lowest validation loss) managers."""
    periodic = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    best = ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["valid_loss"], best_mode="min",
                                        keep_checkpoints_without_metrics=False, enable_async_checkpointing=False)
    root = workdir.absolute() / "checkpoints"
    return dict(periodic=ocp.CheckpointManager(root / "periodic", options=periodic, item_names=ITEMS),
                best=ocp.CheckpointManager(root / "best", options=best, item_names=ITEMS))


def save(manager: ocp.CheckpointManager, step: int, state: Any, params: Any, meta: dict,
         metrics: dict | None = None) -> None:
    """Writes ``state`` (anything orbax stores), the ``params`` users load and ``meta``, synchronously."""
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               params=ocp.args.StandardSave(params),
                                               meta=ocp.args.JsonSave(meta)), metrics=metrics)
    manager.wait_until_finished()


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """``key: checkpoint x, now y`` for every setting that differs between two config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_differences(x, y, f"{prefix}{key}.")
        elif x != y and not (isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and list(x) == list(y)):
            out.append(f"{prefix}{key}: checkpoint {x!r}, now {y!r}")
    return out


def restore_for_resume(manager: ocp.CheckpointManager, abstract_state: Any, meta: dict) -> tuple[Any, int]:
    """The state of the latest periodic checkpoint (shaped like ``abstract_state``) and its step,
    checked against this run's config, species and splits."""
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"nothing to resume: no checkpoint in {manager.directory}")
    step_dir = Path(manager.directory) / str(step)
    stored = restore(step_dir, "meta", ocp.args.JsonRestore())
    problems = config_differences(upgrade_stored_config(stored.get("config", {})), meta["config"])
    if stored.get("symbols") != meta["symbols"]:
        problems.append(f"species symbols: checkpoint {stored.get('symbols')}, now {meta['symbols']}")
    if stored.get("splits") != meta["splits"]:
        problems.append("the data splits differ (another dataset or split seed)")
    if problems:
        raise CheckpointError(f"checkpoint {step_dir} does not match this run: " + "; ".join(problems))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return restore(step_dir, "state", ocp.args.StandardRestore(abstract)), step
