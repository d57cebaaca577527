"""Memory of a gradient through MD against the segment's length: blocks of ~sqrt(n) steps against none.

    python experiments/remat_memory.py --out runs/remat_memory

The LJ fluid (``a2ijax.systems.parametric_energy``, 256 atoms, rho = 0.84, kT = 0.85, Nose-Hoover,
float32): for segments of ``--lengths`` steps, the gradient of the mean potential energy over the
segment's frames with respect to (sigma, epsilon) (``a2ijax.diffmd.make_segment``) is compiled, not
run, with ``block=0`` (the divisor of n nearest sqrt(n): each block rematerialised, memory ~ n/b + b
states) and with ``block=n`` (one block: the backward pass stores every step, memory ~ n states).
XLA's memory analysis of the compiled program gives the working memory (temporary buffers) of each.

Writes ``<out>/remat_memory.json`` and prints one row per length.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax_md import space

from a2ijax import diffmd
from a2ijax.cli import POSITIVE_INT
from a2ijax.files import atomic_write
from a2ijax.systems import lattice_positions, parametric_energy

N, DENSITY, KT, DT = 256, 0.84, 0.85, 0.005


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/remat_memory"))
    parser.add_argument("--lengths", type=POSITIVE_INT, nargs="+", default=[64, 256, 1024, 4096])
    args = parser.parse_args()
    side = (N / DENSITY) ** (1 / 3)
    box = jnp.eye(3) * side
    displacement, shift = space.periodic_general(box, fractional_coordinates=False)
    neighbor_fn, truth, energy_fn = parametric_energy("lj", displacement, box, dr_threshold=0.3)
    R = jnp.asarray(lattice_positions(N, side, jitter=0.05, seed=0))
    neighbor = neighbor_fn.allocate(R)
    key = jax.random.PRNGKey(0)
    state_bytes = R.size * R.dtype.itemsize
    rows = []
    for n in args.lengths:
        row = dict(steps=n)
        for name, block in (("blocks", 0), ("one_block", n)):
            segment = diffmd.make_segment(energy_fn, shift, steps=n, dt=DT, kT=KT, block=block)

            def mean_energy(params, segment=segment):
                return jnp.mean(segment(params, R, neighbor, key).energies)

            started = time.perf_counter()
            compiled = jax.jit(jax.grad(mean_energy)).lower(truth).compile()
            memory = compiled.memory_analysis()
            row[name] = dict(temp_bytes=int(memory.temp_size_in_bytes),
                             compile_seconds=round(time.perf_counter() - started, 1))
        row["block"] = min((b for b in range(1, n + 1) if n % b == 0), key=lambda b: abs(b - math.sqrt(n)))
        rows.append(row)
        print(f"{n:6d} steps: blocks of {row['block']:3d}: {row['blocks']['temp_bytes'] / 2**20:8.2f} MiB; "
              f"one block: {row['one_block']['temp_bytes'] / 2**20:8.2f} MiB "
              f"(positions: {state_bytes / 2**10:.1f} KiB per step)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "remat_memory.json",
                 lambda f: json.dump(dict(N=N, density=DENSITY, kT=KT, dt=DT, backend=jax.default_backend(),
                                          rows=rows), f, indent=1))


if __name__ == "__main__":
    main()
