"""Recover Lennard-Jones sigma and epsilon from a target g(r), pressure and mean potential energy by differentiable MD.

    python experiments/fit_lj_structure.py --out runs/fit_lj               # both methods
    python experiments/fit_lj_structure.py --out /tmp/fit --quick          # a few steps, to try it

The target: the reference LJ fluid (``a2ijax.systems``, sigma = epsilon = 1) at rho = 0.84,
kT = 0.85 (Nose-Hoover NVT, 256 atoms): its smoothed g(r) (``a2ijax.observables.pair_correlation``),
pressure and potential energy per atom averaged over ``--target-steps`` steps. g(r) and the pressure
pin sigma but hardly epsilon (at fixed kT they move little with it); the potential energy per atom
scales with epsilon. The fit starts from sigma = 1.12, epsilon = 0.88 (12% off each) and minimises
``sum (g - g_target)^2 / G + w_P (P - P_target)^2 + w_U (U/N - U_target/N)^2`` with Adam (its learning
rate decayed from ``--lr`` to ``--final-lr`` along a cosine), by

* **reweighting** (DiffTRe, ``a2ijax.fitting.fit_by_reweighting``): samples of ``--sample-steps``
  steps drawn at the current parameters whenever N_eff / N falls below 0.9;
* **backpropagation** (``a2ijax.fitting.fit_by_backprop``): every step differentiates a new
  ``--segment-steps`` segment, each starting where the last ended.

Writes ``<out>/fit.json`` (settings, targets, every step of both fits, final parameters, their
errors, wall clock, samples drawn) and ``<out>/fit.png`` (parameters, loss and N_eff per step).
The final parameters are the mean over the last quarter of the steps (the gradients are noisy).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax_md import space

from a2ijax import diffmd, fitting, observables
from a2ijax.cli import NON_NEGATIVE, POSITIVE, POSITIVE_INT
from a2ijax.files import atomic_write
from a2ijax.systems import lattice_positions, parametric_energy

N, DENSITY, KT, DT = 256, 0.84, 0.85, 0.005
START = dict(sigma=1.12, epsilon=0.88)


def setup():
    side = (N / DENSITY) ** (1 / 3)
    box = jnp.eye(3) * side
    displacement, shift = space.periodic_general(box, fractional_coordinates=False)
    neighbor_fn, truth, energy_fn = parametric_energy("lj", displacement, box, dr_threshold=0.3,
                                                      capacity_multiplier=1.5)
    grid = jnp.linspace(0.8, 2.3, 61)

    def observe(params, R, neighbor):
        rdf = observables.pair_correlation(R, neighbor, displacement, side**3, grid, 0.04)[0, 0]
        pressure = observables.pressure(lambda R, **kw: energy_fn(params, R, neighbor, **kw), R, box, KT)
        return dict(rdf=rdf, pressure=pressure, energy=energy_fn(params, R, neighbor) / N)

    return side, box, shift, neighbor_fn, truth, energy_fn, observe, grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fit_lj"))
    parser.add_argument("--quick", action="store_true", help="a few steps of everything")
    parser.add_argument("--steps", type=POSITIVE_INT, default=120, help="optimiser steps per method")
    parser.add_argument("--lr", type=POSITIVE, default=0.01, help="Adam's first learning rate")
    parser.add_argument("--final-lr", type=POSITIVE, default=0.001,
                        help="the learning rate at the last step (cosine decay from --lr; equal: constant)")
    parser.add_argument("--target-steps", type=POSITIVE_INT, default=20000)
    parser.add_argument("--sample-steps", type=POSITIVE_INT, default=2000)
    parser.add_argument("--segment-steps", type=POSITIVE_INT, default=400)
    parser.add_argument("--pressure-weight", type=POSITIVE, default=0.01)
    parser.add_argument("--energy-weight", type=NON_NEGATIVE, default=1.0,
                        help="weight of the potential energy per atom (0: g(r) and pressure only)")
    parser.add_argument("--methods", nargs="+", default=["reweighting", "backprop"])
    parser.add_argument("--seed", type=int, default=0, help="the key of every MD run (targets, samples, segments)")
    parser.add_argument("--adam-b2", type=POSITIVE, default=0.9,
                        help="Adam's second-moment decay, below 1; optax's 0.999 keeps the first steps' large "
                             "gradients and stalls the fit on some seeds (docs/design.md, 'Known limits')")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.target_steps, args.sample_steps, args.segment_steps = 3, 1000, 200, 40
    if args.final_lr > args.lr:
        parser.error(f"--final-lr ({args.final_lr}) must not exceed --lr ({args.lr})")
    if args.adam_b2 >= 1:
        parser.error(f"--adam-b2 ({args.adam_b2}) must be below 1")
    schedule = optax.cosine_decay_schedule(args.lr, args.steps, alpha=args.final_lr / args.lr)
    optimizer = optax.adam(schedule, b2=args.adam_b2)
    side, box, shift, neighbor_fn, truth, energy_fn, observe, grid = setup()
    key = jax.random.PRNGKey(args.seed)
    R0 = jnp.asarray(lattice_positions(N, side, jitter=0.05, seed=0))
    neighbor = neighbor_fn.allocate(R0)
    started = time.perf_counter()
    equilibrate = diffmd.make_segment(energy_fn, shift, steps=max(args.target_steps // 5, 100), dt=DT, kT=KT)
    _, warm = diffmd.sample(equilibrate, energy_fn, truth, R0, neighbor, key, neighbor_fn, KT)
    target_segment = diffmd.make_segment(energy_fn, shift, steps=args.target_steps, dt=DT, kT=KT,
                                         block=max(1, args.target_steps // 200))
    target_sample, _ = diffmd.sample(target_segment, energy_fn, truth, warm.frames[-1], warm.neighbor,
                                     jax.random.fold_in(key, 1), neighbor_fn, KT)
    targets, _ = diffmd.reweighted_mean(observe, energy_fn, truth, target_sample)
    targets = {k: np.asarray(v) for k, v in targets.items()}
    print(f"targets from {args.target_steps} steps in {time.perf_counter() - started:.1f} s: "
          f"pressure {float(targets['pressure']):.4f}, U/N {float(targets['energy']):.4f}, "
          f"g(r) peak {float(targets['rdf'].max()):.3f}")
    weights = dict(rdf=1.0, pressure=args.pressure_weight, energy=args.energy_weight)
    if args.energy_weight == 0:  # the fit by g(r) and pressure alone
        del targets["energy"], weights["energy"]
    start = {k: jnp.asarray(v) for k, v in START.items()}
    results = {}

    if "reweighting" in args.methods:
        sampler = diffmd.make_segment(energy_fn, shift, steps=args.sample_steps, dt=DT, kT=KT,
                                      block=max(1, args.sample_steps // 100))
        last = dict(R=warm.frames[-1], neighbor=warm.neighbor)

        def draw(params, k):  # relax at the new parameters for one segment, then sample
            sample, segment = diffmd.sample(sampler, energy_fn, params, last["R"], last["neighbor"],
                                            jax.random.fold_in(key, 1000 + k), neighbor_fn, KT, relax=1)
            last.update(R=segment.frames[-1], neighbor=segment.neighbor)
            return sample

        t = time.perf_counter()
        fit = fitting.fit_by_reweighting(start, energy_fn, draw, observe, targets, optimizer, args.steps,
                                         weights=weights, callback=progress("reweighting"), track=floats)
        results["reweighting"] = summary(fit, time.perf_counter() - t, truth)

    if "backprop" in args.methods:
        segment = diffmd.make_segment(energy_fn, shift, steps=args.segment_steps, dt=DT, kT=KT)

        def segment_loss(params, neighbor, R, key):
            result = segment(params, R, neighbor, key)
            values = jax.vmap(lambda R: observe(params, R, neighbor.update(R)))(result.frames)
            return jax.tree.map(lambda v: jnp.mean(v, 0), values), result

        t = time.perf_counter()
        fit = fitting.fit_by_backprop(start, segment_loss, neighbor_fn, warm.frames[-1], warm.neighbor, targets,
                                      optimizer, args.steps, key=jax.random.fold_in(key, 2),
                                      weights=weights, callback=progress("backprop"), track=floats)
        results["backprop"] = summary(fit, time.perf_counter() - t, truth)

    args.out.mkdir(parents=True, exist_ok=True)
    record = dict(settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  state_point=dict(N=N, density=DENSITY, kT=KT, dt=DT), start=START,
                  targets={k: np.asarray(v).tolist() for k, v in targets.items()}, grid=np.asarray(grid).tolist(),
                  results=results)
    atomic_write(args.out / "fit.json", lambda f: json.dump(record, f, indent=1))
    plot(args.out / "fit.png", results)
    for method, r in results.items():
        print(f"{method}: sigma {r['final']['sigma']:.4f} ({100 * r['error']['sigma']:+.2f}%), epsilon "
              f"{r['final']['epsilon']:.4f} ({100 * r['error']['epsilon']:+.2f}%), {r['seconds']:.0f} s, "
              f"{r['samples']} samples/segments")


def floats(params):
    return {k: float(v) for k, v in params.items()}


def progress(method):
    def show(row):
        extra = f" N_eff/N {row['n_eff_fraction']:.2f}{' (new sample)' if row['resampled'] else ''}" \
            if "n_eff_fraction" in row else ""
        print(f"  {method} step {row['step']}: loss {row['loss']:.4g}{extra} ({row['seconds']:.0f} s)", flush=True)
    return show


def summary(fit: fitting.FitResult, seconds: float, truth: dict) -> dict:
    trace = {k: [row["tracked"][k] for row in fit.history] for k in START}
    tail = max(1, len(fit.history) // 4)
    final = {k: float(np.mean(v[-tail:])) for k, v in trace.items()}
    error = {k: final[k] / float(truth[k]) - 1 for k in START}
    return dict(final=final, error=error, seconds=seconds, samples=fit.samples, trace=trace,
                history=[{k: v for k, v in row.items() if k != "tracked"} for row in fit.history])


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method, r in results.items():
        for name, style in (("sigma", "-"), ("epsilon", "--")):
            axes[0].plot(r["trace"][name], style, label=f"{method} {name}")
        axes[1].semilogy([row["loss"] for row in r["history"]], label=method)
        if method == "reweighting":
            axes[2].plot([row["n_eff_fraction"] for row in r["history"]], label="N_eff / N")
    axes[0].axhline(1.0, color="k", lw=0.5)
    axes[0].set(xlabel="step", ylabel="parameter (truth 1)")
    axes[1].set(xlabel="step", ylabel="loss")
    axes[2].set(xlabel="step", ylabel="N_eff / N (reweighting)", ylim=(0, 1.05))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
