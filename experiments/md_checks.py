"""MD with trained models checked against the reference potentials (stability, drift, RDF).

    python experiments/md_checks.py runs/lj runs/sw runs/ka --out runs/md_checks
    python experiments/md_checks.py lj sw ka --out runs/md_checks_pretrained   # the shipped models

For each training work directory or shipped model (``a2ijax.pretrained``; the checkpoint names the
reference system), at one state point:

1. a start: the reference potential equilibrates the state point (NVT Langevin, as the dataset);
2. NVE from that start, velocities drawn at the state point's kT, ``--steps`` steps (default
   20,000) at the system's usual time step, once with the model and once with the reference
   potential: whether it stays finite, the energy drift per atom per time unit (linear fit), the
   largest excursion of the total energy per atom, the mean temperature and the closest pair;
3. NVT (Langevin, the dataset's thermostat) from the same start with the model and with the
   reference, ``--nvt-equilibrate`` steps discarded, then ``--nvt-steps`` sampled every
   ``--rdf-every`` steps: the RDF of every species pair and ``mean_r |g_model - g_ref|``
   (``a2ijax.md.rdf_difference``: the integral of the absolute difference over ``r_max``).
   A second reference run with another seed gives the same measure between two reference runs:
   the sampling-noise floor that the model's difference should be read against.

Writes ``<out>/<system>/{model,reference}_{nve,nvt}/thermo.csv`` (and trajectories, and a
``summary.json`` per finished run: rerunning the command skips the runs already done),
``<out>/<system>/rdf.png``, ``<out>/md_checks.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from a2ijax import md, pretrained
from a2ijax.checkpoint import Checkpoint, load_checkpoint
from a2ijax.files import atomic_write
from a2ijax.geometry import perpendicular_widths
from a2ijax.potential import Potential, periodic_space
from a2ijax.sampling import SamplingConfig, sample_state_point
from a2ijax.systems import get_system

#: The state point checked per system when ``--state-point`` is not given (mid-range of each dataset).
DEFAULT_POINTS = {"lj": "rho0.84_T0.85", "sw": "crystal_900K", "ka": "rho1.2_T1.0"}


def reference_potential(system, box, species, skin_fraction: float, **nl_kwargs) -> Potential:
    """The reference potential in the same shape as ``Checkpoint.potential``."""
    displacement, shift = periodic_space(box)
    neighbor_fn, energy_fn = system.neighbor_list(displacement, box, species,
                                                  dr_threshold=skin_fraction * system.cutoff, **nl_kwargs)
    return Potential(neighbor_fn, energy_fn, displacement, shift)


def nve_summary(result: md.Simulation, n: int) -> dict:
    total = result.thermo["total"] / n
    return dict(steps=int(result.thermo["step"][-1]), finite=bool(np.all(np.isfinite(total))),
                drift_per_atom_per_time=result.drift, max_excursion_per_atom=float(np.max(np.abs(total - total[0]))),
                temperature_mean=float(np.mean(result.thermo["temperature"])),
                closest_pair=float(np.min(result.thermo["min_distance"])), atom_steps_per_s=result.rate,
                seconds=result.seconds, reallocations=result.reallocations)


def finished(run_dir: Path, settings: dict) -> dict | None:
    """The summary of a run already done with the same settings (a rerun after an interruption skips it)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["summary"] if saved["settings"] == settings else None


def staging(run_dir: Path) -> Path:
    """An empty sibling directory a new run writes into: an earlier run's files stay until it is done."""
    tmp = run_dir.with_name(run_dir.name + ".running")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def record(tmp: Path, run_dir: Path, settings: dict, summary: dict) -> None:
    """Writes the summary into the finished run ``tmp`` and puts it in place of ``run_dir``: a run
    directory holds one complete run (an interrupted run leaves its ``.running`` sibling behind)."""
    atomic_write(tmp / "summary.json", lambda f: json.dump(dict(settings=settings, summary=summary), f))
    shutil.rmtree(run_dir, ignore_errors=True)
    tmp.rename(run_dir)


def load_model(workdir: str) -> Checkpoint:
    """A training work directory or checkpoint, or else the shipped model of that name."""
    if not Path(workdir).exists() and workdir in pretrained.names():
        return pretrained.load(workdir)
    return load_checkpoint(workdir)


def check(workdir: str, args: argparse.Namespace) -> dict:
    checkpoint = load_model(workdir)
    system = get_system(checkpoint.meta["system"])
    point = system.state_point(args.state_point.get(system.name, DEFAULT_POINTS[system.name]))
    out = args.out / system.name
    sampling = SamplingConfig(frames_per_point=1, stride=50, equilibration=args.equilibrate,
                              seed=args.seed)
    atoms = sample_state_point(system, point, sampling, seed=args.seed)[-1]
    dtype = jnp.result_type(float)
    box = jnp.asarray(atoms.cell[:].T, dtype)
    R0 = jnp.asarray(atoms.get_positions(), dtype)
    species = jnp.asarray(system.species(len(atoms)))
    symbols = atoms.get_chemical_symbols()
    nl = dict(capacity_multiplier=args.capacity_multiplier)
    cutoff = checkpoint.config.model.cutoff
    potentials = {"model": checkpoint.potential(box, species, dr_threshold=args.skin_fraction * cutoff,
                                                **nl),
                  "reference": reference_potential(system, box, species, args.skin_fraction, **nl)}
    common = dict(dt=system.dt, kT=point.kT, mass=system.mass, thermo_every=args.thermo_every,
                  progress=not args.quiet)
    leaves = jax.tree_util.tree_leaves(checkpoint.params)
    parameters = int(sum(np.size(x) for x in leaves))
    # Which model a saved model run belongs to: a retrained checkpoint must not reuse old runs.
    fingerprint = f"{checkpoint.path}@{checkpoint.step}:{sum(float(np.abs(np.asarray(x)).sum()) for x in leaves):.9g}"
    result = dict(system=system.name, state_point=point.name, kT=point.kT, dt=system.dt, atoms=len(atoms),
                  time_unit=system.units, parameters=parameters,
                  checkpoint=str(workdir), training_closest_pair=checkpoint.meta["statistics"].get("min_distance"),
                  nve={}, nvt={})
    # Half the narrowest width of the box, as the pair search measures it (the largest float below
    # it: a pair list must see one image of each neighbour).
    half = 0.5 * float(np.min(perpendicular_widths(np.asarray(box, np.float64))))
    r_max = min(float(np.nextafter(half, 0.0)), args.r_max)
    rdfs = {}
    runs = [("model", args.seed), ("reference", args.seed), ("reference_seed2", args.seed + 1)]
    for label, seed in runs:
        potential = potentials[label.split("_")[0]]
        settings = dict(seed=seed, steps=args.steps, nvt_equilibrate=args.nvt_equilibrate, nvt_steps=args.nvt_steps,
                        rdf_every=args.rdf_every, thermo_every=args.thermo_every, equilibrate=args.equilibrate,
                        capacity_multiplier=args.capacity_multiplier, skin_fraction=args.skin_fraction,
                        state_point=point.name,
                        model=fingerprint if label == "model" else None)
        if label != "reference_seed2":
            run_dir = out / f"{label}_nve"
            summary = finished(run_dir, settings)
            if summary is None:
                print(f"{system.name} {point.name}: NVE with the {label}, {args.steps} steps of {system.dt}")
                tmp = staging(run_dir)
                nve = md.simulate(potential, R0, box, steps=args.steps,
                                  ensemble="nve", seed=seed, trajectory_every=1000, out=str(tmp),
                                  symbols=symbols, **common)
                summary = nve_summary(nve, len(atoms))
                record(tmp, run_dir, settings, summary)
            result["nve"][label] = summary
        run_dir = out / f"{label}_nvt"
        summary = finished(run_dir, settings)
        if summary is None:
            print(f"{system.name} {point.name}: NVT with the {label} (seed {seed}), "
                  f"{args.nvt_equilibrate} + {args.nvt_steps} steps")
            tmp = staging(run_dir)
            nvt = md.simulate(potential, R0, box,
                              steps=args.nvt_equilibrate + args.nvt_steps, ensemble="langevin", seed=seed,
                              trajectory_every=args.rdf_every, out=str(tmp), symbols=symbols, **common)
            frames = nvt.positions[args.nvt_equilibrate // args.rdf_every:]
            r, g = md.radial_distribution(frames, np.asarray(box), np.asarray(species), r_max, bins=args.bins)
            sampled = nvt.thermo["step"] > args.nvt_equilibrate
            summary = dict(frames=len(frames), temperature_mean=float(np.mean(nvt.thermo["temperature"][sampled])),
                           potential_per_atom=float(np.mean(nvt.thermo["potential"][sampled])) / len(atoms),
                           pressure_mean=float(np.mean(nvt.thermo["pressure"][sampled])),
                           atom_steps_per_s=nvt.rate, seconds=nvt.seconds,
                           r=r.tolist(), g={f"{a}-{b}": v.tolist() for (a, b), v in g.items()})
            record(tmp, run_dir, settings, summary)
        r = np.asarray(summary["r"])
        rdfs[label] = {tuple(int(i) for i in k.split("-")): np.asarray(v) for k, v in summary["g"].items()}
        result["nvt"][label] = {k: v for k, v in summary.items() if k not in ("r", "g")}
    pair_name = lambda k: "-".join(system.symbols[i] for i in k)  # noqa: E731
    for key, label in (("rdf_difference", "model"), ("rdf_noise_floor", "reference_seed2")):
        result[key] = {pair_name(k): v for k, v in md.rdf_difference(r, rdfs[label], rdfs["reference"]).items()}
    result["rdf_r_max"], result["rdf_bins"] = r_max, args.bins
    plot_rdf(out / "rdf.png", r, rdfs, pair_name, f"{system.name} {point.name}")
    return result


def plot_rdf(path: Path, r: np.ndarray, rdfs: dict, pair_name, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(rdfs["reference"])
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 3.5), squeeze=False)
    for ax, k in zip(axes[0], pairs, strict=True):
        ax.plot(r, rdfs["reference"][k], "k-", lw=1.5, label="reference")
        ax.plot(r, rdfs["model"][k], "C1--", lw=1.2, label="A2I model")
        ax.set(xlabel="r", ylabel="g(r)", title=f"{title} {pair_name(k)}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: list[dict]) -> str:
    lines = ["| system | state point | atoms | steps x dt | model: finite / drift / max dE | reference: drift / max dE "
             "| model / reference T | closest pair model / ref (training) | RDF mean abs diff (model vs ref) "
             "| noise floor (ref vs ref) | atom-steps/s model / ref |",
             "|---|---|---:|---|---|---|---|---|---|---|---|"]
    for res in results:
        m, ref = res["nve"]["model"], res["nve"]["reference"]
        rdf = ", ".join(f"{k} {v:.4f}" for k, v in res["rdf_difference"].items())
        floor = ", ".join(f"{k} {v:.4f}" for k, v in res["rdf_noise_floor"].items())
        lines.append(f"| {res['system']} | {res['state_point']} | {res['atoms']} | {m['steps']} x {res['dt']} | "
                     f"{'yes' if m['finite'] else 'NO'} / {m['drift_per_atom_per_time']:.2e} / "
                     f"{m['max_excursion_per_atom']:.2e} | {ref['drift_per_atom_per_time']:.2e} / "
                     f"{ref['max_excursion_per_atom']:.2e} | {m['temperature_mean']:.4g} / "
                     f"{ref['temperature_mean']:.4g} | {m['closest_pair']:.3g} / {ref['closest_pair']:.3g} "
                     f"({res['training_closest_pair'] or float('nan'):.3g}) | {rdf} | {floor} | "
                     f"{m['atom_steps_per_s']:.3g} / {ref['atom_steps_per_s']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+",
                        help="training work directories (or checkpoints), or names of shipped models")
    parser.add_argument("--out", type=Path, default=Path("runs/md_checks"))
    parser.add_argument("--steps", type=int, default=20000, help="NVE steps")
    parser.add_argument("--nvt-equilibrate", type=int, default=1000, help="NVT steps discarded")
    parser.add_argument("--nvt-steps", type=int, default=5000, help="NVT steps sampled for the RDF")
    parser.add_argument("--rdf-every", type=int, default=50, help="NVT steps between RDF frames")
    parser.add_argument("--equilibrate", type=int, default=5000, help="reference steps that prepare the start")
    parser.add_argument("--bins", type=int, default=100)
    parser.add_argument("--r-max", type=float, default=np.inf, help="RDF range (at most half the box)")
    parser.add_argument("--skin-fraction", type=float, default=0.1,
                        help="neighbour-list skin as a fraction of each potential's cutoff")
    parser.add_argument("--capacity-multiplier", type=float, default=1.25,
                        help="neighbour slots per counted neighbour (an overflow reallocates and reruns the chunk)")
    parser.add_argument("--thermo-every", type=int, default=50, help="steps between thermo records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-point", action="append", default=[], metavar="SYSTEM=NAME",
                        help=f"state point per system (default {DEFAULT_POINTS})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    args.state_point = dict(item.split("=", 1) for item in args.state_point)
    for name in ("steps", "nvt_equilibrate", "nvt_steps", "rdf_every"):
        if getattr(args, name) % args.thermo_every:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of --thermo-every ({args.thermo_every})")
    if args.nvt_equilibrate % args.rdf_every or args.nvt_steps % args.rdf_every:
        parser.error("--nvt-equilibrate and --nvt-steps must be multiples of --rdf-every")
    if 1000 % args.thermo_every:
        parser.error("--thermo-every must divide 1000 (the NVE trajectory stride)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for workdir in args.workdirs:
        t0 = time.perf_counter()
        results.append(check(workdir, args))
        results[-1]["wall_seconds"] = time.perf_counter() - t0
        atomic_write(args.out / "md_checks.json", lambda f: json.dump(results, f, indent=1))
    text = table(results)
    atomic_write(args.out / "md_checks.md", lambda f: f.write(text + "\n"))
    print(text)


if __name__ == "__main__":
    main()
