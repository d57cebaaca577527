"""The training loss: predictions over padded batches, squared errors, normalisation, augmentation.

The loss is ``w_E mean_frames((E - E_ref) / s_E)^2 + w_F mean_components((F - F_ref) / s_F)^2`` over
the real frames and atoms of a batch (padding rows carry weight 0, padded atoms mask 0), with each
frame's scales ``s_E``, ``s_F`` carried in the batch (``a2ijax.batching.frame_scales``: by default its
state point's MD energy fluctuation and force std, the report's measure), so the weights are
dimensionless. Predictions go through the potential's builder shape only
(``energy_fn(params, R, neighbor=..., species=..., mask=..., box=..., per_atom=True)``), the same code MD runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from a2ijax.potential import fixed_neighbor_list

Array = jax.Array


def predict_fn(energy_fn: Callable, per_atom: bool = True) -> Callable:
    """``predict(params, batch) -> (E [B], F [B, N, 3], E_i [B, N] or None)`` over a padded batch
    (``per_atom=False``: for potentials without per-atom energies, ``E_i`` is None).

    ``E`` is the residual the batch's ``energy`` holds (``a2ijax.batching.Bucket``): the sum over the
    real atoms of ``E_i - atom_shift_i``, each term taken before the sum, so that it keeps the
    float32 digits a large total would lose; ``E_i`` are the model's own per-atom energies.
    """

    def one(params, R, species, mask, idx, box, atom_shift):
        neighbor = fixed_neighbor_list(idx, R)

        def total(R):
            if not per_atom:
                energy = energy_fn(params, R, neighbor=neighbor, species=species, mask=mask, box=box)
                return energy - jnp.sum(atom_shift), None
            energies = energy_fn(params, R, neighbor=neighbor, species=species, mask=mask, box=box, per_atom=True)
            return jnp.sum(jnp.where(mask, energies - atom_shift.astype(energies.dtype), 0.0)), energies

        (energy, energies), grad = jax.value_and_grad(total, has_aux=True)(R)
        return energy, -grad, energies

    def predict(params, batch):
        return jax.vmap(one, (None, 0, 0, 0, 0, 0, 0))(params, batch["R"], batch["species"], batch["mask"],
                                                       batch["idx"], batch["box"], batch["atom_shift"])

    return predict


def random_rotations(key: Array, n: int) -> Array:
    """``[n, 3, 3]`` rotation matrices, uniform over SO(3) (QR of Gaussian matrices, signs fixed).
    Row ``i`` depends on ``(key, i)`` alone, so a batch filled up with padding rows (several devices)
    rotates its real frames as the unpadded batch does."""
    gaussian = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (3, 3)))(jnp.arange(n))
    q, r = jnp.linalg.qr(gaussian)
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    return q * jnp.linalg.det(q)[:, None, None]  # det -1 -> +1 by flipping every axis (3 is odd)


def rotate_batch(batch: dict[str, Array], key: Array) -> dict[str, Array]:
    """Rotates positions, forces and cells of every frame: energies are unchanged."""
    q = random_rotations(key, batch["R"].shape[0])
    out = dict(batch)
    out["R"] = jnp.einsum("bij,bnj->bni", q, batch["R"])
    out["forces"] = jnp.einsum("bij,bnj->bni", q, batch["forces"])
    out["box"] = jnp.einsum("bij,bjk->bik", q, batch["box"])
    return out


def batch_errors(predict: Callable, params: Any, batch: dict[str, Array]) -> dict[str, Array]:
    """Weighted squared errors of one batch, summed: energy per atom and force components as they
    are (``energy_se``, ``force_se``: the RMSEs' terms) and divided by each frame's loss scales
    (``energy_nse``, ``force_nse``: the loss's terms)."""
    energy, forces, _ = predict(params, batch)
    w = batch["weight"]
    n = jnp.maximum(batch["n_atoms"], 1).astype(energy.dtype)
    e_err = energy - batch["energy"]
    f_err = (forces - batch["forces"]) * batch["mask"][..., None]
    f_se = jnp.sum(f_err**2, (1, 2))  # [B]
    return dict(energy_se=jnp.sum(w * (e_err / n) ** 2), force_se=jnp.sum(w * f_se),
                energy_nse=jnp.sum(w * (e_err / batch["energy_scale"]) ** 2),
                force_nse=jnp.sum(w * f_se / batch["force_scale"] ** 2),
                frames=jnp.sum(w), components=3.0 * jnp.sum(w * batch["n_atoms"]))


def normalised_loss(errors: dict[str, Array], weights: tuple[Any, Any]) -> Array:
    """The loss from the summed squared ``errors`` of :func:`batch_errors` and the weights ``(w_E, w_F)``."""
    e_mse = errors["energy_nse"] / jnp.maximum(errors["frames"], 1.0)
    f_mse = errors["force_nse"] / jnp.maximum(errors["components"], 1.0)
    return weights[0] * e_mse + weights[1] * f_mse
