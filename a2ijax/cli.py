"""The ``a2ijax`` command.

``a2ijax generate <system> --out <file>`` samples a reference dataset (see ``a2ijax.data``).

``a2ijax train <config.toml>`` fits a potential (see ``a2ijax.train``); ``a2ijax evaluate <checkpoint>
<data>`` prints the error report of a checkpoint on any labelled dataset.

``a2ijax demo`` builds the default A2I potential on a Lennard-Jones liquid (embedded, nothing to
download), checks it against its own all-pairs path and ``-grad E``, and runs jit-compiled NVE with
a neighbour list, reporting energy conservation. The weights are untrained: the demo shows the
machinery, not a fitted model. Speed against baselines is measured by ``a2ijax bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import ase
import ase.io
import jax
import jax.numpy as jnp
import numpy as np
from jax_md import simulate as integrators
from jax_md import space

from a2ijax.calculator import structure_frame, warn_if_closer_than_training, warn_if_extrapolating
from a2ijax.config import load_config
from a2ijax.data import (
    SamplingConfig,
    check_cutoff,
    format_statistics,
    generate,
    read_dataset,
    sample_state_point,
    statistics,
    write_dataset,
    write_statistics,
)
from a2ijax.md import Simulation, energy_drift, energy_observables, run, simulate
from a2ijax.model import A2IConfig
from a2ijax.potential import a2i_neighbor_list, a2i_pair
from a2ijax.systems import SYSTEMS, get_system, lattice_positions
from a2ijax.train import Checkpoint, evaluate, format_report, load_checkpoint, train_and_evaluate


def demo(n_atoms: int = 128, steps: int = 200, dt: float = 0.002, kT: float = 1.0, density: float = 0.84,
         seed: int = 0) -> dict[str, float]:
    """Builds, checks and runs the default A2I potential; returns the figures it prints."""
    box = (n_atoms / density) ** (1 / 3)
    R = lattice_positions(n_atoms, box, jitter=0.05, seed=seed)
    displacement, shift = space.periodic(box)
    config = A2IConfig()
    neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement, box, config, dr_threshold=0.3)
    nbrs = neighbor_fn.allocate(R)
    params = init_fn(jax.random.PRNGKey(seed), R, nbrs)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    potential = lambda R, **kw: energy_fn(params, R, **kw)  # noqa: E731
    t0 = time.perf_counter()
    E, G = jax.block_until_ready(jax.jit(jax.value_and_grad(potential))(R, neighbor=nbrs))
    compile_s = time.perf_counter() - t0
    _, pair_energy = a2i_pair(displacement, box, config)
    E_pairs = jax.jit(lambda R: pair_energy(params, R))(R)
    h = 1e-2  # float32: a coarse step, central difference of one force component
    step = jnp.zeros_like(R).at[0, 0].set(h)
    energy = jax.jit(potential)
    fd = -(energy(R + step, neighbor=nbrs) - energy(R - step, neighbor=nbrs)) / (2 * h)

    init, apply = integrators.nve(potential, shift, dt)
    state = init(jax.random.PRNGKey(seed + 1), R, kT=kT, neighbor=nbrs)
    t0 = time.perf_counter()
    md = run(apply, state, neighbor_fn, nbrs, steps, chunk_steps=max(1, steps // 4),
             observe=energy_observables(potential))
    md_s = time.perf_counter() - t0
    total = md.observables["total"]
    drift = energy_drift(np.arange(steps) * dt, total, n_atoms)

    figures = {
        "atoms": n_atoms, "neighbour slots K": nbrs.idx.shape[1], "parameters": n_params,
        "energy per atom": float(E) / n_atoms,
        "|E(list) - E(all pairs)| per atom": abs(float(E - E_pairs)) / n_atoms,
        "force: |-dE/dx - finite difference| / |F|": abs(float(-G[0, 0] - fd)) / float(jnp.max(jnp.abs(G))),
        "|sum of forces|": float(jnp.linalg.norm(jnp.sum(G, 0))),
        "first compile + call (s)": compile_s,
        "NVE steps": steps, "NVE energy drift per atom per time": float(drift),
        "NVE total-energy std per atom": float(np.std(total) / n_atoms),
        "neighbour-list reallocations": md.reallocations,
        "MD atom-steps/s (compile included)": n_atoms * steps / md_s,
    }
    width = max(map(len, figures))
    print(f"a2ijax demo: untrained A2I potential on an LJ liquid (density {density}, kT {kT}, dt {dt})")
    for key, value in figures.items():
        print(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="a2ijax", description="The A2I Transformer potential for jax-md.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="build, check and run the default potential on an LJ liquid")
    p.add_argument("--n-atoms", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dt", type=float, default=0.002)
    p.add_argument("--seed", type=int, default=0)
    p = commands.add_parser("generate", help="sample a reference dataset (lj, ka, sw) into extended XYZ")
    p.add_argument("system", help="reference system: lj, ka or sw")
    p.add_argument("--out", required=True, help="extended XYZ file to write (statistics go beside it)")
    defaults = SamplingConfig()
    p.add_argument("--frames-per-point", type=int, default=defaults.frames_per_point)
    p.add_argument("--stride", type=int, default=defaults.stride, help="MD steps between frames")
    p.add_argument("--equilibration", type=int, default=defaults.equilibration, help="MD steps discarded")
    p.add_argument("--segment-frames", type=int, default=defaults.segment_frames,
                   help="consecutive frames per split segment")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--state-points", nargs="*", help="a subset of the system's state points (default: all)")
    p = commands.add_parser("train", help="fit a potential to a dataset as a TOML config says")
    p.add_argument("config", help="experiment TOML with [data], [model] and [train] tables")
    p.add_argument("--workdir", help="checkpoints, metrics, report and plots (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest periodic checkpoint")
    p.add_argument("--stop-after", type=int, help="stop and checkpoint after this many steps (schedule unchanged)")
    p = commands.add_parser("evaluate", help="error report of a checkpoint on a labelled dataset")
    p.add_argument("checkpoint", help="a work directory, checkpoint directory or checkpoint step directory")
    p.add_argument("data", help="labelled frames (extended XYZ or any ASE-readable file)")
    p.add_argument("--split", choices=["train", "valid", "test"], help="only this split (default: all frames)")
    p.add_argument("--out", help="directory for report.json, report.md and parity.png")
    p = commands.add_parser("quickstart", help="sample, train, evaluate and run MD on a small LJ system (~8 min)")
    p.add_argument("--out", default="quickstart", help="directory for the dataset, run, MD output and plots")
    p = commands.add_parser("md", help="molecular dynamics with a trained potential")
    p.add_argument("checkpoint", help="a work directory, checkpoint directory or checkpoint step directory")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--structure", help="starting structure: any ASE-readable file with a periodic cell")
    start.add_argument("--state-point", help="start from a state point of the checkpoint's reference system, "
                       "equilibrated with the reference potential (--equilibrate steps)")
    p.add_argument("--equilibrate", type=int, default=5000, help="reference-potential steps before a state point")
    p.add_argument("--ensemble", choices=["nve", "nose-hoover", "langevin"], default="nve")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--dt", type=float, help="time step (default: the reference system's)")
    p.add_argument("--kT", type=float, help="temperature for initial velocities and thermostats (energy units)")
    p.add_argument("--thermo-every", type=int, default=10, help="steps between thermo rows")
    p.add_argument("--trajectory-every", type=int, default=100, help="steps between trajectory frames")
    p.add_argument("--skin", type=float, default=0.1, help="neighbour-list skin as a fraction of the cutoff")
    p.add_argument("--capacity-multiplier", type=float, default=1.25,
                   help="neighbour slots per atom over the densest atom's count; lower is faster (attention "
                   "costs K^2: 1.05 gave 0.78x the step time, BUILD_NOTES), an overflow reruns the chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="md", help="directory for thermo.csv and trajectory.extxyz")
    p = commands.add_parser("bench", help="MD speed, latency, compile time and memory against jax-md's potentials")
    p.add_argument("--potentials", nargs="+", default=["lj", "a2i-small", "a2i", "a2i-large", "nequip", "graph_network",
                                                       "behler_parrinello"], help="which potentials (a2ijax.bench)")
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 1000, 4000, 16000, 64000], help="atom counts N")
    p.add_argument("--chunk", type=int, default=50, help="MD steps per compiled chunk")
    p.add_argument("--chunks", type=int, default=3, help="chunks timed after a warm-up chunk")
    p.add_argument("--repeats", type=int, default=5, help="timed energy+forces calls")
    p.add_argument("--skin", type=float, default=0.3, help="neighbour-list skin (every potential)")
    p.add_argument("--max-chunk-s", type=float, default=60.0, help="skip larger N once a chunk takes longer")
    p.add_argument("--out", default="bench", help="directory for bench.json, bench.md and bench.png")
    args = parser.parse_args(argv)
    # jax-md's kinetic energy asks for float64 sums; without x64 JAX warns and uses float32.
    warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
    try:
        if args.command == "demo":
            demo(n_atoms=args.n_atoms, steps=args.steps, dt=args.dt, seed=args.seed)
        elif args.command == "generate":
            generate_command(args)
        elif args.command == "train":
            train_command(args)
        elif args.command == "quickstart":
            from a2ijax.quickstart import quickstart

            quickstart(args.out)
        elif args.command == "md":
            md_command(args)
        elif args.command == "bench":
            from a2ijax import bench

            bench.main(args)
        elif args.command == "evaluate":
            _, text = evaluate(args.checkpoint, args.data, split=args.split, out=args.out)
            print(text)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:  # bad input: a message, not a traceback
        print(f"a2ijax {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def generate_command(args: argparse.Namespace) -> None:
    """Samples, writes the dataset atomically, prints and stores its statistics."""
    system = get_system(args.system)
    config = SamplingConfig(frames_per_point=args.frames_per_point, stride=args.stride,
                            equilibration=args.equilibration, segment_frames=args.segment_frames, seed=args.seed)
    t0 = time.perf_counter()
    frames = generate(system.name, config, state_points=args.state_points)
    write_dataset(args.out, frames)
    table = statistics(read_dataset(args.out), system.cutoff)  # read back: the file, checked, is the dataset
    stats_path = f"{args.out}.stats.json"
    write_statistics(stats_path, dict(system=system.name, cutoff=system.cutoff, units=system.units,
                                      sampling=dataclasses.asdict(config), seconds=time.perf_counter() - t0,
                                      state_points=table))
    print(f"wrote {len(frames)} frames to {args.out} in {time.perf_counter() - t0:.0f} s; statistics in {stats_path}")
    print(f"per state point ({system.units}; energy_std is the total-energy fluctuation, force_std per "
          f"component, neighbours within {system.cutoff:.6g}):")
    print(format_statistics(table))


def md_command(args: argparse.Namespace) -> Simulation:
    """MD from a structure file or a reference state point; prints a summary, writes thermo and trajectory."""
    checkpoint = load_checkpoint(args.checkpoint)
    system_name = checkpoint.meta.get("system", "")
    system = get_system(system_name) if system_name in SYSTEMS else None
    kT = args.kT
    if args.structure:
        atoms = read_structure(args.structure)
    else:
        if system is None:
            raise ValueError(f"the checkpoint's data has no reference system ({system_name!r}): use --structure")
        point = system.state_point(args.state_point)
        # Equilibrate with the (fast) reference potential first: a lattice start would melt and heat up.
        sampling = SamplingConfig(frames_per_point=1, stride=50, equilibration=args.equilibrate, seed=args.seed)
        atoms = sample_state_point(system, point, sampling, seed=args.seed)[-1]
        atoms.calc = None
        kT = point.kT if kT is None else kT
    dt = args.dt if args.dt is not None else (system.dt if system is not None else None)
    if dt is None:
        raise ValueError("give --dt: the checkpoint's data has no reference system to take it from")
    mass = system.mass if system is not None else jnp.asarray(atoms.get_masses())
    return run_md(checkpoint, atoms, steps=args.steps, dt=dt, kT=kT, ensemble=args.ensemble, mass=mass,
                  thermo_every=args.thermo_every, trajectory_every=args.trajectory_every, skin=args.skin,
                  capacity_multiplier=args.capacity_multiplier, seed=args.seed, out=args.out)


def read_structure(path: str) -> ase.Atoms:
    """The last frame of an ASE-readable file; errors name the file."""
    try:
        return ase.io.read(path, index=-1)
    except FileNotFoundError:
        raise
    except Exception as error:  # ASE raises many types for unreadable files
        raise ValueError(f"{path}: cannot read a structure: {error}") from error


def run_md(checkpoint: Checkpoint, atoms: ase.Atoms, *, steps: int, dt: float, kT: float | None, ensemble: str,
           mass: Any = 1.0, thermo_every: int = 10, trajectory_every: int = 100, skin: float = 0.1,
           capacity_multiplier: float = 1.25, seed: int = 0, out: str | None = None, progress: bool = True
           ) -> Simulation:
    """Checks the structure against the checkpoint, runs :func:`a2ijax.md.simulate`, prints a summary."""
    frame = structure_frame(atoms, checkpoint.symbols)  # unknown species: an error naming them
    if not atoms.pbc.all():
        raise ValueError(f"MD needs a fully periodic cell, the structure has pbc={atoms.pbc.tolist()}")
    cutoff = checkpoint.config.model.cutoff
    check_cutoff(frame, cutoff)
    warn_if_extrapolating(frame, checkpoint)
    dtype = jnp.result_type(float)
    box = jnp.asarray(atoms.cell[:].T, dtype)
    species = jnp.asarray(frame.species[0])
    neighbor_fn, energy_fn, displacement, shift = checkpoint.potential(box, species, dr_threshold=skin * cutoff,
                                                                  capacity_multiplier=capacity_multiplier)
    result = simulate(energy_fn, neighbor_fn, displacement, shift, jnp.asarray(atoms.get_positions(), dtype), box,
                      steps=steps, dt=dt, ensemble=ensemble, kT=kT, mass=mass, seed=seed, thermo_every=thermo_every,
                      trajectory_every=trajectory_every, out=out, symbols=atoms.get_chemical_symbols(),
                      progress=progress)
    n, thermo = len(atoms), result.thermo
    warn_if_closer_than_training(float(thermo["min_distance"].min()), checkpoint, "the MD trajectory")
    print(f"{ensemble} MD: {n} atoms, {steps} steps of {dt:g} in {result.seconds:.1f} s "
          f"({result.rate:.4g} atom-steps/s after compilation, {result.reallocations} reallocations)")
    print(f"  neighbour slots per atom (K): {result.neighbor.idx.shape[-1]}")
    print(f"  temperature (kT) mean {thermo['temperature'].mean():.5g}, pressure mean {thermo['pressure'].mean():.5g}")
    print(f"  total energy per atom: start {thermo['total'][0] / n:.6g}, end {thermo['total'][-1] / n:.6g}, "
          f"drift {result.drift:.3g} per atom per time unit")
    if out is not None:
        print(f"  wrote {out}/thermo.csv and {out}/trajectory.extxyz ({len(result.frames)} frames)")
    return result


def train_command(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    result = train_and_evaluate(config, workdir, resume=args.resume, stop_after=args.stop_after)
    if result.report is None:
        print(f"stopped at step {int(result.state['step'])} after {result.seconds:.0f} s; continue with "
              f"`a2ijax train {args.config} --workdir {workdir} --resume`")
        return
    print(f"trained {config.train.steps} steps in {result.seconds:.0f} s; test report ({workdir}/report.md):")
    print(format_report(result.report, result.report.get("units", "")))


if __name__ == "__main__":
    sys.exit(main())
