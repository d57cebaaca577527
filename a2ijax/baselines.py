"""jax-md's own neural potentials in this package's builder shape, for benchmarks and training.

``baseline_neighbor_list(name, displacement_fn, box, ...)`` returns ``(neighbor_fn, init_fn, energy_fn)``
like :func:`a2ijax.a2i_neighbor_list`: ``params = init_fn(key, R, neighbor)`` is a plain pytree of
trainable arrays and ``energy_fn(params, R, neighbor, **kwargs)`` the total energy (``kwargs`` such as
``box=`` reach the displacement function). The three models:

* ``nequip``: ``jax_md.energy.nequip_neighbor_list`` with ``nequip.default_config()`` (``r_max`` =
  cutoff, ``n_elements`` = species, ``shift = 0``, ``scale = 1``); Sparse neighbour list; species as
  a one-hot ``atoms`` array at every call.
* ``graph_network``: ``jax_md.energy.graph_network_neighbor_list`` (default ``mlp_sizes (64, 64)``, two
  recurrences), the one-hot species as node features, fixed when the potential is built.
* ``behler_parrinello``: ``jax_md.energy.behler_parrinello_neighbor_list`` with ``format=Dense`` (its
  default Sparse format pairs every edge with every edge in the angular terms: wrong and quadratic in
  memory, see docs/design.md), default symmetry functions at the cutoff, species fixed when built.

GraphNetwork and Behler-Parrinello are flax-nnx modules whose jax-md ``energy_fn`` carries its own
weights; here their ``nnx.Param`` state is split out as a plain dict, so all three are
params-in, energy-out functions that optax and orbax handle like the A2I parameters. None of them
gives per-atom energies or masks padded atoms: frames must all have the same atoms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import energy, partition

from a2ijax.config import BASELINES
from a2ijax.errors import InputError

Array = jax.Array

#: What each baseline is, with the settings that differ from jax-md's defaults (recorded in results).
DESCRIPTIONS = {
    "nequip": "jax_md.energy.nequip_neighbor_list, nequip.default_config() with r_max = cutoff, n_elements = "
              "species, n_neighbors = average neighbours, shift = 0, scale = 1 (Sparse)",
    "graph_network": "jax_md.energy.graph_network_neighbor_list(r_cutoff = cutoff), default mlp_sizes (64, 64), "
                     "2 recurrences, one-hot species as node features (Dense)",
    "behler_parrinello": "jax_md.energy.behler_parrinello_neighbor_list(sym_kwargs cutoff_distance = cutoff, "
                         "format = Dense: the Sparse angular terms pair every edge with every edge), default "
                         "symmetry functions and mlp_sizes (30, 30)",
}


def one_hot_species(species: Array | None, n_atoms: int, n_species: int) -> Array:
    species = jnp.zeros((n_atoms,), jnp.int32) if species is None else jnp.asarray(species)
    return jax.nn.one_hot(species, n_species, dtype=jnp.result_type(float))


def sparse_from_dense(neighbor: partition.NeighborList) -> partition.NeighborList:
    """The same neighbours as a Sparse ``[2, N K]`` (receivers, senders) list; empty slots become ``(N, N)``."""
    idx = neighbor.idx
    n, k = idx.shape
    senders = idx.reshape(-1)
    receivers = jnp.where(senders < neighbor.reference_position.shape[0], jnp.repeat(jnp.arange(n), k), senders)
    return neighbor.set(idx=jnp.stack([receivers, senders]), format=partition.Sparse)


def _nnx_params(energy_fn: Callable) -> tuple[Callable, dict]:
    """Splits jax-md's nnx module into a pure apply ``(params, R, neighbor, **kw)`` and its Param dict."""
    from flax import nnx

    graphdef, params, rest = nnx.split(energy_fn.model, nnx.Param, ...)

    def apply(pure: dict, R: Array, neighbor: Any, **kwargs) -> Array:
        state = jax.tree_util.tree_map(lambda x: x, params)  # a fresh State with this call's arrays
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(graphdef, state, rest)(R, neighbor, **kwargs)

    return apply, nnx.to_pure_dict(params)


def baseline_neighbor_list(name: str, displacement_fn: Callable, box: Any, *, cutoff: float,
                           species: Array | np.ndarray | None = None, n_species: int = 1,
                           avg_neighbors: float = 32.0, key: Array | None = None,
                           nequip_sizes: dict[str, Any] | None = None,
                           **nl_kwargs) -> tuple[partition.NeighborFn, Callable, Callable]:
    """``(neighbor_fn, init_fn, energy_fn)`` of jax-md's potential ``name`` (one of :data:`BASELINES`).

    ``species`` (``[N]`` ids) is fixed here for ``graph_network`` and ``behler_parrinello`` (a
    ``species=`` at a call is an error, never silently ignored); ``nequip`` takes ``species=`` at
    every call too. The nnx models draw their weights from ``key`` when built
    (``init_fn`` returns those); NequIP draws them from ``init_fn``'s key. ``energy_fn`` accepts a
    Dense list for every model (NequIP's is converted to Sparse inside). ``nequip_sizes``: fields of
    ``nequip.default_config()`` to change (``graph_net_steps``, ``hidden_irreps``, ...); NequIP only.
    """
    if nequip_sizes and name != "nequip":
        raise InputError(f"nequip_sizes are NequIP's; {name!r} keeps jax-md's default sizes")
    key = jax.random.PRNGKey(0) if key is None else key
    dr_threshold = nl_kwargs.pop("dr_threshold", 0.0)
    if name == "nequip":
        from jax_md.nn import nequip

        cfg = nequip.default_config()
        cfg.r_max, cfg.n_elements, cfg.n_neighbors = float(cutoff), int(n_species), float(avg_neighbors)
        cfg.shift, cfg.scale = 0.0, 1.0  # jax-md takes these from a named dataset otherwise
        for field, value in (nequip_sizes or {}).items():
            if field not in cfg or field in ("r_max", "n_elements", "n_neighbors", "shift", "scale"):
                raise InputError(f"nequip_sizes: {field!r} is not a size of jax-md's NequIP config "
                                 "(the cutoff, species and scales come from the other arguments)")
            cfg[field] = value
        neighbor_fn, init, apply = energy.nequip_neighbor_list(displacement_fn, box, cfg,
                                                                dr_threshold=dr_threshold, **nl_kwargs)
        fixed = species

        def atoms(R, kwargs):
            return one_hot_species(kwargs.pop("species", fixed), R.shape[0], n_species)

        @jax.jit  # one compiled program: run op by op, NequIP's initialisers dispatch ~300 small ones
        def init_program(key, R, neighbor, one_hot, kwargs):
            return init(key, R, _sparse(neighbor), atoms=one_hot, **kwargs)

        def init_fn(key, R, neighbor, **kwargs):
            return init_program(key, R, neighbor, atoms(R, kwargs), kwargs)

        def energy_fn(params, R, neighbor, **kwargs):
            return apply(params, R, _sparse(neighbor), atoms=atoms(R, kwargs), **kwargs)

        return neighbor_fn, init_fn, energy_fn
    if name not in ("graph_network", "behler_parrinello"):
        raise InputError(f"unknown baseline {name!r}; known: {BASELINES}")
    if name == "graph_network":
        nodes = None if species is None else one_hot_species(species, len(species), n_species)
        neighbor_fn, model_fn = energy.graph_network_neighbor_list(
            displacement_fn, box, cutoff, dr_threshold, key=key, nodes=nodes, format=partition.Dense, **nl_kwargs)
    else:
        neighbor_fn, model_fn = energy.behler_parrinello_neighbor_list(
            displacement_fn, box, key=key, species=None if species is None else jnp.asarray(species),
            sym_kwargs=dict(cutoff_distance=cutoff), dr_threshold=dr_threshold, format=partition.Dense, **nl_kwargs)
    apply, params = _nnx_params(model_fn)

    def init_fn(key, R, neighbor, **kwargs):
        del key, R, neighbor, kwargs  # the weights were drawn when the module was built
        return jax.tree_util.tree_map(jnp.copy, params)

    def energy_fn(params, R, neighbor, **kwargs):
        if kwargs.pop("species", None) is not None:
            raise InputError(f"jax-md's {name} takes its species when it is built (baseline_neighbor_list("
                             "species=...)), not at each call: a species= here would be ignored")
        return apply(params, R, neighbor, **kwargs)

    return neighbor_fn, init_fn, energy_fn


def _sparse(neighbor: partition.NeighborList) -> partition.NeighborList:
    return sparse_from_dense(neighbor) if neighbor.format == partition.Dense else neighbor
