"""A committee of trained models: MD with the mean force, and how much the members disagree.

Members share one architecture and differ by their training seed (initial parameters and data
order: ``a2ijax train CONFIG --members M``). Their parameters are stacked along a leading axis and
the members are ``jax.vmap``-ped over it, so the neighbour list, the displacements and the
integrator are shared and one compiled step advances the system under all of them::

    committee = a2ijax.committee.load("runs/lj_committee")   # the work directory of --members
    neighbor_fn, energy_fn, displacement_fn, shift_fn = committee.potential(box)   # the mean energy
    disagreement_fn = committee.disagreement(box)             # [N] per atom, same call signature

The mean energy's gradient is the mean of the members' forces. The disagreement of atom ``i`` is
the members' force spread, ``sigma_i = sqrt(mean_a var_m F_mia)``: the sample variance across the
``M`` members of each Cartesian component ``a``, averaged over the components. It is on the scale of
the per-component force RMSE that reports give (:mod:`a2ijax.report`), so it can be compared with
the true error directly (``experiments/calibration.py``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from a2ijax.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from a2ijax.errors import InputError
from a2ijax.potential import Potential, a2i_periodic, default_float

Array = jax.Array
INDEX = "committee.json"  # in a committee's work directory: the members' work directories and seeds


def stack(params: Sequence[Any]) -> Any:
    """The members' parameter pytrees stacked along a new leading axis ``[M, ...]``."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *params)


def member_forces(energy_fn: Callable[..., Array], params: Any, R: Array, **kwargs) -> tuple[Array, Array]:
    """``(E [M], F [M, N, dim])`` of every member: ``energy_fn(p, R, **kwargs)`` vmapped over the stacked
    ``params`` (leading axis ``M``); ``R`` and ``kwargs`` (neighbour list, species, box) are shared."""
    def one(p: Any) -> tuple[Array, Array]:
        energy, grad = jax.value_and_grad(lambda R: energy_fn(p, R, **kwargs))(R)
        return energy, -grad

    return jax.vmap(one)(params)


def force_disagreement(forces: Array) -> Array:
    """``[..., N]``: per atom, the sample variance across members (axis 0 of ``forces [M, ..., N, dim]``)
    of each force component, averaged over the components, square-rooted."""
    return jnp.sqrt(jnp.mean(jnp.var(forces, axis=0, ddof=1), axis=-1))


@dataclasses.dataclass
class Committee:
    """``M >= 2`` checkpoints of one architecture, their parameters stacked ``[M, ...]``.

    Stands in for a :class:`a2ijax.checkpoint.Checkpoint` wherever MD needs one (``config``,
    ``meta``, ``symbols``, ``potential``, ``warn_if_closer_than_training``); the metadata are the
    first member's (all members were trained on the same data).
    """

    members: list[Checkpoint]
    params: Any

    def __post_init__(self):
        if len(self.members) < 2:
            raise InputError(f"a committee needs at least 2 members, got {len(self.members)}")
        first = self.members[0]
        for member in self.members:
            member.require_a2i("a committee")
            if member.config.model != first.config.model or member.symbols != first.symbols:
                raise CheckpointError(f"committee member {member.path} differs from {first.path} in its model "
                                      "config or species: members must share one architecture")

    @property
    def config(self):
        return self.members[0].config

    @property
    def meta(self) -> dict[str, Any]:
        return self.members[0].meta

    @property
    def symbols(self) -> tuple[str, ...]:
        return self.members[0].symbols

    @property
    def size(self) -> int:
        return len(self.members)

    def warn_if_closer_than_training(self, closest: float, where: str) -> None:
        self.members[0].warn_if_closer_than_training(closest, where)

    def potential(self, box: Any, species: Array | None = None, **settings) -> Potential:
        """As :meth:`a2ijax.checkpoint.Checkpoint.potential`, with the members' mean energy (whose
        forces are the mean of the members' forces)."""
        neighbor_fn, _, energy_fn = a2i_periodic(box, self.config.model, species, **settings)
        params = default_float(self.params)

        def energy(R: Array, neighbor: Any = None, **kwargs) -> Array:
            return jnp.mean(jax.vmap(lambda p: energy_fn(p, R, neighbor=neighbor, **kwargs))(params))

        return Potential.periodic(neighbor_fn, energy, box)

    def disagreement(self, box: Any, species: Array | None = None, **settings) -> Callable[..., Array]:
        """``fn(R, neighbor, **kw) -> [N]``: the members' force disagreement per atom
        (:func:`force_disagreement`), for the neighbour lists of :meth:`potential` with the same settings."""
        _, _, energy_fn = a2i_periodic(box, self.config.model, species, **settings)
        params = default_float(self.params)

        def fn(R: Array, neighbor: Any = None, **kwargs) -> Array:
            return force_disagreement(member_forces(energy_fn, params, R, neighbor=neighbor, **kwargs)[1])

        return fn


def from_checkpoints(members: Sequence[Checkpoint]) -> Committee:
    """A committee of loaded checkpoints (or pretrained models)."""
    members = list(members)
    if len(members) < 2:
        raise InputError(f"a committee needs at least 2 members, got {len(members)}")
    return Committee(members, stack([m.params for m in members]))


def is_committee(path: str | Path) -> bool:
    """Whether ``path`` is the work directory of a committee (``a2ijax train --members``)."""
    return (Path(path) / INDEX).is_file()


def load(path: str | Path | Sequence[str | Path]) -> Committee:
    """The committee in the work directory ``path`` (written by ``a2ijax train --members M``), or one
    of the checkpoints (work directories) in a list of paths."""
    if isinstance(path, (str, Path)):
        index = Path(path) / INDEX
        if not index.is_file():
            raise CheckpointError(f"{path} is not a committee's work directory (no {INDEX}; train one with "
                                  "`a2ijax train CONFIG --members M`)")
        try:
            paths = [Path(path) / member for member in json.loads(index.read_text())["members"]]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index} is corrupt: {error}") from error
    else:
        paths = [Path(p) for p in path]
    return from_checkpoints([load_checkpoint(p) for p in paths])


def load_potential(path: str | Path) -> Checkpoint | Committee:
    """A committee's work directory as a :class:`Committee`, anything else as a checkpoint."""
    return load(path) if is_committee(path) else load_checkpoint(path)
