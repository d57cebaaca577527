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


def make_chunk(apply_fn: Callable, n_steps: int, observe: Callable | None = None, **kwargs) -> Callable:
    """A jitted function advancing ``(state, neighbor)`` by ``n_steps`` steps, the list updated each step."""

    @jax.jit
    def chunk(state, neighbor):
        def step(carry, _):
            state, neighbor = carry
            neighbor = neighbor.update(state.position)
            state = apply_fn(state, neighbor=neighbor, **kwargs)
            return (state, neighbor), ({} if observe is None else observe(state, neighbor))

        (state, neighbor), records = jax.lax.scan(step, (state, neighbor), None, length=n_steps)
        return state, neighbor, records

    return chunk


def run(apply_fn: Callable, state: Any, neighbor_fn: partition.NeighborFn, neighbor: partition.NeighborList,
        n_steps: int, *, chunk_steps: int = 100, observe: Callable | None = None,
        max_reallocations: int = 10, **kwargs) -> MDRun:
    """Advances ``state`` by ``n_steps`` integrator steps, ``chunk_steps`` per compiled chunk.

    Raises ``FloatingPointError`` naming the chunk if positions become NaN or inf (the returned
    state is never a poisoned one), and ``RuntimeError`` after ``max_reallocations`` overflows.
    """
    if n_steps < 0 or chunk_steps < 1:
        raise ValueError(f"need n_steps >= 0 and chunk_steps >= 1, got {n_steps}, {chunk_steps}")
    chunks: dict[int, Callable] = {}
    records: list[dict[str, np.ndarray]] = []
    done, reallocations = 0, 0
    while done < n_steps:
        length = min(chunk_steps, n_steps - done)
        if length not in chunks:
            chunks[length] = make_chunk(apply_fn, length, observe, **kwargs)
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
    observables = {key: np.concatenate([r[key] for r in records]) for key in (records[0] if records else {})}
    return MDRun(state, neighbor, observables, reallocations)
