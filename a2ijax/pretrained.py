"""Pretrained models shipped with the package: the paper's three challenges, loadable by name.

    >>> from a2ijax import pretrained
    >>> checkpoint = pretrained.load("lj")          # a Checkpoint, as load_checkpoint gives
    >>> neighbor_fn, energy_fn, displacement_fn, shift_fn = checkpoint.potential(box)

``A2ICalculator.from_pretrained("ka")`` and ``a2ijax md --model sw ...`` take the same names.

A model is a directory ``a2ijax/models/<name>/`` of three small files, written by :func:`export`
from a training run's best checkpoint:

* ``params.msgpack``: the EMA parameters (flax serialisation);
* ``meta.json``: what the checkpoint's metadata holds (experiment config, species symbols, dataset
  statistics, splits), the checkpoint's step, and ``commands``: the exact ``a2ijax generate`` and
  ``a2ijax train`` commands that made it;
* ``report.json``: the run's test-split report (errors per state point), the figures the model
  is documented with and tested against (``tests/test_pretrained.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from a2ijax.checkpoint import Checkpoint, CheckpointError, load_checkpoint, upgrade_stored_meta
from a2ijax.config import experiment_from_dict
from a2ijax.errors import InputError
from a2ijax.files import atomic_write

MODELS = Path(__file__).parent / "models"
FILES = ("params.msgpack", "meta.json", "report.json")


def names() -> list[str]:
    """The shipped models' names."""
    return sorted(p.name for p in MODELS.iterdir() if (p / "meta.json").is_file()) if MODELS.is_dir() else []


def directory(name: str) -> Path:
    """The directory of the shipped model ``name``; an unknown name is an error listing the known ones."""
    path = MODELS / name
    if not name or "/" in name or not (path / "meta.json").is_file():
        raise InputError(f"no pretrained model named {name!r}; shipped models: {names()}")
    return path


def load(name: str) -> Checkpoint:
    """The shipped model ``name`` as a :class:`a2ijax.checkpoint.Checkpoint` (``.potential(box)``
    for jax-md, ``.config``, ``.params``, ``.meta``, with ``meta["report"]`` its test report)."""
    return load_directory(directory(name))


def load_directory(path: str | Path) -> Checkpoint:
    """A model in the shipped layout (``meta.json``, ``params.msgpack``, ``report.json``) from any
    directory: an exported run, or an earlier version of a shipped model kept for comparison."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        meta["report"] = json.loads((path / "report.json").read_text())
        params = flax.serialization.msgpack_restore((path / "params.msgpack").read_bytes())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"pretrained model in {path} is corrupt or unreadable: {error}") from error
    meta = upgrade_stored_meta(meta)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), params)
    return Checkpoint(path, int(meta["step"]), experiment_from_dict(meta["config"]), params, meta)


def resolve(checkpoint: str | Path | Checkpoint) -> Checkpoint:
    """A loaded checkpoint as it is, a checkpoint directory (``load_checkpoint``), a model in the
    shipped layout (:func:`load_directory`), or the name of a shipped model: what the commands that
    take either accept."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if (Path(checkpoint) / "params.msgpack").is_file():
        return load_directory(checkpoint)
    if not Path(checkpoint).exists() and str(checkpoint) in names():
        return load(str(checkpoint))
    return load_checkpoint(checkpoint)


def export(run: str | Path, out: str | Path, commands: list[str]) -> Path:
    """Writes the best checkpoint of the training run in ``run`` (a work directory), its report and
    the ``commands`` that made it into the directory ``out`` (see the module docstring)."""
    run, out = Path(run), Path(out)
    checkpoint = load_checkpoint(run / "checkpoints" / "best")
    checkpoint.require_a2i("a pretrained model")
    report = json.loads((run / "report.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = dict(checkpoint.meta, step=checkpoint.step, commands=list(commands))
    params = jax.tree_util.tree_map(np.asarray, checkpoint.params)
    atomic_write(out / "params.msgpack", lambda f: f.write(flax.serialization.msgpack_serialize(params)), binary=True)
    atomic_write(out / "meta.json", lambda f: json.dump(meta, f, indent=1))
    atomic_write(out / "report.json", lambda f: json.dump(report, f, indent=1))
    return out
