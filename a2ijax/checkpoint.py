"""Checkpoints: orbax save, load and resume, and the potential a checkpoint describes.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax_md import space

from a2ijax.baselines import baseline_neighbor_list
from a2ijax.config import ExperimentConfig, experiment_from_dict
from a2ijax.model import A2IConfig
from a2ijax.potential import a2i_neighbor_list

Array = jax.Array
ITEMS = ("state", "params", "meta")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the run that wants it."""


class ExtrapolationWarning(UserWarning):
    """Atoms are closer than any pair in the training data: the model is extrapolating."""


# ----------------------------------------------------------------------------------------------
# The potential a config describes, in the shape the trainer and the evaluators use


def training_space(cutoff: float) -> tuple[Callable, Array]:
    """A ``periodic_general`` displacement whose cell comes with every call as ``box=``, and a
    placeholder cell wide enough for the builders' box checks."""
    box = jnp.eye(3) * 4.0 * cutoff
    return space.periodic_general(box, fractional_coordinates=False)[0], box


def a2i_builder(config: A2IConfig, *, atom_chunk: int | None = None, dtype: Any = None) -> tuple[Callable, Callable]:
    """``(init_fn, energy_fn)`` of the A2I potential with each frame's cell passed as ``box=``."""
    _, init_fn, energy_fn = a2i_neighbor_list(*training_space(config.cutoff), config, atom_chunk=atom_chunk,
                                              dtype=dtype)
    return init_fn, energy_fn


def fixed_species(dataset: Any, config: ExperimentConfig) -> np.ndarray | None:
    """The species ``[N]`` shared by every frame of ``dataset``, for a ``[baseline]`` potential (None
    for A2I, which pads and masks atoms); frames that differ in atoms are an error naming the first."""
    if not config.baseline.name:
        return None
    first = dataset.species[0]
    for index, species in enumerate(dataset.species):
        if len(species) != len(first) or np.any(species != first):
            raise ValueError(f"{dataset.path}, frame {index}: jax-md's {config.baseline.name} cannot pad or mask "
                             f"atoms, so every frame must hold the same atoms in the same order; frame 0 has "
                             f"{len(first)} atoms, frame {index} has {len(species)} (or another species order)")
    return first


def potential_builder(config: ExperimentConfig, species: np.ndarray | None = None, *,
                      atom_chunk: int | None = None) -> tuple[Callable, Callable, bool]:
    """``(init_fn, energy_fn, per_atom)`` of the potential that ``config`` trains: A2I, or the jax-md
    potential named in ``[baseline]`` (``per_atom``: whether it gives per-atom energies).

    A baseline is wrapped as ``E = s * E_net + sum_i shift[species_i]`` with the trainer's per-species
    shift and a scale ``s``, as A2I carries them inside, so both start from the same fitted offsets.
    ``species`` (``[N]``, from :func:`fixed_species`) is fixed into the baselines when they are built.
    """
    name = config.baseline.name
    if not name:
        return (*a2i_builder(config.model, atom_chunk=atom_chunk), True)
    model = config.model
    _, net_init, net_energy = baseline_neighbor_list(
        name, *training_space(model.cutoff), cutoff=model.cutoff, species=species, n_species=model.n_species,
        avg_neighbors=model.avg_neighbors, key=jax.random.PRNGKey(config.train.seed))

    def init_fn(key, R, neighbor, species=None, box=None):
        del species  # fixed when built
        net = net_init(key, R, neighbor, box=box)
        dtype = jnp.result_type(float)
        return {"params": dict(net=net, energy_shift=jnp.zeros((model.n_species,), dtype),
                               energy_scale=jnp.ones((1,), dtype))}

    def energy_fn(params, R, neighbor, species=None, mask=None, box=None, per_atom=False):
        del mask  # every frame has the same atoms (fixed_species checks); padding frames carry zero weight
        if per_atom:
            raise ValueError(f"jax-md's {name} gives no per-atom energies")
        p = params["params"]
        species = jnp.zeros(R.shape[:1], jnp.int32) if species is None else species
        return p["energy_scale"][0] * net_energy(p["net"], R, neighbor, box=box) + jnp.sum(
            p["energy_shift"][species])

    return init_fn, energy_fn, False


def periodic_potential(model: A2IConfig, box: Any, species: Array | None = None, **settings
                       ) -> tuple[Any, Callable[..., Array], Callable, Callable]:
    """``(neighbor_fn, energy_fn(params, R, neighbor, **kw), displacement_fn, shift_fn)`` of the A2I
    potential in a periodic ``box`` (``[3, 3]``, lattice vectors as columns; real coordinates);
    ``settings`` are the run settings and neighbour-list options of :func:`a2ijax.a2i_neighbor_list`."""
    box = jnp.asarray(box, jnp.result_type(float))
    displacement, shift = space.periodic_general(box, fractional_coordinates=False)
    if not np.allclose(np.asarray(box), np.diag(np.diag(np.asarray(box)))):
        settings.setdefault("disable_cell_list", True)  # jax-md's cell list assumes an orthorhombic box
    neighbor_fn, _, energy_fn = a2i_neighbor_list(displacement, box, model, species=species, **settings)
    return neighbor_fn, energy_fn, displacement, shift


def default_float(params: Any) -> Any:
    """``params`` cast to JAX's default float (float64 under ``jax_enable_x64``)."""
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.result_type(float)), params)


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
            raise ValueError(f"checkpoint {self.path} holds jax-md's {self.config.baseline.name}, not an A2I model; "
                             f"{what} serves A2I checkpoints (build the baseline with "
                             "a2ijax.baselines.baseline_neighbor_list and load its params from the checkpoint)")

    def potential(self, box: Any, species: Array | None = None, *, atom_chunk: int | None = None, dtype: Any = None,
                  mesh: Any = None, **nl_kwargs) -> tuple[Any, Callable[..., Array], Callable, Callable]:
        """The trained potential in a periodic ``box`` (``[3, 3]``, lattice vectors as columns; real
        coordinates) for MD: ``(neighbor_fn, energy_fn(R, neighbor, **kw), displacement_fn, shift_fn)``.

        ``atom_chunk``, ``dtype`` and ``mesh`` (atoms split over devices) are run settings (see
        :func:`a2ijax.a2i_neighbor_list`).
        Parameters are cast to JAX's default float (float64 under ``jax_enable_x64``).
        """
        self.require_a2i("Checkpoint.potential (MD)")
        neighbor_fn, energy_fn, displacement, shift = periodic_potential(
            self.config.model, box, species, atom_chunk=atom_chunk, dtype=dtype, mesh=mesh, **nl_kwargs)
        params = default_float(self.params)

        def energy(R: Array, neighbor: Any = None, **kwargs) -> Array:
            return energy_fn(params, R, neighbor=neighbor, **kwargs)

        return neighbor_fn, energy, displacement, shift

    def warn_if_closer_than_training(self, closest: float, where: str) -> None:
        """Warns (:class:`ExtrapolationWarning`) if ``closest`` is below the closest pair of the training data."""
        trained = self.meta["statistics"].get("min_distance", 0.0)
        if closest < trained:
            warnings.warn(f"{where} has atoms {closest:.4g} apart, closer than any pair in the training data "
                          f"({trained:.4g}): the model is extrapolating", ExtrapolationWarning, stacklevel=3)


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


def restore(step_dir: Path, item: str, args: Any) -> Any:
    """One item of a step directory; damaged files are a :class:`CheckpointError` naming the item."""
    handler = ocp.JsonCheckpointHandler() if isinstance(args, ocp.args.JsonRestore) else \
        ocp.StandardCheckpointHandler()
    try:
        with ocp.Checkpointer(handler) as checkpointer:
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


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Config, EMA parameters and metadata from a checkpoint, a checkpoint directory or a workdir."""
    step_dir = step_directory(Path(path))
    meta = restore(step_dir, "meta", ocp.args.JsonRestore())
    if not isinstance(meta, dict) or "config" not in meta or "symbols" not in meta:
        raise CheckpointError(f"checkpoint {step_dir} has no config or species symbols in its metadata")
    meta["config"] = upgrade_stored_config(meta["config"])
    config = experiment_from_dict(meta["config"])
    params = restore(step_dir, "params", ocp.args.StandardRestore())
    # Through NumPy: orbax returns arrays committed to a device, and jit compiles a second program for
    # committed arguments where the trainer's own (uncommitted) parameters were seen before.
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), params)
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
