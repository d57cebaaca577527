"""Shared fixtures: small systems, small models, float64 where derivatives are checked.

``jax_debug_nans`` stays off: the potential deliberately produces NaN to signal an overflowed
neighbour list or an unknown species inside jit, and tests assert finiteness explicitly instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

# Before JAX starts its backend, for this process and every child the suite starts: LLVM at -O1
# instead of -O2 halves the time XLA takes to compile the suite's programs (the shared trained
# model: 53 -> 29 s), and XLA's older loop emitters instead of its MLIR fusion emitters take another
# third off the training step's compilation (docs/design.md, "Decisions and why"). The suite checks
# numbers, not speed; what they change is rounding in the last bits (tests/test_checkpoint.py).
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from a2ijax import A2IConfig  # noqa: E402
from a2ijax.config import DataConfig, ExperimentConfig, TrainConfig  # noqa: E402
from a2ijax.dataset import write_dataset  # noqa: E402
from a2ijax.sampling import label  # noqa: E402
from a2ijax.systems import get_system, lattice_positions  # noqa: E402
from a2ijax.train import train_committee  # noqa: E402

CUTOFF = 2.0
N_SPECIES = 3


@contextlib.contextmanager
def shared_directory(tmp_path_factory, name: str):
    """``(directory, ready)`` shared by the pytest-xdist workers of one run, under a file lock: the
    first worker to get here builds what goes in it and marks it ``ready`` (a ``done`` file), the
    others wait for the lock and reuse it. Without xdist, a directory of this session."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base temp directories are siblings
    directory = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            directory.mkdir(exist_ok=True)
            yield directory, (directory / "done").exists()
            (directory / "done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(trylast=True)  # after `-m 'not slow'` has deselected: halves of the tests that run
def pytest_collection_modifyitems(config, items):
    """The tests of the shared trained model (:func:`trained_committee`, about a minute to build)
    open the second half of the run. pytest-xdist's worksteal starts each worker on one half, so the
    worker on the second half builds the model first while the other runs tests that do not need
    it. In collection order both workers' first tests needed it, and one core idled ~50 s while the
    other built it (per-test timeline of 2026-12-03, BUILD_NOTES.md "Test suite and CI")."""
    shared = [item for item in items if "trained_committee" in item.fixturenames]
    others = [item for item in items if "trained_committee" not in item.fixturenames]
    half = len(items) // 2
    items[:] = others[:half] + shared + others[half:]


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for the run, shared by the xdist workers: the training tests compile
    the same steps again."""
    with shared_directory(tmp_path_factory, "jax-cache") as (directory, _):
        pass
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Every program, however small: the workers dispatch many of the same small ones op by op.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


def child_env(**variables: str) -> dict[str, str]:
    """The environment for a fresh interpreter the suite starts (a notebook's kernel, a worker on
    several devices or processes): this one's, plus ``variables``, plus the suite's cache, from
    which the child takes every program however small (importing jax-md alone compiles ~120 small
    ones in every interpreter)."""
    env = dict(os.environ, **variables)
    if jax.config.jax_compilation_cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


@pytest.fixture
def x64():
    """float64 for one test; the global config is restored afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# Core-repulsion radii per species pair (symmetric, all different): the jittered test systems have
# pairs on both sides of them, so every invariance test also checks the wall.
CORE_RADII = (0.95, 0.85, 1.0,
              0.85, 1.05, 0.9,
              1.0, 0.9, 0.8)


def small_config(featurization: str = "invariant", *, x64: bool = True, **overrides) -> A2IConfig:
    """A small model for tests: one block, width 16, three species, a core repulsion; the invariant
    model with the pair-aware radial embedding (``pair_mlp``) and the per-token readout, the
    coordinates one with the linear embedding and the pooled readout, so the invariance, gradient and
    continuity tests cover both embeddings and both readouts. The tests of
    permutation, E(3) invariance, finite-difference forces and continuity at the cutoff ask for two
    blocks (``layers=2``: the second block's input is the first one's output); the others check
    what one block decides (neighbour lists, padding, chunks, stress), in half the compilation time."""
    invariant = featurization == "invariant"
    values = dict(cutoff=CUTOFF, n_species=N_SPECIES, width=16, heads=2, layers=1, n_radial=6,
                  radial_embedding="pair_mlp" if invariant else "linear", readout="tokens" if invariant else "pooled",
                  angular_order=2, avg_neighbors=16.0, featurization=featurization,
                  core_radii=CORE_RADII, core_energy=0.02, param_dtype="float64" if x64 else "float32")
    values.update(overrides)
    return A2IConfig(**values)


def jittered_lattice(n_side: tuple[int, int, int], spacing: float, jitter: float, seed: int = 0,
                     dtype=None) -> jax.Array:
    """Atoms on a simple cubic lattice, displaced by uniform noise of amplitude ``jitter``."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in n_side], indexing="ij"), -1).reshape(-1, 3)
    R = (grid + 0.5) * spacing + rng.uniform(-jitter, jitter, grid.shape)
    return jnp.asarray(R, dtype or jnp.result_type(float))


def random_species(n: int, seed: int = 1) -> jax.Array:
    """Species ids covering all ``N_SPECIES`` kinds."""
    s = np.random.default_rng(seed).integers(0, N_SPECIES, n)
    s[:N_SPECIES] = np.arange(N_SPECIES)
    return jnp.asarray(s, jnp.int32)


@pytest.fixture
def periodic_liquid(x64):
    """64 atoms in a periodic box of side 4.6 (density 0.66, about 22 neighbours within 2.0)."""
    side = 4.6
    R = jittered_lattice((4, 4, 4), side / 4, 0.2, seed=0)
    return R, side, random_species(R.shape[0])


@pytest.fixture
def free_cluster(x64):
    """18 atoms in free space."""
    R = jittered_lattice((3, 3, 2), 1.1, 0.15, seed=2)
    return R, random_species(R.shape[0], seed=3)


def assert_nontrivial(forces, floor: float = 1e-2):
    """Symmetry tests are only meaningful if the forces are not (close to) zero."""
    assert float(jnp.max(jnp.abs(forces))) > floor, "forces are trivial: the test would pass vacuously"


# A tiny trained potential, shared by the training, calculator and MD tests.
MODEL = A2IConfig(cutoff=2.0, width=8, heads=2, layers=1, n_radial=4, angular_order=1, avg_neighbors=20.0)


def lj_frames(n_atoms: int, n_frames: int, seed: int) -> list:
    """LJ frames labelled by the reference potential: jittered lattices at density 0.8 (125 sites)."""
    side = (n_atoms / 0.8) ** (1 / 3)
    R = np.stack([np.asarray(lattice_positions(n_atoms, side, jitter=0.1 * side / 5,
                                               seed=seed + f)) for f in range(n_frames)])
    return label(get_system("lj"), R, np.zeros(n_atoms, np.int32), side)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """20 frames of 125 atoms and 8 of 120 (two size buckets), with splits and two state points."""
    with shared_directory(tmp_path_factory, "tiny-data") as (directory, ready):
        path = directory / "tiny.xyz"
        if not ready:
            frames = lj_frames(125, 20, seed=0) + lj_frames(120, 8, seed=100)
            splits = ["train"] * 14 + ["valid"] * 3 + ["test"] * 3 + ["train"] * 6 + ["valid", "test"]
            for i, (atoms, split) in enumerate(zip(frames, splits, strict=True)):
                atoms.info.update(split=split, state_point="n125" if i < 20 else "n120", system="lj",
                                  units="LJ reduced")
            write_dataset(path, frames)
    return path


def tiny_config(path: Path, **train) -> ExperimentConfig:
    values = dict(steps=24, batch_size=2, learning_rate=5e-3, warmup_steps=4, eval_every=8, checkpoint_every=8)
    values.update(train)
    return ExperimentConfig(DataConfig(path=str(path)), MODEL, TrainConfig(**values))


# Atoms per chunk when the tests train: one program, as training on a CPU does by default
# (a2ijax.train.default_training_chunk); chunked and unchunked results are equal by
# tests/test_invariants.py.
TRAIN_ATOM_CHUNK = 0


@pytest.fixture(scope="session")
def trained_committee(tiny_data, tmp_path_factory) -> Path:
    """The work directory of a committee of two tiny models trained on ``tiny_data`` (24 steps each,
    seeds 0 and 1; ``a2ijax train --members 2``), built once per test run and shared by the xdist
    workers. Member 0 is the suite's single trained model (:func:`trained`); member 1 costs one
    more training run, but no compilation (the seed changes data, not programs)."""
    with shared_directory(tmp_path_factory, "trained") as (directory, ready):
        workdir = directory / "committee"
        if not ready:
            train_committee(tiny_config(tiny_data), workdir, 2, progress=False, atom_chunk=TRAIN_ATOM_CHUNK)
    return workdir


@pytest.fixture(scope="session")
def trained(trained_committee) -> tuple[dict, Path]:
    """``(report, workdir)`` of the tiny model trained on ``tiny_data`` (24 steps, seed 0)."""
    workdir = trained_committee / "member_0"
    return json.loads((workdir / "report.json").read_text()), workdir
