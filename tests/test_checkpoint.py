"""Checkpoints: old ones load unchanged, run settings are not part of the model, TOML names the move."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2ijax.checkpoint import load_checkpoint
from a2ijax.config import from_dict
from a2ijax.dataset import read_dataset
from a2ijax.model import A2IConfig

DATA = Path(__file__).parent / "data"


def test_a_checkpoint_from_before_the_run_settings_moved_loads_and_gives_its_numbers():
    """tests/data/legacy_checkpoint was written by a2ijax with ``[model] atom_chunk = 32``, ``dtype``
    and ``energy_weight_final = -1`` in its config; the energies and forces it gave then
    (legacy_expected.json, float32) come back, with any atom chunk, to float32 rounding: within 1e-4
    of the largest force. They were bit-equal on the machine and jaxlib that wrote them; XLA's CPU code
    follows the host's vector units (an AVX-512 host moved them by 7.6e-7 of the largest force) and its
    version (jaxlib 0.10.1 after 0.10.2: 3.0e-5 of the largest, the same with the code of either
    date), and other atom chunks sum in another order (up to 7e-6). The stored numbers are themselves
    float32: a float64 evaluation of the checkpoint differs from them by the same 3e-5. A loading
    error (a parameter or setting lost in the upgrade) moves them by orders of magnitude more."""
    checkpoint = load_checkpoint(DATA / "legacy_checkpoint")
    assert "atom_chunk" not in checkpoint.meta["config"]["model"]
    assert checkpoint.config.train.energy_weight_final is None
    assert checkpoint.config.model.core_radii  # the stored core repulsion survives the upgrade
    dataset = read_dataset(DATA / "legacy_frames.xyz")
    expected = json.loads((DATA / "legacy_expected.json").read_text())["frames"]
    for row in expected:
        frame = row["frame"]
        R = jnp.asarray(dataset.positions[frame], jnp.float32)
        forces = np.asarray(row["forces"])
        assert np.abs(forces).max() > 1.0  # non-trivial forces
        for atom_chunk in (32, 0, 7) if frame == expected[0]["frame"] else (32,):
            neighbor_fn, energy_fn, _, _ = checkpoint.potential(dataset.cells[frame].T, atom_chunk=atom_chunk)
            nbrs = neighbor_fn.allocate(R)
            energy, grad = jax.jit(jax.value_and_grad(energy_fn))(R, nbrs)
            assert float(energy) == pytest.approx(row["energy"], rel=1e-6)
            np.testing.assert_allclose(-np.asarray(grad), forces, rtol=0, atol=1e-4 * np.abs(forces).max())


def test_a_checkpoint_written_on_a_device_this_machine_lacks_loads_its_parameters(tmp_path):
    """A checkpoint records the device each array was written from ("cpu:0" here; a GPU run's say
    "cuda:0", and jax 0.8 names the CPU "TFRT_CPU_0"): a copy that names a device this machine lacks
    loads the same parameters, bit for bit, as host arrays not committed to any device."""
    import shutil

    reference = load_checkpoint(DATA / "legacy_checkpoint")
    moved = tmp_path / "legacy_checkpoint"
    shutil.copytree(DATA / "legacy_checkpoint", moved)
    sharding = next(moved.glob("*/params/_sharding"))
    stored = sharding.read_text()
    assert '\\"device_str\\": \\"cpu:0\\"' in stored
    sharding.write_text(stored.replace('\\"cpu:0\\"', '\\"cuda:7\\"'))
    checkpoint = load_checkpoint(moved)
    leaves, moved_leaves = jax.tree_util.tree_leaves(reference.params), jax.tree_util.tree_leaves(checkpoint.params)
    assert len(leaves) == len(moved_leaves) > 10
    for a, b in zip(leaves, moved_leaves, strict=True):
        assert a.dtype == b.dtype and not b.committed
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_settings_are_not_model_settings():
    """(The TOML side: tests/test_train.py, test_config_file_errors_name_the_key.)"""
    assert "atom_chunk" not in A2IConfig().to_dict() and "dtype" not in A2IConfig().to_dict()
    with pytest.raises(ValueError, match=r"\[model\] atom_chunk is how a model is run, not what it is.*--atom-chunk"):
        from_dict(A2IConfig, {"atom_chunk": 32}, "model")


def test_checkpoint_errors_are_named(tmp_path):
    from a2ijax.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path / "empty")
