"""ASE calculator for a trained A2I potential.

    from a2ijax.calculator import A2ICalculator
    atoms.calc = A2ICalculator("runs/lj")     # a work directory or any checkpoint directory
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress(); atoms.get_potential_energies()

Each call finds the neighbours on the host (as the trainer does), pads the neighbour capacity (and,
for a model with an attention range, the attention-key slots an atom needs: a capacity, see
:mod:`a2ijax.neighbors`) to a multiple of 8 so that small changes in the structure do not recompile,
and evaluates energy, per-atom energies, forces (``-grad E``) and, for periodic cells, the stress
(ASE's sign convention: the derivative of the energy with respect to strain over the volume) in one
jitted call. Computations
run in float64 when ``jax_enable_x64`` is on (parameters are cast), else in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ase
import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from jax_md import quantity

from a2ijax.batching import frame_box, frame_pairs, pad_frames
from a2ijax.checkpoint import Checkpoint, load_checkpoint
from a2ijax.dataset import structure_dataset
from a2ijax.geometry import attention_key_slots, dense_index
from a2ijax.potential import a2i_builder, fixed_neighbor_list


class A2ICalculator(Calculator):
    """Energy, per-atom energies, forces and stress of a trained A2I potential.

    Args:
      checkpoint: a :class:`a2ijax.checkpoint.Checkpoint`, or a path that :func:`load_checkpoint` reads.
      atom_chunk: atoms per rematerialised chunk (a run setting, see :func:`a2ijax.a2i_neighbor_list`).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    @classmethod
    def from_pretrained(cls, name: str, **kwargs) -> A2ICalculator:
        """The calculator of a model shipped with the package (``lj``, ``sw``, ``ka``: :mod:`a2ijax.pretrained`)."""
        from a2ijax import pretrained

        return cls(pretrained.load(name), **kwargs)

    def __init__(self, checkpoint: Checkpoint | str | Path, *, atom_chunk: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.checkpoint.require_a2i("A2ICalculator")
        self.cutoff = self.checkpoint.config.model.cutoff
        _, energy_fn = a2i_builder(self.checkpoint.config.model, atom_chunk=atom_chunk)

        def evaluate(params, R, species, idx, box, periodic: bool, keys: int):
            neighbor = fixed_neighbor_list(idx, R, keys)

            def total(R, **kwargs):  # kwargs: box, and perturbation for the stress
                per_atom = energy_fn(params, R, neighbor=neighbor, species=species, per_atom=True, **kwargs)
                return jnp.sum(per_atom), per_atom

            (energy, per_atom), grad = jax.value_and_grad(lambda R: total(R, box=box), has_aux=True)(R)
            stress = -quantity.stress(lambda R, **kw: total(R, **kw)[0], R, box) if periodic else None
            return energy, per_atom, -grad, stress

        self._evaluate = jax.jit(evaluate, static_argnames=("periodic", "keys"))

    def calculate(self, atoms: ase.Atoms | None = None, properties: Any = ("energy",),
                  system_changes: Any = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        frame = structure_dataset(atoms, self.checkpoint.symbols)
        periodic = bool(atoms.pbc.all())
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a fully periodic cell")
        ((i, j, d),) = frame_pairs(frame, self.cutoff)  # checks the box against the cutoff
        neighbors = [dense_index(i, j, len(atoms))]
        self.checkpoint.warn_if_closer_than_training(float(d.min()) if len(d) else float("inf"), "the structure")
        capacity = 8 * max(1, -(-neighbors[0].shape[1] // 8))
        model = self.checkpoint.config.model
        keys = 0
        if model.attention_keys:  # every atom attends to all its neighbours inside the range
            keys = attention_key_slots(i, d, model.attention_cutoff, model.attention_keys)
        padded = pad_frames(frame, np.zeros(1, int), neighbors, len(atoms), capacity, self.cutoff)
        dtype = jnp.result_type(float)
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), self.checkpoint.params)
        energy, per_atom, forces, stress = self._evaluate(
            params, jnp.asarray(atoms.get_positions(), dtype), jnp.asarray(padded.species[0]),
            jnp.asarray(padded.idx[0]), jnp.asarray(frame_box(frame, 0, self.cutoff), dtype), periodic, keys)
        if not np.isfinite(float(energy)):
            raise FloatingPointError("the potential returned a non-finite energy for this structure")
        self.results = dict(energy=float(energy), free_energy=float(energy), energies=np.asarray(per_atom, float),
                            forces=np.asarray(forces, float))
        if stress is not None:
            s = np.asarray(stress, float)
            self.results["stress"] = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
