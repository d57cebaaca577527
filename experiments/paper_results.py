"""Collects the test reports of the paper's three challenges into one Markdown table.

    for s in lj sw ka; do a2ijax generate $s --out data/$s.xyz; done
    for c in lj sw ka lj_coordinates sw_coordinates ka_coordinates; do
        a2ijax train experiments/configs/$c.toml --workdir runs/$c
    done
    python experiments/paper_results.py runs/lj runs/sw runs/ka ...

For each run: parameters, training time, steps, and on the test split, per state point, the
total-energy RMSE over the MD total-energy fluctuation and the force RMSE over the force std (the
paper's target: far below 1; this project's target: at most 5%), plus the per-atom energy
correlation with the exact pair decomposition where it exists.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from a2ijax.checkpoint import load_checkpoint


def rows(workdir: Path) -> list[str]:
    report = json.loads((workdir / "report.json").read_text())
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    featurization = load_checkpoint(workdir).config.model.featurization
    minutes = metrics[-1]["seconds"] / 60 if metrics else float("nan")
    per_atom = report.get("per_atom_energy", {})
    pearson = per_atom.get("pearson_gauge_fixed", per_atom.get("pearson"))  # mixtures: each species' offset fixed
    out = []
    for name, sp in report["state_points"].items():
        out.append(f"| {workdir.name} | {featurization} | {report.get('parameters', '?')} | {minutes:.1f} | "
                   f"{metrics[-1]['step'] if metrics else '?'} | {name} | {sp['energy_rmse']:.4g} | "
                   f"{sp['energy_fluctuation']:.4g} | {100 * sp['energy_ratio']:.1f}% | {sp['force_rmse']:.4g} | "
                   f"{sp['force_std']:.4g} | {100 * sp['force_ratio']:.1f}% | "
                   f"{'' if pearson is None else f'{pearson:.4f}'} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | featurisation | parameters | train min | steps | state point | E RMSE | E fluct. | ratio "
          "| F RMSE | F std | ratio | per-atom E r |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for workdir in args.workdirs:
        for row in rows(workdir):
            print(row)


if __name__ == "__main__":
    main()
