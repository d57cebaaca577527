"""Training: loss goes down, exact resume, buckets, shift fit, augmentation, reports, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import MODEL, TRAIN_ATOM_CHUNK, assert_nontrivial, lj_frames, tiny_config
from jax_md import space

from a2ijax import cli
from a2ijax import train as train_module
from a2ijax.batching import epoch_batches, fit_energy_shift, frame_pairs, frame_scales, prepare
from a2ijax.checkpoint import CheckpointError, load_checkpoint, restore, step_directory
from a2ijax.config import load_config
from a2ijax.dataset import Dataset, fluctuations, read_dataset, split_indices, state_point_groups, write_dataset
from a2ijax.geometry import closest_distance, minimum_image
from a2ijax.loss import batch_errors, normalised_loss, predict_fn, rotate_batch
from a2ijax.parallel import global_batch, make_mesh, replicate
from a2ijax.potential import a2i_builder, fixed_neighbor_list
from a2ijax.report import Predictions, error_report
from a2ijax.train import TrainingDivergedError, init_state, make_train_step, prepare_run, train_and_evaluate


def test_training_lowers_validation_errors_and_writes_the_report(trained):
    report, workdir = trained
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 16, 24]
    first_valid_force = rows[0]["valid_force_rmse"]
    # The EMA model after 24 steps must beat the EMA model after 8 steps on held-out frames.
    assert rows[-1]["valid_loss"] < rows[0]["valid_loss"]
    assert rows[-1]["valid_force_rmse"] < first_valid_force
    assert report["split"] == "test" and report["frames"] == 4
    assert set(report["state_points"]) == {"n125", "n120"}
    for row in report["state_points"].values():
        assert row["energy_ratio"] == pytest.approx(row["energy_rmse"] / row["energy_fluctuation"])
        assert row["force_ratio"] > 0
    assert -1.0 <= report["per_atom_energy"]["pearson"] <= 1.0
    for name in ("report.json", "report.md", "parity.png", "learning_curve.png"):
        assert (workdir / name).stat().st_size > 0
    assert "| n125 |" in (workdir / "report.md").read_text()


def test_checkpoint_alone_rebuilds_the_potential(trained, tiny_data):
    _, workdir = trained
    checkpoint = load_checkpoint(workdir)
    assert dataclasses.replace(checkpoint.config.model, core_radii=(), core_energy=0.0) == MODEL
    assert checkpoint.symbols == ("Ar",)
    assert checkpoint.meta["capacity"] > 0 and "fluctuations" in checkpoint.meta["statistics"]
    # The fitted per-species shift is stored, and the parameters give finite, non-trivial forces.
    data = prepare(read_dataset(tiny_data), checkpoint.config, statistics=checkpoint.meta["statistics"])
    _, energy_fn = a2i_builder(checkpoint.config.model)
    batch = {k: jnp.asarray(v) for k, v in data.buckets["test"][0].batch(np.arange(1), 1).items()}
    energy, forces, per_atom = jax.jit(predict_fn(energy_fn))(checkpoint.params, batch)
    assert np.isfinite(np.asarray(forces)).all() and float(jnp.abs(forces).max()) > 1e-2
    # The prediction is the residual the batch holds: per-atom energies less the fitted shift, summed.
    residual = np.sum(np.where(batch["mask"][0], per_atom[0] - batch["atom_shift"][0], 0.0))
    assert float(energy[0]) == pytest.approx(float(residual), rel=1e-5, abs=1e-4)
    assert float(batch["energy_offset"][0]) == pytest.approx(float(np.sum(batch["atom_shift"][0])), rel=1e-6)


def test_core_repulsion_sits_below_every_training_pair(trained, tiny_data):
    """The trainer puts the wall at the closest training pair: every training frame has the same
    energy with and without it, and a pair pushed closer than any training pair feels it."""
    _, workdir = trained
    checkpoint = load_checkpoint(workdir)
    dataset = read_dataset(tiny_data)
    train = checkpoint.meta["splits"]["train"]
    cutoff = checkpoint.config.model.cutoff
    closest = min(closest_distance(dataset.positions[i], dataset.cells[i], dataset.pbc[i], cutoff) for i in train)
    model = checkpoint.config.model
    assert model.core_radii == (pytest.approx(closest, rel=1e-12),)
    assert model.core_energy == pytest.approx(np.sqrt(checkpoint.meta["statistics"]["force_mean_square"]) * closest)
    bare = dataclasses.replace(checkpoint, config=dataclasses.replace(
        checkpoint.config, model=dataclasses.replace(model, core_radii=(), core_energy=0.0)))

    cell = dataset.cells[train[0]]
    assert all(np.array_equal(dataset.cells[frame], cell) for frame in train[:3])
    potentials = []
    for c in (checkpoint, bare):
        neighbor_fn, energy_fn, _, _ = c.potential(cell.T)
        potentials.append((neighbor_fn, jax.jit(energy_fn)))  # one compilation, not op-by-op dispatch

    def energies(frame, R):
        R = jnp.asarray(R)
        return [float(energy_fn(R, neighbor_fn.allocate(R))) for neighbor_fn, energy_fn in potentials]

    for frame in train[:3]:
        with_wall, without = energies(frame, dataset.positions[frame])
        assert with_wall == without
    frame = train[0]
    R = dataset.positions[frame].copy()
    d = np.linalg.norm(minimum_image(R[None, :] - R[:, None], dataset.cells[frame], True), axis=-1)
    np.fill_diagonal(d, np.inf)  # 125 atoms: all pairs are fine here
    i, j = np.unravel_index(np.argmin(d), d.shape)
    v = minimum_image(R[j] - R[i], dataset.cells[frame], True)
    R[j] = R[i] + v * 0.9 * closest / d[i, j]
    with_wall, without = energies(frame, R)
    assert with_wall - without > 0.1 * model.core_energy


def final_state(workdir):
    """The train state of a run's last periodic checkpoint, as stored (arrays by name)."""
    step_dir = step_directory(workdir / "checkpoints" / "periodic")
    return int(step_dir.name), restore(step_dir, "state", ocp.args.StandardRestore())


def test_resume_continues_exactly(trained, tiny_data, tmp_path):
    """Stopped after 3 steps (inside the first epoch) and resumed, the run ends bit for bit where the
    uninterrupted run of the shared fixture ended (the same config: 24 steps, 2.4 epochs)."""
    report, workdir = trained
    config = tiny_config(tiny_data)
    first = train_and_evaluate(config, tmp_path / "parts", stop_after=3, progress=False, atom_chunk=TRAIN_ATOM_CHUNK)
    assert first.report is None and int(first.state.step) == 3
    resumed = train_and_evaluate(config, tmp_path / "parts", resume=True, progress=False, atom_chunk=TRAIN_ATOM_CHUNK)
    (step, whole), (resumed_step, parts) = final_state(workdir), final_state(tmp_path / "parts")
    assert step == resumed_step == 24
    leaves = jax.tree_util.tree_leaves(whole)
    assert len(leaves) > 20 and len(leaves) == len(jax.tree_util.tree_leaves(resumed.state))
    for a, b in zip(leaves, jax.tree_util.tree_leaves(parts), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.report["force_rmse"] == report["force_rmse"]
    steps = [json.loads(r)["step"] for r in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [8, 16, 24]


def test_one_compilation_per_size_bucket(tiny_data, trained):
    """The training path of ``train_and_evaluate`` (a one-device mesh here); after the shared trained
    model, so its programs come from the suite's compilation cache."""
    run = prepare_run(read_dataset(tiny_data), tiny_config(tiny_data), atom_chunk=TRAIN_ATOM_CHUNK)
    data = run.data
    assert len(data.buckets["train"]) == 2 and data.bucket_sizes.tolist() == [120, 125]
    mesh = make_mesh()
    state = replicate(init_state(run), mesh)
    step = make_train_step(run, mesh)
    for _ in range(2):
        for bucket in data.buckets["train"]:
            state, _ = step(state, global_batch(bucket.batch(np.arange(1), 2), mesh))
    assert step._cache_size() == 2


def test_neighbor_capacity_covers_every_frame(tiny_data):
    data = prepare(read_dataset(tiny_data), tiny_config(tiny_data))
    dataset = data.dataset

    def all_pairs(frame):  # [n, n] within the cutoff: small frames, the independent check
        R = dataset.positions[frame]
        d = np.linalg.norm(minimum_image(R[None, :] - R[:, None], dataset.cells[frame], True), axis=-1)
        np.fill_diagonal(d, np.inf)
        return d < MODEL.cutoff

    most = max(all_pairs(f).sum(1).max() for f in range(len(dataset)))
    assert data.capacity == most
    for buckets in data.buckets.values():
        for bucket in buckets:
            for row in range(len(bucket)):
                n, frame = bucket.n_atoms[row], bucket.frame_index[row]
                idx = bucket.idx[row, :n]
                within = all_pairs(frame)
                for i in range(n):
                    np.testing.assert_array_equal(idx[i][idx[i] < bucket.R.shape[1]], np.flatnonzero(within[i]))


def test_energy_shift_is_the_least_squares_fit():
    rng = np.random.default_rng(0)
    true_shift = np.array([-3.0, 1.5])
    species = [rng.integers(0, 2, rng.integers(5, 12)).astype(np.int32) for _ in range(9)]
    energy = np.asarray([true_shift[s].sum() for s in species])
    empty = [np.zeros((len(s), 3)) for s in species]
    dataset = Dataset("synthetic", ("A", "B"), empty, species, [np.eye(3)] * 9, [np.zeros(3, bool)] * 9, energy,
                      empty, None, None, [{}] * 9)
    np.testing.assert_allclose(fit_energy_shift(dataset, np.arange(9), 2), true_shift, atol=1e-10)


def test_rotation_augmentation_rotates_forces_and_keeps_energies(tiny_data, x64):
    config = tiny_config(tiny_data)
    config = dataclasses.replace(config, model=dataclasses.replace(MODEL, param_dtype="float64"))
    run = prepare_run(read_dataset(tiny_data), config)
    energy_fn = run.energy_fn
    params = init_state(run).params
    batch = {k: jnp.asarray(v) for k, v in run.data.buckets["train"][1].batch(np.arange(2), 2).items()}
    batch = {k: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in batch.items()}
    rotated = rotate_batch(batch, jax.random.PRNGKey(3))
    predict = jax.jit(predict_fn(energy_fn))
    (e0, f0, _), (e1, f1, _) = predict(params, batch), predict(params, rotated)
    assert float(jnp.abs(f0).max()) > 1e-2
    np.testing.assert_allclose(e1, e0, rtol=1e-10)
    # Forces of the rotated frames are the rotated forces of the originals.
    rot = rotate_batch(dict(batch, forces=f0), jax.random.PRNGKey(3))["forces"]
    np.testing.assert_allclose(f1, rot, atol=1e-9)


def test_evaluate_command_prints_the_report(trained, tiny_data, capsys, tmp_path):
    _, workdir = trained
    assert cli.main(["evaluate", str(workdir), str(tiny_data), "--split", "test", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| n125 |" in out and "Pearson" in out
    assert json.loads((tmp_path / "report.json").read_text())["frames"] == 4
    assert cli.main(["evaluate", str(tmp_path / "nothing"), str(tiny_data)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_force_matching_term_and_evaluation_of_other_parameters_agree(trained, tiny_data):
    """``fitting.checkpoint_force_matching`` (one padded batch, the loss's scales) and
    ``report.evaluate`` of a loaded checkpoint with other parameters (the evaluation's batches) on
    the same frames of one state point:
    the loss's ratio between perturbed and stored parameters is the squared ratio of the force
    RMSEs (the state point's scale cancels), and the perturbation changes both."""
    from a2ijax.fitting import checkpoint_force_matching
    from a2ijax.report import evaluate

    _, workdir = trained
    checkpoint = load_checkpoint(workdir)
    dataset = read_dataset(tiny_data, checkpoint.symbols)
    test = np.intersect1d(split_indices(dataset, (0.8, 0.1, 0.1), 0)["test"], state_point_groups(dataset)["n125"])
    assert len(test) == 3
    loss = checkpoint_force_matching(checkpoint, dataset, test)
    perturbed = jax.tree.map(lambda x: 1.1 * x, checkpoint.params)
    rmse = [evaluate(c, tiny_data, split="test")[0]["state_points"]["n125"]["force_rmse"]
            for c in (workdir, dataclasses.replace(checkpoint, params=perturbed))]
    ratio = float(loss(perturbed)) / float(loss(checkpoint.params))
    assert abs(ratio - 1) > 1e-2
    np.testing.assert_allclose(ratio, (rmse[1] / rmse[0]) ** 2, rtol=1e-4)
    with pytest.raises(ValueError, match="no frames"):
        checkpoint_force_matching(checkpoint, dataset, [])


@pytest.mark.parametrize("text,match", [
    ('[train]\nstesp = 10', r"bad.toml: \[train\] unknown keys \['stesp'\]"),
    ('[train]\nbatch_size = 2.5', r"\[train\] batch_size must be int, got 2.5 \(float\)"),
    ('[optimizer]\nlr = 1', r"unknown tables \['optimizer'\]"),
    ('[model]\ndtype = "bfloat16"', r"bad.toml: \[model\] dtype is how a model is run.*dtype="),  # a run setting now
    ('[train]\nenergy_weight_final = -1.0', r"energy_weight_final must be >= 0 \(or left out"),  # no sentinel
    ('[train]\nloss_normalization = "frame"', r"\[train\] loss_normalization must be one of \('state_point'"),
    ('[train]\nsync_every = 0', r"\[train\] sync_every must be >= 1, got 0"),
    ('[train]\nneighbor_buckets = 0', r"\[train\] neighbor_buckets must be >= 1, got 0"),
    ('[model]\nradial_embedding = "mlp"', r"radial_embedding must be one of \('linear', 'pair_mlp'\)"),
    ('[model]\nreadout = "sum"', r"readout must be one of \('pooled', 'tokens'\)"),
    ('[model]\nattention_cutoff = 1.5', r"attention_cutoff \(1.5\) and attention_keys \(0\) go together"),
    ('[model]\nattention_cutoff = 3.0\nattention_keys = 8', r"attention_cutoff must lie in \[0, cutoff = 2.5\]"),
    ('[model]\nattention_cutoff = 1.5\nattention_keys = -2', r"attention_keys must be an int >= 0, got -2"),
])
def test_config_file_errors_name_the_key(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(f'[data]\npath = "x.xyz"\n{text}\n')
    with pytest.raises(ValueError, match=match):
        load_config(path)


def test_species_unknown_to_the_model_is_an_error(tmp_path):
    frames = lj_frames(125, 4, seed=0)
    frames[0].symbols[5] = "Ne"
    path = tmp_path / "two.xyz"
    write_dataset(path, frames)
    with pytest.raises(ValueError, match=r"species 'Ne' has id 1, but the model knows n_species = 1"):
        prepare(read_dataset(path), tiny_config(path))


def test_more_neighbours_inside_the_attention_range_than_keys_is_an_error(tiny_data):
    """The trainer refuses data that would make the model's energy NaN (tests/test_invariants.py),
    naming the frame and the count; with enough keys the same data is accepted."""
    dataset = read_dataset(tiny_data)
    pairs = frame_pairs(dataset, MODEL.cutoff)
    i, _, d = pairs[0]
    most = int(np.bincount(i[d < 1.2]).max())
    config = tiny_config(tiny_data)
    crowded = dataclasses.replace(config, model=dataclasses.replace(MODEL, attention_cutoff=1.2, attention_keys=2))
    with pytest.raises(ValueError, match=rf"frame 0: an atom has {most} neighbours within attention_cutoff = 1.2, "
                                         r"more than \[model\] attention_keys = 2"):
        prepare(dataset, crowded)
    most_anywhere = max(int(np.bincount(i[d < 1.2]).max()) for i, _, d in pairs)
    roomy = dataclasses.replace(config, model=dataclasses.replace(MODEL, attention_cutoff=1.2,
                                                                 attention_keys=most_anywhere))
    assert prepare(dataset, roomy).capacity > most_anywhere


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    """The host checks finiteness every ``sync_every`` steps: a batch poisoned at step 5 (NaN energies,
    so NaN gradients and parameters after it) is found at the check after step 6, and the state of the
    check after step 3 is what is saved."""
    config = tiny_config(tiny_data, sync_every=3)
    run = prepare_run(read_dataset(tiny_data), config, atom_chunk=TRAIN_ATOM_CHUNK)
    bucket_number, rows = epoch_batches(run.data.buckets["train"], 2, config.train.seed, 0)[5]
    poisoned = run.data.buckets["train"][bucket_number].frame_index[rows].tolist()

    def poison(batch, mesh):
        if batch["frame_index"][:2].tolist() == poisoned:
            batch = dict(batch, energy=np.full_like(batch["energy"], np.nan))
        return global_batch(batch, mesh)

    monkeypatch.setattr(train_module, "global_batch", poison)
    message = rf"not finite at step 5 \(epoch 0, batch of frames \[{poisoned[0]}, {poisoned[1]}\] of .*tiny.xyz\)"
    with pytest.raises(TrainingDivergedError, match=message + ".*step 3, is checkpointed"):
        train_and_evaluate(config, tmp_path, progress=False, atom_chunk=TRAIN_ATOM_CHUNK)
    saved = load_checkpoint(tmp_path / "checkpoints" / "periodic")
    assert saved.step == 3
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree_util.tree_leaves(saved.params))


def test_resume_rejects_a_corrupt_or_mismatched_checkpoint(trained, tiny_data, tmp_path):
    _, workdir = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    wider = dataclasses.replace(tiny_config(tiny_data), model=dataclasses.replace(MODEL, width=12))
    with pytest.raises(CheckpointError, match=r"does not match this run: model.width: checkpoint 8, now 12"):
        train_and_evaluate(wider, copy, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_and_evaluate(tiny_config(tiny_data), copy, progress=False)
    latest = max((copy / "checkpoints" / "periodic").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    for file in (latest / "state").rglob("*"):
        if file.is_file() and file.stat().st_size > 0:
            file.write_bytes(b"\x00garbage" * 3)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        train_and_evaluate(tiny_config(tiny_data), copy, resume=True, progress=False)


def test_loss_terms_are_the_squared_ratios_per_state_point(trained, tiny_data):
    """``state_point``: the energy term over one state point's frames is (RMSE of the total energy /
    that state point's training fluctuation)^2 and the force term (force RMSE / force std)^2, the
    ratios the report shows; ``dataset``: the former MSE(E/N) / var_E and MSE(F) / var_F."""
    _, workdir = trained
    checkpoint = load_checkpoint(workdir)
    dataset = read_dataset(tiny_data)
    _, energy_fn = a2i_builder(checkpoint.config.model)
    predict = jax.jit(predict_fn(energy_fn))
    stats = checkpoint.meta["statistics"]
    train = [i for i, info in enumerate(dataset.info) if info["split"] == "train"]
    scales = {}
    for normalization in ("state_point", "dataset"):
        config = dataclasses.replace(checkpoint.config, train=dataclasses.replace(
            checkpoint.config.train, loss_normalization=normalization))
        data = prepare(dataset, config, statistics=stats)
        bucket = data.buckets["test"][1]  # the three test frames of state point n125
        frames = bucket.frame_index
        assert len(frames) == 3 and all(dataset.info[i]["state_point"] == "n125" for i in frames)
        batch = {k: jnp.asarray(v) for k, v in bucket.batch(np.arange(3), 4).items()}  # one padding row
        errors = batch_errors(predict, checkpoint.params, batch)
        energy, forces, _ = (np.asarray(x, np.float64) for x in predict(checkpoint.params, batch))
        e_err = energy[:3] + bucket.energy_offset[:3] - dataset.energy[frames]  # the residual's offset back
        f_err = np.concatenate([(forces[r] - dataset.forces[i]).ravel() for r, i in enumerate(frames)])
        if normalization == "state_point":
            own = [i for i in train if dataset.info[i]["state_point"] == "n125"]
            e_scale = np.std(dataset.energy[own])
            f_scale = np.std(np.concatenate([dataset.forces[i].ravel() for i in own]))
            expected = (np.mean(e_err**2) / e_scale**2, np.mean(f_err**2) / f_scale**2)
        else:
            expected = (np.mean((e_err / 125) ** 2) / stats["energy_var"],
                        np.mean(f_err**2) / stats["force_mean_square"])
        got = (float(normalised_loss(errors, (1.0, 0.0))), float(normalised_loss(errors, (0.0, 1.0))))
        np.testing.assert_allclose(got, expected, rtol=2e-4)
        scales[normalization] = got
    # Not vacuous: the two normalisations weight this state point's energies differently.
    assert abs(np.log(scales["state_point"][0] / scales["dataset"][0])) > 0.5


def test_neighbor_buckets_pad_each_group_to_its_own_capacity(tiny_data, x64):
    """Frames grouped by neighbour count: every bucket's capacity is its own frames' largest count,
    some are smaller than the dataset's, and a frame's energy does not depend on its bucket's padding."""
    dataset = read_dataset(tiny_data)
    one = prepare(dataset, tiny_config(tiny_data))
    two = prepare(dataset, tiny_config(tiny_data, neighbor_buckets=2))
    assert len(two.buckets["train"]) == 4 and two.capacity == one.capacity
    counts = {}
    for bucket in one.buckets["train"] + one.buckets["valid"] + one.buckets["test"]:
        for row, frame in enumerate(bucket.frame_index):
            counts[int(frame)] = int((bucket.idx[row] < bucket.R.shape[1]).sum(1).max())
    capacities = []
    for name in ("train", "valid", "test"):
        assert sorted(f for b in two.buckets[name] for f in b.frame_index) == sorted(two.splits[name])
        for bucket in two.buckets[name]:
            capacities.append(bucket.idx.shape[2])
            assert max(counts[int(f)] for f in bucket.frame_index) <= bucket.idx.shape[2]
    assert min(capacities) < one.capacity
    init_fn, energy_fn = a2i_builder(dataclasses.replace(MODEL, param_dtype="float64"))
    predict = jax.jit(predict_fn(energy_fn))

    def row_of(data, frame):
        bucket = next(b for b in data.buckets["train"] if frame in b.frame_index)
        row = int(np.flatnonzero(bucket.frame_index == frame)[0])
        return {k: jnp.asarray(v) for k, v in bucket.batch(np.asarray([row]), 1).items()}

    small = next(b for b in two.buckets["train"] if b.idx.shape[2] < one.capacity)
    frame = int(small.frame_index[0])
    lean, padded = row_of(two, frame), row_of(one, frame)
    assert lean["idx"].shape[2] < padded["idx"].shape[2]
    params = init_fn(jax.random.PRNGKey(0), lean["R"][0], neighbor=fixed_neighbor_list(lean["idx"][0], lean["R"][0]),
                     species=lean["species"][0], box=lean["box"][0])
    (e1, f1, _), (e2, f2, _) = predict(params, lean), predict(params, padded)
    assert_nontrivial(f1)
    np.testing.assert_allclose(float(e1[0]), float(e2[0]), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(f1), np.asarray(f2), rtol=1e-10, atol=1e-12)


def test_per_atom_correlation_with_the_species_gauge_fixed():
    """One composition fixes per-atom energies only up to c_s with sum_s n_s c_s = 0: a model off by
    such offsets correlates poorly as it is and perfectly once the gauge is fixed."""
    rng = np.random.default_rng(0)
    species = np.asarray([0] * 40 + [1] * 10, np.int32)
    offsets = np.asarray([0.5, -2.0])  # 40 * 0.5 + 10 * (-2.0) = 0: total energies unchanged
    exact = [rng.normal(0, 0.3, 50) for _ in range(3)]
    forces = [np.zeros((50, 3))] * 3
    dataset = Dataset("mix", ("A", "B"), [np.zeros((50, 3))] * 3, [species] * 3, [np.eye(3) * 9] * 3,
                      [np.ones(3, bool)] * 3, np.asarray([e.sum() for e in exact]), forces, exact, None,
                      [{"state_point": "s"}] * 3)
    model = [e + offsets[species] for e in exact]
    report = error_report(dataset, Predictions(np.arange(3), dataset.energy.copy(), forces, model),
                          {"s": dict(energy_std=1.0, force_std=1.0)})
    assert report["per_atom_energy"]["pearson"] < 0.5
    assert report["per_atom_energy"]["pearson_gauge_fixed"] == pytest.approx(1.0, abs=1e-12)
    assert report["per_atom_energy"]["rmse_gauge_fixed"] == pytest.approx(0.0, abs=1e-12)


def test_state_points_without_spread_take_the_dataset_scales():
    """A state point with one training frame (no fluctuation to measure) is scaled as the dataset-wide
    normalisation scales it; the others by their own training frames' spread."""
    rng = np.random.default_rng(1)
    n = 10
    points = ["a", "a", "a", "b", "b"]
    forces = [rng.normal(0, 2.0 + i, (n, 3)) for i in range(5)]
    dataset = Dataset("two", ("Ar",), [np.zeros((n, 3))] * 5, [np.zeros(n, np.int32)] * 5, [np.eye(3) * 9] * 5,
                      [np.ones(3, bool)] * 5, rng.normal(0, 3, 5), forces, None, None,
                      [{"state_point": p} for p in points])
    train = np.asarray([0, 1, 2, 3])  # one training frame of "b"
    statistics = dict(energy_var=0.7, force_mean_square=5.0, train_fluctuations=fluctuations(dataset.subset(train)))
    energy, force = frame_scales(dataset, statistics, "state_point")
    np.testing.assert_allclose(energy[:3], np.std(dataset.energy[:3]))
    np.testing.assert_allclose(force[:3], np.std(np.concatenate([f.ravel() for f in forces[:3]])))
    np.testing.assert_allclose(energy[3:], n * np.sqrt(0.7))
    np.testing.assert_allclose(force[3:], np.sqrt(5.0))
    np.testing.assert_allclose(frame_scales(dataset, statistics, "dataset")[0], n * np.sqrt(0.7))
    with pytest.raises(ValueError, match="loss normalization must be one of"):
        frame_scales(dataset, statistics, "per_frame")


def test_dft_scale_energies_are_not_at_the_float32_floor(tmp_path):
    """Totals near -1e5 eV (a DFT file: -800 eV per atom on top of LJ), frames of 125 and 120 atoms:
    a potential that knows the labels up to float32 per-atom rounding is reported with an energy error
    far below the float32 spacing of the totals (0.0078 eV), because the fitted per-species shift is
    taken out in float64 on the host before anything is float32; the state points are never mixed
    across sizes (no headers: one group per atom count)."""
    from a2ijax.report import predict_buckets
    from a2ijax.systems import get_system

    frames = lj_frames(125, 6, seed=7) + lj_frames(120, 6, seed=17)
    for atoms in frames:
        n = len(atoms)
        atoms.calc.results["energy"] = atoms.calc.results["energy"] - 800.0 * n
        atoms.info = {}  # no split, no state point: groups by size
    path = tmp_path / "dft.xyz"
    write_dataset(path, frames)
    dataset = read_dataset(path)
    assert np.min(dataset.energy) < -9e4
    assert set(state_point_groups(dataset)) == {"N=125", "N=120"}
    config = tiny_config(path)  # the LJ labels' cutoff: the batches hold every pair of the reference
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, cutoff=2.5))
    data = prepare(dataset, config)
    lj = get_system("lj")

    def energy_fn(params, R, neighbor, species=None, mask=None, box=None, per_atom=False):
        displacement, _ = space.periodic_general(box, fractional_coordinates=False)
        _, reference = lj.neighbor_list(displacement, box)
        e = reference(R, neighbor, per_atom=True) - 800.0  # float32: the shift inside, as A2I has it
        e = jnp.where(mask, e, 0.0)
        return e if per_atom else jnp.sum(e)

    predict = jax.jit(predict_fn(energy_fn))
    buckets = [b for name in ("train", "valid", "test") for b in data.buckets[name]]
    predictions = predict_buckets(predict, None, buckets, 4)
    report = error_report(dataset, predictions, data.statistics["fluctuations"])
    floor = float(np.spacing(np.float32(1e5)))  # 0.0078 eV
    naive = [float(np.float32(dataset.energy[i])) - float(np.sum(predictions.per_atom[k], dtype=np.float32))
             for k, i in enumerate(predictions.frame_index)]
    assert report["energy_rmse_per_atom"] * 125 < 0.1 * floor
    # The training targets too: float32 residuals that give back the float64 totals with their offsets.
    for bucket in buckets:
        real = bucket.n_atoms > 0
        rebuilt = bucket.energy[real].astype(np.float64) + bucket.energy_offset[real]
        assert np.max(np.abs(rebuilt - dataset.energy[bucket.frame_index[real]])) < 0.1 * floor
    assert np.sqrt(np.mean(np.square(naive))) > 0.1 * floor  # the float32 totals would sit at the floor
