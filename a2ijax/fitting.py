"""Fitting potential parameters to MD observables by gradient: the optax loops over ``a2ijax.diffmd``.

Two loops, one per route to the gradient, with the same shape: a loss of predicted observables
against targets (``a2ijax.observables.observable_loss``), optionally plus any other differentiable
term of the parameters (``extra_loss``: force matching on labelled frames, so that a fine-tuned
model keeps its forces; :func:`force_matching_loss` builds it from the training loss's pieces),
an optax optimiser, and a history of every step.

* :func:`fit_by_reweighting` (DiffTRe): observables are reweighted averages over a sample drawn at
  earlier parameters; a new sample is drawn whenever ``N_eff / N`` at the current parameters falls
  below ``n_eff_threshold``.
* :func:`fit_by_backprop`: observables are averages over an MD segment run at the current
  parameters and differentiated through (``diffmd.CheckedGradient``); every step runs a new segment.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from a2ijax import diffmd
from a2ijax.batching import prepare
from a2ijax.checkpoint import Checkpoint
from a2ijax.dataset import Dataset
from a2ijax.errors import InputError
from a2ijax.loss import batch_errors, normalised_loss, predict_fn
from a2ijax.observables import observable_loss
from a2ijax.potential import a2i_builder

Array = jax.Array


@dataclasses.dataclass
class FitResult:
    """The final parameters and one row per optimiser step (``step``, ``loss``, each observable's
    ``terms``, ``extra`` loss, ``n_eff_fraction`` for reweighting, ``resampled``, ``seconds``, and
    ``tracked``: what ``track(params)`` returned for the parameters the step was evaluated at);
    ``samples``: how many MD samples (reweighting) or segments (backpropagation) were run."""

    params: Any
    history: list[dict]
    samples: int


def _row(step, loss, terms, extra, started, params, track, **more) -> dict:
    return dict(step=step, loss=float(loss), terms={k: float(v) for k, v in terms.items()}, extra=float(extra),
                seconds=time.perf_counter() - started, tracked=track(params) if track else None, **more)


def _compiled_update(optimizer: optax.GradientTransformation) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """The optimiser step ``(grads, opt_state, params) -> (params, opt_state)`` as one compiled
    program (run op by op, each of optax's updates would compile on its own)."""

    @jax.jit
    def update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return update


def _record_and_update(row: dict, history: list[dict], callback, update, grads: Any, opt_state: Any,
                       params: Any) -> tuple[Any, Any]:
    """Appends the step's row, shows it to the callback, and takes the optimiser step."""
    history.append(row)
    if callback is not None:
        callback(row)
    return update(grads, opt_state, params)


def strongly_typed(params: Any) -> Any:
    """``params`` with every leaf a strongly typed array: a Python float becomes a weakly typed
    array, which the first optimiser update turns strong, and the step would compile twice."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), params)


def _check(steps: int, threshold: float | None = None) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an int >= 1, got {steps!r}")
    if threshold is not None and not 0 < threshold <= 1:
        raise InputError(f"n_eff_threshold must lie in (0, 1], got {threshold!r}")


def fit_by_reweighting(params: Any, energy_fn: Callable[..., Array], draw: Callable[[Any, int], diffmd.Sample],
                       observe: Callable[[Any, Array, Any], dict[str, Array]], targets: dict[str, Any],
                       optimizer: optax.GradientTransformation, steps: int, *, weights: dict | None = None,
                       extra_loss: Callable[[Any], Array] | None = None, n_eff_threshold: float = 0.9,
                       callback: Callable[[dict], None] | None = None,
                       track: Callable[[Any], Any] | None = None) -> FitResult:
    """DiffTRe: ``steps`` optimiser steps on ``observable_loss(<observe>_params, targets, weights)``
    (+ ``extra_loss(params)``), the averages reweighted from samples ``draw(params, k)`` (the k-th
    sample, drawn without gradients, e.g. by :func:`a2ijax.diffmd.sample`). A sample is redrawn
    when its ``N_eff / N`` at the current parameters is below ``n_eff_threshold``."""
    _check(steps, n_eff_threshold)
    params = strongly_typed(params)

    def total(params, sample):
        averages, n_eff = diffmd.reweighted_mean(observe, energy_fn, params, sample)
        loss, terms = observable_loss(averages, targets, weights)
        extra = extra_loss(params) if extra_loss is not None else jnp.zeros((), loss.dtype)
        return loss + extra, (terms, extra, n_eff)

    value_and_grad = jax.jit(jax.value_and_grad(total, has_aux=True))
    update, opt_state = _compiled_update(optimizer), optimizer.init(params)
    sample, samples, history, started = None, 0, [], time.perf_counter()
    for step in range(steps):
        resampled = sample is None
        if resampled:
            sample, samples = draw(params, samples), samples + 1
        (loss, (terms, extra, n_eff)), grads = value_and_grad(params, sample)
        if not resampled and diffmd.effective_fraction(n_eff, sample) < n_eff_threshold:
            sample, samples, resampled = draw(params, samples), samples + 1, True
            (loss, (terms, extra, n_eff)), grads = value_and_grad(params, sample)
        row = _row(step, loss, terms, extra, started, params, track,
                   n_eff_fraction=diffmd.effective_fraction(n_eff, sample), resampled=resampled)
        params, opt_state = _record_and_update(row, history, callback, update, grads, opt_state, params)
    return FitResult(params, history, samples)


def fit_by_backprop(params: Any, segment_loss: Callable[..., tuple[dict[str, Array], diffmd.Segment]],
                    neighbor_fn: Any, R: Array, neighbor: Any, targets: dict[str, Any],
                    optimizer: optax.GradientTransformation, steps: int, *, key: Array,
                    weights: dict | None = None, extra_loss: Callable[[Any], Array] | None = None,
                    callback: Callable[[dict], None] | None = None,
                    track: Callable[[Any], Any] | None = None) -> FitResult:
    """``steps`` optimiser steps, each on a new MD segment differentiated through:
    ``segment_loss(params, neighbor, R, key) -> (observables, segment)`` runs the segment (from
    :func:`a2ijax.diffmd.make_segment`) from ``R`` and averages its observables over its frames.
    Each segment starts where the last one ended (so the trajectory relaxes towards the current
    parameters) with velocities from ``jax.random.fold_in(key, step)``; it is rerun with a larger
    neighbour list after an overflow (:class:`a2ijax.diffmd.CheckedGradient`)."""
    _check(steps)
    params = strongly_typed(params)

    def total(params, neighbor, R, key):
        predicted, segment = segment_loss(params, neighbor, R, key)
        loss, terms = observable_loss(predicted, targets, weights)
        extra = extra_loss(params) if extra_loss is not None else jnp.zeros((), loss.dtype)
        return loss + extra, dict(terms=terms, extra=extra, overflow=segment.overflow,
                                  last=jax.lax.stop_gradient(segment.frames[-1]))

    gradient = diffmd.CheckedGradient(total, neighbor_fn, neighbor)
    update, opt_state = _compiled_update(optimizer), optimizer.init(params)
    history, started = [], time.perf_counter()
    for step in range(steps):
        loss, aux, grads = gradient(params, R, jax.random.fold_in(key, step))
        R = aux["last"]
        row = _row(step, loss, aux["terms"], aux["extra"], started, params, track)
        params, opt_state = _record_and_update(row, history, callback, update, grads, opt_state, params)
    return FitResult(params, history, steps)


def force_matching_loss(energy_fn: Callable[..., Array], batch: dict[str, Array],
                        weights: tuple[float, float] = (1.0, 1.0)) -> Callable[[Any], Array]:
    """``params -> loss`` of the training loss (``a2ijax.loss``: energies and forces over their
    frames' scales) on one padded ``batch`` of labelled frames (``a2ijax.batching``): the term that
    keeps a model fine-tuned on observables close to its forces. Compiled; inside a fit it is traced
    into the step's program."""
    predict = predict_fn(energy_fn)

    @jax.jit
    def loss(params):
        return normalised_loss(batch_errors(predict, params, batch), weights)

    return loss


def checkpoint_force_matching(checkpoint: Checkpoint, dataset: Dataset, frames: np.ndarray,
                              weights: tuple[float, float] = (0.0, 1.0)) -> Callable[[Any], Array]:
    """:func:`force_matching_loss` of an A2I ``checkpoint``'s model on ``frames`` (indices) of a
    labelled ``dataset`` (read with the checkpoint's symbols), in one padded batch, each frame's
    scales from the checkpoint's training statistics: the term that keeps the model, fine-tuned,
    close to the forces it was trained on. ``weights``: (energy, force), forces only by default."""
    frames = np.asarray(frames, int)
    if not frames.size:
        raise InputError("no frames to match forces on")
    train = dataclasses.replace(checkpoint.config.train, neighbor_buckets=1, size_buckets=1)
    # Only these frames: prepare's neighbour search would otherwise run over the whole dataset.
    data = prepare(dataset.subset(frames), dataclasses.replace(checkpoint.config, train=train),
                   statistics=checkpoint.meta["statistics"], splits={"train": np.arange(frames.size)})
    bucket = data.buckets["train"][0]
    batch = {k: jnp.asarray(v) for k, v in bucket.batch(np.arange(len(bucket)), len(bucket)).items()}
    _, energy_fn = a2i_builder(checkpoint.config.model, atom_chunk=0)
    return force_matching_loss(energy_fn, batch, weights)
