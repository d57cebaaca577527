"""The training loop: AdamW with warm-up and cosine decay, an EMA of the parameters, checkpoints.

:func:`train_and_evaluate` reads the data, prepares it (:mod:`a2ijax.batching`: splits, neighbours,
size buckets, statistics), completes the model config from the data (the core repulsion's radii),
initialises a :class:`TrainState` with the fitted per-species shift and the force-RMS scale, and
runs jitted steps of the loss in :mod:`a2ijax.loss`. The EMA parameters are what gets evaluated,
checkpointed as ``params`` and used for MD. Periodic checkpoints resume a run exactly (the data
order is a function of seed and epoch); the best checkpoint by validation loss is what the final
report (:mod:`a2ijax.report`) evaluates on the test split.

Experiments that need a step in isolation use the public pieces: :func:`prepare_run`,
:func:`init_state`, :func:`make_train_step`, or :func:`step_seconds` for a timed step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from a2ijax.batching import PreparedData, epoch_batches, fixed_species, prepare, with_core_repulsion
from a2ijax.checkpoint import CheckpointError, managers, restore_for_resume, save
from a2ijax.config import ExperimentConfig, TrainConfig
from a2ijax.dataset import Dataset, read_dataset
from a2ijax.errors import InputError
from a2ijax.files import atomic_write
from a2ijax.loss import batch_errors, normalised_loss, predict_fn, rotate_batch
from a2ijax.pair_fit import fit_pair_weights
from a2ijax.parallel import global_batch, is_main_process, make_mesh, padded_rows, replicate, replicated, split_leading
from a2ijax.potential import default_atom_chunk, fixed_neighbor_list, potential_builder
from a2ijax.report import final_report, validation_errors

Array = jax.Array


class TrainingDivergedError(FloatingPointError):
    """The loss or the gradients became NaN or inf; the last good state was checkpointed."""


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (what a periodic checkpoint stores).

    ``params`` are optimised, ``ema`` is their exponential moving average (what is evaluated and
    saved for users), ``key`` drives the augmentation.
    """

    step: Array
    params: Any
    opt_state: Any
    ema: Any
    key: Array


@dataclasses.dataclass
class Run:
    """What a run needs before its first step (:func:`prepare_run`): the config completed from the
    data, the prepared data, the potential's ``init_fn``, ``energy_fn`` and ``per_atom``, and, with
    the pair pathway, its least-squares start ``(weights [S, S, P], energy shift [S])``."""

    config: ExperimentConfig
    data: PreparedData
    init_fn: Callable
    energy_fn: Callable
    per_atom: bool
    pair_start: tuple[np.ndarray, np.ndarray] | None = None


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    report: dict[str, Any] | None
    workdir: Path
    seconds: float


def default_training_chunk(backend: str | None = None) -> int:
    """Atoms per rematerialised chunk when training and none is given. 0 on a CPU: one program
    without rematerialisation, timed faster than chunks of 32 and 64 for the LJ training step
    (BUILD_NOTES.md history, "Accuracy per CPU-hour"; a training batch's ``[B, N, H, K, K]`` attention is tens
    of MB there); elsewhere the MD default (:func:`a2ijax.potential.default_atom_chunk`)."""
    backend = backend or jax.default_backend()
    return 0 if backend == "cpu" else default_atom_chunk(backend)


def prepare_run(dataset: Dataset, config: ExperimentConfig, *, atom_chunk: int | None = None) -> Run:
    """Splits, neighbours, buckets and statistics of ``dataset``, the config's core repulsion set from
    them, and the potential. ``atom_chunk`` is a run setting (see :func:`a2ijax.a2i_neighbor_list`;
    None: :func:`default_training_chunk`)."""
    data = prepare(dataset, config)
    if not len(data.splits["valid"]):
        raise InputError(f"{dataset.path}: no validation frames")
    config = with_core_repulsion(config, data.statistics)
    pair_start = None
    if config.model.pair_radial and not config.baseline.name:
        # The pair pathway starts from its least-squares fit (a2ijax.pair_fit); its errors are recorded.
        weights, shift, fit = fit_pair_weights(config, data)
        pair_start = (weights, shift)
        data.statistics.update(pair_fit=fit)
    chunk = default_training_chunk() if atom_chunk is None else atom_chunk
    init_fn, energy_fn, per_atom = potential_builder(config, fixed_species(dataset, config), atom_chunk=chunk)
    return Run(config, data, init_fn, energy_fn, per_atom, pair_start)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """AdamW (weight decay on matrices only) with warm-up, cosine decay and global-norm clipping; the
    pair pathway's weights at ``pair_lr_fraction`` of the rate."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate, max(train.warmup_steps, 1), max(train.steps, train.warmup_steps + 1),
        end_value=train.learning_rate * train.final_lr_fraction)
    # Matrices only: not biases, scales, or the pair pathway's weights (a fitted potential, not a layer).
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim == 2, params)  # noqa: E731
    chain = [optax.clip_by_global_norm(train.clip_norm)] if train.clip_norm > 0 else []
    chain.append(optax.adamw(schedule, weight_decay=train.weight_decay, mask=decay_mask))
    if train.pair_lr_fraction != 1.0:  # the pair pathway's fitted weights move slower (TrainConfig)
        pair_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: getattr(path[-1], "key", None) == "pair_weights", params)
        chain.append(optax.masked(optax.scale(train.pair_lr_fraction), pair_mask))
    return optax.chain(*chain)


def init_state(run: Run) -> TrainState:
    """Initial parameters with the fitted shift, the force-RMS scale and the pair pathway's
    least-squares start (``run.pair_start``), optimiser state, EMA, key."""
    config, data = run.config, run.data
    key = jax.random.PRNGKey(config.train.seed)
    key, init_key = jax.random.split(key)
    bucket = data.buckets["train"][0]
    R = jnp.asarray(bucket.R[0])
    params = run.init_fn(init_key, R, neighbor=fixed_neighbor_list(jnp.asarray(bucket.idx[0]), R),
                         species=jnp.asarray(bucket.species[0]), box=jnp.asarray(bucket.box[0]))
    leaves = params["params"]
    leaves["energy_shift"] = jnp.asarray(data.statistics["energy_shift"], leaves["energy_shift"].dtype)
    leaves["energy_scale"] = jnp.full_like(leaves["energy_scale"], math.sqrt(data.statistics["force_mean_square"]))
    if run.pair_start is not None:  # the pair pathway's fit, with the shift fitted beside it
        weights, shift = run.pair_start
        leaves["pair_weights"] = jnp.asarray(weights, leaves["pair_weights"].dtype)
        leaves["energy_shift"] = jnp.asarray(shift, leaves["energy_shift"].dtype)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(config.train).init(params),
                      ema=jax.tree_util.tree_map(jnp.copy, params), key=key)


def make_loss(run: Run) -> Callable[[Any, dict[str, Array], Array], tuple[Array, dict[str, Array]]]:
    """``loss(params, batch, step) -> (loss, summed squared errors)``: :mod:`a2ijax.loss` with the
    loss weights at ``step`` (the batch carries each frame's scales)."""
    predict = predict_fn(run.energy_fn, run.per_atom)
    weights = run.config.train.loss_weights

    def loss(params: Any, batch: dict[str, Array], step: Array) -> tuple[Array, dict[str, Array]]:
        errors = batch_errors(predict, params, batch)
        return normalised_loss(errors, weights(step)), errors

    return loss


def make_train_step(run: Run, mesh: Mesh | None = None
                    ) -> Callable[[TrainState, dict[str, Array]], tuple[TrainState, dict[str, Array]]]:
    """``step(state, batch) -> (state, metrics)``: one jitted AdamW step with EMA; ``metrics["finite"]``
    is False when the loss or the gradients are not finite (the caller keeps the old state).

    With a ``mesh`` (:func:`a2ijax.parallel.make_mesh`) the batch is split by rows over its devices
    and the state and metrics are replicated: the sums over the batch are all-reduces, so the step
    is the one-device step, whatever the device count.
    """
    train = run.config.train
    loss_fn = make_loss(run)
    optimizer = make_optimizer(train)
    rotate = run.config.rotate()

    def step(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict[str, Array]]:
        key, sub = jax.random.split(state.key)
        if rotate:
            batch = rotate_batch(batch, sub)
        (loss, errors), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = jnp.minimum(train.ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
        grad_norm = optax.tree.norm(grads)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, key=key)
        return new, dict(loss=loss, finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm), grad_norm=grad_norm,
                         **errors)

    if mesh is None:
        return jax.jit(step)
    whole = replicated(mesh)
    return jax.jit(step, in_shardings=(whole, split_leading(mesh)), out_shardings=whole)


def sharded_predict(run: Run, mesh: Mesh) -> Callable:
    """``predict(params, batch)`` (:func:`a2ijax.loss.predict_fn`) taking a host batch (the same on
    every process) split by rows over ``mesh``; the predictions come back whole on every process."""
    jitted = jax.jit(predict_fn(run.energy_fn, run.per_atom), out_shardings=replicated(mesh))
    return lambda params, batch: jitted(replicate(params, mesh), global_batch(batch, mesh))


def step_seconds(dataset: Dataset, config: ExperimentConfig, steps: int = 5, *,
                 atom_chunk: int | None = None) -> float:
    """Median wall time of one training step of ``config`` on ``dataset`` (after a compiling step),
    over ``steps`` steps on the training split's first batches. For budgets and timings."""
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    run = prepare_run(dataset, config, atom_chunk=atom_chunk)
    mesh = make_mesh()  # the program train_and_evaluate runs
    state, step = replicate(init_state(run), mesh), make_train_step(run, mesh)
    order = epoch_batches(run.data.buckets["train"], config.train.batch_size, config.train.seed, 0)
    times = []
    for i in range(steps + 1):
        b, rows = order[i % len(order)]
        bucket = run.data.buckets["train"][b]
        batch = global_batch(bucket.batch(rows, padded_rows(config.train.batch_size, mesh)), mesh)
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(step(state, batch))
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def train_and_evaluate(config: ExperimentConfig, workdir: str | Path, *, resume: bool = False,
                       stop_after: int | None = None, progress: bool = True, dataset: Dataset | None = None,
                       atom_chunk: int | None = None, devices: int | None = None) -> TrainResult:
    """Trains, checkpoints and reports into ``workdir``.

    Args:
      config: the experiment (data, model, training).
      workdir: checkpoints, ``metrics.jsonl``, ``report.json``/``report.md`` and plots go here.
      resume: continue from the latest periodic checkpoint in ``workdir``: parameters, optimiser
        state, EMA, step, RNG key and data order, so the result equals an uninterrupted run.
      stop_after: stop (and checkpoint) once this many steps are done, as if interrupted; the
        schedule still spans ``config.train.steps``. No report is written then.
      progress: show a progress bar with live metrics.
      dataset: frames already read (default: read ``config.data.path``).
      atom_chunk: how the model is run (not stored: a resume may use another).
      devices: data parallelism over this many local devices (None: every device of every process,
        after :func:`a2ijax.parallel.initialize`). Batches are filled up with rows of weight 0 to a
        multiple of the device count; the loss is the one-device loss. Process 0 alone writes
        metrics, reports and the progress bar; every process takes part in checkpoints.
    """
    t_start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train = config.train
    if dataset is None:
        dataset = read_dataset(config.data.path, config.data.symbols or None)
    run = prepare_run(dataset, config, atom_chunk=atom_chunk)
    config, data = run.config, run.data
    meta = dict(config=config.to_dict(), symbols=list(dataset.symbols), statistics=data.statistics,
                capacity=data.capacity, bucket_sizes=data.bucket_sizes.tolist(), data_path=str(dataset.path),
                units=str(dataset.info[0].get("units", "")), system=str(dataset.info[0].get("system", "")),
                splits={k: v.tolist() for k, v in data.splits.items()})
    mesh = make_mesh(devices)
    main = is_main_process()
    rows_per_batch = padded_rows(train.batch_size, mesh)
    if rows_per_batch != train.batch_size and main:
        warnings.warn(f"batch_size {train.batch_size} is not a multiple of the {mesh.size} devices: every batch is "
                      f"filled up to {rows_per_batch} rows with zero-weight frames, which cost as much as real ones; "
                      f"use a multiple of {mesh.size}", stacklevel=2)
    state = replicate(init_state(run), mesh)
    checkpoints = managers(workdir)
    metrics_path = workdir / "metrics.jsonl"
    if resume:
        state, resumed_at = restore_for_resume(checkpoints["periodic"], state, meta)
        if main and metrics_path.exists():  # drop metrics logged after the checkpoint: they will be logged again
            rows = [line for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_at]
            atomic_write(metrics_path, lambda f: f.write("".join(r + "\n" for r in rows)))
    elif checkpoints["periodic"].latest_step() is not None:
        raise CheckpointError(f"{workdir} already holds checkpoints: pass resume (--resume) to continue, or use a "
                              "new work directory")
    elif main:
        metrics_path.write_text("")

    def checkpoint(manager: str, state: TrainState, metrics: dict | None = None) -> None:
        save(checkpoints[manager], int(state.step), state, state.ema, meta, metrics)

    step_fn = make_train_step(run, mesh)
    predict = sharded_predict(run, mesh)
    train_buckets = data.buckets["train"]
    steps_per_epoch = sum(-(-len(b) // train.batch_size) for b in train_buckets)
    final_weights = train.loss_weights(train.steps - 1)

    start = int(state.step)
    end = train.steps if stop_after is None else min(train.steps, stop_after)
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=train.steps, initial=start, unit="step", desc="train", dynamic_ncols=True)
    running, last_valid = [], {}
    pending: list[tuple[dict[str, Array], str]] = []  # steps since the last check: metrics on the device, batch
    good, good_step = state, start  # the state at the last check, all of whose steps were finite
    order: list[tuple[int, np.ndarray]] = []
    epoch_of_order = -1
    step = start

    def check() -> None:
        """Reads the pending steps' metrics (one host-device synchronisation); stops the run, with
        the last good state checkpointed, if one of them was not finite."""
        nonlocal pending, good, good_step
        fetched = jax.device_get([m for m, _ in pending])
        bad = [i for i, m in enumerate(fetched) if not bool(m["finite"])]
        if bad:
            checkpoint("periodic", good)
            raise TrainingDivergedError(
                f"loss or gradients are not finite at step {good_step + bad[0]} ({pending[bad[0]][1]} of "
                f"{dataset.path}); the last good state checked, step {good_step}, is checkpointed in "
                f"{workdir / 'checkpoints' / 'periodic'}. Lower learning_rate or clip_norm.")
        running.extend(float(m["loss"]) for m in fetched)
        if bar is not None:
            bar.update(len(fetched))
            bar.set_postfix(loss=f"{np.mean(running[-20:]):.3g}", **last_valid)
        pending, good, good_step = [], state, step

    try:
        while step < end:
            epoch, position = divmod(step, steps_per_epoch)
            if epoch != epoch_of_order:
                order, epoch_of_order = epoch_batches(train_buckets, train.batch_size, train.seed, epoch), epoch
            b, rows = order[position]
            bucket = train_buckets[b]
            state, metrics = step_fn(state, global_batch(bucket.batch(rows, rows_per_batch), mesh))
            step += 1
            pending.append((dict(loss=metrics["loss"], finite=metrics["finite"]),
                            f"epoch {epoch}, batch of frames {bucket.frame_index[rows].tolist()}"))
            evaluate = step % train.eval_every == 0 or step == train.steps
            save_now = step % train.checkpoint_every == 0 or step == end
            if evaluate or save_now or step % train.sync_every == 0:
                check()
            if evaluate:
                valid = validation_errors(predict, state.ema, data, "valid", rows_per_batch, train.eval_frames)
                valid_loss = final_weights[0] * valid["energy_nmse"] + final_weights[1] * valid["force_nmse"]
                row = dict(step=step, epoch=step / steps_per_epoch, seconds=time.perf_counter() - t_start,
                           train_loss=float(np.mean(running)), valid_loss=valid_loss,
                           valid_energy_rmse_per_atom=valid["energy_rmse_per_atom"],
                           valid_force_rmse=valid["force_rmse"], valid_ratios=valid["ratios"])
                running = []
                if main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                checkpoint("best", state, dict(valid_loss=valid_loss))
                last_valid = dict(val_E=f"{valid['energy_rmse_per_atom']:.3g}", val_F=f"{valid['force_rmse']:.3g}")
            if save_now:
                checkpoint("periodic", state)
    except KeyboardInterrupt:
        checkpoint("periodic", good)  # the steps after the last check may not be finite
        raise
    finally:
        if bar is not None:
            bar.close()
    report = None
    if step == train.steps:
        report = final_report(workdir, data, predict, rows_per_batch, write=main)
    return TrainResult(state, report, workdir, time.perf_counter() - t_start)


def train_committee(config: ExperimentConfig, workdir: str | Path, members: int, *, resume: bool = False,
                    dataset: Dataset | None = None, **kwargs) -> list[TrainResult | None]:
    """Trains a committee (:mod:`a2ijax.committee`): ``members`` runs of ``config`` with the seeds
    ``seed, seed + 1, ...`` (initial parameters and data order), each in ``workdir/member_<k>``, and
    ``workdir/committee.json`` naming them. With ``resume``, members with a report are kept (None in
    the result) and the others continue from their periodic checkpoints. The members must share
    their splits, so the frames need split headers (``a2ijax generate`` writes them) or a
    ``max_train_frames`` subset would differ too: both are checked before training. Other keywords
    go to :func:`train_and_evaluate`.
    """
    from a2ijax.committee import INDEX
    from a2ijax.dataset import split_indices

    if isinstance(members, bool) or not isinstance(members, int) or members < 2:
        raise InputError(f"a committee needs members >= 2, got {members!r}")
    workdir = Path(workdir)
    if dataset is None:
        dataset = read_dataset(config.data.path, config.data.symbols or None)
    seeds = [config.train.seed + k for k in range(members)]
    splits = [split_indices(dataset, config.data.split_fractions, seed) for seed in seeds]
    if config.data.max_train_frames or any(
            any(not np.array_equal(s[name], splits[0][name]) for name in s) for s in splits[1:]):
        raise InputError(f"{dataset.path}: committee members would get different splits (the frames have no split "
                         "headers, or [data] max_train_frames draws a subset per seed); give the frames split "
                         "headers and drop max_train_frames, so that every member is tested on the same frames")
    names = [f"member_{k}" for k in range(members)]
    index = dict(members=names, seeds=seeds, config=config.to_dict())
    if (workdir / INDEX).exists():
        stored = json.loads((workdir / INDEX).read_text())
        if not resume:
            raise CheckpointError(f"{workdir} already holds a committee: pass resume (--resume) to continue, or use a "
                                  "new work directory")
        if stored != json.loads(json.dumps(index)):
            raise CheckpointError(f"{workdir / INDEX} describes another committee (members, seeds or config differ)")
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write(workdir / INDEX, lambda f: json.dump(index, f, indent=1))
    results: list[TrainResult | None] = []
    for name, seed in zip(names, seeds, strict=True):
        member = workdir / name
        if (member / "report.json").exists():
            results.append(None)
            continue
        member_config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
        periodic = member / "checkpoints" / "periodic"
        started = periodic.is_dir() and any(periodic.iterdir())
        results.append(train_and_evaluate(member_config, member, resume=resume and started, dataset=dataset,
                                          **kwargs))
    return results
