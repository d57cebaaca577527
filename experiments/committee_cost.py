"""What a committee costs in MD: M members against one model, the same system and integrator.

    python experiments/committee_cost.py --members 2 4 --atoms 256 --out runs/committee_cost.json

The shipped LJ model is the single model; a committee of M is M copies of its parameters, each
moved by 5% noise (the cost does not depend on the values). Every variant runs NVE at the LJ
state point rho 0.84 in compiled chunks of ``--chunk`` steps (``a2ijax.md.run``), with the
force disagreement recorded every ``--record-every`` steps for the committees; one chunk compiles,
``--chunks`` more are timed. The ratio to the single model's step time is the cost of the
committee: the members are vmapped over their stacked parameters, so the neighbour list, the
displacements and the integrator are shared; the model's own work grows with M.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax_md import simulate as integrators

from a2ijax import committee, pretrained
from a2ijax.files import atomic_write
from a2ijax.md import run
from a2ijax.systems import get_system, lattice_positions


def perturbed(checkpoint, seed: int):
    leaves, tree = jax.tree_util.tree_flatten(checkpoint.params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    moved = [p * (1.0 + 0.05 * jax.random.normal(k, p.shape, p.dtype)) for p, k in zip(leaves, keys, strict=True)]
    return dataclasses.replace(checkpoint, params=jax.tree_util.tree_unflatten(tree, moved))


def seconds_per_step(potential, box, R, disagreement, args) -> float:
    system = get_system("lj")
    neighbor_fn, energy, _, shift = potential(box, dr_threshold=0.25)
    init, apply = integrators.nve(energy, shift, system.dt)
    nbrs = neighbor_fn.allocate(R)
    state = init(jax.random.PRNGKey(0), R, kT=0.85, neighbor=nbrs)
    observe = None if disagreement is None else (
        lambda state, neighbor: dict(sigma=jnp.max(disagreement(state.position, neighbor=neighbor))))
    stride = args.record_every
    warm = run(apply, state, neighbor_fn, nbrs, args.chunk, chunk_steps=args.chunk, stride=stride, observe=observe)
    jax.block_until_ready(warm.state.position)
    t0 = time.perf_counter()
    timed = run(apply, warm.state, neighbor_fn, warm.neighbor, args.chunk * args.chunks, chunk_steps=args.chunk,
                stride=stride, observe=observe)
    jax.block_until_ready(timed.state.position)
    if timed.reallocations:
        raise RuntimeError("the neighbour list was reallocated during the timed chunks: use a larger skin")
    return (time.perf_counter() - t0) / (args.chunk * args.chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--atoms", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--record-every", type=int, default=10)
    parser.add_argument("--out", default="runs/committee_cost.json")
    args = parser.parse_args()
    model = pretrained.load("lj")
    side = (args.atoms / 0.84) ** (1 / 3)
    box = jnp.eye(3) * side
    R = jnp.asarray(lattice_positions(args.atoms, side, jitter=0.05, seed=0))
    single = seconds_per_step(model.potential, box, R, None, args)
    rows = [dict(members=1, seconds_per_step=single, ratio=1.0)]
    print(f"{args.atoms} LJ atoms, NVE, chunks of {args.chunk} steps, disagreement every {args.record_every}")
    print(f"  single model: {single * 1e3:.2f} ms per step")
    for m in args.members:
        group = committee.from_checkpoints([perturbed(model, seed) for seed in range(m)])
        seconds = seconds_per_step(group.potential, box, R, group.disagreement(box), args)
        rows.append(dict(members=m, seconds_per_step=seconds, ratio=seconds / single))
        print(f"  committee of {m}: {seconds * 1e3:.2f} ms per step, {seconds / single:.2f}x the single model")
    result = dict(atoms=args.atoms, chunk=args.chunk, chunks=args.chunks, record_every=args.record_every,
                  backend=jax.default_backend(), rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.out), lambda f: json.dump(result, f, indent=1))


if __name__ == "__main__":
    main()
