"""How the gradient of an MD average grows with the length of the differentiated segment.

    python experiments/gradient_norms.py --out runs/gradient_norms

The LJ fluid (``a2ijax.systems.parametric_energy``, 256 atoms, rho = 0.84, kT = 0.85, Nose-Hoover,
float64), equilibrated at sigma = epsilon = 1. For segments of ``--lengths`` steps (each from the
same start, velocities from the same key), the gradient of the mean potential energy per atom
over the segment's frames with respect to (sigma, epsilon) by backpropagation (``diffmd``), full
and truncated every ``--truncate`` blocks. Chaos makes the full gradient grow exponentially once
the segment is longer than the system's Lyapunov time; the truncated one stays bounded (and biased).
A reference: the same derivative by reweighting a long sample (``diffmd.reweighted_mean``), which
is what the average's true derivative is (up to sampling noise).

Writes ``<out>/gradient_norms.json`` and ``<out>/gradient_norms.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import space

from a2ijax import diffmd
from a2ijax.files import atomic_write
from a2ijax.systems import lattice_positions, parametric_energy

N, DENSITY, KT, DT = 256, 0.84, 0.85, 0.005


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gradient_norms"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[25, 50, 100, 200, 400, 800, 1600])
    parser.add_argument("--block", type=int, default=25, help="steps per rematerialised block")
    parser.add_argument("--truncate", type=int, default=2, help="blocks between gradient cuts")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    side = (N / DENSITY) ** (1 / 3)
    box = jnp.eye(3) * side
    displacement, shift = space.periodic_general(box, fractional_coordinates=False)
    neighbor_fn, truth, energy_fn = parametric_energy("lj", displacement, box, dr_threshold=0.3)
    key = jax.random.PRNGKey(0)
    R = jnp.asarray(lattice_positions(N, side, jitter=0.05, seed=0))
    warm_segment = diffmd.make_segment(energy_fn, shift, steps=4000, dt=DT, kT=KT, block=100)
    long_sample, warm = diffmd.sample(warm_segment, energy_fn, truth, R, neighbor_fn.allocate(R), key,
                                      neighbor_fn, KT)
    start, neighbor = warm.frames[-1], warm.neighbor
    long_sample, _ = diffmd.sample(warm_segment, energy_fn, truth, start, neighbor, jax.random.fold_in(key, 1),
                                   neighbor_fn, KT)
    reweighted = jax.grad(lambda p: diffmd.reweighted_mean(lambda p, R, n: energy_fn(p, R, n) / N, energy_fn, p,
                                                           long_sample)[0])(truth)
    rows = []
    for length in args.lengths:
        for truncate in (0, args.truncate):
            if truncate and length // args.block <= truncate:
                continue
            segment = diffmd.make_segment(energy_fn, shift, steps=length, dt=DT, kT=KT,
                                          block=min(args.block, length), truncate=truncate)

            def loss(params, nbr, R, segment=segment):
                result = segment(params, R, nbr, jax.random.fold_in(key, 2))
                return jnp.mean(result.energies) / N, dict(overflow=result.overflow)

            t = time.perf_counter()
            _, _, grads = diffmd.CheckedGradient(loss, neighbor_fn, neighbor)(truth, start)
            row = dict(length=length, truncate=truncate, sigma=float(grads["sigma"]), epsilon=float(grads["epsilon"]),
                       norm=float(np.hypot(grads["sigma"], grads["epsilon"])), seconds=time.perf_counter() - t)
            rows.append(row)
            print(f"{length:5d} steps, truncate {truncate}: d<U/N>/dsigma {row['sigma']:+.4g}, "
                  f"d<U/N>/depsilon {row['epsilon']:+.4g}, |grad| {row['norm']:.4g} ({row['seconds']:.1f} s)",
                  flush=True)
    reference = dict(sigma=float(reweighted["sigma"]), epsilon=float(reweighted["epsilon"]),
                     norm=float(np.hypot(reweighted["sigma"], reweighted["epsilon"])))
    print(f"reweighting over {long_sample.frames.shape[0]} frames: d<U/N>/dsigma {reference['sigma']:+.4g}, "
          f"d<U/N>/depsilon {reference['epsilon']:+.4g}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = dict(settings=dict(N=N, density=DENSITY, kT=KT, dt=DT, block=args.block, truncate=args.truncate),
                  rows=rows, reweighting=reference)
    atomic_write(args.out / "gradient_norms.json", lambda f: json.dump(record, f, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for truncate, label in ((0, "full backpropagation"), (args.truncate, f"truncated every {args.truncate} blocks")):
        mine = [r for r in rows if r["truncate"] == truncate]
        ax.loglog([r["length"] for r in mine], [r["norm"] for r in mine], "o-", label=label)
    ax.axhline(reference["norm"], color="k", lw=0.8, ls="--", label="reweighting (long sample)")
    ax.set(xlabel="segment length (steps of 0.005)", ylabel="|d<U/N>/d(sigma, epsilon)|")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "gradient_norms.png", dpi=110)


if __name__ == "__main__":
    main()
