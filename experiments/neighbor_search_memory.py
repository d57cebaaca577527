"""Peak memory and time of the host-side neighbour search against the number of atoms.

The paths that advertise large systems (training's neighbour indices, the ASE calculator, the
extrapolation check of ``a2ijax md``, RDFs) find neighbours on the host with
:func:`a2ijax.geometry.neighbor_pairs`. This measures its peak memory (tracemalloc, which NumPy
reports to) and wall time on an LJ liquid (density 0.84, cutoff 2.5) at each N, and prints the
bytes per atom: flat when memory is linear in N.

    python experiments/neighbor_search_memory.py --sizes 1000 4000 16000 64000
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from a2ijax.geometry import closest_distance, neighbor_index


def measure(fn, *args) -> tuple[int, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1], time.perf_counter() - t0
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 4000, 16000, 64000])
    parser.add_argument("--cutoff", type=float, default=2.5)
    args = parser.parse_args(argv)
    print("| N | neighbour index: peak MiB | KiB/atom | s | closest distance: peak MiB | KiB/atom | s | "
          "an [N, N, 3] float64 array would be, MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        side = (n / 0.84) ** (1 / 3)
        R = np.random.default_rng(n).uniform(0, side, (n, 3))
        cell = np.eye(3) * side
        rows = [measure(neighbor_index, R, cell, True, args.cutoff), measure(closest_distance, R, cell, True,
                                                                             args.cutoff)]
        cells = " | ".join(f"{peak / 2**20:.1f} | {peak / n / 1024:.1f} | {seconds:.2f}" for peak, seconds in rows)
        print(f"| {n:,} | {cells} | {24 * n * n / 2**20:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
