"""Speed-up of two devices over one on this CPU, and a scaling model for many devices.

Each configuration runs in a fresh interpreter with single-threaded XLA CPU devices
(``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``), so "2 devices" means two
cores doing the work of one:

* an A2I MD step (NVE, neighbour list updated every step), atoms split over the devices with
  ``a2i_neighbor_list(..., mesh=)``;
* a training step (batch split over the devices, :func:`a2ijax.train.make_train_step` with a mesh);
* the replicated work of an MD step: the same MD with jax-md's Lennard-Jones (neighbour list,
  integrator and a pair energy), an upper bound for what every device repeats.

    python experiments/scaling.py --atoms 512 --out runs/scaling.json
    python experiments/scaling.py --accelerator --atoms 16000    # 1 GPU against all of a machine's


The scaling model on paper (printed and stored): per MD step on ``D`` devices,
``t(D) = t_model / D + t_replicated + t_reduce(D)``, with ``t_model`` and ``t_replicated`` measured
here and ``t_reduce`` the all-reduce of the forces ``[N, 3]`` (the transpose of the replicated
positions), which does not shrink with ``D``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def worker(kind: str, devices: int, atoms: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax_md import energy, simulate, space

    from a2ijax.bench import median_seconds
    from a2ijax.model import A2IConfig
    from a2ijax.parallel import make_mesh
    from a2ijax.potential import a2i_neighbor_list
    from a2ijax.systems import lattice_positions

    if "A2IJAX_SCALING_DEVICES" not in os.environ:
        assert jax.device_count() == devices
    side = (atoms / 0.8) ** (1 / 3)
    R = jnp.asarray(lattice_positions(atoms, side, jitter=0.05, seed=0), jnp.float32)
    displacement, shift = space.periodic(side)

    if kind in ("md", "replicated"):
        if kind == "md":
            mesh = make_mesh(devices, "atoms") if devices > 1 else None
            neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement, side, A2IConfig(), dr_threshold=0.3,
                                                                mesh=mesh)
            neighbor = neighbor_fn.allocate(R)
            params = init_fn(jax.random.PRNGKey(0), R, neighbor)
            potential = lambda R, neighbor, **kw: energy_fn(params, R, neighbor, **kw)  # noqa: E731
        else:
            neighbor_fn, potential = energy.lennard_jones_neighbor_list(displacement, side, r_cutoff=3.0,
                                                                        dr_threshold=0.3)
            neighbor = neighbor_fn.allocate(R)
        init, apply = simulate.nve(potential, shift, 0.002)
        state = init(jax.random.PRNGKey(1), R, kT=1.0, neighbor=neighbor)

        @jax.jit
        def chunk(carry):
            def one(_, carry):
                state, neighbor = carry
                neighbor = neighbor.update(state.position)
                return apply(state, neighbor=neighbor), neighbor
            return jax.lax.fori_loop(0, steps, one, carry)

        seconds = median_seconds(lambda: chunk((state, neighbor)), 3) / steps
        return dict(kind=kind, devices=devices, atoms=atoms, seconds_per_step=seconds,
                    us_per_atom_step=1e6 * seconds / atoms)

    # a training step: LJ frames labelled by the reference potential, the batch split over devices
    import tempfile

    from a2ijax.config import DataConfig, ExperimentConfig, TrainConfig
    from a2ijax.dataset import read_dataset, write_dataset
    from a2ijax.parallel import global_batch, padded_rows, replicate
    from a2ijax.sampling import label
    from a2ijax.systems import get_system
    from a2ijax.train import init_state, make_train_step, prepare_run

    frames, n = 8, 128
    side = (n / 0.8) ** (1 / 3)
    positions = np.stack([lattice_positions(n, side, jitter=0.1, seed=s) for s in range(frames + 2)])
    labelled = label(get_system("lj"), positions, np.zeros(n, np.int32), side)
    for k, atoms in enumerate(labelled):
        atoms.info.update(split="train" if k < frames else "valid", state_point="lj", system="lj")
    path = Path(tempfile.mkdtemp()) / "frames.xyz"
    write_dataset(path, labelled)
    config = ExperimentConfig(DataConfig(path=str(path)), A2IConfig(), TrainConfig(batch_size=frames))
    run = prepare_run(read_dataset(path), config)
    mesh = make_mesh(devices)
    step = make_train_step(run, mesh)
    batch = global_batch(run.data.buckets["train"][0].batch(np.arange(frames), padded_rows(frames, mesh)), mesh)
    state = replicate(init_state(run), mesh)
    seconds = median_seconds(lambda: step(state, batch), 3)
    return dict(kind=kind, devices=devices, frames=frames, atoms=n, seconds_per_step=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--atoms", type=int, default=512, help="atoms in the MD system")
    parser.add_argument("--steps", type=int, default=5, help="MD steps per timed chunk")
    parser.add_argument("--out", default="runs/scaling.json")
    parser.add_argument("--accelerator", action="store_true",
                        help="one accelerator against all of them (default: 1 against 2 single-threaded CPU devices)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "DEVICES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.atoms, args.steps)))
        return
    rows = []
    many = 2
    if args.accelerator:
        import jax

        many = jax.device_count()
    for kind, devices in (("md", 1), ("md", many), ("replicated", 1), ("train", 1), ("train", many)):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {SINGLE_THREAD}")  # bare token last
        if args.accelerator:  # the worker takes the first `devices` accelerators
            env = dict(os.environ, A2IJAX_SCALING_DEVICES=str(devices))
        out = subprocess.run([sys.executable, __file__, "--worker", kind, str(devices), "--atoms", str(args.atoms),
                              "--steps", str(args.steps)], env=env, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    t = {(r["kind"], r["devices"]): r["seconds_per_step"] for r in rows}
    summary = dict(devices=many, md_speedup=t["md", 1] / t["md", many],
                   train_speedup=t["train", 1] / t["train", many],
                   md_replicated_fraction=t["replicated", 1] / t["md", 1])
    # t(D) = t_model / D + t_fixed: what the split run took beyond t_model / D does not shrink with D
    model = t["md", 1] - t["replicated", 1]
    fixed = t["md", many] - model / many
    summary["md_fixed_seconds"] = fixed
    summary["modelled_md_speedup"] = {str(d): t["md", 1] / (model / d + fixed) for d in (8, 64, 256)}
    # the bound where only the replicated neighbour list and integrator stay whole on every device
    summary["bound_md_speedup"] = {str(d): t["md", 1] / (model / d + t["replicated", 1]) for d in (8, 64, 256)}
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(rows=rows, summary=summary, atoms=args.atoms), indent=1))


if __name__ == "__main__":
    main()
