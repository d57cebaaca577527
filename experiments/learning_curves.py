"""Learning curves: held-out error against training steps, and against the number of training frames.

    python experiments/learning_curves.py --steps lj=runs/lj sw=runs/sw ka=runs/ka \
        --gap lj=runs/lj,runs/lj_train_eval --out runs/learning_curves.png
    python experiments/learning_curves.py --frames lj=runs/lj_frames200,runs/lj --out runs/frames.png

Left: for each run, the worst state point's energy and force error over the MD fluctuation on the
validation split (``valid_ratios`` in ``metrics.jsonl``, EMA parameters) against the optimiser
step, log-log, with the power law fitted to the second half of the curve (its exponent says how
much more compute would buy). Right: the test-split worst ratios (``report.json``) of runs that
differ only in ``[data] max_train_frames`` against their number of training frames: a curve that
still falls says data is a limit; a flat one, that steps or the model are. Without such runs,
``--gap`` puts each state point's training-split error (``a2ijax evaluate RUN DATA --split train
--out DIR``) against its test-split error: points on the diagonal mean no overfitting, so more
frames of the same kind would not help and compute or the model is the limit. Inside a cosine
schedule the fitted exponent mixes in the learning-rate decay: read it as an optimistic bound.
Prints the exponents and writes ``<out>`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from a2ijax.checkpoint import load_checkpoint
from a2ijax.files import atomic_write


def steps_curve(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "valid_ratios" in r]
    step = np.asarray([r["step"] for r in rows], float)
    energy = np.asarray([max(v[0] for v in r["valid_ratios"].values()) for r in rows])
    force = np.asarray([max(v[1] for v in r["valid_ratios"].values()) for r in rows])
    half = slice(len(step) // 2, None)
    fit = {}
    for name, y in (("energy", energy), ("force", force)):
        if len(step[half]) >= 2:
            fit[name] = float(np.polyfit(np.log(step[half]), np.log(y[half]), 1)[0])
    return dict(step=step.tolist(), energy=energy.tolist(), force=force.tolist(), exponent=fit)


def frames_curve(runs: list[Path]) -> dict:
    frames, energy, force = [], [], []
    for run in runs:
        report = json.loads((run / "report.json").read_text())
        frames.append(len(load_checkpoint(run / "checkpoints" / "best").meta["splits"]["train"]))
        energy.append(max(r["energy_ratio"] for r in report["state_points"].values()))
        force.append(max(r["force_ratio"] for r in report["state_points"].values()))
    order = np.argsort(frames)
    return dict(frames=np.asarray(frames)[order].tolist(), energy=np.asarray(energy)[order].tolist(),
                force=np.asarray(force)[order].tolist())


def gap(run: Path, train_eval: Path) -> dict:
    test = json.loads((run / "report.json").read_text())["state_points"]
    train = json.loads((train_eval / "report.json").read_text())["state_points"]
    return {name: dict(test=[test[name]["energy_ratio"], test[name]["force_ratio"]],
                       train=[train[name]["energy_ratio"], train[name]["force_ratio"]]) for name in test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="*", default=[], help="NAME=RUN")
    parser.add_argument("--frames", nargs="*", default=[], help="NAME=RUN,RUN,...")
    parser.add_argument("--gap", nargs="*", default=[], help="NAME=RUN,TRAIN_EVAL_DIR")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = dict(steps={}, frames={}, gap={})
    for item in args.steps:
        name, run = item.split("=", 1)
        result["steps"][name] = steps_curve(Path(run))
        print(f"{name}: error ~ steps^a over the second half: {result['steps'][name]['exponent']}")
    for item in args.frames:
        name, runs = item.split("=", 1)
        result["frames"][name] = frames_curve([Path(r) for r in runs.split(",")])
        print(f"{name}: {result['frames'][name]}")
    for item in args.gap:
        name, runs = item.split("=", 1)
        run, train_eval = runs.split(",")
        result["gap"][name] = gap(Path(run), Path(train_eval))
        print(f"{name}: train / test ratios per state point: {result['gap'][name]}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for name, c in result["steps"].items():
        line, = axes[0].loglog(c["step"], c["energy"], "o-", label=f"{name} energy")
        axes[0].loglog(c["step"], c["force"], "s--", color=line.get_color(), label=f"{name} force")
    axes[0].axhline(0.05, color="k", lw=0.8, ls=":", label="5% target")
    axes[0].set_xlabel("optimiser step")
    axes[0].set_ylabel("worst state point: RMSE / MD fluctuation (validation)")
    axes[0].legend(fontsize=8)
    if result["frames"]:
        for name, c in result["frames"].items():
            line, = axes[1].loglog(c["frames"], c["energy"], "o-", label=f"{name} energy")
            axes[1].loglog(c["frames"], c["force"], "s--", color=line.get_color(), label=f"{name} force")
        axes[1].axhline(0.05, color="k", lw=0.8, ls=":")
        axes[1].set_xlabel("training frames")
        axes[1].set_ylabel("worst state point: RMSE / MD fluctuation (test)")
        axes[1].legend(fontsize=8)
    elif result["gap"]:
        for name, points in result["gap"].items():
            test = np.asarray([p["test"] for p in points.values()])
            train = np.asarray([p["train"] for p in points.values()])
            line, = axes[1].loglog(test[:, 0], train[:, 0], "o", label=f"{name} energy (per state point)")
            axes[1].loglog(test[:, 1], train[:, 1], "s", color=line.get_color(), label=f"{name} force")
        lo, hi = axes[1].get_xlim()
        axes[1].plot([lo, hi], [lo, hi], "k--", lw=0.8, label="no overfitting")
        axes[1].set_xlabel("test split: RMSE / MD fluctuation")
        axes[1].set_ylabel("training split: RMSE / MD fluctuation")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    atomic_write(f"{args.out}.json", lambda f: json.dump(result, f, indent=1))


if __name__ == "__main__":
    main()
