"""Time per atom-step of LAMMPS + A2I (fix external, 1 and 2 MPI ranks) against ``a2ijax md``.

The same system for all three: a shipped model (default ``lj``) on its liquid at density 0.84 (a
jittered lattice, velocities at kT 0.85), NVE, float32, the same neighbour skin. ``a2ijax md`` is
``Checkpoint.potential`` + ``md.run``; LAMMPS runs ``a2ijax.lammps.run_input`` in a fresh process
(``mpiexec -n R`` for R ranks). Each run takes a first stretch of steps (compilation included) and
then times ``--steps`` more. ``a2ijax md``: between the ends of two compiled chunks. LAMMPS: from the
end of the ``run`` command's setup callback to the end of its last step's (``us_per_atom_step``, the
cost of a step in a long run), and the whole ``run`` command, setup included (``run_s``). The LAMMPS
rows also say, for rank 0 in the timed run, where the callback's time went (the host's neighbour
search and padding, the model), how many calls rebuilt the layout or compiled a program, and how
many centres it evaluated per local atom (the ghost recomputation).

    python experiments/lammps_speed.py --sizes 4000 32000 --out runs/lammps_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DENSITY, KT, DT = 0.84, 0.85, 0.005
ROOT = Path(__file__).resolve().parents[1]


def system(n: int, out: Path) -> tuple[np.ndarray, np.ndarray, float, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from lammps_worker import write_data

    from a2ijax.systems import lattice_positions

    side = (n / DENSITY) ** (1 / 3)
    R = np.asarray(lattice_positions(n, side, jitter=0.05, seed=0), np.float64)
    V = np.random.default_rng(1).normal(scale=np.sqrt(KT), size=(n, 3))
    V -= V.mean(0)
    data = out / f"start_{n}.data"
    write_data(data, R, V, side)
    return R, V, side, data


def a2ijax_md(model: str, n: int, steps: int, skin: float, out: Path) -> dict:
    import jax
    import jax.numpy as jnp
    from jax_md import simulate

    from a2ijax import md, pretrained

    R, V, side, _ = system(n, out)
    potential = pretrained.load(model).potential(np.eye(3) * side, dr_threshold=skin)
    init, apply = simulate.nve(potential.energy_fn, potential.shift_fn, DT)
    neighbor, _ = md.allocate(potential.neighbor_fn, jnp.asarray(R, jnp.float32))
    state = init(jax.random.PRNGKey(0), jnp.asarray(R, jnp.float32), kT=0.0, neighbor=neighbor)
    state = state.set(momentum=jnp.asarray(V, jnp.float32))
    stamps = []
    t0 = time.perf_counter()  # the first chunk of `steps` steps compiles; the second is timed
    md.run(apply, state, potential.neighbor_fn, neighbor, 2 * steps, chunk_steps=steps,
           on_chunk=lambda *_: stamps.append(time.perf_counter()))
    seconds = stamps[-1] - stamps[0]
    return dict(engine="a2ijax md", ranks=1, n=n, first_s=stamps[0] - t0, seconds=seconds,
                neighbor_list="cell list" if neighbor.cell_list_fn is not None else "all pairs",
                us_per_atom_step=1e6 * seconds / (n * steps))


def lammps_worker(model: str, n: int, steps: int, skin: float, out: Path) -> dict | None:
    from a2ijax.lammps import run_input

    _, _, _, data = system(n, out)
    script = out / f"speed_{n}.in"
    script.write_text(f"units lj\natom_style atomic\nboundary p p p\nread_data {data}\ntimestep {DT}\n"
                      f"fix integrate all nve\nthermo {2 * steps}\nrun {steps}\n")
    t0 = time.perf_counter()
    fix = run_input(model, script, ["Ar"], skin=skin)
    first = time.perf_counter() - t0
    ends = []  # when each callback of the timed run returned: the first is the run's setup

    def timed(*args):
        fix.callback(*args)
        ends.append(time.perf_counter())

    fix.lmp.set_fix_external_callback(fix.fix_id, timed, fix)
    fix.seconds.update(host=0.0, model=0.0)
    compiled, layouts = len(fix.programs), fix.layouts
    if fix.comm is not None:
        fix.comm.Barrier()
    t0 = time.perf_counter()
    fix.lmp.command(f"run {steps}")
    whole = time.perf_counter() - t0
    seconds = ends[-1] - ends[0]  # `steps` steps, each with its callback, after the setup's
    nlocal, nghost = int(fix.lmp.extract_global("nlocal")), int(fix.lmp.extract_global("nghost"))
    ranks = int(fix.lmp.extract_setting("world_size"))
    rank = 0 if fix.comm is None else fix.comm.rank
    row = dict(engine="LAMMPS + A2I (fix external)", ranks=ranks, n=n, first_s=first, seconds=seconds,
               neighbor_list="host cell list (the fix's layout)",
               us_per_atom_step=1e6 * seconds / (n * steps), run_s=whole,
               run_us_per_atom_step=1e6 * whole / (n * steps), rank0_local=nlocal, rank0_ghost=nghost,
               rank0_host_s=fix.seconds["host"], rank0_model_s=fix.seconds["model"],
               rank0_centres_per_local=fix.centres / max(nlocal, 1), rank0_calls=len(ends),
               rank0_layouts=fix.layouts - layouts, rank0_compiled=len(fix.programs) - compiled)
    return row if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[4000, 32000])
    parser.add_argument("--model", default="lj")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (and steps of the first stretch)")
    parser.add_argument("--skin", type=float, default=0.25)
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", default="runs/lammps_speed.json")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    scratch = Path(args.out).with_suffix("")
    scratch.mkdir(parents=True, exist_ok=True)
    if args.worker:
        engine, n = args.worker[0], int(args.worker[1])
        work = a2ijax_md if engine == "md" else lammps_worker
        row = work(args.model, n, args.steps, args.skin, scratch)
        if row is not None:
            print(json.dumps(row), flush=True)
        return
    import platform

    result = dict(command=" ".join(["python", *sys.argv]), date=time.strftime("%Y-%m-%d %H:%M"),
                  machine=platform.machine(), cores=os.cpu_count(), model=args.model, rows=[])
    for n in args.sizes:
        jobs = [("md", [sys.executable])] + [("lammps", [str(Path(sys.executable).parent / "mpiexec"), "-n", str(r),
                                                        sys.executable]) for r in args.ranks]
        for engine, launcher in jobs:
            done = subprocess.run([*launcher, __file__, "--worker", engine, str(n), "--model", args.model, "--steps",
                                   str(args.steps), "--skin", str(args.skin), "--out", args.out],
                                  capture_output=True, text=True)
            if done.returncode:
                row = dict(engine=engine, n=n, failed=done.stderr.strip().splitlines()[-1:])
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
        base = next(r for r in result["rows"] if r.get("engine") == "a2ijax md" and r["n"] == n)
        for row in result["rows"]:
            if row["n"] == n and "us_per_atom_step" in row:
                row["over_a2ijax_md"] = row["us_per_atom_step"] / base["us_per_atom_step"]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}; docs/results.md renders it once it is copied to docs/data/")

if __name__ == "__main__":
    main()
