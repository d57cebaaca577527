"""Attention maps and their profiles (a2ijax.analysis)."""

from __future__ import annotations

import numpy as np
from conftest import lj_frames

from a2ijax import analysis
from a2ijax.checkpoint import load_checkpoint
from a2ijax.potential import all_pairs_index


def test_attention_weights_sum_to_one_minus_the_sink_and_vanish_beyond_the_cutoff(trained):
    """All pairs as neighbours (most of them beyond the cutoff) against the potential's own list:
    beyond-cutoff keys get exactly zero weight, and every pair of real neighbours gets the same weight
    either way, whatever slot it sits in."""
    checkpoint = load_checkpoint(trained[1])
    atoms = lj_frames(125, 1, seed=5)[0]
    centers = np.arange(6)
    every = analysis.attention_maps(checkpoint, atoms, centers, neighbor_idx=all_pairs_index(len(atoms)))
    listed = analysis.attention_maps(checkpoint, atoms, centers)
    cutoff = checkpoint.config.model.cutoff
    for maps in (every, listed):
        real = np.isfinite(maps.distances)
        total = maps.weights.sum(-1) + maps.sink  # [layers, n, H, K]
        np.testing.assert_allclose(total[:, real[:, None, :].repeat(total.shape[2], 1)], 1.0, rtol=1e-5)
    beyond = every.distances >= cutoff  # keys = all slots here
    assert beyond.sum() > 2 * (~beyond).sum()  # most of the pairs are beyond the cutoff
    for n in range(len(centers)):
        assert np.all(every.weights[:, n][..., beyond[n]] == 0.0)
    assert float(listed.weights.max()) > 0.05 and len(listed.neighbors[0]) < len(every.neighbors[0])
    for n in range(len(centers)):
        slot_every = {int(a): s for s, a in enumerate(every.neighbors[n]) if every.distances[n, s] < cutoff}
        slots = [(s, slot_every[int(a)]) for s, a in enumerate(listed.neighbors[n])
                 if np.isfinite(listed.distances[n, s])]
        assert len(slots) == len(slot_every) > 10
        mine, theirs = np.asarray(slots).T
        np.testing.assert_allclose(listed.weights[:, n][..., mine[:, None], mine[None, :]],
                                   every.weights[:, n][..., theirs[:, None], theirs[None, :]], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(listed.cosines[n][mine[:, None], mine[None, :]],
                                   every.cosines[n][theirs[:, None], theirs[None, :]], atol=1e-6)


def test_profiles_average_the_weights_of_real_distinct_pairs_per_bin():
    """A hand-made map: two centres, three slots (one empty), one layer, one head."""
    inf = np.inf
    distances = np.array([[1.0, 2.0, inf], [1.5, 1.5, inf]])
    cosines = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                        [[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    weights = np.array([[[0.5, 0.2, 0.9], [0.4, 0.1, 0.9], [0.9, 0.9, 0.9]],
                        [[0.3, 0.6, 0.9], [0.7, 0.3, 0.9], [0.9, 0.9, 0.9]]])[None, :, None]
    maps = analysis.AttentionMaps(np.arange(2), np.array([[1, 2, 9], [3, 4, 9]]), np.tile(np.arange(3), (2, 1)),
                                  distances, cosines, weights, np.zeros((1, 2, 1, 3)))
    theta, mean, counts = analysis.angle_profile(maps, bins=2)
    np.testing.assert_allclose(theta, [45.0, 135.0])
    # 90 degrees falls in the upper bin: pairs (0,1), (1,0) of centre 0; 180: (0,1), (1,0) of centre 1.
    assert counts.tolist() == [0, 4]
    np.testing.assert_allclose(mean[0, 0], [np.nan, (0.2 + 0.4 + 0.6 + 0.7) / 4])
    r, by_distance, counts = analysis.distance_profile(maps, bins=3, r_max=3.0)
    assert counts.tolist() == [0, 3, 1]  # keys at 1.0, 1.5, 1.5 | 2.0 (a bin holds its lower edge)
    np.testing.assert_allclose(by_distance[0, 0], [np.nan, (0.4 + 0.6 + 0.7) / 3, 0.2])
