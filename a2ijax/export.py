"""A trained model as a function of explicit atoms, and as a serialized ``jax.export`` artefact.

Engines that decompose space (LAMMPS, a GPU pair style) hand a rank its own atoms and copies of
their neighbours ("ghosts"), with positions as they are: no box, no minimum image. The *ghost
form* of a model is the function they need::

    energy, forces, virial = fn(R [A, 3], species [A], mask [A], idx [C, K], rows [C], local [C], real [C],
                                owner [A])

* ``R``, ``species``, ``mask``: every atom the rank holds, local and ghost (``mask`` False on padding);
* ``rows``: the atoms whose energies are taken (the centres), ``idx``: each centre's neighbours as
  indices into ``R`` (``A``: an empty slot), ``real``: which rows are centres (False: padding),
  ``local``: which centres the rank owns;
* ``owner``: for each atom, the atom whose force its gradient adds to (itself for a local atom, its
  local original for a periodic image the rank holds, ``A`` for none);
* ``energy``: the sum of the owned centres' energies, ``forces [A, 3]``: ``-d/dR`` of the sum over
  all real centres, gathered by ``owner`` (exact on the atoms whose every neighbour within the cutoff
  is a centre, or whose images carry their gradients home: :mod:`a2ijax.lammps`), ``virial [3, 3]``:
  ``-d energy / d strain``.

:func:`ghost_form` builds it with the parameters inside; :mod:`a2ijax.lammps` runs it jitted each
step; :func:`export_model` serializes it with ``jax.export`` (StableHLO and the parameters as
constants) with symbolic sizes ``A``, ``C``, ``K`` (``K`` at least the model's attention keys), so
one artefact serves any system; :func:`load_exported` reads it back into a callable that checks its
inputs against what was exported and names a mismatch.

    a2ijax export lj --out lj.a2i-export            # or a checkpoint directory
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import space

from a2ijax.checkpoint import Checkpoint
from a2ijax.errors import InputError
from a2ijax.files import atomic_write
from a2ijax.model import A2ITransformer
from a2ijax.potential import default_float, per_atom_energies

#: The artefact's format tag, written into its metadata.
FORMAT = "a2ijax-ghost-form/1"
INPUTS = ("R", "species", "mask", "idx", "rows", "local", "real", "owner")


class ExportError(InputError):
    """An exported model called with inputs it was not exported for, or a damaged artefact."""


def ghost_form(checkpoint: Checkpoint, *, keys: int = 0, atom_chunk: int = 0, dtype: Any = None,
               ghost_centres: bool = True) -> Callable:
    """The ghost form of ``checkpoint``'s model (module docstring), parameters inside.

    ``keys``: attention-key slots (at least the model's ``attention_keys``; 0: the model's own): a
    capacity, more of which changes no finite energy. ``atom_chunk``: centres per rematerialised
    chunk (0: one program). Parameters are cast to ``dtype`` (None: JAX's default float).

    ``ghost_centres``: whether centres may be ghosts (another rank's atoms): the virial is then the
    strain derivative of the owned centres' energies (a second pass). Without (one rank: the centres
    are the local atoms, and every ghost is a periodic image of one), the virial is ``-sum_i R_i (x)
    dE/dR_i`` over all atoms, exact for a translation-invariant energy of them, in the one pass.
    """
    checkpoint.require_a2i("the ghost form")
    config = checkpoint.config.model
    if config.attention_keys:
        config = dataclasses.replace(config, attention_keys=max(keys, config.attention_keys))
    model = A2ITransformer(config)
    params = default_float(checkpoint.params) if dtype is None else jax.tree.map(
        lambda p: jnp.asarray(p, dtype), checkpoint.params)
    displacement, _ = space.free()

    def energies(R, species, mask, idx, rows, strain):
        def move(a, b, **kwargs):
            return displacement(a, b, perturbation=jnp.eye(3, dtype=R.dtype) + strain, **kwargs)

        return per_atom_energies(model, params, R, idx, move, species, mask, atom_chunk, centers=rows)

    def fn(R, species, mask, idx, rows, local, real, owner):
        zero = jnp.zeros((3, 3), R.dtype)

        def total(R):  # every real centre: the forces on atoms whose neighbours are all centres
            return jnp.sum(jnp.where(real, energies(R, species, mask, idx, rows, zero), 0.0))

        value, gradient = jax.value_and_grad(total)(R)
        # Each atom's gradient goes to the atom it is a copy of (``owner``; R.shape[0]: nowhere).
        forces = -jax.ops.segment_sum(gradient, owner, num_segments=R.shape[0])
        if not ghost_centres:  # the energy differentiated is the rank's own: virial from positions
            return value, forces, -jnp.einsum("ia,ib->ab", gradient, R)

        def owned(strain):  # the rank's share: the energies of the centres it owns
            return jnp.sum(jnp.where(local, energies(R, species, mask, idx, rows, strain), 0.0))

        energy, strain_grad = jax.value_and_grad(owned)(zero)
        return energy, forces, -strain_grad

    return fn


def export_model(checkpoint: Checkpoint, out: str | Path, *, dtype: str = "float32",
                 platforms: tuple[str, ...] = ("cpu", "cuda")) -> dict:
    """Serializes the ghost form of ``checkpoint`` with ``jax.export`` into ``out`` (the artefact) and
    ``out.json`` (its metadata: format, inputs, symbolic sizes, species, units, cutoff, key slots).

    Sizes are symbolic: ``A`` atoms, ``C`` centres, ``K`` slots with ``K >= M`` (the model's attention
    keys, which an exported program cannot raise); ``platforms``: where it may run.
    """
    config = checkpoint.config.model
    keys = config.attention_keys
    a, c, k = jax.export.symbolic_shape("A, C, K", constraints=[f"K >= {max(keys, 1)}"])
    float_type, int_type, bool_type = jnp.dtype(dtype), jnp.int32, jnp.bool_
    specs = (jax.ShapeDtypeStruct((a, 3), float_type), jax.ShapeDtypeStruct((a,), int_type),
             jax.ShapeDtypeStruct((a,), bool_type), jax.ShapeDtypeStruct((c, k), int_type),
             jax.ShapeDtypeStruct((c,), int_type), jax.ShapeDtypeStruct((c,), bool_type),
             jax.ShapeDtypeStruct((c,), bool_type), jax.ShapeDtypeStruct((a,), int_type))
    fn = ghost_form(checkpoint, dtype=float_type)
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(*specs)
    out = Path(out)
    sizes = dict(A="atoms, local and ghost", C="centres", K=f"neighbour slots per centre, at least {max(keys, 1)}")
    meta = dict(format=FORMAT, inputs=list(INPUTS), sizes=sizes,
                min_slots=max(keys, 1), dtype=dtype, platforms=list(platforms), symbols=list(checkpoint.symbols),
                units=checkpoint.meta.get("units", ""), cutoff=float(config.cutoff),
                attention_cutoff=float(config.attention_cutoff), attention_keys=keys,
                source=str(checkpoint.path), step=checkpoint.step,
                outputs=["energy of the local centres", "forces [A, 3]", "virial [3, 3]"])
    atomic_write(out, lambda f: f.write(exported.serialize()), binary=True)
    atomic_write(out.with_name(out.name + ".json"), lambda f: json.dump(meta, f, indent=1))
    return meta


@dataclasses.dataclass
class ExportedModel:
    """An artefact of :func:`export_model` read back: call it with the ghost form's inputs."""

    exported: Any
    meta: dict

    def __call__(self, R, species, mask, idx, rows, local, real, owner):
        R, idx = np.asarray(R), np.asarray(idx)
        a, c = R.shape[0], idx.shape[0]
        problems = []
        if R.ndim != 2 or R.shape[1] != 3:
            problems.append(f"R has shape {R.shape}, the model was exported for [A, 3]")
        if idx.ndim != 2 or idx.shape[1] < self.meta["min_slots"]:
            problems.append(f"idx has shape {idx.shape}: the model was exported for [C, K] with K >= "
                            f"{self.meta['min_slots']} (its attention keys)")
        for name, value, size in (("species", species, a), ("mask", mask, a), ("rows", rows, c),
                                  ("local", local, c), ("real", real, c), ("owner", owner, a)):
            if np.shape(value) != (size,):
                problems.append(f"{name} has shape {np.shape(value)}, expected ({size},)")
        if R.dtype != np.dtype(self.meta["dtype"]):
            problems.append(f"R is {R.dtype}, the model was exported for {self.meta['dtype']}")
        if problems:
            raise ExportError("inputs outside what the model was exported for: " + "; ".join(problems))
        return self.exported.call(R, np.asarray(species, np.int32), np.asarray(mask, bool), idx.astype(np.int32),
                                  np.asarray(rows, np.int32), np.asarray(local, bool), np.asarray(real, bool),
                                  np.asarray(owner, np.int32))


def load_exported(path: str | Path) -> ExportedModel:
    """The artefact at ``path`` and its metadata (``path.json``); a damaged one is an :class:`ExportError`."""
    path = Path(path)
    try:
        meta = json.loads(path.with_name(path.name + ".json").read_text())
        if meta.get("format") != FORMAT:
            raise ExportError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except ExportError:
        raise
    except Exception as error:  # missing files, JSON or flatbuffer damage
        raise ExportError(f"{path} is not a readable exported model: {type(error).__name__}: {error}") from error
    return ExportedModel(exported, meta)
