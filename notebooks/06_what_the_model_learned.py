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
# # 06 — What the model learned: per-atom energies and attention maps
#
# The paper motivates A2I by interpretability: each atom's energy is a readout of attention over
# its neighbours, so one can ask what the attention looks at. `a2ijax.analysis` gives
#
# * the per-atom energies against the exact decomposition of the reference potential (for a pair
#   potential, half of every pair term goes to each atom), and
# * the attention weights `w_jk` of every block and head between the neighbour tokens `j` (queries)
#   and `k` (keys) of an atom `i`, taken from the model itself, with the angle `theta_jik` and the
#   distances they belong to.
#
# We look at the shipped Lennard-Jones and Stillinger-Weber models on frames sampled freshly with
# the reference potentials. `A2IJAX_NOTEBOOK_QUICK=1` (what the test suite sets) shortens the LJ
# equilibration, uses fewer centre atoms and, for SW, a diamond crystal with random displacements of
# 0.1 A (about the thermal amplitude at 1500 K) instead of a sampled crystal and liquid.

# %%
import os

import ase
import matplotlib.pyplot as plt
import numpy as np

from a2ijax import analysis, pretrained
from a2ijax.md import radial_distribution
from a2ijax.sampling import SamplingConfig, sample_state_point
from a2ijax.systems import diamond_positions, get_system

QUICK = os.environ.get("A2IJAX_NOTEBOOK_QUICK") == "1"
EQUILIBRATION = 1000 if QUICK else 10000
CENTERS = np.arange(32 if QUICK else 256)
SW_POINTS = ("crystal_1500K",) if QUICK else ("crystal_1500K", "liquid_2500K")


def frame(system_name, point_name, equilibration=EQUILIBRATION, seed=0):
    """One frame of Langevin MD with the reference potential, labelled (energies, forces, per-atom energies)."""
    system = get_system(system_name)
    sampling = SamplingConfig(frames_per_point=1, stride=50, equilibration=equilibration, seed=seed)
    return sample_state_point(system, system.state_point(point_name), sampling, seed=seed)[-1]


# %% [markdown]
# ## Per-atom energies of the LJ model against the exact pair decomposition

# %%
lj = pretrained.load("lj")
atoms = frame("lj", "rho0.84_T0.85")
box = atoms.cell[:].T
neighbor_fn, energy_fn, _, _ = lj.potential(box)
R = atoms.get_positions()
nbrs = neighbor_fn.allocate(R)
model_energies = np.asarray(energy_fn(R, neighbor=nbrs, per_atom=True))
exact_energies = atoms.get_potential_energies()
r_lj = float(np.corrcoef(model_energies, exact_energies)[0, 1])
print(f"{len(atoms)} atoms: per-atom energy correlation r = {r_lj:.3f} "
      f"(the model's test report: {lj.meta['report']['per_atom_energy']['pearson']:.3f}); "
      f"total energy model {model_energies.sum():.2f}, reference {atoms.get_potential_energy():.2f}")
plt.figure(figsize=(4, 4))
plt.scatter(exact_energies, model_energies, s=6)
lims = [exact_energies.min(), exact_energies.max()]
plt.plot(lims, lims, "k:", lw=0.8)
plt.xlabel("exact E_i (half of each LJ pair term)")
plt.ylabel("model E_i")
plt.title(f"LJ, rho 0.84, kT 0.85: r = {r_lj:.3f}")
plt.show()

# %% [markdown]
# ## Does the LJ model attend to the first shell?
#
# The mean weight a key gets against its distance from the centre, next to the radial distribution
# function of the same frame: where is the weight, compared with the first-shell peak?

# %%
lj_maps = analysis.attention_maps(lj, atoms, CENTERS)
r, by_distance, counts = analysis.distance_profile(lj_maps, bins=24)
rdf_r, g = radial_distribution(R[None], box, np.zeros(len(atoms), int), r_max=lj.config.model.cutoff, bins=50)
first_peak = float(rdf_r[np.argmax(g[0, 0])])
mean_over_heads = np.nanmean(by_distance, axis=(0, 1))
populated = counts >= 20
lj_favourite = float(r[populated][np.nanargmax(mean_over_heads[populated])])
print(f"first RDF peak at r = {first_peak:.2f}; keys get the largest mean weight at d_ik = {lj_favourite:.2f} "
      f"(cutoff {lj.config.model.cutoff})")
for layer in range(by_distance.shape[0]):
    for head in range(by_distance.shape[1]):
        h = by_distance[layer, head]
        print(f"  block {layer} head {head}: mean weight {np.nanmean(h[r < first_peak + 0.25]):.4f} within the first "
              f"shell (d < {first_peak + 0.25:.2f}), {np.nanmean(h[r > first_peak + 0.25]):.4f} beyond")
figure, axis = plt.subplots(figsize=(6, 3.5))
for layer in range(by_distance.shape[0]):
    for head in range(by_distance.shape[1]):
        axis.plot(r, by_distance[layer, head], label=f"block {layer}, head {head}")
twin = axis.twinx()
twin.plot(rdf_r, g[0, 0], "k:", lw=0.8)
twin.set_ylabel("g(r)")
axis.set(xlabel="d_ik", ylabel="mean attention weight")
axis.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## Does the SW model attend to the tetrahedral angle?
#
# Stillinger-Weber's three-body term vanishes at `cos(theta) = -1/3` (109.47 degrees) for the pairs
# of the first shell. We take the mean attention weight against `theta_jik` over pairs of first-shell
# neighbours (closer than 2.7 A, between the first and second shells of silicon), in the crystal at
# 1500 K and in the liquid.

# %%
sw = pretrained.load("sw")
sw_profiles = {}
for point_name in SW_POINTS:
    if QUICK:
        lattice, sw_side = diamond_positions(3)
        jitter = np.random.default_rng(0).normal(0.0, 0.1, np.shape(lattice))
        sw_atoms = ase.Atoms(f"Si{len(lattice)}", positions=np.asarray(lattice) + jitter,
                             cell=np.eye(3) * float(sw_side), pbc=True)
    else:
        sw_atoms = frame("sw", point_name)
    maps = analysis.attention_maps(sw, sw_atoms, CENTERS[: min(len(CENTERS), len(sw_atoms))])
    theta, by_angle, counts = analysis.angle_profile(maps, bins=36, max_distance=2.7)
    populated = counts >= 10
    mean_over_heads = np.nanmean(by_angle, axis=(0, 1))
    favourite = float(theta[populated][np.nanargmax(mean_over_heads[populated])])
    sw_profiles[point_name] = (theta, by_angle, counts, maps)
    print(f"{point_name}: pairs at {theta[populated].min():.0f}-{theta[populated].max():.0f} degrees; the largest "
          f"mean weight (over blocks and heads) at {favourite:.0f} degrees (tetrahedral: 109.5)")
    for layer in range(by_angle.shape[0]):
        peaks = [float(theta[populated][np.nanargmax(by_angle[layer, h][populated])])
                 for h in range(by_angle.shape[1])]
        print(f"  block {layer}: each head's largest mean weight at {[round(p) for p in peaks]} degrees")
    analysis.plot_profiles("sw_attention_" + point_name + ".png", maps, f"SW {point_name}", max_distance=2.7)

figure, axes = plt.subplots(1, len(sw_profiles), figsize=(5 * len(sw_profiles), 3.5), sharey=True, squeeze=False)
axes = axes[0]
for axis, (point_name, (theta, by_angle, _, _)) in zip(axes, sw_profiles.items(), strict=True):
    for layer in range(by_angle.shape[0]):
        for head in range(by_angle.shape[1]):
            axis.plot(theta, by_angle[layer, head], label=f"block {layer}, head {head}")
    axis.axvline(109.47, color="grey", ls=":")
    axis.set(title=point_name, xlabel="theta_jik (degrees), first-shell pairs")
axes[0].set_ylabel("mean attention weight")
axes[-1].legend(fontsize=7)
plt.show()

# %% [markdown]
# ## Checks on this notebook's own numbers
#
# The weights and the sink share of every real query sum to one; the LJ per-atom energies follow
# the exact decomposition as closely as the shipped report says (r >= 0.95, the target of issue
# #14 for LJ); the profiles have data.

# %%
figures = dict(lj_per_atom_energy_r=float(r_lj), lj_first_rdf_peak=float(first_peak))
for maps in (lj_maps, *[p[3] for p in sw_profiles.values()]):
    real = np.isfinite(maps.distances)
    total = maps.weights.sum(-1) + maps.sink
    assert np.allclose(np.moveaxis(total, 2, -1)[:, real], 1.0, atol=1e-5)
assert r_lj >= 0.95, r_lj
assert abs(first_peak - 1.1) < 0.15, first_peak
assert all(np.isfinite(p[1][..., p[2] >= 10]).all() for p in sw_profiles.values())
print("checks passed")
