"""The pair pathway's starting weights: a float64 least-squares fit on the training frames.

The model's pair pathway (``A2IConfig.pair_radial``, :mod:`a2ijax.model`) is linear in its weights:
``E = sum_i E_shift(a_i) + 1/2 sum_(i,j) sum_p w_abp phi_p(d_ij)`` with ``phi_p(d) = c(d/r_c)
sin(p pi d/r_c) / (d/r_c)``, and the forces are linear in the same weights. So the best pair model
under the training loss is one linear least-squares problem: every training frame's energy (after the
per-species shift) and every force component are rows, each scaled as the loss scales it (the
frame's energy and force scale and the loss weights at the end of the run), and the columns are
``phi_p`` summed per unordered species pair, and the species counts: the per-species shift is
refitted with the pair potential (fitted alone, it absorbs the mean pair energy of the frames). The
trainer starts the pathway there (:func:`a2ijax.train.init_state`), so step 0 is already the best
pair potential the basis holds and the transformer, whose readout starts at zero, learns what is
left.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from a2ijax.batching import PreparedData
from a2ijax.config import ExperimentConfig
from a2ijax.geometry import minimum_image, neighbor_pairs
from a2ijax.model import bessel_basis, envelope

MAX_FIT_FRAMES = 400  # evenly spaced training frames; the fit has at most a few hundred columns
# Ridge penalties tried on the pair weights, relative to the design's mean squared column, and the bound
# on the weights over the energy scale that picks the first acceptable one (fit_pair_weights).
RIDGES = (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)
WEIGHT_BOUND = 1e2


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _basis_and_slope(x: jax.Array, n: int, kind: str, p: int) -> tuple[jax.Array, jax.Array]:
    def phi(x):
        return envelope(x, kind, p)[..., None] * bessel_basis(x, n)

    return jax.jvp(phi, (x,), (jnp.ones_like(x),))  # phi is elementwise in x


def pair_basis(d: np.ndarray, cutoff: float, n: int, kind: str = "polynomial", p: int = 6
               ) -> tuple[np.ndarray, np.ndarray]:
    """``phi_p(d)`` and ``d phi_p / d d`` for distances ``d [P]``: ``[P, n]`` each (the model's own
    envelope and Bessel functions, evaluated by JAX in float64)."""
    d = np.asarray(d, np.float64)
    size = 1 << max(int(len(d)) - 1, 1).bit_length()  # padded to a power of two: few shapes, few compilations
    with jax.enable_x64(True):
        x = jnp.asarray(np.pad(d, (0, size - len(d)), constant_values=cutoff) / cutoff)
        value, slope = _basis_and_slope(x, n, kind, p)
        return np.asarray(value)[:len(d)], np.asarray(slope)[:len(d)] / cutoff


def species_pair_columns(n_species: int) -> np.ndarray:
    """``[S, S]`` column block of each ordered species pair: one block per unordered pair."""
    table = np.zeros((n_species, n_species), int)
    pairs = [(a, b) for a in range(n_species) for b in range(a, n_species)]
    for m, (a, b) in enumerate(pairs):
        table[a, b] = table[b, a] = m
    return table


def frame_rows(R: np.ndarray, cell: np.ndarray, pbc, species: np.ndarray, cutoff: float, n: int, n_species: int,
               kind: str = "polynomial", p: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A frame's design rows: its pair energy ``[columns]`` and its forces ``[3 N, columns]``, linear
    in the weights ``w[m, p]`` of unordered species pair ``m`` (:func:`species_pair_columns`)."""
    blocks = species_pair_columns(n_species)
    columns = int(blocks.max()) + 1
    i, j, d = neighbor_pairs(R, cell, pbc, cutoff)
    u = minimum_image(R[j] - R[i], cell, pbc) / d[:, None]  # unit vector from i to j
    value, slope = pair_basis(d, cutoff, n, kind, p)
    block = blocks[species[i], species[j]]
    energy = np.zeros((columns, n))
    np.add.at(energy, block, 0.5 * value)  # each unordered pair appears twice among the ordered ones
    # -dE/dR_i = sum_j V'(d_ij) u_ij: each ordered pair (i, j) gives atom i its share once.
    forces = np.zeros((len(R), 3, columns, n))
    np.add.at(forces, (i, slice(None), block), u[:, :, None] * slope[:, None, :])
    return energy.reshape(-1), forces.reshape(3 * len(R), columns * n)


def fit_pair_weights(config: ExperimentConfig, data: PreparedData,
                     max_frames: int = MAX_FIT_FRAMES) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The pair pathway's weights ``[S, S, P]`` (symmetric) and the per-species energy shift ``[S]``
    that minimise the training loss of the pair model alone (with the ridge below, the largest of
    ``RIDGES`` if none keeps the weights in bound), and the fit's force RMSE over the force RMS,
    energy RMSE per atom, frames used and ridge."""
    model, train = config.model, config.train
    dataset, shift = data.dataset, np.asarray(data.statistics["energy_shift"], np.float64)
    frames = data.splits["train"]
    if len(frames) > max_frames:
        frames = frames[np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    w_energy, w_force = train.loss_weights(train.steps - 1)
    energy_scale, force_scale = data.frame_scales
    components = sum(3 * len(dataset.positions[f]) for f in frames)
    rows, targets, weights, force_rows = [], [], [], []
    for f in frames:
        species = dataset.species[f]
        energy, forces = frame_rows(dataset.positions[f], dataset.cells[f], dataset.pbc[f], species, model.cutoff,
                                    model.pair_radial, model.n_species, model.envelope, model.envelope_exponent)
        counts = np.bincount(species, minlength=model.n_species).astype(np.float64)
        rows += [np.concatenate([energy, counts])[None], np.pad(forces, ((0, 0), (0, model.n_species)))]
        targets += [[dataset.energy[f] - shift[species].sum()], dataset.forces[f].reshape(-1)]
        weights += [[np.sqrt(w_energy / len(frames)) / energy_scale[f]],
                    np.full(len(forces), np.sqrt(w_force / components) / force_scale[f])]
        force_rows.append(np.zeros(1 + len(forces), bool))
        force_rows[-1][1:] = True
    A, y, w = np.concatenate(rows), np.concatenate(targets), np.concatenate(weights)
    is_force = np.concatenate(force_rows)
    # Where the frames sample few distances (a crystal's shells), the plain least-squares weights reach
    # 1e6 and cancel, which float32 cannot evaluate (the SW crystal: forces 10-25x the std after 500
    # steps): the smallest ridge of RIDGES that keeps every weight within WEIGHT_BOUND times the energy
    # scale (force RMS x cutoff), so float32's round-off in their sum stays near 1e-5 of that scale.
    A_w, pair_columns = A * w[:, None], A.shape[1] - model.n_species
    column_scale = np.sum(A_w[:, :pair_columns] ** 2) / pair_columns
    bound = WEIGHT_BOUND * math.sqrt(data.statistics["force_mean_square"]) * model.cutoff
    for ridge in RIDGES:
        regulariser = np.zeros((pair_columns, A.shape[1]))
        regulariser[:, :pair_columns] = math.sqrt(ridge * column_scale) * np.eye(pair_columns)
        solution, *_ = np.linalg.lstsq(np.concatenate([A_w, regulariser]),
                                       np.concatenate([y * w, np.zeros(pair_columns)]), rcond=None)
        if np.max(np.abs(solution[:pair_columns])) <= bound:
            break
    residual = A @ solution - y
    atoms = np.asarray([len(dataset.positions[f]) for f in frames], np.float64)
    fit = dict(force_rmse_over_rms=float(np.sqrt(np.mean(residual[is_force] ** 2) / np.mean(y[is_force] ** 2))),
               energy_rmse_per_atom=float(np.sqrt(np.mean((residual[~is_force] / atoms) ** 2))),
               frames=int(len(frames)), ridge=ridge)
    blocks = species_pair_columns(model.n_species)
    table = solution[:-model.n_species].reshape(-1, model.pair_radial)[blocks]  # [S, S, P], symmetric
    return table, shift + solution[-model.n_species:], fit
