"""jax-md glue: the A2I Transformer as a potential with jax-md's builder shape.

``a2i_neighbor_list`` mirrors ``jax_md.energy.nequip_neighbor_list``::

    neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement_fn, box, config, species)
    nbrs   = neighbor_fn.allocate(R)               # Dense [N, K] list, empty slots hold N
    params = init_fn(key, R, neighbor=nbrs)        # a plain pytree
    E      = energy_fn(params, R, neighbor=nbrs)   # scalar; per_atom=True gives [N]
    F      = quantity.force(lambda R, **kw: energy_fn(params, R, **kw))(R, neighbor=nbrs)

Forces are only ever ``-grad E``, and stress comes from ``jax_md.quantity.stress`` (extra keyword
arguments such as ``box=`` and ``perturbation=`` go to the displacement function). ``a2i_pair`` is
the all-pairs variant for small systems, with the same signatures.

``a2i_periodic(box, config, species)`` is the same potential in a periodic box of any shape, in real
coordinates, on this package's linear-memory neighbour list (:mod:`a2ijax.neighbors`): what the
trained models run on (``Checkpoint.potential``, committees, ``a2ijax md``, active learning,
analysis). A :class:`Potential` bundles it for MD with its parameters bound: ``(neighbor_fn,
energy_fn(R, neighbor, **kw), displacement_fn, shift_fn)``.

Errors:
* Called outside ``jit`` (concrete arrays), bad input raises an :class:`a2ijax.errors.InputError`
  naming the problem: shape, dtype, species out of range, NaN/inf positions, an overflowed
  neighbour list.
* Inside ``jit`` nothing can raise, so errors are carried as data: a list that needs reallocating
  (``neighbor.did_buffer_overflow``; its error bits name why, :func:`a2ijax.neighbors.describe`) or
  a species id out of range makes the energy and the forces NaN instead of silently dropping
  neighbours. Check ``did_buffer_overflow`` between jitted steps and call :func:`reallocate`, as
  jax-md does; :func:`a2ijax.md.run` does both.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jax_md import partition, space

from a2ijax.baselines import baseline_neighbor_list
from a2ijax.errors import InputError
from a2ijax.geometry import lattice_matrix, perpendicular_widths
from a2ijax.model import A2IConfig, A2ITransformer, is_float_dtype
from a2ijax.neighbors import ListError, PeriodicNeighborList, describe, masked_displacements, periodic_neighbor_list
from a2ijax.neighbors import reallocate as reallocate  # re-exported: a2ijax.reallocate

if TYPE_CHECKING:
    from a2ijax.config import ExperimentConfig

Array = jax.Array
DisplacementFn = Callable[..., Array]


class NeighborListOverflowError(InputError):
    """The neighbour list had more neighbours than slots: reallocate it (see ``reallocate``)."""


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_box(displacement_fn: DisplacementFn, box: Any, cutoff: float, fractional_coordinates: bool = False) -> None:
    """Raises if a periodic direction of ``box`` is too narrow for minimum-image displacements, or if
    ``displacement_fn`` and ``fractional_coordinates`` disagree about the coordinates.

    A direction is periodic when ``displacement_fn`` maps one lattice vector to zero: the lattice
    column in real coordinates, or the unit vector in fractional ones (``space.periodic_general``'s
    default), so the check holds whichever convention the displacement uses; ``space.free`` boxes are
    never rejected. Minimum-image displacements see a single image of each neighbour only if every
    perpendicular width of the box exceeds ``2 * cutoff``.
    """
    dim = int(np.shape(box)[0]) if np.ndim(box) else 3  # a scalar side: a cube in three dimensions
    lattice = lattice_matrix(box, dim)
    if not np.all(np.isfinite(lattice)) or np.linalg.det(lattice) == 0:
        raise InputError(f"box {lattice.tolist()} is singular or not finite")
    widths = perpendicular_widths(lattice)
    origin = jnp.zeros((dim,))

    def maps_to_zero(probe: np.ndarray) -> bool:
        image = np.asarray(displacement_fn(jnp.asarray(probe, origin.dtype), origin))
        return bool(np.linalg.norm(image) < 1e-6 * max(np.linalg.norm(probe), 1.0))

    for axis in range(dim):
        real, fractional = maps_to_zero(lattice[:, axis]), maps_to_zero(np.eye(dim)[axis])
        if fractional and not real and not fractional_coordinates:
            raise InputError("displacement_fn takes fractional coordinates (space.periodic_general's default) but "
                             "fractional_coordinates=False: pass fractional_coordinates=True to the builder, or "
                             "build the space with fractional_coordinates=False")
        if real and not fractional and fractional_coordinates:
            raise InputError("fractional_coordinates=True but displacement_fn takes real coordinates: build the "
                             "space with space.periodic_general(box) (fractional by default) or drop the option")
        if (real or fractional) and widths[axis] <= 2.0 * cutoff:
            raise InputError(
                f"box too small for the cutoff: the periodic box is {widths[axis]:.6g} wide along "
                f"lattice vector {axis}, but minimum-image displacements need more than "
                f"2 x cutoff = {2.0 * cutoff:.6g}. Use a larger box (replicate the cell) or a "
                "smaller cutoff.")


def default_atom_chunk(backend: str | None = None) -> int:
    """Atoms per rematerialised chunk when none is given: 32 on a CPU (the ``[chunk, H, K, K]``
    attention stays in cache: fastest there, docs/design.md), 4,096 on accelerators (enough to fill
    the device, memory still linear in N)."""
    return 32 if (backend or jax.default_backend()) == "cpu" else 4096


def run_settings(atom_chunk: int | None, dtype: Any) -> tuple[int, Any]:
    """Checked ``(atom_chunk, dtype)`` of a builder: ``atom_chunk`` None takes the backend's default."""
    chunk = default_atom_chunk() if atom_chunk is None else atom_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 0:
        raise InputError(f"atom_chunk must be an int >= 0 (0: all atoms at once), got {atom_chunk!r}")
    if dtype is not None and not is_float_dtype(dtype):
        raise InputError(f"dtype must name a floating compute dtype (or None), got {dtype!r}")
    return int(chunk), dtype


def _check_inputs(config: A2IConfig, R: Array, species: Array | None, mask: Array | None) -> None:
    """Shape and dtype checks always; value checks (NaN, species range) on concrete arrays only."""
    if R.ndim != 2:
        raise InputError(f"positions R must have shape [n_atoms, spatial_dim], got shape {R.shape}")
    if not jnp.issubdtype(R.dtype, jnp.floating):
        raise InputError(f"positions R must be floating point, got dtype {R.dtype}")
    n = R.shape[0]
    if _is_concrete(R) and not np.all(np.isfinite(np.asarray(R))):
        bad = np.argwhere(~np.all(np.isfinite(np.asarray(R)), axis=1))[:, 0]
        raise InputError(f"positions contain NaN or inf for atoms {bad[:10].tolist()}")
    if species is not None:
        if species.shape != (n,):
            raise InputError(f"species must have shape [n_atoms] = ({n},), got {species.shape}")
        if not jnp.issubdtype(species.dtype, jnp.integer):
            raise InputError(f"species must be integer ids, got dtype {species.dtype}")
        if _is_concrete(species):
            s = np.asarray(species)
            if s.size and (s.min() < 0 or s.max() >= config.n_species):
                raise InputError(
                    f"species ids must lie in [0, {config.n_species}) (config.n_species = "
                    f"{config.n_species}), got ids in [{s.min()}, {s.max()}]")
    elif config.n_species > 1:
        raise InputError(f"config.n_species = {config.n_species}: pass species=[n_atoms] ids")
    if mask is not None:
        if mask.shape != (n,):
            raise InputError(f"mask must have shape [n_atoms] = ({n},), got {mask.shape}")
        if mask.dtype != jnp.bool_:
            raise InputError(f"mask must be boolean (True for real atoms), got dtype {mask.dtype}")


def model_inputs(R: Array, idx: Array, displacement_fn: DisplacementFn, species: Array | None,
                 mask: Array | None, centers: Array | None = None, **kwargs) -> tuple[Array, Array, Array, Array]:
    """The model's per-atom inputs from a Dense neighbour index ``idx [n, K]`` (empty slots hold ``N``).

    Row ``r`` of ``idx`` lists the neighbours of atom ``centers[r]`` (default: the first ``n`` atoms of
    ``R``). Returns displacements ``[n, K, dim]``, centre species ``[n]``, neighbour species ``[n, K]``
    and the pair mask ``[n, K]`` (:func:`masked_displacements`; padded atoms are neither centres nor
    neighbours).
    """
    n = idx.shape[0]
    species = jnp.zeros((R.shape[0],), jnp.int32) if species is None else species
    pick = (lambda x: x[:n]) if centers is None else (lambda x: x[centers])
    dR, pair_mask = masked_displacements(R, idx, displacement_fn, centers, **kwargs)
    j = jnp.where(pair_mask, idx, 0)
    if mask is not None:
        pair_mask = pair_mask & pick(mask)[:, None] & mask[j]
    return dR, pick(species), species[j], pair_mask


def per_atom_energies(model: A2ITransformer, params: Any, R: Array, idx: Array, displacement_fn: DisplacementFn,
                      species: Array | None, mask: Array | None, atom_chunk: int = 0, centers: Array | None = None,
                      **kwargs) -> Array:
    """``[n]`` energies of the atoms whose neighbours are the rows of ``idx [n, K]`` (``centers``: which
    atoms those are; default the first ``n``), in rematerialised chunks of ``atom_chunk`` rows (0: all).

    Each chunk gathers its own displacements inside ``jax.checkpoint``, so what stays in memory
    between the forward and the backward pass is the index and the positions, not ``[N, K, dim]``
    inputs or the ``[chunk, H, K, M]`` attention of every chunk: memory is bounded by one chunk
    beyond what grows with ``N``. Rows are padded to whole chunks with empty slots, and cut off again.
    """
    R, n = jnp.asarray(R), idx.shape[0]  # NumPy positions cannot be indexed by traced chunk rows
    rows = jnp.arange(n, dtype=jnp.int32) if centers is None else centers

    def apply(block_idx: Array, block_rows: Array) -> Array:
        inputs = model_inputs(R, block_idx, displacement_fn, species, mask, block_rows, **kwargs)
        return model.apply(params, *inputs)

    if atom_chunk == 0 or n <= atom_chunk:
        return apply(idx, rows)
    n_chunks = -(-n // atom_chunk)
    size = -(-n // n_chunks)
    pad = n_chunks * size - n
    idx = jnp.concatenate([idx, jnp.full((pad, idx.shape[1]), R.shape[0], idx.dtype)]).reshape(n_chunks, size, -1)
    rows = jnp.concatenate([rows, jnp.zeros((pad,), rows.dtype)]).reshape(n_chunks, size)
    energies = jax.lax.map(jax.checkpoint(lambda block: apply(*block)), (idx, rows))
    return energies.reshape(-1)[:n]


def _a2i_energy(model: A2ITransformer, atom_chunk: int, params: Any, R: Array, idx: Array,
                displacement_fn: DisplacementFn, species: Array | None, mask: Array | None,
                per_atom: bool, **kwargs) -> Array:
    """Total (or per-atom) energy from a Dense neighbour index ``idx [N, K]``."""
    energies = per_atom_energies(model, params, R, idx, displacement_fn, species, mask, atom_chunk, **kwargs)
    if mask is not None:
        energies = jnp.where(mask, energies, 0.0)
    return energies if per_atom else jnp.sum(energies)


def _sharded_energy(model: A2ITransformer, atom_chunk: int, params: Any, R: Array, idx: Array,
                    displacement_fn: DisplacementFn, species: Array | None, mask: Array | None,
                    per_atom: bool, *, mesh: Mesh, **kwargs) -> Array:
    """:func:`_a2i_energy` with the centre atoms split over the devices of a one-axis ``mesh``.

    Inside ``jax.shard_map`` each device gets all positions, species and the mask (replicated) and
    its own block of ``ceil(N / D)`` rows of ``idx``; rows past ``N`` are padding whose energy,
    species shift included, is masked to zero. The total is a ``psum``; gradients are taken outside
    (the transpose of the replicated positions sums the devices' contributions once).
    """
    axis = mesh.axis_names[0]
    n, capacity = idx.shape
    rows = -(-n // mesh.size) * mesh.size
    if rows > n:
        idx = jnp.concatenate([idx, jnp.full((rows - n, capacity), R.shape[0], idx.dtype)])
    centers = jnp.minimum(jnp.arange(rows, dtype=jnp.int32), n - 1)
    real = jnp.arange(rows) < n
    species = jnp.zeros((R.shape[0],), jnp.int32) if species is None else species
    mask = jnp.ones((R.shape[0],), bool) if mask is None else mask
    real = real & mask[centers]
    kwargs = {k: jnp.asarray(v) for k, v in kwargs.items()}

    def block(params, R, idx, centers, real, species, mask, kwargs):
        energies = per_atom_energies(model, params, R, idx, displacement_fn, species, mask, atom_chunk, centers,
                                     **kwargs)
        energies = jnp.where(real, energies, 0.0)
        return energies if per_atom else jax.lax.psum(jnp.sum(energies), axis)

    split, whole = PartitionSpec(axis), PartitionSpec()
    energy = jax.shard_map(block, mesh=mesh, in_specs=(whole, whole, split, split, split, whole, whole, whole),
                           out_specs=split if per_atom else whole)(params, R, idx, centers, real, species, mask, kwargs)
    return energy[:n] if per_atom else energy


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_program(model: A2ITransformer, key: Array, dim: int, dtype: str) -> Any:
    """``model.init`` on one centre with two neighbours, compiled once per model, dimension and
    position dtype: a parameter's shape and value depend on the configuration and its path in the
    model, not on the atoms, ``N`` or ``K``, so no system needs a program of its own (the compiled
    program is mostly the random initialisers)."""
    dR = 0.5 * model.config.cutoff * jnp.eye(2, dim, dtype=dtype)[None]  # [1, 2, dim]
    species = jnp.zeros((1,), jnp.int32)
    return model.init(key, dR, species, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool))


def _init(model: A2ITransformer, key: Array, R: Array) -> Any:
    """The model's parameters for positions like ``R`` (:func:`_init_program`; only ``R``'s dimension
    and dtype are read, so the positions stay where they are)."""
    return _init_program(model, key, R.shape[-1], jnp.result_type(R).name)


def _a2i_functions(displacement_fn: DisplacementFn, config: A2IConfig, species: Array | None, atom_chunk: int,
                   dtype: Any, mesh: Mesh | None) -> tuple[Callable[..., Any], Callable[..., Array]]:
    """``(init_fn, energy_fn)`` of :func:`a2i_neighbor_list` for any Dense neighbour list.

    A list that carries ``key_capacity`` (:class:`a2ijax.neighbors.PeriodicNeighborList`) sets the
    attention's key slots ``M``: a capacity like ``K``, which changes no energy that the model's own
    ``M`` gives finite.
    """
    if mesh is not None and len(mesh.axis_names) != 1:
        raise InputError(f"mesh must have one axis (the atoms are split along it), got axes {mesh.axis_names}")
    compute = _a2i_energy if mesh is None else functools.partial(_sharded_energy, mesh=mesh)
    models: dict[int, A2ITransformer] = {}

    def model_for(neighbor: Any) -> A2ITransformer:
        keys = max(config.attention_keys, getattr(neighbor, "key_capacity", 0)) if config.attention_keys else 0
        if keys not in models:
            models[keys] = A2ITransformer(dataclasses.replace(config, attention_keys=keys) if keys else config,
                                          dtype=dtype)
        return models[keys]

    def _neighbors(neighbor: Any) -> partition.NeighborList:
        if neighbor is None:
            raise InputError("the A2I energy needs neighbor=neighbor_fn.allocate(R)")
        if neighbor.format is not partition.Dense:
            raise InputError(f"neighbour list must be Dense, got {neighbor.format}")
        overflow = neighbor.did_buffer_overflow  # traced inside jit, even for a list closed over
        if _is_concrete(overflow) and bool(overflow):
            raise NeighborListOverflowError(
                f"the neighbour list overflowed ({describe(neighbor.error.code)}; {neighbor.idx.shape[1]} "
                "slots per atom): reallocate it with a2ijax.reallocate(neighbor_fn, R, neighbor)")
        return neighbor

    def init_fn(key: Array, R: Array, neighbor: Any = None, **kwargs) -> Any:
        s = kwargs.pop("species", species)
        _check_inputs(config, R, s, None)
        neighbor = _neighbors(neighbor)
        return _init(model_for(neighbor), key, R)

    def energy_fn(params: Any, R: Array, neighbor: Any = None, *, species: Array | None = species,
                  mask: Array | None = None, per_atom: bool = False, **kwargs) -> Array:
        _check_inputs(config, R, species, mask)
        neighbor = _neighbors(neighbor)
        if neighbor.idx.shape[0] != R.shape[0]:
            raise InputError(f"neighbour list is for {neighbor.idx.shape[0]} atoms, R has {R.shape[0]}")
        energy = compute(model_for(neighbor), atom_chunk, params, R, neighbor.idx, displacement_fn, species, mask,
                         per_atom, **kwargs)
        # A list that needs reallocating may have lost neighbours: poison energy and forces rather than truncate.
        return energy * jnp.where(neighbor.did_buffer_overflow, jnp.nan, 1.0).astype(energy.dtype)

    return init_fn, energy_fn


def a2i_neighbor_list(
    displacement_fn: DisplacementFn,
    box: Any,
    config: A2IConfig,
    species: Array | None = None,
    *,
    atom_chunk: int | None = None,
    dtype: Any = None,
    mesh: Mesh | None = None,
    **nl_kwargs,
) -> tuple[partition.NeighborFn, Callable[..., Any], Callable[..., Array]]:
    """A2I potential on a jax-md Dense neighbour list.

    Args:
      displacement_fn: from ``jax_md.space`` (``free``, ``periodic``, ``periodic_general``).
      box: the jax-md box (side, sides ``[dim]`` or lattice matrix ``[dim, dim]``); checked against
        ``2 * config.cutoff`` along every periodic direction.
      config: the model's hyperparameters.
      species: ``[N]`` integer species ids; may instead be passed to each call as ``species=``.
      atom_chunk: atoms per rematerialised chunk (bounds memory by the chunk; results do not depend
        on it beyond float rounding); 0: all at once; None: :func:`default_atom_chunk` of the backend.
      dtype: compute dtype, e.g. ``"bfloat16"``; None: that of the positions and parameters.
      mesh: a one-axis ``jax.sharding.Mesh`` (:func:`a2ijax.parallel.make_mesh`): the energy is split
        over its devices by centre atoms (``jax.shard_map``), each device computing only its own
        atoms; positions and the list stay whole on every device. None: one device.
      **nl_kwargs: passed to ``jax_md.partition.neighbor_list`` (``dr_threshold``,
        ``capacity_multiplier``, ``fractional_coordinates``, ...). The format is always Dense.
        A skin (``dr_threshold``) saves rebuilds but adds tokens: attention cost grows as ``K**2``.

    Returns:
      ``(neighbor_fn, init_fn, energy_fn)`` with ``init_fn(key, R, neighbor, **kw) -> params`` and
      ``energy_fn(params, R, neighbor, *, species=None, mask=None, per_atom=False, **kw)``. ``mask``
      ``[N]`` marks real atoms (False: padding that contributes nothing); ``**kw`` go to
      ``displacement_fn`` (e.g. ``box``, ``perturbation`` for stress).

    jax-md's list gathers every atom's cell-list candidates at once (tens of KiB per atom): for large
    periodic systems :func:`a2i_periodic` builds the same potential on a list whose memory is linear.
    """
    if "format" in nl_kwargs and nl_kwargs["format"] is not partition.Dense:
        raise InputError("a2i_neighbor_list needs format=partition.Dense")
    nl_kwargs.pop("format", None)
    atom_chunk, dtype = run_settings(atom_chunk, dtype)
    species = None if species is None else jnp.asarray(species)
    fractional = nl_kwargs.get("fractional_coordinates", False)
    check_box(displacement_fn, box, config.cutoff, fractional)
    neighbor_fn = partition.neighbor_list(displacement_fn, box, config.cutoff, format=partition.Dense, **nl_kwargs)
    return (neighbor_fn, *_a2i_functions(displacement_fn, config, species, atom_chunk, dtype, mesh))


def periodic_space(box: Any) -> tuple[DisplacementFn, Callable]:
    """jax-md's ``(displacement_fn, shift_fn)`` of a periodic ``box`` (side, sides or ``[3, 3]`` lattice
    vectors as columns) in real coordinates: ``space.periodic_general`` with ``fractional_coordinates=False``,
    so that keyword arguments ``box=`` (a changing box) and ``perturbation=`` (stress) reach it."""
    lattice = jnp.asarray(lattice_matrix(box, 3), jnp.result_type(float))
    return space.periodic_general(lattice, fractional_coordinates=False)


def a2i_periodic(
    box: Any,
    config: A2IConfig,
    species: Array | None = None,
    *,
    atom_chunk: int | None = None,
    dtype: Any = None,
    mesh: Mesh | None = None,
    **nl_kwargs,
) -> tuple[partition.NeighborFn, Callable[..., Any], Callable[..., Array]]:
    """:func:`a2i_neighbor_list` in a periodic ``box`` of any shape, in real coordinates, on
    :func:`a2ijax.neighbors.periodic_neighbor_list` (a cell list in every box at least three cells
    wide, memory linear in ``N``, the box may change as ``neighbor.update(R, box=box)``).

    ``box``: side, sides ``[3]`` or ``[3, 3]`` lattice vectors as columns, any orientation;
    ``nl_kwargs``: ``dr_threshold``, ``capacity_multiplier``, ``chunk`` of the neighbour list. The
    energy takes ``box=`` for a box that changes and ``perturbation=`` for stress, as jax-md's do;
    positions may lie in any periodic image.
    """
    atom_chunk, dtype = run_settings(atom_chunk, dtype)
    species = None if species is None else jnp.asarray(species)
    displacement, _ = periodic_space(box)
    check_box(displacement, lattice_matrix(box, 3), config.cutoff)
    neighbor_fn = periodic_neighbor_list(box, config.cutoff, attention_cutoff=config.attention_cutoff,
                                         attention_keys=config.attention_keys, **nl_kwargs)
    return (neighbor_fn, *_a2i_functions(displacement, config, species, atom_chunk, dtype, mesh))


class Potential(NamedTuple):
    """A potential ready for MD in a periodic box, its parameters bound.

    ``neighbor_fn`` (``allocate(R)``, ``update(R, neighbor)``), ``energy_fn(R, neighbor=..., **kw)`` (``kw``:
    ``species``, ``mask``, ``per_atom``, ``box`` and ``perturbation``), and jax-md's real-coordinate
    ``displacement_fn`` and ``shift_fn`` of the box. ``Checkpoint.potential`` and
    ``Committee.potential`` return one; it unpacks as the four functions.
    """

    neighbor_fn: partition.NeighborFn
    energy_fn: Callable[..., Array]
    displacement_fn: DisplacementFn
    shift_fn: Callable

    @classmethod
    def periodic(cls, neighbor_fn: partition.NeighborFn, energy_fn: Callable[..., Array], box: Any) -> Potential:
        """The bundle of ``neighbor_fn`` and ``energy_fn`` with the space of ``box`` (:func:`periodic_space`)."""
        return cls(neighbor_fn, energy_fn, *periodic_space(box))


def default_float(params: Any) -> Any:
    """``params`` cast to JAX's default float (float64 under ``jax_enable_x64``)."""
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.result_type(float)), params)


def bound(energy_fn: Callable[..., Array], params: Any) -> Callable[..., Array]:
    """``energy(R, neighbor=None, **kw) = energy_fn(params, R, neighbor=neighbor, **kw)``."""

    def energy(R: Array, neighbor: Any = None, **kwargs) -> Array:
        return energy_fn(params, R, neighbor=neighbor, **kwargs)

    return energy


def all_pairs_index(n: int) -> Array:
    """``[n, n - 1]`` Dense index of every other atom: row ``i`` lists ``j != i`` in order."""
    m = np.arange(n - 1)[None, :]
    i = np.arange(n)[:, None]
    return jnp.asarray(np.where(m < i, m, m + 1), jnp.int32)


def a2i_pair(
    displacement_fn: DisplacementFn,
    box: Any,
    config: A2IConfig,
    species: Array | None = None,
    *,
    fractional_coordinates: bool = False,
    atom_chunk: int | None = None,
    dtype: Any = None,
) -> tuple[Callable[..., Any], Callable[..., Array]]:
    """All-pairs A2I potential for small systems: every other atom is a token (no neighbour list).

    Same model, run settings and signatures as :func:`a2i_neighbor_list`, returning ``(init_fn, energy_fn)``;
    ``neighbor=`` is accepted and ignored so that one MD driver can call either. Cost and memory
    grow as ``N**3``: meant for clusters and for checking the neighbour-list path.
    """
    atom_chunk, dtype = run_settings(atom_chunk, dtype)
    species = None if species is None else jnp.asarray(species)
    check_box(displacement_fn, box, config.cutoff, fractional_coordinates)
    model = A2ITransformer(config, dtype=dtype)

    def init_fn(key: Array, R: Array, neighbor: Any = None, **kwargs) -> Any:
        s = kwargs.pop("species", species)
        _check_inputs(config, R, s, None)
        return _init(model, key, R)

    def energy_fn(params: Any, R: Array, neighbor: Any = None, *, species: Array | None = species,
                  mask: Array | None = None, per_atom: bool = False, **kwargs) -> Array:
        del neighbor
        _check_inputs(config, R, species, mask)
        return _a2i_energy(model, atom_chunk, params, R, all_pairs_index(R.shape[0]), displacement_fn, species, mask,
                           per_atom, **kwargs)

    return init_fn, energy_fn


def batched_energy_and_forces(energy_fn: Callable[..., Array]) -> Callable[..., tuple[Array, Array]]:
    """vmap of ``(E, F = -dE/dR)`` over a batch of systems of one shape.

    Returns ``fn(params, R [B, N, dim], neighbor, species=None, mask=None) -> (E [B], F [B, N, dim])``
    where ``neighbor`` is a NeighborList whose arrays carry the batch axis (``idx [B, N, K]``) and
    ``species``/``mask`` are ``[B, N]``. Systems of different sizes are padded to a common ``N``
    with ``mask`` False on the padding.
    """
    def one(params, R, neighbor, species, mask):
        energy, grad = jax.value_and_grad(
            lambda R: energy_fn(params, R, neighbor=neighbor, species=species, mask=mask))(R)
        return energy, -grad

    return jax.vmap(one, in_axes=(None, 0, 0, 0, 0))


def fixed_neighbor_list(idx: Array, R: Array, key_capacity: int = 0) -> partition.NeighborList:
    """A Dense jax-md ``NeighborList`` around a precomputed index ``idx [N, K]`` (empty slots hold ``N``).

    For frames whose neighbours were found once on the host (training and evaluation batches, the
    ASE calculator): the list never updates and never overflows, so its capacity must have been
    checked beforehand. ``key_capacity``: attention-key slots beyond the model's own (0: the
    model's), for atoms with more neighbours inside the attention range. It names every field of
    jax-md's ``NeighborList``, which is why pyproject.toml pins the jax-md version the tests ran with
    (``tests/test_invariants.py`` checks the fields).
    """
    return PeriodicNeighborList(idx=idx, reference_position=R, error=ListError(jnp.zeros((), jnp.uint8)),
                                cell_list_capacity=None, max_occupancy=idx.shape[-1], format=partition.Dense,
                                cell_size=None, cell_list_fn=None, update_fn=None, reference_box=None,
                                key_capacity=key_capacity)


# ----------------------------------------------------------------------------------------------
# Frames that bring their own cells: the shape the trainer and the evaluators use


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


def potential_builder(config: ExperimentConfig, species: np.ndarray | None = None, *,
                      atom_chunk: int | None = None) -> tuple[Callable, Callable, bool]:
    """``(init_fn, energy_fn, per_atom)`` of the potential that ``config`` trains: A2I, or the jax-md
    potential named in ``[baseline]`` (``per_atom``: whether it gives per-atom energies).

    A baseline is wrapped as ``E = s * E_net + sum_i shift[species_i]`` with the trainer's per-species
    shift and a scale ``s``, as A2I carries them inside, so both start from the same fitted offsets.
    ``species`` (``[N]``, from :func:`a2ijax.batching.fixed_species`) is fixed into the baselines when they are built.
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
            raise InputError(f"jax-md's {name} gives no per-atom energies")
        p = params["params"]
        species = jnp.zeros(R.shape[:1], jnp.int32) if species is None else species
        return p["energy_scale"][0] * net_energy(p["net"], R, neighbor, box=box) + jnp.sum(
            p["energy_shift"][species])

    return init_fn, energy_fn, False
