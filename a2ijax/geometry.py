"""Host-side geometry in NumPy: lattice matrices, cell widths, minimum-image neighbour search.

Nothing here imports the rest of the package or JAX. Two cell conventions meet in this project:
ASE and the dataset files hold the lattice vectors as the **rows** of ``cell`` (``[3, 3]``), jax-md's
``box`` holds them as **columns**. Functions here take ASE's ``cell`` unless they say ``box``.

The neighbour search is a cell list: atoms are binned into cells at least ``cutoff`` wide along each
perpendicular direction, and only atoms in the same or adjacent cells are compared. Time and memory
grow linearly with the number of atoms (no ``[N, N]`` array), which keeps the extrapolation check,
the ASE calculator and the trainer's neighbour indices usable for large systems.
"""

from __future__ import annotations

import itertools

import numpy as np

from a2ijax.errors import InputError


def lattice_matrix(box, dim: int) -> np.ndarray:
    """The ``[dim, dim]`` matrix whose **columns** are the lattice vectors of a jax-md ``box``
    (a side length, ``dim`` side lengths, or a ``[dim, dim]`` matrix)."""
    box = np.asarray(box, dtype=np.float64)
    if box.ndim == 0:
        return box * np.eye(dim)
    if box.ndim == 1:
        if box.shape[0] != dim:
            raise InputError(f"box has {box.shape[0]} side lengths, positions have dimension {dim}")
        return np.diag(box)
    if box.shape != (dim, dim):
        raise InputError(f"box matrix has shape {box.shape}, expected ({dim}, {dim})")
    return box


def perpendicular_widths(lattice: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of the cell whose **columns** are the lattice vectors.

    Width ``k`` is measured across the faces spanned by the other lattice vectors: ``1 / |row k of T^-1|``.
    """
    return 1.0 / np.linalg.norm(np.linalg.inv(lattice), axis=1)


def _periodic(pbc) -> bool:
    pbc = np.asarray(pbc, bool)
    if pbc.any() and not pbc.all():
        raise InputError(f"partly periodic cells (pbc={pbc.tolist()}) are not supported; use fully periodic "
                         "or fully free frames")
    return bool(pbc.all())


def check_widths(cell: np.ndarray, pbc, cutoff: float) -> None:
    """Raises if a periodic ``cell`` (rows: lattice vectors) is not wider than ``2 * cutoff`` across
    every pair of faces: minimum-image displacements would then miss or double neighbours."""
    if not _periodic(pbc):
        return
    widths = perpendicular_widths(np.asarray(cell, np.float64).T)
    for axis in range(3):
        if widths[axis] <= 2 * cutoff:
            raise InputError(f"box too small for the cutoff: width {widths[axis]:.6g} along cell vector {axis} "
                             f"<= 2 x cutoff = {2 * cutoff:.6g}")


def minimum_image(d: np.ndarray, cell: np.ndarray, pbc) -> np.ndarray:
    """Minimum-image displacement vectors ``d [..., 3]`` in a cell (rows: lattice vectors)."""
    if not _periodic(pbc):
        return d
    frac = d @ np.linalg.inv(cell)
    return (frac - np.round(frac)) @ cell


def neighbor_pairs(R: np.ndarray, cell: np.ndarray, pbc, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ordered pair ``(i, j)``, ``i != j``, closer than ``cutoff`` (minimum image), sorted by
    ``i`` then ``j``, and their distances ``d``. A periodic cell must be wider than ``2 * cutoff``.

    Linear time and memory: a cell list with cells at least ``cutoff`` wide, each compared with its
    (up to 26) neighbour cells, one offset at a time.
    """
    R = np.asarray(R, np.float64)
    n = len(R)
    if cutoff <= 0:
        raise InputError(f"cutoff must be positive, got {cutoff}")
    empty = np.zeros(0, np.int64)
    if n < 2:
        return empty, empty, np.zeros(0)
    periodic = _periodic(pbc)
    if periodic:
        cell = np.asarray(cell, np.float64)
        check_widths(cell, pbc, cutoff)
        frac = R @ np.linalg.inv(cell)
        frac -= np.floor(frac)
        counts = np.maximum(np.floor(perpendicular_widths(cell.T) / cutoff).astype(int), 1)
    else:  # free atoms: a box around them, cells that never wrap
        low = R.min(0)
        extent = np.maximum(R.max(0) - low, 1e-12)
        counts = np.maximum(np.floor(extent / cutoff).astype(int), 1)
        frac = (R - low) / extent
    counts = np.minimum(counts, max(1, int(round(n ** (1 / 3)))) * 4)  # no more cells than atoms need
    bins = np.minimum((frac * counts).astype(int), counts - 1)  # [n, 3]
    flat = np.ravel_multi_index(bins.T, counts)
    order = np.argsort(flat, kind="stable")
    occupancy = np.bincount(flat, minlength=int(np.prod(counts)))
    depth = int(occupancy.max())
    start = np.concatenate([[0], np.cumsum(occupancy)[:-1]])
    rank = np.arange(n) - start[flat[order]]
    table = np.full((len(occupancy), depth), -1, np.int64)  # [cells, depth] atom ids, -1: empty
    table[flat[order], rank] = order
    cells = np.stack(np.unravel_index(np.arange(len(occupancy)), counts), -1)  # [cells, 3]
    offsets = set()
    for offset in itertools.product((-1, 0, 1), repeat=3):
        offset = np.asarray(offset)
        offsets.add(tuple(np.mod(offset, counts)) if periodic else tuple(offset))
    inverse = np.linalg.inv(cell) if periodic else None
    found_i, found_j, found_d = [], [], []
    for offset in sorted(offsets):
        other = cells + np.asarray(offset)
        if periodic:
            other = np.mod(other, counts)
            valid = np.ones(len(cells), bool)
        else:
            valid = np.all((other >= 0) & (other < counts), axis=1)
            other = np.clip(other, 0, counts - 1)
        partner = np.ravel_multi_index(other.T, counts)
        a = table[:, :, None]  # [cells, depth, 1]
        b = table[partner][:, None, :]  # [cells, 1, depth]
        keep = (a >= 0) & (b >= 0) & (a != b) & valid[:, None, None]
        i, j = np.broadcast_to(a, keep.shape)[keep], np.broadcast_to(b, keep.shape)[keep]
        d = R[j] - R[i]
        if periodic:
            f = d @ inverse
            d = (f - np.round(f)) @ cell
        r = np.sqrt(np.sum(d * d, -1))
        close = r < cutoff
        found_i.append(i[close])
        found_j.append(j[close])
        found_d.append(r[close])
    i, j, d = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def neighbor_index(R: np.ndarray, cell: np.ndarray, pbc, cutoff: float) -> np.ndarray:
    """``[n, K]`` neighbours within ``cutoff`` of each atom in index order, padded with ``n``
    (jax-md's Dense format); ``K`` is the largest count of any atom."""
    i, j, _ = neighbor_pairs(R, cell, pbc, cutoff)
    return dense_index(i, j, len(R))


def dense_index(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """The ``[n, K]`` Dense index of the pairs ``(i, j)`` of :func:`neighbor_pairs` (sorted by ``i``)."""
    counts = np.bincount(i, minlength=n)
    k = int(counts.max()) if n else 0
    index = np.full((n, k), n, np.int32)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else np.zeros(0, int)
    index[i, np.arange(len(i)) - start[i]] = j
    return index


def attention_key_slots(centre: np.ndarray, d: np.ndarray, radius: float, least: int) -> int:
    """Attention-key slots for host pairs (``centre[p]`` the row of pair ``p``, ``d[p]`` its length):
    the most pairs of one row inside ``radius``, at least ``least``, rounded up to a multiple of 8 so
    that small changes in the structure reuse a compiled program."""
    most = int(np.bincount(centre[d < radius]).max(initial=0))
    return 8 * -(-max(least, most) // 8)


def closest_distance(R: np.ndarray, cell: np.ndarray, pbc, cutoff: float) -> float:
    """The smallest distance between two atoms, if below ``cutoff``; else inf."""
    _, _, d = neighbor_pairs(R, cell, pbc, cutoff)
    return float(d.min()) if len(d) else float("inf")
