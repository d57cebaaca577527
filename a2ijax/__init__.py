"""a2ijax: the A2I Transformer (Yu, Ha, Seo, Lee 2021) as a JAX/Flax potential for jax-md.

``import a2ijax`` gives the builders and the MD driver (``a2ijax.md``); training, checkpoints,
reports, sampling and the ASE calculator are submodules imported by name (``a2ijax.train``,
``a2ijax.checkpoint``, ...), so that loading a potential for MD never imports the trainer.
"""

from a2ijax import md
from a2ijax.model import A2IConfig, A2ITransformer
from a2ijax.potential import (
    NeighborListOverflowError,
    a2i_neighbor_list,
    a2i_pair,
    batched_energy_and_forces,
    default_atom_chunk,
    reallocate,
)

__version__ = "0.1.0"

__all__ = [
    "A2IConfig",
    "A2ITransformer",
    "NeighborListOverflowError",
    "a2i_neighbor_list",
    "a2i_pair",
    "batched_energy_and_forces",
    "default_atom_chunk",
    "md",
    "reallocate",
]
