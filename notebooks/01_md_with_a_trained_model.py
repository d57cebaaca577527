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
# # 01 — MD with a trained model
#
# The shipped Lennard-Jones model (`a2ijax.pretrained.load("lj")`) drives jax-md like any jax-md
# potential: `(neighbor_fn, energy_fn, displacement_fn, shift_fn)` from `checkpoint.potential(box)`.
# We start from a configuration equilibrated by the reference potential, run NVE with the model
# and with the reference, compare energy conservation and the radial distribution function, and
# finally run several replicas in one compiled step.
#
# `A2IJAX_NOTEBOOK_QUICK=1` (what the test suite sets) shrinks the system and the runs; the full
# mode is 256 atoms and a few thousand steps (a few minutes on 2 cores).

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax_md import simulate

from a2ijax import md, pretrained
from a2ijax.potential import Potential, periodic_space
from a2ijax.systems import get_system, lattice_positions

QUICK = os.environ.get("A2IJAX_NOTEBOOK_QUICK") == "1"
N = 128 if QUICK else 256
STEPS = 100 if QUICK else 4000
system = get_system("lj")
point = system.state_point("rho0.84_T0.85")
side = (N / point.density) ** (1 / 3)
box = jnp.eye(3) * side
print(f"{N} LJ atoms at density {point.density}, kT = {point.kT}, box {side:.3f}")

# %% [markdown]
# ## A start equilibrated by the reference potential (Langevin NVT)

# %%
displacement, shift = periodic_space(box)
reference = Potential(*system.neighbor_list(displacement, box, dr_threshold=0.2), displacement, shift)
R = jnp.asarray(lattice_positions(N, side, jitter=0.05, seed=0))
warm = md.simulate(reference, R, box, steps=300 if QUICK else 5000,
                   dt=system.dt, ensemble="langevin", kT=point.kT, thermo_every=100, trajectory_every=500,
                   progress=False)
start = warm.state.position
print(f"reference NVT: mean kT {warm.thermo['temperature'][-5:].mean():.3f}")

# %% [markdown]
# ## NVE with the model and with the reference, from the same start

# %%
checkpoint = pretrained.load("lj")
print("model:", checkpoint.meta["commands"][-1])
model = checkpoint.potential(box, dr_threshold=0.2)
runs = {}
for name, potential in dict(model=model, reference=reference).items():
    runs[name] = md.simulate(potential, start, box, steps=STEPS, dt=system.dt, ensemble="nve",
                             kT=point.kT, seed=1, thermo_every=20, trajectory_every=20 if QUICK else 100,
                             progress=False)
    total = runs[name].thermo["total"] / N
    print(f"{name:9s}: mean kT {runs[name].thermo['temperature'].mean():.3f}, drift {runs[name].drift:.2e} "
          f"per atom per time, largest excursion {np.max(np.abs(total - total[0])):.2e}, "
          f"{runs[name].rate:,.0f} atom-steps/s")

fig, ax = plt.subplots(figsize=(6, 3))
for name, run in runs.items():
    ax.plot(run.thermo["time"], run.thermo["total"] / N, label=name)
ax.set(xlabel="time (LJ units)", ylabel="total energy per atom")
ax.legend()
plt.show()

# %% [markdown]
# ## Radial distribution function
# `a2ijax.md.radial_distribution` histograms every stored frame; the difference is the mean of
# |g_model - g_reference| over r (`a2ijax.md.rdf_difference`).

# %%
species = np.zeros(N, np.int32)
rdfs = {}
for name, run in runs.items():
    r, rdfs[name] = md.radial_distribution(run.positions, np.asarray(box), species, r_max=0.49 * side, bins=60)
difference = md.rdf_difference(r, rdfs["model"], rdfs["reference"])[(0, 0)]
fig, ax = plt.subplots(figsize=(6, 3))
for name, g in rdfs.items():
    ax.plot(r, g[(0, 0)], label=name)
ax.set(xlabel="r", ylabel="g(r)", title=f"mean |difference| {difference:.3f}")
ax.legend()
plt.show()

# %% [markdown]
# ## Replicas: several systems in one compiled step
# `md.run(..., replicas=True)` vmaps the integrator over a leading replica axis of the state and of
# the neighbour lists (`md.allocate_replicas`). Here: three copies started with different velocities.

# %%
neighbor_fn, energy_fn = model.neighbor_fn, model.energy_fn
init, apply = simulate.nve(energy_fn, model.shift_fn, system.dt)
B = 3
starts = jnp.stack([start] * B)
keys = jax.random.split(jax.random.PRNGKey(2), B)
states = jax.vmap(lambda k, R: init(k, R, kT=point.kT, neighbor=neighbor_fn.allocate(start)))(keys, starts)
together = md.run(apply, states, neighbor_fn, md.allocate_replicas(neighbor_fn, starts), 20 if QUICK else 400,
                  chunk_steps=20, observe=md.energy_observables(energy_fn), replicas=True)
totals = together.observables["total"] / N
print("replica total energies per atom (first, last record):")
print(np.stack([totals[:, 0], totals[:, -1]], 1))

# %% [markdown]
# ## Checks on this notebook's own numbers

# %%
model, reference = runs["model"], runs["reference"]
figures = dict(mean_kT={k: float(v.thermo["temperature"].mean()) for k, v in runs.items()},
               drift_per_atom={k: float(v.drift) for k, v in runs.items()}, rdf_difference=float(difference))
assert np.all(np.isfinite(model.thermo["total"]))
# Energy conservation: the model's excursion is of the same order as the reference's (the
# reference's force jumps at its cutoff; the model is smooth).
excursion = {k: np.max(np.abs(v.thermo["total"] - v.thermo["total"][0])) / N for k, v in runs.items()}
assert excursion["model"] < 10 * max(excursion["reference"], 1e-4), excursion
# Same state: mean temperatures within 10%, liquid structure close.
assert abs(model.thermo["temperature"].mean() / reference.thermo["temperature"].mean() - 1) < 0.1
assert difference < (0.15 if QUICK else 0.05), difference
# Replicas: distinct trajectories (different velocities), each conserving its own energy.
assert float(np.std(totals[:, 0])) > 1e-4
assert float(np.max(np.abs(totals[:, -1] - totals[:, 0]))) < 5e-3
