"""The ``a2ijax`` command: a thin argument layer over the library.

``demo`` (:mod:`a2ijax.demo`), ``generate`` (:func:`a2ijax.sampling.write_reference_dataset`),
``train`` (:func:`a2ijax.train.train_and_evaluate`; ``--members``: :func:`a2ijax.train.train_committee`),
``learn`` (:func:`a2ijax.learn.learn`), ``evaluate`` (:func:`a2ijax.report.evaluate`),
``quickstart`` (:mod:`a2ijax.quickstart`), ``md`` (:func:`a2ijax.trained_md.md_from_checkpoint`),
``relax`` (:func:`a2ijax.trained_md.relax_structure`), ``lammps`` (:func:`a2ijax.lammps.run_input`),
``export`` (:func:`a2ijax.export.export_model`) and ``bench`` (:mod:`a2ijax.bench`). Every numeric
option is checked when the arguments are parsed, before any work starts; bad input
(:class:`a2ijax.errors.InputError`, a missing file) ends in a one-line message and exit status 2,
not a traceback; any other exception is a failure of the run or a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from a2ijax.errors import InputError

MAX_ATOMS = 10_000_000  # an atom count beyond this is a typo, not a system this machine can hold


def _number(kind: type, low: float, strict: bool, high: float | None = None):
    """An argparse type: a finite ``kind`` that is > ``low`` (``strict``) or >= ``low``, and <= ``high``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:,}, got {text}")
        return value

    return parse


POSITIVE_INT = _number(int, 0, True)
COUNT = _number(int, 0, False)  # >= 0
ATOMS = _number(int, 0, True, MAX_ATOMS)
POSITIVE = _number(float, 0.0, True)
NON_NEGATIVE = _number(float, 0.0, False)


def parser() -> argparse.ArgumentParser:
    from a2ijax.sampling import SamplingConfig

    top = argparse.ArgumentParser(prog="a2ijax", description="The A2I Transformer potential for jax-md.")
    commands = top.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="build, check and run the default potential on an LJ liquid")
    p.add_argument("--n-atoms", type=ATOMS, default=128)
    p.add_argument("--steps", type=POSITIVE_INT, default=200)
    p.add_argument("--dt", type=POSITIVE, default=0.002)
    p.add_argument("--seed", type=COUNT, default=0)
    p = commands.add_parser("generate", help="sample a reference dataset (lj, ka, sw) into extended XYZ")
    p.add_argument("system", help="reference system: lj, ka or sw")
    p.add_argument("--out", required=True, help="extended XYZ file to write (statistics go beside it)")
    defaults = SamplingConfig()
    p.add_argument("--frames-per-point", type=POSITIVE_INT, default=defaults.frames_per_point)
    p.add_argument("--stride", type=POSITIVE_INT, default=defaults.stride, help="MD steps between frames")
    p.add_argument("--equilibration", type=COUNT, default=defaults.equilibration, help="MD steps discarded")
    p.add_argument("--segment-frames", type=POSITIVE_INT, default=defaults.segment_frames,
                   help="consecutive frames per split segment")
    p.add_argument("--seed", type=COUNT, default=defaults.seed)
    p.add_argument("--state-points", nargs="*", help="a subset of the system's state points (default: all)")
    p = commands.add_parser("train", help="fit a potential to a dataset as a TOML config says")
    p.add_argument("config", help="experiment TOML with [data], [model] and [train] tables")
    p.add_argument("--workdir", help="checkpoints, metrics, report and plots (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest periodic checkpoint")
    p.add_argument("--members", type=POSITIVE_INT, default=1, help="train a committee of this many models (seeds "
                   "seed, seed+1, ...; a2ijax.committee) into WORKDIR/member_<k>")
    p.add_argument("--stop-after", type=POSITIVE_INT, help="stop and checkpoint after this many steps")
    p.add_argument("--atom-chunk", type=COUNT, help="atoms per rematerialised chunk (0: all; default per backend)")
    p.add_argument("--devices", type=POSITIVE_INT, help="local devices to split batches over (default: all devices "
                   "of all processes)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, to train with several processes (jax.distributed;"
                   " Slurm and Open MPI launches are detected without it)")
    p.add_argument("--num-processes", type=POSITIVE_INT, help="number of processes (with --coordinator)")
    p.add_argument("--process-id", type=COUNT, help="this process's rank, 0..num-processes-1 (with --coordinator)")
    p = commands.add_parser("learn", help="active learning: label the frames where a committee disagrees most "
                            "(a TOML config with a [learn] table; rerun to continue after an interruption)")
    p.add_argument("config", help="experiment TOML with [data], [model], [train] and [learn] tables")
    p.add_argument("--workdir", help="rounds, labelled frames and learning curve (default: runs/<config name>)")
    p = commands.add_parser("evaluate", help="error report of a checkpoint on a labelled dataset")
    p.add_argument("checkpoint", help="a work directory, checkpoint directory or checkpoint step directory")
    p.add_argument("data", help="labelled frames (extended XYZ or any ASE-readable file)")
    p.add_argument("--split", choices=["train", "valid", "test"], help="only this split (default: all frames)")
    p.add_argument("--out", help="directory for report.json, report.md and parity.png")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=4, help="frames per evaluation batch")
    p.add_argument("--atom-chunk", type=COUNT, help="atoms per rematerialised chunk (0: all; default per backend)")
    p = commands.add_parser("quickstart", help="sample, train, evaluate and run MD on a small LJ system (minutes)")
    p.add_argument("--out", default="quickstart", help="directory for the dataset, run, MD output and plots")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart run in --out")
    p = commands.add_parser("md", help="molecular dynamics with a trained potential")
    p.add_argument("checkpoint", nargs="?", help="a work directory, checkpoint directory or checkpoint step directory; "
                   "a committee's work directory (train --members) runs committee MD")
    p.add_argument("--model", help="a pretrained model shipped with the package instead of a checkpoint: "
                   "lj, sw or ka (a2ijax.pretrained)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--structure", help="starting structure: any ASE-readable file with a periodic cell")
    start.add_argument("--state-point", help="start from a state point of the checkpoint's reference system, "
                       "equilibrated with the reference potential (--equilibrate steps)")
    p.add_argument("--equilibrate", type=COUNT, default=5000, help="reference-potential steps before a state point")
    p.add_argument("--ensemble", choices=["nve", "nose-hoover", "langevin", "npt"], default="nve",
                   help="npt: Nose-Hoover thermostat and isotropic barostat (jax-md's npt_nose_hoover); needs "
                   "--pressure")
    p.add_argument("--pressure", type=float, help="NPT target pressure (in the checkpoint's units, printed at the "
                   "start)")
    p.add_argument("--steps", type=POSITIVE_INT, default=10000)
    p.add_argument("--dt", type=POSITIVE, help="time step in the checkpoint's time unit (metal: 10.18 fs; default: "
                   "the reference system's)")
    p.add_argument("--kT", type=NON_NEGATIVE, help="temperature for initial velocities and thermostats, in the "
                   "checkpoint's energy unit (eV for metal units)")
    p.add_argument("--thermo-every", type=POSITIVE_INT, default=10, help="steps between thermo rows")
    p.add_argument("--trajectory-every", type=POSITIVE_INT, default=100, help="steps between trajectory frames")
    p.add_argument("--skin", type=NON_NEGATIVE, help="neighbour-list skin, a length (default: 0.1 x the cutoff)")
    p.add_argument("--capacity-multiplier", type=POSITIVE, default=1.25,
                   help="neighbour slots per atom over the densest atom's count; lower is faster (attention "
                   "costs K^2: 1.05 gave 0.78x the step time, BUILD_NOTES.md history), an overflow reruns the chunk")
    p.add_argument("--atom-chunk", type=COUNT, help="atoms per rematerialised chunk (0: all; default per backend)")
    p.add_argument("--devices", type=POSITIVE_INT, default=1, help="local devices to split the atoms over")
    p.add_argument("--seed", type=COUNT, default=0)
    p.add_argument("--out", default="md", help="directory for thermo.csv and trajectory.extxyz")
    p = commands.add_parser("relax", help="minimise a structure at fixed cell with FIRE (jax-md's fire_descent)")
    p.add_argument("checkpoint", nargs="?", help="a work directory, checkpoint directory or committee's work directory")
    p.add_argument("--model", help="a pretrained model shipped with the package instead: lj, sw or ka")
    p.add_argument("--structure", required=True, help="any ASE-readable file with a periodic cell (its last frame)")
    p.add_argument("--fmax", type=POSITIVE, default=1e-3, help="stop once the largest force on an atom is below this")
    p.add_argument("--max-steps", type=POSITIVE_INT, default=10000)
    p.add_argument("--skin", type=NON_NEGATIVE, help="neighbour-list skin, a length (default: 0.1 x the cutoff)")
    p.add_argument("--out", default="relaxed.extxyz", help="extended XYZ file for the relaxed structure")
    p = commands.add_parser("lammps", help="run a LAMMPS input with a trained model as its force field (fix external; "
                            "on several ranks under mpiexec)")
    p.add_argument("checkpoint", help="a shipped model (lj, sw, ka) or a checkpoint directory")
    p.add_argument("input", help="a LAMMPS input without a force field; the A2I fix goes in before its first run")
    p.add_argument("--elements", nargs="+", required=True, help="the checkpoint symbol of each LAMMPS atom type, in "
                   "type order (as pair_coeff * * takes them)")
    p.add_argument("--skin", type=NON_NEGATIVE, help="LAMMPS's neighbour skin, a length (default: 0.1 x the cutoff)")
    p.add_argument("--atom-chunk", type=COUNT, help="atoms per rematerialised chunk (0: all; default per backend)")
    p.add_argument("--var", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="an index-style LAMMPS variable set before the input (as lmp -var NAME VALUE)")
    p = commands.add_parser("export", help="serialize a trained model with jax.export (StableHLO, parameters inside, "
                            "symbolic sizes)")
    p.add_argument("checkpoint", help="a shipped model (lj, sw, ka) or a checkpoint directory")
    p.add_argument("--out", required=True, help="the artefact to write (its metadata goes to OUT.json)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p = commands.add_parser("bench", help="MD speed, latency, compile time and memory of the shipped models against "
                            "jax-md's potentials, each row in its own process")
    p.add_argument("--potentials", nargs="+",
                   default=["lj-pretrained", "ka-pretrained", "sw-pretrained", "lj", "nequip", "graph_network", "a2i"],
                   help="which potentials (a2ijax.bench.POTENTIALS: the shipped models X-pretrained, jax-md's lj, "
                   "nequip, graph_network, behler_parrinello, untrained full-attention a2i-small, a2i, a2i-large)")
    p.add_argument("--sizes", nargs="+", type=ATOMS, default=[256, 1000, 4000, 16000, 64000], help="atom counts N")
    p.add_argument("--chunk", type=POSITIVE_INT, default=50, help="MD steps per compiled chunk")
    p.add_argument("--chunks", type=POSITIVE_INT, default=3, help="chunks timed after a warm-up chunk")
    p.add_argument("--repeats", type=POSITIVE_INT, default=5, help="timed energy+forces calls")
    p.add_argument("--skin", type=NON_NEGATIVE, default=0.3, help="neighbour-list skin, a length (every potential)")
    p.add_argument("--max-chunk-s", type=POSITIVE, default=60.0, help="skip larger N once a chunk takes longer")
    p.add_argument("--out", default="bench", help="directory for bench.json, bench.md and bench.png")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # bad options: argparse prints the message and exits with 2
    # jax-md's kinetic energy asks for float64 sums; without x64 JAX warns and uses float32.
    warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
    try:
        run_command(args)
    except (InputError, FileNotFoundError) as error:  # bad input: a message, not a traceback (a2ijax.errors)
        print(f"a2ijax {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _checkpoint(args: argparse.Namespace):
    """The checkpoint path, or the shipped model that ``--model`` names (exactly one of them)."""
    if (args.checkpoint is None) == (args.model is None):
        raise InputError("give a checkpoint or --model NAME (a pretrained model), not both or neither")
    if args.model is None:
        return args.checkpoint
    from a2ijax import pretrained

    return pretrained.load(args.model)


def run_command(args: argparse.Namespace) -> None:
    if args.command == "demo":
        from a2ijax.demo import demo

        demo(n_atoms=args.n_atoms, steps=args.steps, dt=args.dt, seed=args.seed)
    elif args.command == "generate":
        from a2ijax.dataset import format_statistics
        from a2ijax.sampling import SamplingConfig, write_reference_dataset

        config = SamplingConfig(frames_per_point=args.frames_per_point, stride=args.stride,
                                equilibration=args.equilibration, segment_frames=args.segment_frames, seed=args.seed)
        summary = write_reference_dataset(args.system, args.out, config, state_points=args.state_points)
        print(f"wrote {summary['frames']} frames to {args.out} in {summary['seconds']:.0f} s; statistics in "
              f"{args.out}.stats.json")
        print(f"per state point ({summary['units']}; energy_std is the total-energy fluctuation, force_std per "
              f"component, neighbours within {summary['cutoff']:.6g}):")
        print(format_statistics(summary["state_points"]))
    elif args.command == "train":
        from a2ijax.parallel import initialize, is_main_process

        initialize(args.coordinator, args.num_processes, args.process_id)  # before jax-md starts the backend
        from a2ijax.config import load_config
        from a2ijax.report import format_report
        from a2ijax.train import train_and_evaluate, train_committee

        config = load_config(args.config)
        workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
        if args.members > 1:
            results = train_committee(config, workdir, args.members, resume=args.resume, stop_after=args.stop_after,
                                      atom_chunk=args.atom_chunk, devices=args.devices)
            if is_main_process():
                done = sum(r is None or r.report is not None for r in results)
                print(f"committee in {workdir}: {done} of {args.members} members trained "
                      f"({workdir}/member_<k>/report.md); MD with `a2ijax md {workdir} ...`")
            return
        result = train_and_evaluate(config, workdir, resume=args.resume, stop_after=args.stop_after,
                                    atom_chunk=args.atom_chunk, devices=args.devices)
        if not is_main_process():
            return
        if result.report is None:
            print(f"stopped at step {int(result.state.step)} after {result.seconds:.0f} s; continue with "
                  f"`a2ijax train {args.config} --workdir {workdir} --resume`")
        else:
            print(f"trained {config.train.steps} steps in {result.seconds:.0f} s; test report ({workdir}/report.md):")
            print(format_report(result.report, result.report.get("units", "")))
    elif args.command == "learn":
        from a2ijax.learn import learn, load_learn_config

        config, learn_config = load_learn_config(args.config)
        workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
        curve = learn(config, learn_config, workdir, progress=True)
        print(f"active learning in {workdir} ({learn_config.selection} selection); test errors of the committee mean "
              "(worst state point, ratios to the MD fluctuation and the force std):")
        for row in curve:
            print(f"  round {row['round']}: {row['train_frames']} training frames, energy "
                  f"{100 * row['worst_energy_ratio']:.1f}%, force {100 * row['worst_force_ratio']:.1f}%")
    elif args.command == "evaluate":
        from a2ijax.report import evaluate

        _, text = evaluate(args.checkpoint, args.data, split=args.split, out=args.out, batch_size=args.batch_size,
                           atom_chunk=args.atom_chunk)
        print(text)
    elif args.command == "quickstart":
        from a2ijax.quickstart import quickstart

        quickstart(args.out, overwrite=args.overwrite)
    elif args.command == "md":
        from a2ijax.trained_md import md_from_checkpoint

        if args.ensemble == "npt" and args.pressure is None:
            raise InputError("--ensemble npt needs --pressure")
        if args.ensemble != "npt" and args.pressure is not None:
            raise InputError(f"--pressure applies to --ensemble npt, not {args.ensemble}")
        md_from_checkpoint(_checkpoint(args), structure=args.structure, state_point=args.state_point,
                           equilibrate=args.equilibrate, steps=args.steps, dt=args.dt, kT=args.kT, seed=args.seed,
                           ensemble=args.ensemble, pressure=args.pressure, thermo_every=args.thermo_every,
                           trajectory_every=args.trajectory_every, skin=args.skin,
                           capacity_multiplier=args.capacity_multiplier, atom_chunk=args.atom_chunk,
                           devices=args.devices, out=args.out)
    elif args.command == "relax":
        from a2ijax.committee import load_potential
        from a2ijax.trained_md import relax_structure

        checkpoint = _checkpoint(args)
        relax_structure(load_potential(checkpoint) if isinstance(checkpoint, str) else checkpoint, args.structure,
                        max_force=args.fmax, max_steps=args.max_steps, skin=args.skin, out=args.out)
    elif args.command == "lammps":
        from a2ijax.lammps import run_input

        fix = run_input(args.checkpoint, args.input, args.elements, skin=args.skin, atom_chunk=args.atom_chunk,
                        variables=dict(args.var))
        print(f"LAMMPS ran with the A2I fix: {fix.calls} force calls, {len(fix.programs)} compiled shapes")
    elif args.command == "export":
        from a2ijax.export import export_model
        from a2ijax.pretrained import resolve

        meta = export_model(resolve(args.checkpoint), args.out, dtype=args.dtype)
        print(f"wrote {args.out} and {args.out}.json: {meta['format']}, inputs {', '.join(meta['inputs'])}, "
              f"sizes A, C, K >= {meta['min_slots']}, {meta['dtype']}, for {', '.join(meta['platforms'])}")
    elif args.command == "bench":
        from a2ijax import bench

        bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
