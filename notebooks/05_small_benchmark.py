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
# # 05 — A small benchmark
#
# `a2ijax.bench.measure` times one potential at one size: energy+forces latency, MD throughput
# (atom-steps per second in a compiled `lax.scan` of NVE steps with the neighbour list updated
# inside), compile times and XLA's FLOP count. A benchmark is a ratio against a baseline measured
# in the same run, here jax-md's own Lennard-Jones: absolute times depend on the machine, the
# ratio much less. The accelerator part runs only where JAX sees a GPU or TPU.
# `A2IJAX_NOTEBOOK_QUICK=1` measures one small size with few repeats.

# %%
import os

import jax
import matplotlib.pyplot as plt

from a2ijax import bench

QUICK = os.environ.get("A2IJAX_NOTEBOOK_QUICK") == "1"
# Quick: the settings of tests/test_bench.py, whose programs the test suite's compilation cache holds.
SIZES = [128] if QUICK else [256, 1000, 4000]
settings = dict(chunk=4, chunks=1, repeats=1) if QUICK else dict(chunk=50, chunks=3, repeats=5)
print("backend:", jax.default_backend(), jax.devices())

# %%
rows = [bench.measure("lj", n, **settings) for n in SIZES] + [bench.measure("a2i-small", n, **settings) for n in SIZES]
for row in rows:
    print(f"{row['potential']:10s} N={row['n']:5d}: {row['atom_steps_per_s']:>12,.0f} atom-steps/s, "
          f"energy+forces {1e3 * row['force_s']:.2f} ms, {row['force_flop_per_atom']:.3g} FLOP/atom, "
          f"first chunk {row['md_first_chunk_s']:.1f} s")
ratio = {n: next(r["atom_steps_per_s"] for r in rows if r["potential"] == "lj" and r["n"] == n)
         / next(r["atom_steps_per_s"] for r in rows if r["potential"] == "a2i-small" and r["n"] == n)
         for n in SIZES}
print("jax-md LJ / A2I (small) MD throughput:", {n: f"{v:.0f}x" for n, v in ratio.items()})

fig, ax = plt.subplots(figsize=(5, 3.5))
for name in ("lj", "a2i-small"):
    mine = [r for r in rows if r["potential"] == name]
    ax.loglog([r["n"] for r in mine], [r["us_per_atom_step"] for r in mine], "o-", label=name)
ax.set(xlabel="atoms", ylabel="microseconds per atom-step")
ax.legend()
plt.show()

# %% [markdown]
# ## On an accelerator
# `experiments/gpu_bench.sh` is the full accelerator run (sizes to 64,000 atoms, the speed
# ablation); here one size with the accelerator's own default atom chunk.

# %%
accelerator = jax.default_backend() in ("gpu", "tpu")
if accelerator:
    row = bench.measure("a2i", 4000, **settings)
    print(f"a2i on {jax.devices()[0].device_kind}: {row['atom_steps_per_s']:,.0f} atom-steps/s")
else:
    print("no accelerator: skipped")

# %% [markdown]
# ## Checks on this notebook's own numbers

# %%
figures = dict(lj_over_a2i_small={str(n): float(v) for n, v in ratio.items()})
for row in rows:
    assert row["force_flop_per_atom"] > 0 and row["neighbor_list"] in ("cell list", "all pairs")
# The learned potential costs more per atom than the pair potential it learns (XLA's FLOP count
# is deterministic; the timing ratio is the measured one).
for n in SIZES:
    lj, a2i = (next(r for r in rows if r["potential"] == p and r["n"] == n) for p in ("lj", "a2i-small"))
    assert a2i["force_flop_per_atom"] > 10 * lj["force_flop_per_atom"]
    # A plausible band for the cost of attention over a pair potential per atom-step (measured 20-60x
    # for this model on CPUs: results.md); far outside it, a timing is broken.
    assert 3.0 < ratio[n] < 3000.0, ratio
