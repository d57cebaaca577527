"""What a trained model learned: its attention maps and its per-atom energies.

* :func:`attention_maps`: the attention weights of every block and head between the neighbour
  tokens ``j`` (queries) and ``k`` (keys) of chosen centre atoms ``i`` of a structure, with the
  geometry they belong to (neighbour indices, distances ``d_ij``, cosines of ``theta_jik``).
* :func:`angle_profile` and :func:`distance_profile`: the mean weight against the angle
  ``theta_jik`` and against the key's distance ``d_ik``, over all pairs of real, distinct
  neighbours; :func:`plot_profiles` draws both.
* :func:`per_atom_energies`: the model's per-atom energies on a labelled dataset against the exact
  decomposition the reference potential gives (pair potentials: half of each pair term to each
  atom; Stillinger-Weber: jax-md's convention, each three-body term to its central atom), with the
  correlations :func:`a2ijax.report.error_report` reports (for several species also after fixing
  the per-species offset that data of one composition cannot determine).

The weights come from the model itself (``intermediates`` of :class:`a2ijax.model.SelfAttention`),
not from a re-implementation, so they are exactly what the energy used.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import ase
import jax
import jax.numpy as jnp
import numpy as np

from a2ijax.checkpoint import Checkpoint
from a2ijax.dataset import structure_dataset
from a2ijax.errors import InputError
from a2ijax.model import A2ITransformer
from a2ijax.potential import a2i_periodic, default_float, model_inputs, periodic_space
from a2ijax.report import error_report, predict_dataset


@dataclasses.dataclass
class AttentionMaps:
    """Attention of the centre atoms ``centers [n]`` over their ``K`` neighbour slots.

    ``weights [layers, n, H, K, M]``: the weight of key ``m`` for query slot ``j`` (``M = K`` slots,
    or the ``attention_keys`` nearest ones, listed in ``keys``; with the pair pathway and an
    attention range the tokens are those keys, and the slots here are the tokens: ``K = M``);
    ``sink [layers, n, H, K]``: the share of the sink (each query's weights and sink sum to one).
    ``neighbors [n, K]``: the atom in each slot (``N`` where empty); ``keys [n, M]``: the slot of
    each key; ``distances [n, K]``: ``d_ij`` (inf where empty); ``cosines [n, K, M]``:
    ``cos(theta_jik)`` between query slot ``j`` and key ``m``.
    """

    centers: np.ndarray
    neighbors: np.ndarray
    keys: np.ndarray
    distances: np.ndarray
    cosines: np.ndarray
    weights: np.ndarray
    sink: np.ndarray

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mask [n, K, M], key distance [n, M])``: which (query, key) entries are two real, distinct
        neighbours, and each key's distance from the centre."""
        real = np.isfinite(self.distances)
        key_real = np.take_along_axis(real, self.keys, 1)
        distinct = self.keys[:, None, :] != np.arange(real.shape[1])[None, :, None]
        key_distance = np.take_along_axis(self.distances, self.keys, 1)
        return real[:, :, None] & key_real[:, None, :] & distinct, key_distance


def attention_maps(checkpoint: Checkpoint, atoms: ase.Atoms, centers: Any = None, neighbor_idx: Any = None,
                   capacity_multiplier: float = 1.25) -> AttentionMaps:
    """The attention maps of ``checkpoint``'s model for the centre atoms ``centers`` (default: all)
    of the periodic structure ``atoms``. ``neighbor_idx [N, K]``: a Dense neighbour index to use
    (empty slots hold ``N``; neighbours beyond the cutoff are allowed and get no weight); default:
    the potential's own neighbour list."""
    checkpoint.require_a2i("a2ijax.analysis")
    config = checkpoint.config.model
    frame = structure_dataset(atoms, checkpoint.symbols)
    dtype = jnp.result_type(float)
    box = jnp.asarray(atoms.cell[:].T, dtype)
    species = jnp.asarray(frame.species[0])
    R = jnp.asarray(atoms.get_positions(), dtype)
    neighbor_fn, _, _ = a2i_periodic(box, config, species, capacity_multiplier=capacity_multiplier)
    displacement, _ = periodic_space(box)
    neighbor = neighbor_fn.allocate(R)
    idx = neighbor.idx if neighbor_idx is None else jnp.asarray(neighbor_idx, jnp.int32)
    if config.attention_keys:  # the key slots the list found necessary (a capacity: a2ijax.neighbors)
        config = dataclasses.replace(config, attention_keys=max(config.attention_keys, neighbor.key_capacity))
    centers = np.arange(len(R)) if centers is None else np.asarray(centers, int).reshape(-1)
    if centers.size and (centers.min() < 0 or centers.max() >= len(R)):
        raise InputError(f"centers must be atom indices in [0, {len(R)}), got {centers.min()}..{centers.max()}")
    rows = jnp.asarray(centers, jnp.int32)
    dR, species_center, species_neighbor, pair_mask = model_inputs(R, idx[rows], displacement, species, None,
                                                                   centers=rows)
    apply = jax.jit(functools.partial(A2ITransformer(config).apply, mutable=["intermediates"]))
    _, state = apply(default_float(checkpoint.params), dR, species_center, species_neighbor, pair_mask)
    found = state["intermediates"]
    blocks = [found[f"block_{layer}"]["attention"] for layer in range(config.layers)]
    weights = np.stack([np.asarray(b["weights"][0]) for b in blocks])
    sink = np.stack([np.asarray(b["sink"][0]) for b in blocks])
    dR, mask, slots = np.asarray(dR, np.float64), np.asarray(pair_mask), np.asarray(idx)[centers]
    if "tokens" in found:  # with the pair pathway the tokens are the keys: the maps cover those slots
        tokens = np.asarray(found["tokens"][0])
        dR, mask = np.take_along_axis(dR, tokens[..., None], 1), np.take_along_axis(mask, tokens, 1)
        slots = np.take_along_axis(slots, tokens, 1)
    d = np.where(mask, np.linalg.norm(dR, axis=-1), np.inf)
    k = dR.shape[1]
    keys = np.asarray(found["keys"][0]) if "keys" in found else np.broadcast_to(np.arange(k), (len(centers), k))
    unit = np.where(mask[..., None], dR / np.where(mask, d, 1.0)[..., None], 0.0)
    cosines = np.einsum("nkx,nmx->nkm", unit, np.take_along_axis(unit, keys[..., None], 1))
    neighbors = np.where(mask, slots, len(R))
    return AttentionMaps(centers, neighbors, np.asarray(keys), d, np.clip(cosines, -1.0, 1.0), weights, sink)


def _binned_mean(x: np.ndarray, weights: np.ndarray, mask: np.ndarray, edges: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``weights [layers, n, H, K, M]`` per bin of ``x [n, K, M]`` over ``mask``: ``[layers, H, bins]``
    (NaN in empty bins), and the count per bin."""
    which = np.minimum(np.digitize(x, edges) - 1, len(edges) - 2)  # the last edge belongs to the last bin
    inside = mask & (x >= edges[0]) & (x <= edges[-1])
    counts = np.bincount(which[inside], minlength=len(edges) - 1)
    w = np.moveaxis(weights, 2, 1)[:, :, inside]  # [layers, H, pairs]
    sums = np.stack([[np.bincount(which[inside], h, minlength=len(edges) - 1) for h in layer] for layer in w])
    with np.errstate(invalid="ignore"):
        return sums / counts, counts


def angle_profile(maps: AttentionMaps, bins: int = 36, max_distance: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(theta in degrees [bins], mean weight [layers, H, bins], pairs per bin [bins])`` over every
    pair of real, distinct neighbours ``j, k`` (both within ``max_distance`` of the centre if given)."""
    mask, key_distance = maps.pairs()
    if max_distance is not None:
        mask = mask & (maps.distances[:, :, None] < max_distance) & (key_distance[:, None, :] < max_distance)
    edges = np.linspace(0.0, 180.0, bins + 1)
    mean, counts = _binned_mean(np.degrees(np.arccos(maps.cosines)), maps.weights, mask, edges)
    return 0.5 * (edges[1:] + edges[:-1]), mean, counts


def distance_profile(maps: AttentionMaps, bins: int = 30, r_max: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(d_ik [bins], mean weight [layers, H, bins], pairs per bin [bins])``: the mean weight a key
    gets against its distance from the centre, over every pair of real, distinct neighbours."""
    mask, key_distance = maps.pairs()
    x = np.broadcast_to(key_distance[:, None, :], mask.shape)
    r_max = float(np.max(key_distance[np.isfinite(key_distance)])) if r_max is None else r_max
    edges = np.linspace(0.0, r_max, bins + 1)
    mean, counts = _binned_mean(x, maps.weights, mask, edges)
    return 0.5 * (edges[1:] + edges[:-1]), mean, counts


def plot_profiles(path: str | Path, maps: AttentionMaps, title: str = "", max_distance: float | None = None) -> None:
    """A PNG: the mean attention weight against ``theta_jik`` (left) and ``d_ik`` (right), a line per
    block and head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    theta, by_angle, _ = angle_profile(maps, max_distance=max_distance)
    r, by_distance, _ = distance_profile(maps)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for layer in range(by_angle.shape[0]):
        for head in range(by_angle.shape[1]):
            label = f"block {layer}, head {head}"
            left.plot(theta, by_angle[layer, head], label=label)
            right.plot(r, by_distance[layer, head], label=label)
    left.axvline(109.47, color="grey", lw=0.8, ls=":")
    left.set(xlabel="theta_jik (degrees)", ylabel="mean attention weight w_jk",
             title="by angle" + (f" (d < {max_distance:g})" if max_distance else ""))
    right.set(xlabel="d_ik (key distance)", ylabel="mean attention weight w_jk", title="by key distance")
    right.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def per_atom_energies(checkpoint: Checkpoint, data_path: str | Path, split: str | None = "test",
                      atom_chunk: int | None = None) -> dict[str, Any]:
    """The model's per-atom energies on a labelled dataset (``split`` of it, or all frames with
    None) against the exact ones stored with it: ``model``, ``exact`` and ``species`` (flat over
    atoms) and the report's ``pearson`` (and ``pearson_gauge_fixed`` for several species)."""
    dataset, (predictions,) = predict_dataset(checkpoint, data_path, split, atom_chunk=atom_chunk)
    if dataset.per_atom_energies is None or predictions.per_atom is None:
        raise InputError(f"{data_path}: the frames carry no per-atom energies (the exact decomposition)")
    frames = predictions.frame_index
    stats = error_report(dataset, predictions, {})["per_atom_energy"]
    return dict(stats, model=np.concatenate(predictions.per_atom),
                exact=np.concatenate([dataset.per_atom_energies[i] for i in frames]),
                species=np.concatenate([dataset.species[i] for i in frames]))
