"""a2ijax: the A2I Transformer (Yu, Ha, Seo, Lee 2021) as a JAX/Flax potential for jax-md.

``import a2ijax`` gives the builders, the MD driver (``a2ijax.md``) and the shipped models
(``a2ijax.pretrained.load("lj")``); training, checkpoints,
reports, sampling and the ASE calculator are submodules imported by name (``a2ijax.train``,
``a2ijax.checkpoint``, ...), so that loading a potential for MD never imports the trainer.

The names below are imported on first use: importing jax-md starts JAX's backend, and a process
that joins a multi-process run (:func:`a2ijax.parallel.initialize`) must do so before that.
"""

import importlib

__version__ = "0.1.0"

_NAMES = {
    "A2IConfig": "a2ijax.model",
    "A2ITransformer": "a2ijax.model",
    "NeighborListOverflowError": "a2ijax.potential",
    "Potential": "a2ijax.potential",
    "a2i_neighbor_list": "a2ijax.potential",
    "a2i_periodic": "a2ijax.potential",
    "a2i_pair": "a2ijax.potential",
    "batched_energy_and_forces": "a2ijax.potential",
    "default_atom_chunk": "a2ijax.potential",
    "reallocate": "a2ijax.potential",
}

_MODULES = ("md", "pretrained")

__all__ = sorted([*_NAMES, *_MODULES])


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"a2ijax.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'a2ijax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
