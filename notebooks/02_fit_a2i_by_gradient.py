# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 — Fitting an A2I model by gradient, the loop written out
#
# `a2ijax train` runs this loop with checkpoints, evaluation and several devices; here it is by
# hand, from the library's pieces: labelled frames (`a2ijax.sampling.label`), padded batches
# (`a2ijax.batching.prepare`), the potential in jax-md's builder shape, the loss pieces
# (`a2ijax.loss.predict_fn`, `batch_errors`, `normalised_loss`) and an optax optimiser.
# `A2IJAX_NOTEBOOK_QUICK=1` uses fewer frames and steps.

# %%
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from a2ijax import A2IConfig
from a2ijax.batching import prepare
from a2ijax.config import DataConfig, ExperimentConfig, TrainConfig
from a2ijax.dataset import read_dataset, write_dataset
from a2ijax.loss import batch_errors, normalised_loss, predict_fn
from a2ijax.potential import a2i_builder, fixed_neighbor_list
from a2ijax.sampling import label
from a2ijax.systems import get_system, lattice_positions

QUICK = os.environ.get("A2IJAX_NOTEBOOK_QUICK") == "1"
FRAMES, STEPS, N = (24, 200, 64) if QUICK else (120, 1500, 108)

# %% [markdown]
# ## Labelled frames: jittered LJ lattices at density 0.5, energies and forces from the reference

# %%
system = get_system("lj")
side = (N / 0.5) ** (1 / 3)
positions = np.stack([np.asarray(lattice_positions(N, side, jitter=0.12 * side / N ** (1 / 3), seed=s))
                      for s in range(FRAMES)])
frames = label(system, positions, np.zeros(N, np.int32), side)
n_train = int(0.75 * FRAMES)
for i, atoms in enumerate(frames):
    atoms.info.update(split="train" if i < n_train else "test", state_point="rho0.5", system="lj")
path = Path(tempfile.mkdtemp()) / "frames.xyz"
write_dataset(path, frames)
dataset = read_dataset(path)
print(f"{len(dataset)} frames of {N} atoms, {n_train} for training")

# %% [markdown]
# ## Batches, the potential and its initial parameters

# %%
model = A2IConfig(cutoff=2.5, width=16, heads=2, layers=1, n_radial=6, angular_order=1, avg_neighbors=30.0)
config = ExperimentConfig(DataConfig(path=str(path), split_fractions=(0.75, 0.0, 0.25)), model,
                          TrainConfig(batch_size=4))
data = prepare(dataset, config)
train, test = data.buckets["train"][0], data.buckets["test"][0]
init_fn, energy_fn = a2i_builder(model, atom_chunk=0)
R0 = jnp.asarray(train.R[0])
params = init_fn(jax.random.PRNGKey(0), R0, neighbor=fixed_neighbor_list(jnp.asarray(train.idx[0]), R0),
                 species=jnp.asarray(train.species[0]), box=jnp.asarray(train.box[0]))
# Start from the least-squares energy per atom and the force scale, as the trainer does.
params["params"]["energy_shift"] = jnp.asarray(data.statistics["energy_shift"], jnp.float32)
params["params"]["energy_scale"] = jnp.full((1,), np.sqrt(data.statistics["force_mean_square"]), jnp.float32)
print("parameters:", sum(x.size for x in jax.tree.leaves(params)))
initial_params = params

# %% [markdown]
# ## The loop: loss from the library's pieces, gradient, AdamW

# %%
predict = predict_fn(energy_fn)
optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, STEPS), weight_decay=1e-4)
opt_state = optimizer.init(params)


@jax.jit
def step(params, opt_state, batch):
    def loss(params):
        return normalised_loss(batch_errors(predict, params, batch), (0.1, 1.0))

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


rng = np.random.default_rng(0)
losses = []
for _ in range(STEPS):
    batch = {k: jnp.asarray(v) for k, v in train.batch(rng.choice(len(train), 4, replace=False), 4).items()}
    params, opt_state, value = step(params, opt_state, batch)
    losses.append(float(value))
print(f"loss: first 10 steps {np.mean(losses[:10]):.3f}, last 10 {np.mean(losses[-10:]):.3f}")

# %% [markdown]
# ## Parity on the held-out frames

# %%
batch = {k: jnp.asarray(v) for k, v in test.batch(np.arange(len(test)), len(test)).items()}
mask = np.asarray(batch["mask"])
f_ref = np.asarray(batch["forces"])[mask].ravel()
force_std = float(np.std(f_ref))


def test_forces(params):
    return np.asarray(jax.jit(predict)(params, batch)[1])[mask].ravel()


f_pred = test_forces(params)
force_ratio = float(np.sqrt(np.mean((f_pred - f_ref) ** 2))) / force_std
initial_ratio = float(np.sqrt(np.mean((test_forces(initial_params) - f_ref) ** 2))) / force_std
print(f"test force RMSE / std: {initial_ratio:.2f} before training, {force_ratio:.2f} after")
fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
axes[0].semilogy(losses)
axes[0].set(xlabel="step", ylabel="loss")
axes[1].plot(f_ref, f_pred, ".", ms=2)
axes[1].plot([f_ref.min(), f_ref.max()], [f_ref.min(), f_ref.max()], "k", lw=0.5)
axes[1].set(xlabel="reference force", ylabel="model force", title=f"test RMSE / std = {force_ratio:.2f}")
plt.show()

# %% [markdown]
# ## Checks on this notebook's own numbers

# %%
figures = dict(loss_first_10=float(np.mean(losses[:10])), loss_last_10=float(np.mean(losses[-10:])),
               test_force_rmse_over_std=dict(before=initial_ratio, after=force_ratio),
               force_correlation=float(np.corrcoef(f_pred, f_ref)[0, 1]))
assert np.all(np.isfinite(losses))
assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])
# Held-out frames: the fit generalises. Quick mode (200 steps on 18 frames) only starts on the
# forces, whose error falls slowly for this model family (BUILD_NOTES.md history, learning curves).
assert force_ratio < (0.95 if QUICK else 0.5) * initial_ratio, (initial_ratio, force_ratio)
assert np.corrcoef(f_pred, f_ref)[0, 1] > (0.5 if QUICK else 0.95)
if not QUICK:
    assert force_ratio < 0.3, force_ratio
