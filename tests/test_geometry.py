"""Host-side neighbour search: equal to all pairs, and memory linear in N (docs/design.md, invariant 5
on the host and "no N x N arrays on paths advertised for large systems")."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from a2ijax.geometry import check_widths, closest_distance, minimum_image, neighbor_index, neighbor_pairs


def all_pairs(R, cell, pbc, cutoff):
    """The independent answer: every pair, minimum image, O(N^2)."""
    d = np.linalg.norm(minimum_image(R[None, :, :] - R[:, None, :], cell, pbc), axis=-1)
    np.fill_diagonal(d, np.inf)
    i, j = np.nonzero(d < cutoff)
    return i, j, d[i, j]


CELLS = {
    "cube, 2 cells per axis": (np.eye(3) * 5.0, True, 2.4),
    "cube, 5 cells per axis": (np.eye(3) * 9.0, True, 1.7),
    "sheared": (np.array([[6.0, 0.0, 0.0], [2.5, 5.5, 0.0], [-1.0, 1.5, 6.2]]), True, 2.0),
    "free cluster": (np.zeros((3, 3)), False, 1.5),
}


@pytest.mark.parametrize("name", CELLS)
def test_cell_list_equals_all_pairs(name):
    cell, pbc, cutoff = CELLS[name]
    rng = np.random.default_rng(len(name))
    n = 150
    R = rng.uniform(0, 1, (n, 3)) @ cell if pbc else rng.uniform(-4, 4, (n, 3))
    R = R + (rng.integers(-2, 3, (n, 3)) @ cell if pbc else 0.0)  # atoms outside the cell wrap
    i, j, d = neighbor_pairs(R, cell, pbc, cutoff)
    i0, j0, d0 = all_pairs(R, cell, pbc, cutoff)
    assert len(i0) > 2 * n  # a dense enough system for the check to mean something
    np.testing.assert_array_equal(i, i0)
    np.testing.assert_array_equal(j, j0)
    np.testing.assert_allclose(d, d0, rtol=1e-12)
    index = neighbor_index(R, cell, pbc, cutoff)
    for a in range(n):
        np.testing.assert_array_equal(index[a][index[a] < n], j0[i0 == a])
    assert closest_distance(R, cell, pbc, cutoff) == pytest.approx(d0.min(), rel=1e-12)


def test_narrow_box_and_partial_periodicity_are_errors():
    with pytest.raises(ValueError, match=r"box too small for the cutoff: width 4 along cell vector 0"):
        check_widths(np.eye(3) * 4.0, True, 2.0)
    with pytest.raises(ValueError, match="partly periodic"):
        neighbor_pairs(np.zeros((3, 3)), np.eye(3) * 10, [True, False, True], 1.0)


def _peak_bytes(fn, *args) -> int:
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_is_linear_in_the_number_of_atoms():
    """4x the atoms, at most ~4x the peak memory (an [N, N] distance array, as the search had before,
    would be 16x: 384 MB of float64 [N, N, 3] at N = 4,000). NumPy reports to tracemalloc."""
    peaks = {}
    for n in (2000, 8000):
        side = (n / 0.84) ** (1 / 3)
        R = np.random.default_rng(n).uniform(0, side, (n, 3))
        cell = np.eye(3) * side
        peaks[n] = max(_peak_bytes(neighbor_index, R, cell, True, 2.5),
                       _peak_bytes(closest_distance, R, cell, True, 2.5))
    assert peaks[8000] < 5.0 * peaks[2000], peaks
    assert peaks[8000] / 8000 < 64 * 1024  # bytes per atom (all pairs at N = 8,000 would be 24 kB/atom x 8)
