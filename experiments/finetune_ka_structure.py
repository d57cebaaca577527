"""Top-down fine-tuning of the shipped Kob-Andersen model on the reference's g_ab(r), by reweighting.

    python experiments/finetune_ka_structure.py --out runs/finetune_ka
    python experiments/finetune_ka_structure.py --out /tmp/ft --quick      # a few short steps, to try it

At rho = 1.2, kT = 1.0 (``--atoms`` atoms, 80:20, Nose-Hoover NVT): the target is the reference
potential's smoothed g_ab(r) (``a2ijax.observables.pair_correlation``) averaged over
``--target-samples`` samples of ``--sample-steps`` steps; its noise floor per pair is the mean
|difference| between the averages of the first and the second half of those samples. The shipped
model (``a2ijax.pretrained.load("ka")``, or ``--checkpoint``) is fine-tuned by DiffTRe
(``a2ijax.fitting.fit_by_reweighting``: samples of ``--sample-steps`` steps after as many to relax,
redrawn when N_eff / N < ``--n-eff``) on ``--rdf-weight * sum (g - g_ref)^2 / G`` plus force matching
on ``--force-frames`` frames of the model's training split of ``--data``
(``fitting.checkpoint_force_matching``). Before and after: the model's g_ab(r) from a fresh sample
(mean |g - g_ref| per pair against the noise floor) and its force error on the test split of
``--data`` at this state point (``a2ijax.report.evaluate`` of the checkpoint with the new parameters).

Writes ``<out>/finetune.json`` and ``<out>/finetune.png`` (g_ab before / after / reference, loss and
N_eff per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax_md import space

from a2ijax import diffmd, fitting, observables, pretrained
from a2ijax.checkpoint import load_checkpoint
from a2ijax.cli import POSITIVE, POSITIVE_INT
from a2ijax.dataset import read_dataset, split_indices, state_point_groups
from a2ijax.files import atomic_write
from a2ijax.potential import a2i_neighbor_list
from a2ijax.report import evaluate
from a2ijax.systems import get_system, lattice_positions, parametric_energy

POINT = "rho1.2_T1.0"
PAIRS = {"A-A": (0, 0), "A-B": (0, 1), "B-B": (1, 1)}
FRAMES_PER_SAMPLE = 25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_ka"))
    parser.add_argument("--checkpoint", default="", help="a checkpoint directory (default: the shipped KA model)")
    parser.add_argument("--data", default="data/ka.xyz", help="the model's labelled data (a2ijax generate ka)")
    parser.add_argument("--quick", action="store_true", help="a few short steps of everything")
    parser.add_argument("--atoms", type=POSITIVE_INT, default=250)
    parser.add_argument("--steps", type=POSITIVE_INT, default=8, help="optimiser steps")
    parser.add_argument("--lr", type=POSITIVE, default=3e-4, help="Adam's learning rate")
    parser.add_argument("--sample-steps", type=POSITIVE_INT, default=500)
    parser.add_argument("--target-samples", type=POSITIVE_INT, default=8)
    parser.add_argument("--rdf-weight", type=POSITIVE, default=10.0)
    parser.add_argument("--force-frames", type=POSITIVE_INT, default=16)
    parser.add_argument("--n-eff", type=POSITIVE, default=0.5, help="redraw a sample below this N_eff / N")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.sample_steps, args.target_samples, args.force_frames = 2, 50, 2, 2
    if args.target_samples < 2:
        parser.error("--target-samples must be >= 2 (the noise floor compares two halves)")
    if args.sample_steps % FRAMES_PER_SAMPLE:
        parser.error(f"--sample-steps must be a multiple of {FRAMES_PER_SAMPLE} (frames per sample)")
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else pretrained.load("ka")
    system = get_system("ka")
    point = system.state_point(POINT)
    side = (args.atoms / point.density) ** (1 / 3)
    box = jnp.eye(3) * side
    species = jnp.asarray(system.species(args.atoms))
    displacement, shift = space.periodic_general(box, fractional_coordinates=False)
    grid = jnp.linspace(0.6, 2.3, 69)
    key = jax.random.PRNGKey(0)
    started = time.perf_counter()

    def rdf(R, neighbor):
        return observables.pair_correlation(R, neighbor, displacement, side**3, grid, 0.05, species, 2)

    def make_sampler(energy_fn):
        return diffmd.make_segment(energy_fn, shift, steps=args.sample_steps, dt=system.dt, kT=point.kT,
                                   block=args.sample_steps // FRAMES_PER_SAMPLE)

    # The reference's g_ab(r) and its noise floor.
    ref_neighbor_fn, truth, ref_energy = parametric_energy("ka", displacement, box, species, dr_threshold=0.3)
    ref_sampler = make_sampler(ref_energy)
    R = jnp.asarray(lattice_positions(args.atoms, side, jitter=0.05, seed=0))
    neighbor = ref_neighbor_fn.allocate(R)
    per_sample = []
    for k in range(args.target_samples + 4):  # the first four equilibrate
        drawn, ended = diffmd.sample(ref_sampler, ref_energy, truth, R, neighbor, jax.random.fold_in(key, k),
                                     ref_neighbor_fn, point.kT)
        R, neighbor = ended.frames[-1], ended.neighbor
        if k >= 4:
            per_sample.append(np.asarray(diffmd.frame_values(rdf, drawn.frames, drawn.neighbor, 5).mean(0)))
    per_sample = np.stack(per_sample)
    half = args.target_samples // 2
    target = per_sample.mean(0)
    noise = differences(per_sample[:half].mean(0), per_sample[half:].mean(0))
    print(f"reference g_ab(r) from {args.target_samples} x {args.sample_steps} steps "
          f"({time.perf_counter() - started:.0f} s); noise floor {fmt(noise)}", flush=True)

    # The model, its samples, and the force-matching term on its own training frames.
    neighbor_fn, _, energy_fn = a2i_neighbor_list(displacement, box, checkpoint.config.model, species,
                                                  dr_threshold=0.3)
    sampler = make_sampler(energy_fn)
    last = dict(R=R, neighbor=neighbor_fn.allocate(R))

    def draw(params, k):  # one segment to relax at the new parameters, then the sample
        t = time.perf_counter()
        drawn, ended = diffmd.sample(sampler, energy_fn, params, last["R"], last["neighbor"],
                                     jax.random.fold_in(key, 1000 + k), neighbor_fn, point.kT, relax=1)
        last.update(R=ended.frames[-1], neighbor=ended.neighbor)
        print(f"  model sample {k}: {2 * args.sample_steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
        return drawn

    def observe(params, R, neighbor):
        return dict(rdf=rdf(R, neighbor))

    def structure(params, sample):
        return np.asarray(diffmd.reweighted_mean(observe, energy_fn, params, sample)[0]["rdf"])

    dataset = read_dataset(args.data, checkpoint.symbols)
    config = checkpoint.config
    train = np.intersect1d(split_indices(dataset, config.data.split_fractions, config.train.seed)["train"],
                           state_point_groups(dataset)[POINT])
    chosen = np.sort(np.random.default_rng(0).choice(train, min(args.force_frames, len(train)), replace=False))
    force_matching = fitting.checkpoint_force_matching(checkpoint, dataset, chosen)

    def test_force_error(params):
        report, _ = evaluate(dataclasses.replace(checkpoint, params=params), args.data, split="test")
        return report["state_points"][POINT]["force_rmse"]

    before = dict(force_rmse=test_force_error(checkpoint.params),
                  force_matching=float(force_matching(checkpoint.params)))
    first = draw(checkpoint.params, 0)
    g_before = structure(checkpoint.params, first)
    before["rdf_difference"] = differences(g_before, target)
    print(f"before: g_ab difference {fmt(before['rdf_difference'])}, test force RMSE {before['force_rmse']:.4f}, "
          f"force matching {before['force_matching']:.4f}", flush=True)

    t = time.perf_counter()
    fit = fitting.fit_by_reweighting(checkpoint.params, energy_fn, lambda p, k: first if k == 0 else draw(p, k),
                                     observe, dict(rdf=target), optax.adam(args.lr), args.steps,
                                     weights=dict(rdf=args.rdf_weight), extra_loss=force_matching,
                                     n_eff_threshold=args.n_eff, callback=progress)
    fit_seconds = time.perf_counter() - t
    g_after = structure(fit.params, draw(fit.params, 10_000))
    after = dict(force_rmse=test_force_error(fit.params), force_matching=float(force_matching(fit.params)),
                 rdf_difference=differences(g_after, target))
    print(f"after:  g_ab difference {fmt(after['rdf_difference'])}, test force RMSE {after['force_rmse']:.4f}, "
          f"force matching {after['force_matching']:.4f}; {fit.samples} samples, {fit_seconds:.0f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    record = dict(settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  model=checkpoint.meta["commands"][-1], state_point=POINT, force_frames=chosen.tolist(),
                  noise_floor=noise, before=before, after=after, fit_seconds=fit_seconds, samples=fit.samples,
                  total_seconds=time.perf_counter() - started, history=fit.history, grid=np.asarray(grid).tolist(),
                  rdf=dict(reference=target.tolist(), before=g_before.tolist(), after=g_after.tolist()))
    atomic_write(args.out / "finetune.json", lambda f: json.dump(record, f, indent=1))
    plot(args.out / "finetune.png", np.asarray(grid), target, g_before, g_after, fit.history)


def differences(g: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Mean |g_ab - reference_ab| over the grid, per species pair."""
    return {name: float(np.mean(np.abs(g[a, b] - reference[a, b]))) for name, (a, b) in PAIRS.items()}


def fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items())


def progress(row: dict) -> None:
    print(f"  step {row['step']}: loss {row['loss']:.4g} (force matching {row['extra']:.4g}), N_eff/N "
          f"{row['n_eff_fraction']:.2f}{' (new sample)' if row['resampled'] else ''} ({row['seconds']:.0f} s)",
          flush=True)


def plot(path: Path, grid, target, before, after, history) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (name, (a, b)) in zip(axes, PAIRS.items(), strict=False):
        ax.plot(grid, target[a, b], "k", label="reference")
        ax.plot(grid, before[a, b], label="shipped model")
        ax.plot(grid, after[a, b], label="fine-tuned")
        ax.set(title=f"g_{name}(r)", xlabel="r")
    axes[0].legend(fontsize=7)
    axes[3].semilogy([row["loss"] for row in history], label="loss")
    axes[3].semilogy([row["extra"] for row in history], label="force matching")
    axes[3].plot([row["n_eff_fraction"] for row in history], label="N_eff / N")
    axes[3].set(xlabel="step")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
