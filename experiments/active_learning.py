"""Active learning against random selection on the LJ fluid: test error against labelled frames.

    python experiments/active_learning.py experiments/configs/learn_lj.toml --out runs/active_learning

Writes the start set (``[data] path``) from ``data/lj.xyz`` if it is missing: per state point the
first ``--train-frames`` training frames and one validation frame, split headers kept. Then runs
``a2ijax learn`` from it, selecting the candidates of the committee MD by disagreement, at random
(the same number of frames from the same kind of MD) and, with ``--max-disagreement``, by
disagreement below an upper trust level (candidates above it are taken for unphysical), and plots
the committee mean's test error (worst state point, and the force RMSE) against the number of
training frames. Rerunning continues every loop where it stopped. ``<out>/curves.json``: the command,
date, machine and every loop's rows (round, training frames, the committee mean's force RMSE and worst
state point's energy and force ratios on the test split); recorded in ``docs/data/active_learning.json``
for docs/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import ase.io

from a2ijax.dataset import write_dataset
from a2ijax.files import atomic_write
from a2ijax.learn import learn, load_learn_config


def start_set(source: str, out: Path, train_frames: int) -> None:
    frames = ase.io.read(source, index=":")
    kept, seen = [], {}
    for atoms in frames:
        key = (atoms.info["state_point"], atoms.info["split"])
        limit = {"train": train_frames, "valid": 1}.get(key[1], 0)
        if seen.get(key, 0) < limit:
            seen[key] = seen.get(key, 0) + 1
            kept.append(atoms)
    write_dataset(out, kept)
    print(f"start set {out}: {len(kept)} frames ({seen})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--source", default="data/lj.xyz")
    parser.add_argument("--train-frames", type=int, default=1, help="training frames per state point to start with")
    parser.add_argument("--out", default="runs/active_learning")
    parser.add_argument("--max-disagreement", type=float, nargs="*", default=[],
                        help="also select by disagreement below each of these trust levels (one loop each)")
    args = parser.parse_args()
    config, settings = load_learn_config(args.config)
    if not Path(config.data.path).exists():
        start_set(args.source, Path(config.data.path), args.train_frames)
    out = Path(args.out)
    curves, started = {}, time.strftime("%Y-%m-%d %H:%M")
    arms = {"disagreement": dict(selection="disagreement"), "random": dict(selection="random")}
    arms.update({f"disagreement_below_{level:g}": dict(selection="disagreement", max_disagreement=level)
                 for level in args.max_disagreement})
    for selection, changes in arms.items():
        workdir = out / selection
        curves[selection] = learn(config, dataclasses.replace(settings, **changes), workdir, progress=False)
        for row in curves[selection]:
            print(f"{selection}: round {row['round']}: {row['train_frames']} training frames, force RMSE "
                  f"{row['force_rmse']:.3f}, worst ratios energy {row['worst_energy_ratio']:.3f} force "
                  f"{row['worst_force_ratio']:.3f}")
    record = dict(command=" ".join(["python", "experiments/active_learning.py", *sys.argv[1:]]),
                  date=f"{started} to {time.strftime('%H:%M')}", machine=platform.machine(),
                  rounds=settings.rounds, members=settings.members, frames_per_round=settings.frames_per_round,
                  curves=curves)
    atomic_write(out / "curves.json", lambda f: json.dump(record, f, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for selection, rows in curves.items():
        n = [r["train_frames"] for r in rows]
        axes[0].loglog(n, [r["force_rmse"] for r in rows], "o-", label=selection)
        axes[1].loglog(n, [r["worst_energy_ratio"] for r in rows], "o-", label=selection)
    axes[0].set(xlabel="labelled training frames", ylabel="test force RMSE (committee mean)")
    axes[1].set(xlabel="labelled training frames", ylabel="worst state point energy RMSE / fluctuation")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=120)
    print(f"wrote {out}/curves.json and curves.png")


if __name__ == "__main__":
    main()
