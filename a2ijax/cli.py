"""The ``a2ijax`` command.

``a2ijax generate <system> --out <file>`` samples a reference dataset (see ``a2ijax.data``).

``a2ijax demo`` builds the default A2I potential on a Lennard-Jones liquid (embedded, nothing to
download), checks it against its own all-pairs path and ``-grad E``, and runs jit-compiled NVE with
a neighbour list, reporting energy conservation. The weights are untrained: the demo shows the
machinery, not a fitted model. Speed against baselines is measured by ``experiments/bench_core.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import simulate, space

from a2ijax.data import (
    SamplingConfig,
    format_statistics,
    generate,
    read_dataset,
    statistics,
    write_dataset,
    write_statistics,
)
from a2ijax.md import energy_observables, run
from a2ijax.model import A2IConfig
from a2ijax.potential import a2i_neighbor_list, a2i_pair
from a2ijax.systems import get_system, lattice_positions


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

    init, apply = simulate.nve(potential, shift, dt)
    state = init(jax.random.PRNGKey(seed + 1), R, kT=kT, neighbor=nbrs)
    t0 = time.perf_counter()
    md = run(apply, state, neighbor_fn, nbrs, steps, chunk_steps=max(1, steps // 4),
             observe=energy_observables(potential))
    md_s = time.perf_counter() - t0
    total = md.observables["total"]
    drift = np.polyfit(np.arange(steps) * dt, total / n_atoms, 1)[0]

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
    args = parser.parse_args(argv)
    # jax-md's kinetic energy asks for float64 sums; without x64 JAX warns and uses float32.
    warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
    try:
        if args.command == "demo":
            demo(n_atoms=args.n_atoms, steps=args.steps, dt=args.dt, seed=args.seed)
        elif args.command == "generate":
            generate_command(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: a message, not a traceback
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


if __name__ == "__main__":
    sys.exit(main())
