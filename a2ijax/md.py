"""Running jax-md integrators in compiled chunks, with the neighbour list checked between chunks.

Steps run inside ``lax.scan`` chunks; the host looks at the result once per chunk, never once per
step. If the neighbour list overflowed anywhere in a chunk, the chunk's result is discarded, the list
is reallocated with more capacity (:func:`a2ijax.potential.reallocate`) and the same chunk runs again
from its starting state, so no step is lost or computed with truncated neighbours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import partition, quantity

from a2ijax.potential import reallocate


@dataclasses.dataclass
class MDRun:
    """What :func:`run` returns: the final state and list, and per-step observables ``[n_steps]``."""

    state: Any
    neighbor: partition.NeighborList
    observables: dict[str, np.ndarray]
    reallocations: int


def energy_observables(energy: Callable[..., jax.Array]) -> Callable[..., dict[str, jax.Array]]:
    """Per-step potential, kinetic and total energy and temperature (k_B T) of a jax-md state."""

    def observe(state, neighbor):
        potential = energy(state.position, neighbor=neighbor)
        kinetic = quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)
        kT = quantity.temperature(momentum=state.momentum, mass=state.mass)
        return dict(potential=potential, kinetic=kinetic, total=potential + kinetic, kT=kT)

    return observe


def make_chunk(apply_fn: Callable, n_records: int, observe: Callable | None = None, stride: int = 1,
               **kwargs) -> Callable:
    """A jitted function advancing ``(state, neighbor)`` by ``n_records * stride`` steps.

    The neighbour list is updated before every step; ``observe(state, neighbor)`` is recorded after
    every ``stride`` steps, giving arrays with a leading ``[n_records]`` axis.
    """

    def one_step(_, carry):
        state, neighbor = carry
        neighbor = neighbor.update(state.position)
        return apply_fn(state, neighbor=neighbor, **kwargs), neighbor

    @jax.jit
    def chunk(state, neighbor):
        def record(carry, _):
            state, neighbor = jax.lax.fori_loop(0, stride, one_step, carry)
            return (state, neighbor), ({} if observe is None else observe(state, neighbor))

        (state, neighbor), records = jax.lax.scan(record, (state, neighbor), None, length=n_records)
        return state, neighbor, records

    return chunk


def run(apply_fn: Callable, state: Any, neighbor_fn: partition.NeighborFn, neighbor: partition.NeighborList,
        n_steps: int, *, chunk_steps: int = 100, stride: int = 1, observe: Callable | None = None,
        max_reallocations: int = 10, progress: Callable[[int], Any] | None = None, **kwargs) -> MDRun:
    """Advances ``state`` by ``n_steps`` integrator steps, ``chunk_steps`` per compiled chunk.

    ``observe`` is recorded every ``stride`` steps (``n_steps`` and ``chunk_steps`` are multiples of
    it); ``progress(steps)`` is called after each accepted chunk. Raises ``FloatingPointError``
    naming the chunk if positions become NaN or inf (the returned state is never a poisoned one),
    and ``RuntimeError`` after ``max_reallocations`` overflows.
    """
    if n_steps < 0 or chunk_steps < 1 or stride < 1 or n_steps % stride or chunk_steps % stride:
        raise ValueError(f"need n_steps >= 0, chunk_steps >= 1 and both multiples of stride >= 1; got "
                         f"n_steps={n_steps}, chunk_steps={chunk_steps}, stride={stride}")
    chunks: dict[int, Callable] = {}
    records: list[dict[str, np.ndarray]] = []
    done, reallocations = 0, 0
    while done < n_steps:
        length = min(chunk_steps, n_steps - done)
        if length not in chunks:
            chunks[length] = make_chunk(apply_fn, length // stride, observe, stride, **kwargs)
        new_state, new_neighbor, record = chunks[length](state, neighbor)
        if bool(new_neighbor.did_buffer_overflow):
            if reallocations == max_reallocations:
                raise RuntimeError(f"neighbour list overflowed {reallocations} times; giving up at step {done}")
            neighbor = reallocate(neighbor_fn, state.position, neighbor)
            reallocations += 1  # the chunk functions recompile once for the new list shape
            continue
        if not bool(jnp.all(jnp.isfinite(new_state.position))):
            raise FloatingPointError(f"non-finite positions in the chunk of steps {done}..{done + length}; "
                                     f"the last good state is from step {done}")
        state, neighbor = new_state, new_neighbor
        records.append(jax.tree.map(np.asarray, record))
        done += length
        if progress is not None:
            progress(length)
    observables = {key: np.concatenate([r[key] for r in records]) for key in (records[0] if records else {})}
    return MDRun(state, neighbor, observables, reallocations)
