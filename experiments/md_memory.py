"""Peak memory per atom and time per atom-step of MD with a shipped model, from 10^3 to 10^6 atoms.

The path users run: ``a2ijax.pretrained.load(MODEL).potential(box)`` (the linear-memory neighbour
list of :mod:`a2ijax.neighbors`) stepped by ``a2ijax.md.run`` with jax-md's NVE integrator, on an
LJ liquid at density 0.84 (a jittered simple-cubic lattice, kT 0.85 velocities), float32, one
process. Each size runs in a fresh interpreter, so that its peak resident memory (Linux ``VmHWM``)
is its own; the memory that grows with N is the peak minus the interpreter's resident memory after
JAX, the package and the model were loaded (``base``).

    python experiments/md_memory.py --sizes 1000 10000 100000 1000000 --out runs/md_memory.json

Per size: the neighbour slots K and key slots M, whether the list has a cell list, the time to
allocate the list, the first chunk of ``--steps`` steps (compilation included), then ``--chunks``
timed chunks of the same program. The summary gives each figure at the largest size over its value at 10^4.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DENSITY = 0.84


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def worker(n: int, steps: int, chunks: int, model: str, skin: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax_md import simulate

    from a2ijax import md, pretrained
    from a2ijax.systems import lattice_positions

    checkpoint = pretrained.load(model)
    side = (n / DENSITY) ** (1 / 3)
    R = jnp.asarray(lattice_positions(n, side, jitter=0.05, seed=0), jnp.float32)
    potential = checkpoint.potential(np.eye(3) * side, dr_threshold=skin)
    base = resident_mib()
    t0 = time.perf_counter()
    neighbor = potential.neighbor_fn.allocate(R)
    jax.block_until_ready(neighbor.idx)
    allocate_s = time.perf_counter() - t0
    init, apply = simulate.nve(potential.energy_fn, potential.shift_fn, 0.005)
    state = init(jax.random.PRNGKey(0), R, kT=0.85, neighbor=neighbor)
    ends = []  # when each chunk was accepted: the first includes compilation, the rest are timed
    t0 = time.perf_counter()
    result = md.run(apply, state, potential.neighbor_fn, neighbor, steps * (chunks + 1), chunk_steps=steps,
                    on_chunk=lambda *_: ends.append(time.perf_counter()))
    first_s, seconds = ends[0] - t0, ends[-1] - ends[0]
    peak = peak_mib()
    return dict(n=n, side=side, K=int(result.neighbor.idx.shape[1]), M=int(result.neighbor.key_capacity),
                cell_list=result.neighbor.cell_list_fn is not None, cell_capacity=result.neighbor.cell_list_capacity,
                base_mib=base, peak_mib=peak, kib_per_atom=1024 * (peak - base) / n, allocate_s=allocate_s,
                first_chunk_s=first_s, steps=steps * chunks, seconds=seconds,
                us_per_atom_step=1e6 * seconds / (n * steps * chunks),
                reallocations=result.reallocations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000, 100000, 1000000])
    parser.add_argument("--steps", type=int, default=2, help="MD steps per compiled chunk")
    parser.add_argument("--chunks", type=int, default=2, help="timed chunks after the first (which compiles)")
    parser.add_argument("--model", default="lj", help="a shipped model (a2ijax.pretrained)")
    parser.add_argument("--skin", type=float, default=0.25, help="neighbour-list skin (dr_threshold)")
    parser.add_argument("--out", default="runs/md_memory.json")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.chunks, args.model, args.skin)))
        return
    import platform

    import jax

    result = dict(command=" ".join(["python", *sys.argv]), date=time.strftime("%Y-%m-%d %H:%M"),
                  machine=platform.machine(), jax=jax.__version__, model=args.model, density=DENSITY,
                  skin=args.skin, rows=[])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("| N | K | M | cell list | allocate s | first chunk s | us/atom-step | peak MiB | base MiB | KiB/atom |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        done = subprocess.run([sys.executable, __file__, "--worker", str(n), "--steps", str(args.steps), "--chunks",
                               str(args.chunks), "--model", args.model, "--skin", str(args.skin)],
                              capture_output=True, text=True)
        if done.returncode:
            why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            row = dict(n=n, failed=why)
            print(f"| {n:,} | failed: {row['failed']} |", flush=True)
        else:
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {n:,} | {row['K']} | {row['M']} | {row['cell_list']} | {row['allocate_s']:.1f} | "
                  f"{row['first_chunk_s']:.1f} | {row['us_per_atom_step']:.1f} | {row['peak_mib']:.0f} | "
                  f"{row['base_mib']:.0f} | {row['kib_per_atom']:.2f} |", flush=True)
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=1))  # every row on disk as it comes
    rows = {r["n"]: r for r in result["rows"] if "failed" not in r}
    sizes = sorted(rows)
    for small, large in zip(sizes, sizes[1:], strict=False):  # the growth between sizes, free of fixed costs
        grown = rows[large]["peak_mib"] - rows[small]["peak_mib"]
        rows[large]["marginal_kib_per_atom"] = 1024 * grown / (large - small)
        print(f"from N = {small:,} to {large:,}: {rows[large]['marginal_kib_per_atom']:.2f} KiB per added atom")
    if 10000 in rows and len(rows) > 1:
        largest = max(rows)
        result["ratio_to_1e4"] = dict(n=largest, us_per_atom_step=rows[largest]["us_per_atom_step"]
                                      / rows[10000]["us_per_atom_step"],
                                      kib_per_atom=rows[largest]["kib_per_atom"] / rows[10000]["kib_per_atom"])
        ratio = result["ratio_to_1e4"]
        print(f"at N = {largest:,} over N = 10,000: time per atom-step x{ratio['us_per_atom_step']:.2f}, "
              f"memory per atom x{ratio['kib_per_atom']:.2f}")
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
