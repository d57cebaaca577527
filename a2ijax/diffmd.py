"""Differentiable MD: gradients of MD averages with respect to the parameters of the potential.

Any potential in the builder shape works: ``energy_fn(params, R, neighbor)`` with a jax-md
``neighbor_fn`` (A2I's ``a2i_neighbor_list``; the reference systems with their physical parameters
from ``a2ijax.systems.parametric_energy``). Two routes to the gradient (docs/design.md,
"Differentiable MD"):

* **Backpropagation through the trajectory** (:func:`make_segment`, :class:`CheckedGradient`): an
  MD segment is one jit-compiled ``lax.scan`` over blocks of steps, each block rematerialised
  (``jax.checkpoint``), so the backward pass keeps one state per block and recomputes the steps
  inside a block: memory grows like ``n / b + b``, ``2 sqrt(n)`` states at ``b = sqrt(n)`` (the
  default), instead of ``n``. The neighbour list is updated inside the scan; an overflow anywhere is
  reported with the result, and :class:`CheckedGradient` reruns the segment with a larger list
  (never a silently truncated one). Chaos makes these gradients grow exponentially with the segment
  length: ``truncate`` stops the gradient every ``truncate`` blocks (truncated backpropagation).
* **Reweighting** (DiffTRe, Thaler & Zavadlav, Nat. Commun. 12, 6884 (2021)): frames sampled at
  ``theta_0`` without gradients (:func:`sample`) give averages at nearby ``theta`` through Boltzmann
  weights ``w_i ~ exp(-(U_theta(x_i) - U_theta0(x_i)) / kT)`` (:func:`reweighted_mean`), whose
  gradient needs no backpropagation through the dynamics. The effective sample size
  ``N_eff = exp(-sum_i w_i log w_i)`` says when the frames no longer represent ``theta`` and a new
  sample is due. Frames are evaluated in vmapped, rematerialised chunks, so the memory of the
  gradient is that of one chunk beyond the stored frames.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import partition

from a2ijax.errors import InputError
from a2ijax.md import check_positive, integrator
from a2ijax.md import step as md_step
from a2ijax.potential import NeighborListOverflowError, reallocate

Array = jax.Array
#: The deterministic integrators of ``a2ijax.md``: their gradients are those of one trajectory.
ENSEMBLES = ("nve", "nose-hoover")


@dataclasses.dataclass(frozen=True)
class Segment:
    """What an MD segment returns: ``frames [B, N, dim]`` and their potential energies ``[B]`` (one
    frame at the end of every block), the final ``state`` and ``neighbor`` (to continue from), and
    ``overflow``: whether the neighbour list overflowed at any step (then nothing here is valid)."""

    frames: Array
    energies: Array
    state: Any
    neighbor: partition.NeighborList
    overflow: Array


jax.tree_util.register_dataclass(Segment, data_fields=["frames", "energies", "state", "neighbor", "overflow"],
                                 meta_fields=[])


def make_segment(energy_fn: Callable[..., Array], shift_fn: Callable, *, steps: int, dt: float, kT: float,
                 mass: float = 1.0, ensemble: str = "nose-hoover", block: int = 0, truncate: int = 0,
                 tau: float = 100.0) -> Callable[..., Segment]:
    """``segment(params, R, neighbor, key) -> Segment``: ``steps`` MD steps from positions ``R`` with
    velocities drawn at ``kT`` from ``key``, differentiable with respect to ``params`` (and ``R``).
    ``neighbor`` gives the list's capacity; it is updated for ``R`` first.

    ``ensemble``: ``"nve"`` (velocity Verlet) or ``"nose-hoover"`` (a chain thermostat, ``tau`` in
    units of ``dt``, as ``a2ijax.md.simulate``): both deterministic, so their gradients are those
    of one trajectory.
    ``block``: steps per rematerialised block (0: the divisor of ``steps`` nearest ``sqrt(steps)``);
    one frame is recorded at the end of each block. ``truncate``: if positive, the gradient does
    not flow back across every ``truncate``-th block boundary (truncated backpropagation).
    """
    for name, value in (("steps", steps), ("block", block), ("truncate", truncate)):
        if not isinstance(value, int) or value < 0 or (name == "steps" and value == 0):
            raise InputError(f"{name} must be an int >= {int(name == 'steps')}, got {value!r}")
    check_positive("kT", kT)
    check_positive("mass", mass)
    integrator(energy_fn, shift_fn, ensemble, dt, kT, tau=tau, ensembles=ENSEMBLES)  # checks the rest
    if block == 0:
        divisors = [b for b in range(1, steps + 1) if steps % b == 0]
        block = min(divisors, key=lambda b: abs(b - math.sqrt(steps)))
    if steps % block:
        raise InputError(f"block ({block}) must divide steps ({steps})")
    n_blocks = steps // block

    def segment(params: Any, R: Array, neighbor: partition.NeighborList, key: Array) -> Segment:
        energy = partial(energy_fn, params)
        neighbor = neighbor.update(R)  # the list may come from other positions (an earlier segment's start)
        init, apply, _ = integrator(energy, shift_fn, ensemble, dt, kT, tau=tau, ensembles=ENSEMBLES)
        state = init(key, R, mass=mass, kT=kT, neighbor=neighbor)

        advance = md_step(apply)

        def step(carry, _):
            state, nbr, overflow = carry
            state, nbr = advance(state, nbr)
            return (state, nbr, overflow | nbr.did_buffer_overflow), None

        @jax.checkpoint
        def run_block(carry):
            return jax.lax.scan(step, carry, None, length=block)[0]

        def outer(carry, i):
            state, nbr, overflow = run_block(carry)
            if truncate:
                cut = (i + 1) % truncate == 0
                state = jax.tree.map(lambda x: jnp.where(cut, jax.lax.stop_gradient(x), x), state)
            return (state, nbr, overflow), (state.position, energy(state.position, nbr))

        start = (state, neighbor, jnp.asarray(neighbor.did_buffer_overflow))
        (state, nbr, overflow), (frames, energies) = jax.lax.scan(outer, start, jnp.arange(n_blocks))
        return Segment(frames, energies, state, nbr, overflow)

    return segment


def _until_it_fits(run: Callable[[partition.NeighborList], Any], overflowed: Callable[[Any], Any],
                   neighbor_fn: partition.NeighborFn, R: Array, neighbor: partition.NeighborList,
                   max_reallocations: int, what: str) -> tuple[Any, partition.NeighborList, int]:
    """``run(neighbor)``, rerun with a list reallocated for ``R`` (``a2ijax.potential.reallocate``: at
    least 1.5x the capacity) while ``overflowed(result)``; returns the result, the list it fitted
    and the number of reallocations. More than ``max_reallocations`` overflows raise
    :class:`NeighborListOverflowError` naming ``what``: never a result from a truncated list."""
    for attempt in range(max_reallocations + 1):
        result = run(neighbor)
        if not bool(overflowed(result)):
            return result, neighbor, attempt
        if attempt < max_reallocations:
            neighbor = reallocate(neighbor_fn, R, neighbor)
    raise NeighborListOverflowError(f"{what}: the neighbour list still overflowed after {max_reallocations} "
                                    f"reallocations (capacity {neighbor.idx.shape[1]})")


class CheckedGradient:
    """``jax.value_and_grad`` of a loss computed from MD segments, rerun with a larger neighbour list
    whenever a segment inside it overflowed.

    ``loss_fn(params, neighbor, R, *args) -> (loss, aux)``, where ``R`` is where the segments start
    and ``aux["overflow"]`` is the OR of their ``overflow`` flags. Calling the object with
    ``(params, R, *args)`` (``args``: a random key, say; arguments, so that new values do not
    recompile) returns ``(loss, aux, grads)``; after an overflow it reallocates the list for ``R``
    (at least 1.5x the capacity), keeps the larger list for later calls and recompiles once. More
    than ``max_reallocations`` overflows in one call raise :class:`NeighborListOverflowError`.
    """

    def __init__(self, loss_fn: Callable[..., tuple[Array, dict]], neighbor_fn: partition.NeighborFn,
                 neighbor: partition.NeighborList, max_reallocations: int = 4):
        self.neighbor_fn, self.neighbor = neighbor_fn, neighbor
        self.max_reallocations = max_reallocations
        self.reallocations = 0
        self._value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def __call__(self, params: Any, R: Array, *args: Any) -> tuple[Array, dict, Any]:
        ((loss, aux), grads), self.neighbor, grown = _until_it_fits(
            lambda nbr: self._value_and_grad(params, nbr, R, *args), lambda out: out[0][1]["overflow"],
            self.neighbor_fn, R, self.neighbor, self.max_reallocations, "the MD segment's gradient")
        self.reallocations += grown
        return loss, aux, grads


# Reweighting ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """Frames sampled at ``params`` and ``kT``, with their energies there (computed the way
    :func:`frame_values` computes them, so the weights at ``params`` are exactly uniform) and a
    neighbour list whose capacity fits every frame (``None``: a potential without one)."""

    frames: Array
    energies: Array
    params: Any
    kT: float
    neighbor: partition.NeighborList | None
    chunk: int


jax.tree_util.register_dataclass(Sample, data_fields=["frames", "energies", "params", "neighbor"],
                                 meta_fields=["kT", "chunk"])


def frame_values(fn: Callable[[Array, Any], Any], frames: Array, neighbor: partition.NeighborList | None,
                 chunk: int) -> Any:
    """``fn(R, neighbor)`` of every frame (each frame's own list, updated from ``neighbor``), vmapped
    over chunks of ``chunk`` frames, each chunk rematerialised: the gradient stores one chunk's
    intermediates, not the whole trajectory's. The frames are padded to whole chunks (copies of
    the first, cut off again)."""
    n = frames.shape[0]
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    padded = jnp.concatenate([frames, jnp.broadcast_to(frames[:1], (pad,) + frames.shape[1:])]) if pad else frames

    def one(R):
        return fn(R, None if neighbor is None else neighbor.update(R))

    out = jax.lax.map(jax.checkpoint(jax.vmap(one)), padded.reshape((-1, chunk) + frames.shape[1:]))
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:n], out)


@partial(jax.jit, static_argnums=0)
def _run_segment(segment: Callable[..., Segment], params, R, neighbor, key) -> Segment:
    return segment(params, R, neighbor, key)


@partial(jax.jit, static_argnames="chunk")
def _overflows(frames: Array, neighbor: partition.NeighborList, chunk: int) -> Array:
    return frame_values(lambda R, n: n.did_buffer_overflow, frames, neighbor, chunk)


@partial(jax.jit, static_argnames=("energy_fn", "chunk"))
def _energies(energy_fn: Callable[..., Array], params, frames: Array, neighbor, chunk: int) -> Array:
    return frame_values(lambda R, n: energy_fn(params, R, n), frames, neighbor, chunk)


def sample(segment: Callable[..., Segment], energy_fn: Callable[..., Array], params: Any, R: Array,
           neighbor: partition.NeighborList, key: Array, neighbor_fn: partition.NeighborFn, kT: float,
           chunk: int = 16, max_reallocations: int = 4, relax: int = 0) -> tuple[Sample, Segment]:
    """Runs ``segment`` at ``params`` without gradients (rerun with a larger neighbour list if it
    overflowed), then finds a list capacity that fits every frame and evaluates the frames' energies.
    ``relax`` segments run first and are discarded (the state relaxes to ``params``; each with its
    own key from ``key``). Returns the :class:`Sample` and the last :class:`Segment` (its last frame
    and list continue the trajectory). Compiled once per segment, energy function and shape."""
    for k in range(relax + 1):
        run_key = jax.random.fold_in(key, k) if relax else key
        result, _, _ = _until_it_fits(lambda nbr, R=R, key=run_key: _run_segment(segment, params, R, nbr, key),
                                      lambda out: out.overflow, neighbor_fn, R, neighbor, max_reallocations,
                                      "the sampling segment")
        R, neighbor = result.frames[-1], result.neighbor
    frames = result.frames
    _, template, _ = _until_it_fits(lambda nbr: jnp.any(_overflows(frames, nbr, chunk)), lambda out: out,
                                    neighbor_fn, frames[0], result.neighbor, max_reallocations,
                                    "a list for every sampled frame")
    return sample_from_frames(frames, energy_fn, params, kT, template, chunk), result


def sample_from_frames(frames: Array, energy_fn: Callable[..., Array], params: Any, kT: float,
                       neighbor: partition.NeighborList | None = None, chunk: int = 16) -> Sample:
    """A :class:`Sample` of frames drawn at ``params`` and ``kT`` by any means (``neighbor``: a list
    whose capacity fits every frame, or None for a potential without one)."""
    check_positive("kT", kT)
    params = jax.lax.stop_gradient(params)
    return Sample(frames, _energies(energy_fn, params, frames, neighbor, chunk), params, float(kT), neighbor, chunk)


def _weights(energies: Array, sample: Sample) -> tuple[Array, Array]:
    w = jax.nn.softmax(-(energies - sample.energies) / sample.kT)
    return w, jnp.exp(-jnp.sum(jax.scipy.special.xlogy(w, w)))


def reweighted_mean(observable: Callable[[Any, Array, Any], Any], energy_fn: Callable[..., Array], params: Any,
                    sample: Sample) -> tuple[Any, Array]:
    """``(<O>_params, N_eff)``: the Boltzmann-reweighted average of ``observable(params, R, neighbor)``
    (a pytree of arrays; it may depend on the parameters, as the pressure does) over the sample,
    differentiable with respect to ``params``; one pass over the frames computes energies and values."""
    energies, values = frame_values(lambda R, n: (energy_fn(params, R, n), observable(params, R, n)),
                                    sample.frames, sample.neighbor, sample.chunk)
    w, n_eff = _weights(energies, sample)
    return jax.tree.map(lambda v: jnp.tensordot(w, v, axes=1), values), n_eff


def effective_fraction(n_eff: Array, sample: Sample) -> float:
    """``N_eff / N``: below a threshold (DiffTRe uses about 0.9), sample anew at the current parameters."""
    return float(n_eff) / int(np.shape(sample.frames)[0])
