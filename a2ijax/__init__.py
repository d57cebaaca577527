"""a2ijax: the A2I Transformer (Yu, Ha, Seo, Lee 2021) as a JAX/Flax potential for jax-md."""

from a2ijax.model import A2IConfig, A2ITransformer
from a2ijax.potential import (
    NeighborListOverflowError,
    a2i_neighbor_list,
    a2i_pair,
    batched_energy_and_forces,
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
    "reallocate",
]
