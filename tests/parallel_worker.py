"""The child processes of tests/test_parallel.py (JAX fixes its devices and processes at start-up,
so each configuration needs a fresh interpreter). Writes its measurements as JSON for the test.

    python parallel_worker.py devices DATA OUT               # 1 process, 2 CPU devices
    python parallel_worker.py processes DATA OUT ID PORT     # process ID of 2, 1 CPU device each

``devices`` compares the first training step (batch split over the devices) and MD (atoms split)
with one device in the same process; ``processes`` trains the suite's shared model on two
processes, stopping and resuming, for the test to compare with the one-process run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

mode, data_path, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if mode == "processes":
    from a2ijax.parallel import initialize

    initialize(f"127.0.0.1:{sys.argv[5]}", 2, int(sys.argv[4]))

import jax.numpy as jnp  # noqa: E402
from conftest import MODEL, TRAIN_ATOM_CHUNK, jittered_lattice, random_species, small_config, tiny_config  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax_md import quantity, space  # noqa: E402

from a2ijax.checkpoint import load_checkpoint  # noqa: E402
from a2ijax.dataset import read_dataset  # noqa: E402
from a2ijax.md import allocate_replicas, run  # noqa: E402
from a2ijax.parallel import global_batch, is_main_process, make_mesh, padded_rows, replicate, replicated  # noqa: E402
from a2ijax.potential import a2i_neighbor_list  # noqa: E402
from a2ijax.train import init_state, make_loss, prepare_run, train_and_evaluate  # noqa: E402

results: dict = {}
_clock = [time.perf_counter()]


def lap(name: str) -> None:
    now = time.perf_counter()
    results.setdefault("seconds", {})[name] = round(now - _clock[0], 1)
    _clock[0] = now


def relative(a, b) -> float:
    """Largest |a - b| over the largest |b|, across the leaves of two pytrees."""
    a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    scale = max(float(np.max(np.abs(np.asarray(y)))) for y in b)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(a, b, strict=True)) / scale


def float64(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch with its float fields (stored as float32) in float64, so the whole loss is float64."""
    return {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in batch.items()}


def first_step(mesh: Mesh, reference: Mesh) -> None:
    """The loss and its gradient at step 0 on ``mesh`` against ``reference`` (one device), in float64,
    on a batch of 3 frames (filled up to 4 rows on 2 devices)."""
    config = tiny_config(data_path, batch_size=3)
    config = dataclasses.replace(config, model=dataclasses.replace(MODEL, param_dtype="float64"))
    run_ = prepare_run(read_dataset(data_path), config, atom_chunk=TRAIN_ATOM_CHUNK)
    params = init_state(run_).params
    bucket = run_.data.buckets["train"][0]
    loss = make_loss(run_)

    def loss_and_grad(on: Mesh):
        fn = jax.jit(jax.value_and_grad(loss, has_aux=True), out_shardings=replicated(on))
        batch = global_batch(float64(bucket.batch(np.arange(3), padded_rows(3, on))), on)
        (value, _), grads = fn(replicate(params, on), batch, jnp.zeros((), jnp.int32))
        return float(value), grads

    (l1, g1), (l2, g2) = loss_and_grad(reference), loss_and_grad(mesh)
    results["batch_rows"] = padded_rows(3, mesh)
    results["loss0_relative"] = abs(l1 - l2) / abs(l1)
    results["grad0_relative"] = relative(g2, g1)
    results["grad0_max"] = max(float(np.max(np.abs(np.asarray(g)))) for g in jax.tree_util.tree_leaves(g1))


def atom_sharded_md(mesh: Mesh) -> None:
    """Energy, per-atom energies, forces and stress (the ``box`` and ``perturbation`` arguments
    through the split) against one device, and the per-device work of the compiled program; 200 NVE
    steps through :func:`a2ijax.md.run`; replicas split over devices (float64)."""
    R = jittered_lattice((4, 4, 4), 4.6 / 4, 0.2, seed=0)[:63]  # 63 atoms: not a multiple of 2 devices
    species = random_species(63)
    box = jnp.eye(3) * 4.6
    displacement, shift = space.periodic_general(box, fractional_coordinates=False)
    config = small_config(layers=1, width=8)
    # atom_chunk 0: XLA's cost analysis counts a loop body once, so chunks would hide the work
    built = {name: a2i_neighbor_list(displacement, box, config, species, dr_threshold=0.3, disable_cell_list=True,
                                     atom_chunk=0, mesh=m)
             for name, m in (("one", None), ("split", mesh))}
    neighbor_fn = built["one"][0]
    neighbor = neighbor_fn.allocate(R)
    params = built["one"][1](jax.random.PRNGKey(0), R, neighbor)
    # per-species shifts as training fits them: an atom without neighbours then has a non-zero energy,
    # so a padding row counted by mistake would show in the total
    params["params"]["energy_shift"] = jnp.asarray([0.3, -0.2, 0.5])
    values, flops = [], []
    for name in ("one", "split"):  # per-atom energies, their sum, its gradient and the stress in one program
        energy_fn = built[name][2]

        def observables(R, nbr, energy_fn=energy_fn):  # the psum path, its gradient, the stress, per atom
            total, grad = jax.value_and_grad(lambda R: energy_fn(params, R, nbr))(R)
            stress = quantity.stress(lambda R, **kw: energy_fn(params, R, **kw), R, box, neighbor=nbr)
            return total, energy_fn(params, R, nbr, per_atom=True), -grad, stress

        compiled = jax.jit(observables).lower(R, neighbor).compile()
        cost = compiled.cost_analysis()
        flops.append(float((cost[0] if isinstance(cost, list) else cost)["flops"]))
        values.append(compiled(R, neighbor))
    (e1, a1, f1, s1), (e2, a2, f2, s2) = values
    results["energy_relative"] = abs(float(e1 - e2)) / abs(float(e1))
    results["per_atom_relative"] = relative(a2, a1)
    results["force_relative"] = relative(f2, f1)
    results["stress_relative"] = relative(s2, s1)
    results["force_max"] = float(jnp.max(jnp.abs(f1)))
    results["flops"] = flops
    lap("md: energy")

    from jax_md import simulate as integrators

    # One device: two replicas in one program (the first from R); the atom-split run of R alone and
    # the replica-split run of both are compared with it: two MD programs instead of four.
    steps = 200
    replicas = jnp.stack([R, jittered_lattice((4, 4, 4), 4.6 / 4, 0.2, seed=5)[:63]])

    def nve(energy_fn):
        return integrators.nve(lambda R, neighbor=None, **kw: energy_fn(params, R, neighbor, **kw), shift, 0.002)

    init, apply = nve(built["one"][2])

    def replicas_run(on=None):  # a fresh start for each run: md.run may donate the state's buffers
        lists = allocate_replicas(neighbor_fn, replicas)
        states = jax.vmap(lambda R, nbr: init(jax.random.PRNGKey(1), R, kT=1.0, neighbor=nbr))(replicas, lists)
        return run(apply, states, neighbor_fn, lists, steps, chunk_steps=steps, replicas=True, mesh=on)

    one = replicas_run()
    lap("md: one device")

    split_init, split_apply = nve(built["split"][2])  # the list updated inside the compiled chunk
    state = split_init(jax.random.PRNGKey(1), R, kT=1.0, neighbor=neighbor)
    split = run(split_apply, state, neighbor_fn, neighbor, steps, chunk_steps=steps)
    results["md_max_dR"] = float(np.max(np.abs(np.asarray(split.state.position) - np.asarray(one.state.position[0]))))
    results["md_moved"] = float(np.max(np.abs(np.asarray(split.state.position) - np.asarray(R))))
    results["md_reallocations_one"], results["md_reallocations_split"] = one.reallocations, split.reallocations
    lap("md: nve")

    final = replicas_run(mesh).state.position
    results["replicas_max_dR"] = float(np.max(np.abs(np.asarray(one.state.position) - np.asarray(final))))
    results["replicas_sharding"] = str(final.sharding.spec)
    lap("md: replicas")


def trained_params(workdir: Path) -> dict:
    return {"/".join(str(k) for k in path): np.asarray(leaf).tolist() for path, leaf in
            jax.tree_util.tree_flatten_with_path(load_checkpoint(workdir / "checkpoints" / "periodic").params)[0]}


def resumed_training() -> None:
    """float32: the suite's shared trained model (``tiny_config``, 24 steps) resumed on two processes
    from its step-16 checkpoint, which the test copied into ``train/``; the parameters are written
    for the test to compare with the uninterrupted one-process run."""
    workdir = out.parent / "train"
    train_and_evaluate(tiny_config(data_path), workdir, resume=True, progress=False, atom_chunk=TRAIN_ATOM_CHUNK)
    params = trained_params(workdir)  # every process: orbax restores collectively
    if is_main_process():
        (out.parent / "params.json").write_text(json.dumps(params))
        results["report"] = json.loads((workdir / "report.json").read_text())
    lap("training")


results["devices"], results["processes"] = jax.device_count(), jax.process_count()
if mode == "devices":
    jax.config.update("jax_enable_x64", True)
    first_step(make_mesh(2), make_mesh(1))
    lap("first step")
    atom_sharded_md(make_mesh(2, "atoms"))
else:
    resumed_training()
if is_main_process():
    out.write_text(json.dumps(results))
