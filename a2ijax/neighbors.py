"""Dense neighbour lists for periodic boxes of any shape, with memory linear in the number of atoms.

:func:`periodic_neighbor_list` returns jax-md's ``NeighborListFns`` (``allocate``, ``update``) and
its lists are jax-md ``NeighborList`` objects in the Dense format (``idx [N, K]``, empty slots hold
``N``), so jax-md's integrators, ``did_buffer_overflow`` and this package's MD driver use them as
they are. Positions are real coordinates, as the trained models' potentials take them, in any
periodic image.

How it works, and why it is not ``jax_md.partition.neighbor_list``:

* **Cells in fractional coordinates, any box shape.** The box's perpendicular widths ``w`` fix
  ``n_a = floor(w_a / (cutoff + skin))`` cells along each lattice vector, and jax-md's cell list
  (``partition.cell_list``) bins the atoms by their fractional coordinates ``u`` times ``n``. Each
  cell is then a slab at least ``cutoff + skin`` thick across every pair of faces, so two atoms that
  close lie in the same or adjacent cells in a triclinic box as in an orthorhombic one. The layout
  is chosen when a list is allocated, for the box it is allocated in.
* **Candidates in blocks of atoms.** jax-md's list gathers the ``27 x cell capacity`` candidates
  of every atom at once (their positions, distances and a cumulative sum: about 76 KiB per atom
  measured at 100,000 atoms, docs/design.md "Decisions"), which puts a million atoms out of reach of 24 GB.
  Here the candidates of ``chunk`` atoms at a time are filtered and compacted into their ``K``
  slots inside ``lax.map``, so the temporaries are bounded by the block and the memory that grows
  with ``N`` is the list itself, the cell list and the positions.
* **Boxes that change (NPT).** ``update(R, neighbor, box=box)`` takes the current box; the list is
  rebuilt when an atom has moved more than half the skin since the last build or the box has
  strained enough to bring an unlisted pair inside the cutoff, and the error code
  ``CELL_SIZE_TOO_SMALL`` is set when the box has narrowed below the cells' thickness (allocate a
  new list in the current box: ``allocate(R, box=box)``).
* **Attention keys.** A model with a limited attention range attends to at most ``M`` neighbours
  within ``r_att`` (``A2IConfig.attention_keys``). ``M`` is a capacity like ``K``: more key slots
  than an atom needs change nothing (the extra keys carry zero weight), too few make its energy NaN.
  The list carries ``key_capacity`` (at least the model's ``M``), counts every atom's neighbours
  within ``r_att`` at every update, and sets :data:`KEY_OVERFLOW` when an atom has more, so that a
  driver reallocates it (:func:`reallocate`) as it does an overflowed list.
* **Small boxes.** With fewer than three cells along an axis every atom is a candidate of every
  other (memory ``N**2``): a :class:`AllPairsWarning` says so and why.

Every condition that calls for a new list is a bit of the list's ``error.code`` (jax-md's
``PartitionError``, with :data:`KEY_OVERFLOW` beside jax-md's own bits) and makes
``did_buffer_overflow`` true; :func:`describe` names them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import dataclasses as md_dataclasses
from jax_md import partition

from a2ijax.errors import InputError
from a2ijax.geometry import lattice_matrix, perpendicular_widths

Array = jax.Array
PEC = partition.PartitionErrorCode
#: Error bit of a list whose atoms have more neighbours inside the attention range than key slots.
KEY_OVERFLOW = 1 << 4
#: The bits that call for a new list (:func:`reallocate`).
REALLOCATE = PEC.NEIGHBOR_LIST_OVERFLOW | PEC.CELL_LIST_OVERFLOW | PEC.CELL_SIZE_TOO_SMALL | KEY_OVERFLOW
_CAUSES = {
    int(PEC.NEIGHBOR_LIST_OVERFLOW): "an atom has more neighbours than the list's slots (K)",
    int(PEC.CELL_LIST_OVERFLOW): "a cell of the cell list holds more atoms than its capacity",
    int(PEC.CELL_SIZE_TOO_SMALL): "the box has narrowed below the cell list's cells (cutoff + skin)",
    int(PEC.MALFORMED_BOX): "the box matrix is malformed",
    KEY_OVERFLOW: "an atom has more neighbours inside the attention range than key slots (M)",
}
#: Displacements of a cell to its 27 neighbour cells (itself included), ``[27, 3]``.
CELL_OFFSETS = np.stack(np.meshgrid(*([np.arange(-1, 2)] * 3), indexing="ij"), -1).reshape(-1, 3)


class AllPairsWarning(UserWarning):
    """A neighbour list compares all pairs of atoms (time and memory ``N**2``): the box is too narrow
    for three cells along an axis."""


@md_dataclasses.dataclass
class ListError(partition.PartitionError):
    """jax-md's ``PartitionError`` with this module's :data:`KEY_OVERFLOW` bit, printed by :func:`describe`."""

    def update(self, bit: int, pred: Array) -> ListError:
        return ListError(self.code | jnp.where(pred, jnp.asarray(bit, jnp.uint8), jnp.zeros((), jnp.uint8)))

    def __str__(self) -> str:
        return describe(self.code)

    __repr__ = __str__


@md_dataclasses.dataclass
class PeriodicNeighborList(partition.NeighborList):
    """A jax-md Dense ``NeighborList`` that also remembers the box it was built in (``[3, 3]``,
    lattice vectors as columns): the update compares the current box with it."""

    reference_box: Array = None
    key_capacity: int = md_dataclasses.static_field(default=0)

    @property
    def did_buffer_overflow(self) -> Array:
        """True when the list must be reallocated: slots, cells or key slots overflowed, or the box
        narrowed below the cells (every bit of :data:`REALLOCATE`)."""
        return (self.error.code & REALLOCATE) != 0


def describe(code: Any) -> str:
    """The causes named by the error bits ``code`` of a neighbour list, joined by "; "."""
    if isinstance(code, jax.core.Tracer):
        return "ListError(traced)"
    code = int(np.bitwise_or.reduce(np.asarray(code).reshape(-1)))  # a batch of lists: the bits of any
    return "; ".join(text for bit, text in _CAUSES.items() if code & bit) or "no error"


def default_chunk(backend: str | None = None) -> int:
    """Atoms per block of the candidate search: 512 on a CPU, 16,384 on accelerators."""
    return 512 if (backend or jax.default_backend()) == "cpu" else 16384


@dataclasses.dataclass(frozen=True)
class Layout:
    """The cells of a list: ``counts`` per axis (all ``>= 3``), or None for all pairs."""

    counts: tuple[int, int, int] | None
    widths: tuple[float, float, float]
    reach: float

    @property
    def uses_cells(self) -> bool:
        return self.counts is not None


def layout(box: Any, reach: float) -> Layout:
    """Cells at least ``reach`` thick across every pair of faces of ``box`` (a jax-md box: side,
    sides or ``[3, 3]`` lattice vectors as columns); all pairs where an axis fits fewer than three."""
    widths = perpendicular_widths(lattice_matrix(box, 3))
    counts = np.floor(widths / reach).astype(int)
    cells = tuple(int(c) for c in counts) if np.all(counts >= 3) else None
    return Layout(cells, tuple(float(w) for w in widths), float(reach))


def periodic_neighbor_list(box: Any, r_cutoff: float, *, dr_threshold: float = 0.0,
                           capacity_multiplier: float = 1.25, attention_cutoff: float = 0.0, attention_keys: int = 0,
                           chunk: int | None = None, **ignored: Any) -> partition.NeighborListFns:
    """Dense neighbour lists of atoms closer than ``r_cutoff`` in the periodic ``box``.

    Args:
      box: jax-md box in real coordinates: side, sides ``[3]`` or ``[3, 3]`` lattice vectors as columns
        (any orientation). Every perpendicular width must exceed ``2 * r_cutoff`` (minimum images).
      r_cutoff: the cutoff; pairs closer than ``r_cutoff + dr_threshold`` are listed.
      dr_threshold: the skin: the list is rebuilt once an atom has moved half of it.
      capacity_multiplier: slots per atom over the most neighbours any atom has at allocation (also
        for the key slots and the cell list's capacity).
      attention_cutoff, attention_keys: the model's attention range ``r_att`` and key slots ``M``
        (0, 0: no limited range); the list then carries ``key_capacity >= M`` (module docstring).
      chunk: atoms per block of the candidate search (None: :func:`default_chunk`).
      ignored: jax-md options that have no meaning here (``format``, always Dense;
        ``fractional_coordinates``, always False; ``disable_cell_list``: the layout decides, and
        True silences the warning about all pairs).

    Returns:
      jax-md's ``NeighborListFns``: ``allocate(R, extra_capacity=0, box=None, key_capacity=0,
      cell_capacity=0, cell_margin=1)`` and ``update(R, neighbor, box=None)`` (also
      ``neighbor.update(R, box=None)``), where ``box`` is the current box of a simulation whose box
      changes, ``key_capacity`` and ``cell_capacity`` are lower bounds for a reallocation and
      ``cell_margin`` makes the cells that much thicker than cutoff + skin (room for a box to shrink).
    """
    unknown = set(ignored) - {"format", "fractional_coordinates", "disable_cell_list"}
    if unknown:
        raise TypeError(f"periodic_neighbor_list got unexpected options {sorted(unknown)}")
    if ignored.get("format", partition.Dense) is not partition.Dense:
        raise InputError("periodic_neighbor_list builds Dense lists only")
    if ignored.get("fractional_coordinates", False):
        raise InputError("periodic_neighbor_list takes real coordinates (fractional_coordinates=False)")
    for name, value in (("r_cutoff", r_cutoff), ("capacity_multiplier", capacity_multiplier)):
        if not float(value) > 0:
            raise InputError(f"{name} must be positive, got {value!r}")
    if not float(dr_threshold) >= 0:
        raise InputError(f"dr_threshold must be >= 0, got {dr_threshold!r}")
    if (float(attention_cutoff) > 0) != (int(attention_keys) > 0):
        raise InputError(f"attention_cutoff ({attention_cutoff!r}) and attention_keys ({attention_keys!r}) go together")
    chunk = default_chunk() if chunk is None else int(chunk)
    if chunk < 1:
        raise InputError(f"chunk must be >= 1, got {chunk!r}")
    reach = float(r_cutoff) + float(dr_threshold)
    r_att = float(attention_cutoff)
    quiet = ignored.get("disable_cell_list") is True
    lattice0 = jnp.asarray(lattice_matrix(box, 3), jnp.result_type(float))
    threshold = 0.5 * float(dr_threshold)

    cell_lists: dict[tuple[int, int, int], Any] = {}

    def cells_for(box: Any, stacklevel: int, margin: float = 1.0) -> tuple[Layout, Any]:
        """The layout for ``box`` (cells ``margin`` times thicker than cutoff + skin) and jax-md's cell
        list over ``u * counts`` (cells of side 1), or None."""
        cells = layout(box, reach * margin)
        if min(cells.widths) <= 2.0 * float(r_cutoff):
            raise InputError(f"box too small for the neighbour list: its narrowest width {min(cells.widths):.6g} "
                             f"must exceed 2 x cutoff = {2.0 * float(r_cutoff):.6g} for minimum-image pairs")
        if not cells.uses_cells:
            if not quiet:
                warnings.warn(
                    f"the box is {min(cells.widths):.4g} wide, fewer than 3 cells of cutoff + skin = {reach:.4g}: "
                    "the neighbour list compares all pairs of atoms (time and memory grow as N**2). A larger box, "
                    "or a smaller skin, gets a cell list.", AllPairsWarning, stacklevel=stacklevel)
            return cells, None
        if cells.counts not in cell_lists:  # one per layout: the lists' static fields, and jit's caches, stay equal
            counts = np.asarray(cells.counts, np.float64)
            cell_lists[cells.counts] = partition.cell_list(counts, 1.0, capacity_multiplier)
        return cells, cell_lists[cells.counts]

    cells_for(box, 4)  # the box is checked (and an all-pairs list named) when the list is built

    def fractional(R: Array, lattice: Array) -> Array:
        u = R @ jnp.linalg.inv(lattice).T  # [N, 3]
        return u - jnp.floor(u)

    def blocks(fn, n: int):
        """``fn(rows [chunk]) -> per-row arrays`` over all ``n`` rows in blocks (``lax.map``)."""
        count = -(-n // chunk)
        out = jax.lax.map(fn, jnp.arange(count * chunk, dtype=jnp.int32).reshape(count, chunk))
        return jax.tree.map(lambda a: a.reshape((count * chunk,) + a.shape[2:])[:n], out)

    def candidates_of(rows: Array, cell_list: Any, counts: tuple[int, int, int] | None, n: int) -> Array:
        """``[C, P]`` candidate neighbours of the atoms ``rows [C]`` (``n``: an empty slot)."""
        if cell_list is None:
            return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows.shape[0], n))
        multiplier = jnp.asarray([1, counts[0], counts[0] * counts[1]], jnp.int32)
        counts = jnp.asarray(counts, jnp.int32)
        own = cell_list.particle_cell_id[jnp.minimum(rows, n - 1)]  # [C, 3]
        around = jnp.mod(own[:, None, :] + jnp.asarray(CELL_OFFSETS, jnp.int32), counts)  # [C, 27, 3]
        slots = cell_list.id_buffer.reshape(-1, cell_list.cell_capacity)  # [cells, capacity]
        return slots[jnp.sum(around * multiplier, -1)].reshape(rows.shape[0], -1)  # [C, 27 x capacity]

    def squared_distances(u: Array, rows: Array, j: Array, lattice: Array) -> Array:
        """``|r_ij|^2`` (minimum image) of the atoms ``rows [C]`` and their candidates ``j [C, P]``."""
        n = u.shape[0]
        du = u[jnp.minimum(j, n - 1)] - u[jnp.minimum(rows, n - 1)][:, None, :]
        dR = (du - jnp.round(du)) @ lattice.T  # [C, P, 3]
        return jnp.sum(dR * dR, -1)

    def build(R: Array, lattice: Array, capacity: int, cell_fn: Any, counts: tuple[int, int, int] | None,
              cell_capacity: int | None) -> tuple[Array, Array, Array]:
        """``idx [N, capacity]``, the most neighbours of any atom, and the cell list's overflow flag."""
        n = R.shape[0]
        u = fractional(R, lattice)
        cell_list = None if cell_fn is None else cell_fn.update(u * jnp.asarray(counts, u.dtype), cell_capacity)

        def block(rows: Array) -> tuple[Array, Array]:
            j = candidates_of(rows, cell_list, counts, n)  # [C, P]
            keep = (j < n) & (j != rows[:, None]) & (rows[:, None] < n)
            keep = keep & (squared_distances(u, rows, j, lattice) < reach**2)
            rank = jnp.cumsum(keep, axis=1, dtype=jnp.int32)  # [C, P]
            slot = jnp.where(keep, rank - 1, capacity)  # slot `capacity` is dropped
            local = jnp.broadcast_to(jnp.arange(rows.shape[0])[:, None], j.shape)
            idx = jnp.full((rows.shape[0], capacity), n, jnp.int32).at[local, slot].set(j, mode="drop")
            return idx, rank[:, -1]

        idx, count = blocks(block, n)
        overflow = jnp.zeros((), bool) if cell_list is None else cell_list.did_buffer_overflow
        return idx, jnp.max(count), overflow

    def most_keys(R: Array, idx: Array, lattice: Array) -> Array:
        """The most listed neighbours of any atom inside the attention range (0 without one)."""
        if r_att <= 0:
            return jnp.zeros((), jnp.int32)
        u = fractional(R, lattice)
        n = R.shape[0]

        def block(rows: Array) -> Array:
            j = idx[jnp.minimum(rows, n - 1)]
            inside = (j < n) & (rows[:, None] < n) & (squared_distances(u, rows, j, lattice) < r_att**2)
            return jnp.sum(inside, -1, dtype=jnp.int32)

        return jnp.max(blocks(block, n))

    build_jit = jax.jit(build, static_argnums=(2, 3, 4, 5))
    most_keys_jit = jax.jit(most_keys)

    def error_of(occupancy: Array, capacity: int, cell_overflow: Array, keys: Array, key_capacity: int,
                 lattice: Array, counts: tuple[int, int, int] | None) -> Array:
        error = ListError(jnp.zeros((), jnp.uint8))
        error = error.update(PEC.NEIGHBOR_LIST_OVERFLOW, occupancy > capacity)
        error = error.update(PEC.CELL_LIST_OVERFLOW, cell_overflow)
        error = error.update(KEY_OVERFLOW, keys > key_capacity)
        widths = 1.0 / jnp.linalg.norm(jnp.linalg.inv(lattice), axis=1)
        if counts is not None:  # the box narrowed: cells thinner than cutoff + skin would miss pairs
            error = error.update(PEC.CELL_SIZE_TOO_SMALL, jnp.min(widths / jnp.asarray(counts)) < reach)
        else:  # all pairs: minimum images need a box wider than twice the cutoff
            error = error.update(PEC.CELL_SIZE_TOO_SMALL, jnp.min(widths) <= 2.0 * float(r_cutoff))
        return error.code

    def current(box: Any) -> Array:
        return lattice0 if box is None else jnp.asarray(lattice_matrix_traced(box), lattice0.dtype)

    def allocate(R: Array, extra_capacity: int = 0, box: Any = None, key_capacity: int = 0, cell_capacity: int = 0,
                 cell_margin: float = 1.0, **unused: Any) -> PeriodicNeighborList:
        R = jnp.asarray(R)
        if R.ndim != 2 or R.shape[1] != 3:
            raise InputError(f"positions must have shape [n_atoms, 3], got {R.shape}")
        n = R.shape[0]
        lattice = current(box)
        cells, cell_fn = cells_for(np.asarray(lattice), 3, cell_margin)
        cells_capacity = None
        if cell_fn is not None:
            estimate = cell_fn.allocate(fractional(R, lattice) * jnp.asarray(cells.counts, R.dtype)).cell_capacity
            cells_capacity = max(int(estimate), int(cell_capacity))
        _, most, _ = build_jit(R, lattice, 1, cell_fn, cells.counts, cells_capacity)
        capacity = max(1, min(int(int(most) * capacity_multiplier + extra_capacity), n - 1))
        idx, most, cell_overflow = build_jit(R, lattice, capacity, cell_fn, cells.counts, cells_capacity)
        keys = most_keys_jit(R, idx, lattice)
        key_slots = 0
        if r_att > 0:
            key_slots = min(max(int(attention_keys), int(np.ceil(int(keys) * capacity_multiplier)), int(key_capacity)),
                            capacity)
        error = ListError(error_of(most, capacity, cell_overflow, keys, key_slots, lattice, cells.counts))
        # jax-md's static cell_size field holds the cells per axis (None: all pairs).
        return PeriodicNeighborList(idx, R, error, cells_capacity, capacity, partition.Dense, cells.counts, cell_fn,
                                    update, lattice, key_slots)

    def update(R: Array, neighbor: PeriodicNeighborList, box: Any = None, **unused: Any) -> PeriodicNeighborList:
        lattice = current(box)
        capacity = neighbor.max_occupancy

        def rebuild(_: Any) -> PeriodicNeighborList:
            idx, most, cell_overflow = build(R, lattice, capacity, neighbor.cell_list_fn, neighbor.cell_size,
                                             neighbor.cell_list_capacity)
            code = error_of(most, capacity, cell_overflow, jnp.zeros((), jnp.int32), 0, lattice, neighbor.cell_size)
            return dataclasses.replace(neighbor, idx=idx, reference_position=R, reference_box=lattice,
                                       error=ListError(neighbor.error.code | code))

        # Motion without the box's own deformation: fractional displacements in the current box.
        du = fractional(R, lattice) - fractional(neighbor.reference_position, neighbor.reference_box)
        moved = jnp.sqrt(jnp.max(jnp.sum(((du - jnp.round(du)) @ lattice.T) ** 2, -1)))
        # A strained box brings pairs closer by at most |lattice lattice_ref^-1 - 1| x (cutoff + skin).
        strain = jnp.linalg.norm(lattice @ jnp.linalg.inv(neighbor.reference_box) - jnp.eye(3), ord=2)
        stale = (moved + 0.5 * strain * reach > threshold) if threshold > 0 else jnp.asarray(True)
        neighbor = jax.lax.cond(stale, rebuild, lambda _: neighbor, None)
        if r_att > 0:  # atoms move between rebuilds: count the keys at every update
            crowded = most_keys(R, neighbor.idx, lattice) > neighbor.key_capacity
            neighbor = dataclasses.replace(neighbor, error=neighbor.error.update(KEY_OVERFLOW, crowded))
        return neighbor

    return partition.NeighborListFns(allocate, update)


def reallocate(neighbor_fn: partition.NeighborFn, R: Array, neighbor: partition.NeighborList, growth: float = 1.5,
               **kwargs) -> partition.NeighborList:
    """A new list for ``R`` whose capacities have grown by ``growth`` where the old list overflowed.

    For a jax-md list, the slots ``K``; for a :class:`PeriodicNeighborList`, also the key slots, the
    cell list's capacity and (a box that narrowed) the cells' thickness, each where its bit is set,
    while the capacities that held keep their size; ``kwargs`` go to ``allocate`` (``box=``: the
    current box of a simulation whose box changes).
    Reallocation changes shapes and so recompiles whatever consumes the list; growing
    geometrically keeps repeated overflows to a handful of recompilations.
    """
    grown = lambda size: int(np.ceil(growth * size))  # noqa: E731
    slots = grown(neighbor.idx.shape[1])
    if isinstance(neighbor, PeriodicNeighborList):
        # Every capacity is at least the old list's: one that did not overflow this time keeps its
        # size, or capacities that overflow by turns would take it back and forth for ever.
        code = int(neighbor.error.code)
        if not code & REALLOCATE:  # a list from before the overflow (as jax-md's reallocate gets): grow K
            code = int(PEC.NEIGHBOR_LIST_OVERFLOW)
        kwargs["key_capacity"] = grown(neighbor.key_capacity) if code & KEY_OVERFLOW else neighbor.key_capacity
        if neighbor.cell_list_capacity is not None:
            capacity = neighbor.cell_list_capacity
            kwargs["cell_capacity"] = grown(capacity) if code & PEC.CELL_LIST_OVERFLOW else capacity
        if code & PEC.CELL_SIZE_TOO_SMALL:  # a shrinking box: 10% thicker cells leave it room
            kwargs.setdefault("cell_margin", 1.1)
        if not code & PEC.NEIGHBOR_LIST_OVERFLOW:
            slots = neighbor.idx.shape[1]
    fresh = neighbor_fn.allocate(R, **kwargs)
    target = min(slots, R.shape[0] - 1)
    if fresh.idx.shape[1] < target:
        fresh = neighbor_fn.allocate(R, extra_capacity=target - fresh.idx.shape[1], **kwargs)
    return fresh


def masked_displacements(R: Array, idx: Array, displacement_fn: Callable[..., Array], centers: Array | None = None,
                         **kwargs) -> tuple[Array, Array]:
    """Displacements ``r_ij = R_j - R_i`` ``[n, K, dim]`` to the neighbours in a Dense index ``idx [n, K]``
    (empty slots hold ``N``) and the mask ``[n, K]`` of real slots (empty slots get ``r_ii = 0``).

    Row ``r`` of ``idx`` lists the neighbours of atom ``centers[r]`` (default: the first ``n`` atoms);
    ``kwargs`` (``box``, ``perturbation``) go to ``displacement_fn``.
    """
    n_atoms, n = R.shape[0], idx.shape[0]
    pair_mask = idx < n_atoms
    own = jnp.arange(n, dtype=idx.dtype) if centers is None else centers
    j = jnp.where(pair_mask, idx, own[:, None])
    center = R[own]
    displacement = jax.vmap(jax.vmap(lambda Rj, Ri: displacement_fn(Rj, Ri, **kwargs), (0, None)))
    return displacement(R[j], center), pair_mask


def lattice_matrix_traced(box: Any) -> Array:
    """:func:`a2ijax.geometry.lattice_matrix` for a box that may be a traced array."""
    box = jnp.asarray(box)
    if box.ndim == 0:
        return box * jnp.eye(3, dtype=box.dtype)
    if box.ndim == 1:
        return jnp.diag(box)
    return box
