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
# # 04 — Fine-tuning an A2I model to structure by reweighting (Kob-Andersen)
#
# A Kob-Andersen model fitted to energies and forces can get the structure wrong in MD: the earlier
# KA models put B-B pairs where the reference has none (docs/results.md, "MD with the shipped models").
# Top-down fine-tuning of the shipped model (`a2ijax.pretrained.load("ka")`): sample MD with the
# model, reweight the frames to nearby parameters (DiffTRe, `a2ijax.fitting.fit_by_reweighting`),
# and follow the gradient of the difference between the model's g_ab(r) and the reference
# potential's, with a force-matching term on reference-labelled frames so that the model keeps its
# forces.
#
# `A2IJAX_NOTEBOOK_QUICK=1` takes one optimiser step on short samples: it shows the pieces; the full
# mode takes 8 steps on samples of 500 steps, as `experiments/finetune_ka_structure.py` (its figures,
# and why they fall short of the reference structure: BUILD_NOTES.md, "Figures no file holds yet").

# %%
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from jax_md import space

from a2ijax import diffmd, fitting, observables, pretrained
from a2ijax.dataset import read_dataset, write_dataset
from a2ijax.potential import a2i_neighbor_list
from a2ijax.sampling import label
from a2ijax.systems import get_system, lattice_positions, parametric_energy

QUICK = os.environ.get("A2IJAX_NOTEBOOK_QUICK") == "1"
system = get_system("ka")
point = system.state_point("rho1.2_T1.0")
N, KT, DT = (180 if QUICK else 250), point.kT, system.dt
side = (N / point.density) ** (1 / 3)
box = jnp.eye(3) * side
species = jnp.asarray(system.species(N))
displacement, shift = space.periodic_general(box, fractional_coordinates=False)
checkpoint = pretrained.load("ka")
print(f"{N} atoms ({int(jnp.sum(species == 1))} B), kT = {KT}; model: {checkpoint.meta['commands'][-1]}")

# %% [markdown]
# ## Targets: the reference potential's g_ab(r), and reference-labelled frames for force matching

# %%
grid = jnp.linspace(0.6, 2.4, 46)


def rdf(R, neighbor):
    return observables.pair_correlation(R, neighbor, displacement, side**3, grid, 0.05, species, 2)


ref_neighbor_fn, truth, ref_energy = parametric_energy("ka", displacement, box, species, dr_threshold=0.3)
sampler = diffmd.make_segment(ref_energy, shift, steps=100 if QUICK else 500, dt=DT, kT=KT, block=5 if QUICK else 20)
R = jnp.asarray(lattice_positions(N, side, jitter=0.05, seed=0))
neighbor = ref_neighbor_fn.allocate(R)
key = jax.random.PRNGKey(0)
reference_frames = []
for k in range(2 if QUICK else 12):  # the first sample equilibrates
    drawn, ended = diffmd.sample(sampler, ref_energy, truth, R, neighbor, jax.random.fold_in(key, k),
                                 ref_neighbor_fn, KT)
    R, neighbor = ended.frames[-1], ended.neighbor
    if k >= 1:
        reference_frames.append(drawn)
targets = dict(rdf=jnp.mean(jnp.stack([diffmd.frame_values(rdf, s.frames, s.neighbor, 16).mean(0)
                                       for s in reference_frames]), 0))
start_R = R

labelled = label(system, np.asarray(reference_frames[-1].frames[-(1 if QUICK else 8):]), species, side)
for atoms in labelled:
    atoms.info.update(split="train", state_point=point.name, system="ka")
path = Path(tempfile.mkdtemp()) / "labelled.xyz"
write_dataset(path, labelled)
force_matching = fitting.checkpoint_force_matching(
    checkpoint, read_dataset(path, symbols=checkpoint.meta["symbols"]), np.arange(len(labelled)))
print(f"force-matching term of the shipped model on {len(labelled)} fresh frames: "
      f"{float(force_matching(checkpoint.params)):.3f} (squared force error over the force std squared)")

# %% [markdown]
# ## The model in the builder shape, sampled by MD, reweighted

# %%
neighbor_fn, _, energy_fn = a2i_neighbor_list(displacement, box, checkpoint.config.model, species,
                                              dr_threshold=0.3)
model_sampler = diffmd.make_segment(energy_fn, shift, steps=24 if QUICK else 500, dt=DT, kT=KT,
                                    block=3 if QUICK else 20)
state = dict(R=start_R, neighbor=neighbor_fn.allocate(start_R))


def draw(params, k):  # one segment to relax at the new parameters (full mode), then the sample
    drawn, ended = diffmd.sample(model_sampler, energy_fn, params, state["R"], state["neighbor"],
                                 jax.random.fold_in(key, 100 + k), neighbor_fn, KT, relax=0 if QUICK else 1)
    state.update(R=ended.frames[-1], neighbor=ended.neighbor)
    return drawn


def observe(params, R, neighbor):
    return dict(rdf=rdf(R, neighbor))


first = draw(checkpoint.params, 0)
before, n_eff = diffmd.reweighted_mean(observe, energy_fn, checkpoint.params, first)
pairs = {"A-A": (0, 0), "A-B": (0, 1), "B-B": (1, 1)}
dr = float(grid[1] - grid[0])


def differences(g):
    return {name: float(jnp.mean(jnp.abs(g[a, b] - targets["rdf"][a, b]))) for name, (a, b) in pairs.items()}


print("mean |g_model - g_reference| before:", differences(before["rdf"]))

# %% [markdown]
# ## Fine-tuning: g(r) loss + force matching, Adam, a new sample when N_eff / N < 0.5

# %%
# The fit's first sample is the one above (drawn at the same parameters); later ones are new.
fit = fitting.fit_by_reweighting(checkpoint.params, energy_fn, lambda params, k: first if k == 0 else draw(params, k),
                                 observe, targets, optax.adam(3e-4),
                                 1 if QUICK else 8, weights=dict(rdf=10.0), extra_loss=force_matching,
                                 n_eff_threshold=0.5)
# The structure after fine-tuning: a new sample at the final parameters (quick mode: reweighted from
# the last sample, which is close enough after one small step).
after_sample = first if QUICK else draw(fit.params, 1000)
after, _ = diffmd.reweighted_mean(observe, energy_fn, fit.params, after_sample)
print("mean |g_model - g_reference| after: ", differences(after["rdf"]))
print(f"force-matching term after: {float(force_matching(fit.params)):.3f}; {fit.samples} samples drawn")

fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
for ax, (name, (a, b)) in zip(axes, pairs.items(), strict=True):
    ax.plot(grid, targets["rdf"][a, b], "k", label="reference")
    ax.plot(grid, before["rdf"][a, b], label="model")
    ax.plot(grid, after["rdf"][a, b], label="fine-tuned")
    ax.set(title=name, xlabel="r")
axes[0].legend()
plt.show()

# %% [markdown]
# ## Checks on this notebook's own numbers

# %%
figures = dict(rdf_difference=dict(before=differences(before["rdf"]), after=differences(after["rdf"])),
               force_matching=dict(before=float(force_matching(checkpoint.params)),
                                   after=float(force_matching(fit.params))), samples=fit.samples)
assert abs(diffmd.effective_fraction(n_eff, first) - 1) < 1e-6, diffmd.effective_fraction(n_eff, first)
rows = fit.history
assert all(np.isfinite(row["loss"]) and row["extra"] > 0 for row in rows), [(row["loss"], row["extra"]) for row in rows]
assert all(0 < row["n_eff_fraction"] <= 1 + 1e-6 for row in rows), [row["n_eff_fraction"] for row in rows]
moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(fit.params),
                                                          jax.tree.leaves(checkpoint.params), strict=True))
assert moved > 0, moved
# The fit's objective on its first sample falls: the reweighted gradient points downhill.


def objective(params):
    averages, _ = diffmd.reweighted_mean(observe, energy_fn, params, first)
    return float(observables.observable_loss(averages, targets, dict(rdf=10.0))[0] + force_matching(params))


assert objective(fit.params) < objective(checkpoint.params), (objective(fit.params), objective(checkpoint.params))
print(figures)
if not QUICK:  # force matching keeps the forces to their order over the fit; the structure of a new
    # sample is not improved (docs/results.md, "The notebooks in full mode"; docs/design.md, "Known
    # limits": the model's own MD drifts between samples, so a better-trained model comes first)
    assert float(force_matching(fit.params)) < 2.0 * float(force_matching(checkpoint.params)), figures
