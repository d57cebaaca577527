"""Several devices and processes (docs/design.md, "Scale-out"): data-parallel training across two
processes equals the one-process run, and MD split by atoms over two devices equals MD on one.

JAX fixes its devices and processes when it starts, so the split runs happen in fresh interpreters
(``tests/parallel_worker.py``): 1 process x 2 CPU devices for MD, 2 processes x 1 CPU device
(``jax.distributed`` over a free loopback port, gloo collectives) to resume the shared trained
model's run. Each configuration
runs once per test session (shared by the xdist workers) and the tests below read its numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import child_env, shared_directory

from a2ijax import parallel
from a2ijax.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("parallel_worker.py")
TIMEOUT = 400
RESUME_AT = 16  # a periodic checkpoint of the shared trained model (conftest: tiny_config)


def worker_env(devices: int) -> dict[str, str]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return child_env(JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


def check_finished(processes: list[subprocess.Popen], logs: list[Path]) -> None:
    for process, log in zip(processes, logs, strict=True):
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        assert process.returncode == 0, f"{' '.join(process.args)} failed:\n{log.read_text()[-4000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def two_devices(tmp_path_factory, tiny_data) -> dict:
    with shared_directory(tmp_path_factory, "parallel-devices") as (directory, ready):
        out = directory / "results.json"
        if not ready:
            log = directory / "log.txt"
            with open(log, "w") as f:
                process = subprocess.Popen([sys.executable, str(WORKER), "devices", str(tiny_data), str(out)],
                                           cwd=WORKER.parent,
                                           env=worker_env(2), stdout=f, stderr=subprocess.STDOUT)
            check_finished([process], [log])
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory, tiny_data, trained) -> tuple[dict, Path]:
    """The shared trained model's run resumed on 2 processes from its step-16 checkpoint."""
    with shared_directory(tmp_path_factory, "parallel-processes") as (directory, ready):
        out = directory / "results.json"
        if not ready:
            _, workdir = trained
            shutil.rmtree(directory / "train", ignore_errors=True)
            shutil.copytree(workdir / "checkpoints" / "periodic" / str(RESUME_AT),
                            directory / "train" / "checkpoints" / "periodic" / str(RESUME_AT))
            rows = [r for r in (workdir / "metrics.jsonl").read_text().splitlines()
                    if json.loads(r)["step"] <= RESUME_AT]
            (directory / "train" / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
            port, processes, logs = free_port(), [], []
            for rank in (0, 1):
                logs.append(directory / f"log{rank}.txt")
                with open(logs[-1], "w") as f:
                    processes.append(subprocess.Popen(
                        [sys.executable, str(WORKER), "processes", str(tiny_data), str(out), str(rank), str(port)],
                        cwd=WORKER.parent, env=worker_env(1), stdout=f, stderr=subprocess.STDOUT))
            check_finished(processes, logs)
    return json.loads(out.read_text()), directory


def test_split_batch_first_step_equals_one_device(two_devices):
    """Step 0 in float64: the loss and every gradient entry with the batch split over 2 devices (3
    frames filled up to 4 rows with a zero-weight row) against one device. The reductions are the
    same XLA all-reduces across processes (the test below)."""
    assert two_devices["devices"] == 2 and two_devices["batch_rows"] == 4
    assert two_devices["grad0_max"] > 1.0  # non-trivial gradients
    assert two_devices["loss0_relative"] <= 1e-12
    assert two_devices["grad0_relative"] <= 1e-12


def test_two_process_resume_equals_the_uninterrupted_one_process_run(two_processes, trained):
    """The shared trained model (24 float32 steps on one process, checkpoints every 8) resumed on 2
    processes from step 16, the batch split over them: the last 8 optimiser steps land within 1e-6
    (of the largest parameter) of the uninterrupted run; checkpoints and the report are written."""
    results, directory = two_processes
    assert results["processes"] == 2 and results["devices"] == 2
    report, workdir = trained
    one = jax.tree_util.tree_flatten_with_path(load_checkpoint(workdir / "checkpoints" / "periodic").params)[0]
    start = jax.tree_util.tree_flatten_with_path(load_checkpoint(
        workdir / "checkpoints" / "periodic" / str(RESUME_AT)).params)[0]
    two = json.loads((directory / "params.json").read_text())
    assert len(two) == len(one) == len(start)
    scale = max(float(np.max(np.abs(leaf))) for _, leaf in one)
    worst = max(float(np.max(np.abs(np.asarray(two["/".join(str(k) for k in path)]) - leaf))) for path, leaf in one)
    moved = max(float(np.max(np.abs(a - b))) for (_, a), (_, b) in zip(one, start, strict=True))
    assert moved > 1e3 * worst  # the 8 steps moved the parameters far more than the two runs differ
    assert worst <= 1e-6 * scale
    assert results["report"]["frames"] == report["frames"]
    steps = [json.loads(r)["step"] for r in (directory / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [8, 16, 24]  # process 0 alone appended the rows after the resume


def test_atom_split_energy_forces_stress_and_per_atom_energies_equal_one_device(two_devices):
    """63 atoms (not a multiple of 2) over 2 devices, float64; the stress passes the box and the
    strain perturbation through the split."""
    assert two_devices["devices"] == 2
    assert two_devices["force_max"] > 1e-2
    for quantity in ("energy", "per_atom", "force", "stress"):
        assert two_devices[f"{quantity}_relative"] <= 1e-12, quantity


def test_atom_split_program_computes_only_its_own_atoms(two_devices):
    """XLA's cost analysis of the compiled per-device program: half the work of the one-device program
    (32 of 63 centre atoms), not all of it with the answer split afterwards."""
    one, split = two_devices["flops"]
    assert 0.45 < split / one < 0.56


def test_atom_split_nve_trajectory_equals_one_device(two_devices):
    """200 NVE steps through a2ijax.md.run, the neighbour list updated inside the compiled chunk."""
    assert two_devices["md_moved"] > 0.1
    assert two_devices["md_max_dR"] <= 1e-10
    assert two_devices["md_reallocations_one"] == two_devices["md_reallocations_split"]


def test_replicas_split_over_devices_equal_one_device(two_devices):
    assert two_devices["replicas_sharding"] == "PartitionSpec('atoms',)" or "atoms" in two_devices["replicas_sharding"]
    assert two_devices["replicas_max_dR"] <= 1e-10


# Checks of the arguments, in this process.

@pytest.mark.parametrize("kwargs, match", [
    (dict(coordinator="localhost:1234"), "all of coordinator"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator="localhost:99999", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator="localhost:1234", num_processes=2, process_id=2), "process_id"),
    (dict(coordinator="localhost:1234", num_processes=0, process_id=0), "num_processes"),
])
def test_initialize_rejects_incomplete_or_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        parallel.initialize(**kwargs)


def test_cluster_detection_needs_more_than_one_task():
    assert parallel.cluster_detected({"SLURM_NTASKS": "4"})
    assert parallel.cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"})
    assert not parallel.cluster_detected({"SLURM_NTASKS": "1"})
    assert not parallel.cluster_detected({})
    assert not parallel.initialize()  # no launcher here: nothing to join


def test_mesh_and_batch_errors():
    with pytest.raises(ValueError, match="asked for 9 devices"):
        parallel.make_mesh(9)
    with pytest.raises(ValueError, match="integer >= 1"):
        parallel.make_mesh(0)
    mesh = parallel.make_mesh(1)
    assert parallel.padded_rows(3, mesh) == 3 and parallel.padded_rows(3, None) == 3
    batch = parallel.global_batch({"x": np.arange(6.0).reshape(3, 2)}, mesh)
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(6.0).reshape(3, 2))
