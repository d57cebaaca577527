"""Errors at state points and sizes no training run sampled (issue: the paper's claim, item 4).

    python experiments/transfer.py --out runs/transfer.json
    python experiments/transfer.py --systems lj --model lj=runs/lj --out runs/transfer_lj.json

For each system, frames are sampled with the project's own sampler (``a2ijax.sampling``, seed 7,
which no training set uses) at temperatures between the sampled ones, below the coldest or the
liquid's, and at about twice the atoms (``POINTS``), labelled by the reference potential, written to
``<frames>/<system>.xyz`` once (later runs reuse the file) and evaluated with ``a2ijax.report.evaluate``
for every model given: the shipped model by default, or ``--model system=directory`` (a training run,
or a model in the shipped layout, such as an earlier shipped version). Per state
point: energy RMSE over the energy fluctuation of those frames, force RMSE over their force std, and
the mean energy error per atom (the bias a transfer to a new state point shows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

# (name, kT or temperature as the system states it, density or None for the system's, atoms)
POINTS = {
    "lj": [("rho0.80_T1.2", 1.2, 0.80, 256), ("rho0.87_T1.0", 1.0, 0.87, 256),
           ("rho0.84_T1.0_N512", 1.0, 0.84, 512)],
    "ka": [("rho1.2_T0.7", 0.7, 1.2, 250), ("rho1.2_T1.2", 1.2, 1.2, 250), ("rho1.2_T0.6_N500", 0.6, 1.2, 500)],
    "sw": [("crystal_600K", 600, None, 216), ("liquid_2200K", 2200, 0.0542, 216),
           ("crystal_1200K_N512", 1200, None, 512)],
}


def unseen_frames(name: str, path: Path, frames: int, equilibration: int) -> None:
    """Samples ``POINTS[name]`` into ``path`` (extended XYZ with state-point names)."""
    from a2ijax.dataset import write_dataset
    from a2ijax.sampling import SamplingConfig, sample_state_point
    from a2ijax.systems import BOLTZMANN_EV, StatePoint, get_system

    system = get_system(name)
    config = SamplingConfig(frames_per_point=frames, equilibration=equilibration, seed=7)
    images = []
    for index, (point_name, temperature, density, atoms) in enumerate(POINTS[name]):
        like = system.state_points[0] if name != "sw" else system.state_point(
            "liquid_2500K" if point_name.startswith("liquid") else "crystal_300K")
        kT = temperature * BOLTZMANN_EV if name == "sw" else temperature
        point = StatePoint(point_name, kT, like.density if density is None else density, like.phase)
        sized = dataclasses.replace(system, n_atoms=atoms)
        t0 = time.perf_counter()
        for frame in sample_state_point(sized, point, config, seed=7000 + index):
            frame.info.update(system=name, state_point=point_name, units=system.units, split="test")
            images.append(frame)
        print(f"{name} {point_name}: {frames} frames of {atoms} atoms in {time.perf_counter() - t0:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dataset(path, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=["lj", "ka", "sw"], choices=sorted(POINTS))
    parser.add_argument("--model", action="append", default=[],
                        help="system=directory: a run or a model in the shipped layout (default: the shipped model)")
    parser.add_argument("--frames", type=int, default=40, help="frames per state point")
    parser.add_argument("--equilibration", type=int, default=10000, help="MD steps before the first frame")
    parser.add_argument("--frames-dir", type=Path, default=Path("runs/transfer_frames"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.frames < 2 or args.equilibration < 0:
        parser.error("--frames must be >= 2 and --equilibration >= 0")
    from a2ijax import pretrained
    from a2ijax.report import evaluate

    models = dict(item.split("=", 1) for item in args.model)
    rows = []
    for name in args.systems:
        path = args.frames_dir / f"{name}.xyz"
        if not path.exists():
            unseen_frames(name, path, args.frames, args.equilibration)
        report, _ = evaluate(pretrained.resolve(models.get(name, name)), path)
        for point, row in report["state_points"].items():
            rows.append(dict(system=name, model=models.get(name, f"pretrained {name}"), state_point=point, **row))
            print(f"{name} {point:>20}: energy {100 * row['energy_ratio']:6.1f}% of the fluctuation, force "
                  f"{100 * row['force_ratio']:5.1f}% of the std, bias {row['energy_bias_per_atom']:+.4f} per atom",
                  flush=True)
    words = ["--systems", *args.systems] + [f"--model {m}" for m in args.model] + [f"--frames {args.frames}"]
    out = dict(command="python experiments/transfer.py " + " ".join(words),
        date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.machine(), points=POINTS, rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
