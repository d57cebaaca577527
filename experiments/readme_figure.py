"""The README's picture: forces of the shipped LJ model against the reference on freshly sampled frames.

Frames the model never saw (the project's own sampler, a seed no training run used) at every LJ
state point, the model's forces through its ASE calculator, a small parity plot:

    python experiments/readme_figure.py --out docs/img/lj_parity.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/img/lj_parity.png")
    parser.add_argument("--frames", type=int, default=4, help="frames per state point")
    parser.add_argument("--seed", type=int, default=20261202)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from a2ijax.calculator import A2ICalculator
    from a2ijax.sampling import SamplingConfig, sample_state_point
    from a2ijax.systems import get_system

    system = get_system("lj")
    calc = A2ICalculator.from_pretrained("lj")
    config = SamplingConfig(frames_per_point=args.frames, stride=100, equilibration=2000, seed=args.seed)
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    errors, stds = [], []
    for point in system.state_points:
        frames = sample_state_point(system, point, config, seed=args.seed)
        reference = np.concatenate([f.get_forces().ravel() for f in frames])
        predicted = []
        for atoms in frames:
            atoms = atoms.copy()
            atoms.calc = calc
            predicted.append(atoms.get_forces().ravel())
        predicted = np.concatenate(predicted)
        errors.append(np.sqrt(np.mean((predicted - reference) ** 2)))
        stds.append(np.std(reference))
        ax.plot(reference, predicted, ".", ms=1.0, alpha=0.4, label=point.name)
    lim = 60
    ax.plot([-lim, lim], [-lim, lim], "k-", lw=0.6)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="reference force component",
           ylabel="shipped LJ model")
    ax.set_title(f"frames no training run sampled, {len(system.state_points)} state points", fontsize=8)
    ax.legend(fontsize=5, markerscale=5, loc="upper left")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}; per state point RMSE / force std:",
          {p.name: round(e / s, 4) for p, e, s in zip(system.state_points, errors, stds, strict=True)})


if __name__ == "__main__":
    main()
