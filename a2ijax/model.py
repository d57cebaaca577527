"""The A2I Transformer: self-attention over each atom's neighbour tokens -> per-atom energies.

Every atom ``i`` sees its neighbours ``j`` (within the cutoff ``r_c``) as a set of tokens, one per
neighbour, built from the displacement ``r_ij = R_j - R_i`` and the species of ``i`` and ``j``. A
stack of pre-norm transformer blocks lets the tokens of atom ``i`` attend to each other: the
attention between tokens ``j`` and ``k`` couples the triplet ``(j, i, k)``, which is where three-body
and higher terms come from. A readout pools the tokens into ``E_i``; the potential sums them.

Two featurisations (``A2IConfig.featurization``):

* ``"invariant"`` (default): tokens from a radial basis of ``d_ij``; every attention logit between
  tokens ``j`` and ``k`` gets a learned bias ``sum_l a_l(h_j) b_l(h_k) cos(theta_jik)^l``. The bias is
  folded into the query-key product as extra dimensions (``(r_j . r_k)^l`` is a dot product of
  tensor powers of the unit vectors), so it costs one matmul. Exactly E(3) invariant.
* ``"coordinates"``: the paper's minimal featurisation, tokens from ``r_ij / r_c`` and ``d_ij / r_c``.
  Invariant to permutations and translations, not rotations: train with random rotations.

Smoothness: a smooth envelope ``c(d)`` (zero with vanishing derivatives at ``r_c``) weights every
key in the softmax, ``w_jk = c_k exp(s_jk) / (exp(s_sink) + sum_k c_k exp(s_jk))``, and every token
in the pooling. A neighbour at the cutoff has no influence, so energies and forces stay continuous
as atoms cross it. The learned sink logit keeps the denominator away from zero.

Attention weights (:mod:`a2ijax.analysis`): ``model.apply(..., mutable=["intermediates"])`` returns, per
block, the weights ``w_jk`` ``[n, H, K, M]`` and the sink's share ``[n, H, K]`` (the two sum to one
over the keys), and the key slots ``[n, M]`` when the attention range is limited.

Attention range (optional, ``attention_cutoff`` ``r_att`` and ``attention_keys`` ``M``): the keys of
every query are the ``M`` nearest neighbours, weighted by an envelope in ``d / r_att`` instead of
``d / r_c``, so the attention costs ``K x M`` instead of ``K^2``; the queries (every token) and the
pooled readout keep the full cutoff.

Pair pathway (optional, ``pair_radial`` ``P``): ``E_i`` gains ``1/2 sum_j V_ab(d_ij)`` over every
neighbour within the cutoff, ``V_ab = sum_p w_abp c(d/r_c) sin(p pi d/r_c) / (d/r_c)`` with ``w`` a
symmetric table per species pair: an exact, smooth pair potential beside the transformer, with no
normalisation between it and the energy, so its weights can start from a least-squares fit
(``a2ijax.pair_fit``) and the transformer learns the many-body rest (its readout starts at zero).
With an attention range as well, the transformer's tokens are the ``M`` keys alone: attention, the
blocks' dense layers and the pooled readout work on ``M`` tokens inside ``r_att`` instead of ``K``
inside ``r_c``, and the pair pathway carries the tail between ``r_att`` and ``r_c``. This departs
from the paper's single pathway; docs/design.md, "The pair pathway", says why.

Core repulsion (optional, ``core_radii``): a fixed pair wall that is exactly zero, with its first two
derivatives, at and beyond a radius per species pair, and grows like ``(r_ab / d)^12`` below it. The
trainer sets the radii to the closest approach of each species pair in the training data, so the
wall never touches a training pair and the fit is unchanged; in MD it keeps atoms out of the short
distances that no training frame shows, where a learned potential is free to be attractive.

This module knows only jax and flax; the jax-md glue lives in ``a2ijax.potential``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from a2ijax.errors import InputError

Array = jax.Array

FEATURIZATIONS = ("invariant", "coordinates")
# Log-weight of a key outside the cutoff: exp of it underflows to exactly 0 in every float dtype.
DEAD_KEY_LOG_WEIGHT = -1.0e4
ENVELOPES = ("polynomial", "cosine")
RADIAL_EMBEDDINGS = ("linear", "pair_mlp")
READOUTS = ("pooled", "tokens")


@dataclasses.dataclass(frozen=True)
class A2IConfig:
    """Hyperparameters of the A2I Transformer. Frozen: a config is data, hashable and static.

    Attributes:
      cutoff: neighbour cutoff ``r_c`` in the length unit of the positions. Neighbours at or
        beyond it have no influence on the energy.
      n_species: number of species; species ids run over ``0 .. n_species - 1``.
      width: token width ``D`` (embedding size of every token).
      heads: attention heads ``H``; ``width`` must be divisible by ``heads``.
      layers: number of transformer blocks.
      mlp_ratio: hidden width of each block's MLP, as a multiple of ``width``.
      n_radial: size of the radial (Bessel) basis that featurises ``d_ij`` (invariant tokens).
      radial_embedding: how a token's geometry features become its embedding. ``"linear"``: one
        linear map, to which the centre's and the neighbour's species embeddings are added.
        ``"pair_mlp"``: a two-layer MLP whose hidden layer also gets an embedding of the ordered
        species pair ``(i, j)``, so the radial shape (where a pair wall rises) can differ per pair.
      readout: how the tokens become ``E_i``. ``"pooled"``: an MLP of the envelope-weighted mean of
        the tokens. ``"tokens"``: an MLP of every token, whose outputs are summed with the envelope
        weights, ``E_i = sum_j c_j g(h_j) / avg_neighbors``: a sum of per-neighbour terms, which holds a
        pair potential exactly (each term's size is free, where the pooled readout sees a mean of
        normalised tokens).
      pair_radial: size ``P`` of the Bessel basis of the pair pathway (0: none, the paper's single
        pathway); see the module docstring. With ``attention_keys`` set, the transformer's tokens
        are the ``M`` keys, and its pooled sum is divided by ``avg_neighbors (r_att / r_c)^3``, the
        same density's count inside ``r_att``.
      attention_cutoff: attention range ``r_att`` (0: the cutoff). With ``0 < r_att <= r_c``, every
        token (query) attends only to the ``attention_keys`` nearest neighbours, weighted by an
        envelope that vanishes at ``r_att``: attention costs ``K x M`` instead of ``K^2``, while the
        tokens (all of them queries) and the pooled readout still span the full cutoff.
      attention_keys: ``M``, the key slots per atom when ``attention_cutoff`` is set. An atom with
        more than ``M`` neighbours inside ``r_att`` would lose keys that still carry weight (the
        energy would jump as neighbours change rank), so its energy and forces are NaN instead;
        the trainer checks the data against ``M`` before it starts (``a2ijax.batching``). ``M`` is
        a capacity, not a parameter: more slots change no finite energy (the keys beyond ``r_att``
        weigh exactly zero), so MD lists and the ASE calculator raise it where an atom needs more
        (``a2ijax.neighbors``).
      angular_order: highest power ``l`` of ``cos(theta_jik)`` in the learned attention bias
        (``invariant`` only); adds ``sum_l 3**l`` dimensions to each query/key. 0 disables angles.
      envelope: ``"polynomial"`` (zero with vanishing first and second derivatives at ``r_c``) or
        ``"cosine"`` (vanishing first derivative only).
      envelope_exponent: exponent ``p`` of the polynomial envelope.
      featurization: ``"invariant"`` or ``"coordinates"`` (see the module docstring).
      avg_neighbors: typical number of neighbours inside the cutoff; divides the pooled sum so that
        activations stay of order one. A constant, not learned; changing it changes the model.
      core_radii: radii ``r_ab`` of the core repulsion, the ``n_species x n_species`` symmetric matrix
        flattened row by row; empty: no core repulsion. See :func:`core_repulsion`.
      core_energy: energy scale ``E_0`` of the core repulsion (energy unit of the data).
      param_dtype: dtype of the parameters, e.g. ``"float32"`` or ``"float64"``.

    How a model is run (the compute dtype, atom chunking) is not part of what it is: those are
    arguments of :class:`A2ITransformer` and of the builders in
    ``a2ijax.potential``, so a model trained on one device runs on another with its own settings.
    """

    cutoff: float = 2.5
    n_species: int = 1
    width: int = 32
    heads: int = 4
    layers: int = 2
    mlp_ratio: int = 2
    n_radial: int = 8
    radial_embedding: str = "linear"
    readout: str = "pooled"
    pair_radial: int = 0
    attention_cutoff: float = 0.0
    attention_keys: int = 0
    angular_order: int = 2
    envelope: str = "polynomial"
    envelope_exponent: int = 6
    featurization: str = "invariant"
    avg_neighbors: float = 32.0
    core_radii: tuple[float, ...] = ()
    core_energy: float = 0.0
    param_dtype: str = "float32"

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise InputError(f"A2IConfig: {what}")

        need(float(self.cutoff) > 0, f"cutoff must be positive, got {self.cutoff!r}")
        for name in ("n_species", "width", "heads", "layers", "mlp_ratio", "n_radial"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
        for name in ("angular_order", "attention_keys", "pair_radial"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, f"{name} must be an int >= 0, got {value!r}")
        need(self.width % self.heads == 0,
             f"width ({self.width}) must be divisible by heads ({self.heads})")
        need(self.radial_embedding in RADIAL_EMBEDDINGS,
             f"radial_embedding must be one of {RADIAL_EMBEDDINGS}, got {self.radial_embedding!r}")
        need(self.readout in READOUTS, f"readout must be one of {READOUTS}, got {self.readout!r}")
        need(0 <= float(self.attention_cutoff) <= float(self.cutoff),
             f"attention_cutoff must lie in [0, cutoff = {self.cutoff}] (0: the cutoff), got {self.attention_cutoff!r}")
        need((float(self.attention_cutoff) > 0) == (self.attention_keys > 0),
             f"attention_cutoff ({self.attention_cutoff!r}) and attention_keys ({self.attention_keys!r}) go "
             "together: both positive (a limited attention range) or both 0")
        need(self.envelope in ENVELOPES, f"envelope must be one of {ENVELOPES}, got {self.envelope!r}")
        need(isinstance(self.envelope_exponent, int) and self.envelope_exponent >= 2,
             f"envelope_exponent must be an int >= 2, got {self.envelope_exponent!r}")
        need(self.featurization in FEATURIZATIONS,
             f"featurization must be one of {FEATURIZATIONS}, got {self.featurization!r}")
        if self.core_radii:
            s = self.n_species
            need(len(self.core_radii) == s * s,
                 f"core_radii must hold n_species**2 = {s * s} radii (the matrix row by row), "
                 f"got {len(self.core_radii)}")
            need(all(float(r) > 0 for r in self.core_radii), f"core_radii must be positive, got {self.core_radii!r}")
            need(all(self.core_radii[a * s + b] == self.core_radii[b * s + a] for a in range(s) for b in range(s)),
                 f"core_radii must be a symmetric matrix, got {self.core_radii!r}")
        need(float(self.core_energy) >= 0, f"core_energy must be >= 0, got {self.core_energy!r}")
        need(float(self.avg_neighbors) > 0, f"avg_neighbors must be positive, got {self.avg_neighbors!r}")
        need(is_float_dtype(self.param_dtype), f"param_dtype must name a floating dtype, got {self.param_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_float_dtype(name: Any) -> bool:
    """Whether ``name`` names a floating-point dtype (``"float32"``, ``"bfloat16"``, ...)."""
    try:
        return bool(jnp.issubdtype(jnp.dtype(name), jnp.floating))
    except TypeError:
        return False


def envelope(x: Array, kind: str = "polynomial", p: int = 6) -> Array:
    """Smooth cutoff ``c(x)`` of the reduced distance ``x = d / r_c``: 1 at 0, 0 for ``x >= 1``."""
    inside = x < 1.0
    x = jnp.where(inside, x, 0.0)  # keep the unused branch finite for gradients
    if kind == "polynomial":
        # 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2): c, c', c'' vanish at x = 1.
        xp = x**p
        c = 1.0 - 0.5 * (p + 1) * (p + 2) * xp + p * (p + 2) * xp * x - 0.5 * p * (p + 1) * xp * x * x
    elif kind == "cosine":
        c = 0.5 * (jnp.cos(jnp.pi * x) + 1.0)
    else:
        raise InputError(f"unknown envelope {kind!r}; expected one of {ENVELOPES}")
    return jnp.where(inside, c, 0.0)


CORE_EXPONENT = 12


def core_repulsion(x: Array, p: int = CORE_EXPONENT) -> Array:
    """Wall ``x^-p`` minus its second-order Taylor polynomial at ``x = 1``, for ``x = d / r_ab < 1``; 0 beyond.

    Value, first and second derivative vanish at ``x = 1`` (the Taylor remainder of a convex,
    decreasing function), so the wall switches on smoothly; it is positive and decreasing below 1
    and diverges like ``x^-p`` at 0.
    """
    inside = x < 1.0
    x = jnp.where(inside, x, 1.0)  # keep the unused branch finite for gradients
    t = x - 1.0
    return jnp.where(inside, x ** -p - 1.0 + p * t - 0.5 * p * (p + 1) * t * t, 0.0)


def bessel_basis(x: Array, n: int) -> Array:
    """``sin(k pi x) / x`` for ``k = 1..n`` of the reduced distance ``x > 0``: ``[..., n]``."""
    k = jnp.arange(1, n + 1, dtype=x.dtype)
    return jnp.sin(jnp.pi * k * x[..., None]) / x[..., None]


def tensor_powers(u: Array, order: int) -> list[Array]:
    """Flattened tensor powers ``u^(x)l`` for ``l = 0..order`` of vectors ``u [..., dim]``.

    ``<u^(x)l, v^(x)l> = (u . v)^l``, so a dot product of these features gives powers of the cosine.
    """
    power = jnp.ones(u.shape[:-1] + (1,), u.dtype)
    powers = [power]
    for _ in range(order):
        power = (power[..., :, None] * u[..., None, :]).reshape(u.shape[:-1] + (-1,))
        powers.append(power)
    return powers


def _gather_slots(a: Array, slots: Array) -> Array:
    """``a [n, K, ...]`` at the neighbour slots ``slots [n, M]`` of each atom: ``[n, M, ...]``."""
    return jnp.take_along_axis(a, slots.reshape(slots.shape + (1,) * (a.ndim - 2)), axis=1)


def _lookup(table: Array, ids: Array) -> Array:
    """Rows of ``table`` for integer ``ids``; an id out of range gives NaN, never a clamped row."""
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)


class SelfAttention(nn.Module):
    """Multi-head attention among the tokens of each atom, envelope-weighted keys, a sink logit."""

    config: A2IConfig
    dtype: Any = None  # compute dtype; None: promote from inputs and parameters

    @nn.compact
    def __call__(self, x: Array, c: Array, angular: list[Array] | None, keys: Array | None = None) -> Array:
        """``x [n, K, D]`` tokens, all of them queries; ``keys [n, M]`` the slots that serve as keys and
        values (None: all ``K``); ``c [n, M or K]`` the keys' envelope weights; ``angular`` the tokens'
        tensor powers (:func:`tensor_powers`) or None."""
        cfg = self.config
        n, k, d = x.shape
        h, dh = cfg.heads, cfg.width // cfg.heads
        n_ang = (cfg.angular_order + 1) if angular is not None else 0
        dense = dict(dtype=self.dtype, param_dtype=cfg.param_dtype)
        # One fused projection for queries, keys, values and the angular bias coefficients.
        proj = nn.Dense(3 * d + 2 * h * n_ang, name="qkv", **dense)(x)  # [n, K, 3D + 2H(L+1)]
        key_proj, key_angular = proj, angular
        if keys is not None:
            key_proj = _gather_slots(proj, keys)  # [n, M, 3D + 2H(L+1)]
            key_angular = None if angular is None else [_gather_slots(y, keys) for y in angular]
        m = key_proj.shape[1]
        q = proj[..., :d].reshape(n, k, h, dh) / math.sqrt(dh)
        kk, v = (key_proj[..., i * d:(i + 1) * d].reshape(n, m, h, dh) for i in (1, 2))
        if angular is not None:
            a = proj[..., 3 * d:3 * d + h * n_ang].reshape(n, k, h, n_ang)
            b = key_proj[..., 3 * d + h * n_ang:].reshape(n, m, h, n_ang)
            # Extra query/key dimensions whose dot product is sum_l a_l(j) b_l(k) cos^l(theta_jik).
            q = jnp.concatenate([q] + [a[..., l, None] * y[:, :, None, :] for l, y in enumerate(angular)], -1)
            kk = jnp.concatenate([kk] + [b[..., l, None] * y[:, :, None, :] for l, y in enumerate(key_angular)], -1)
        # One more key dimension carries log c_k (a large negative number for dead keys, c_k = 0),
        # against a constant 1 in the query: the matmul then yields log(c_k) + s_jk directly.
        log_c = jnp.where(c > 0, jnp.log(jnp.where(c > 0, c, 1.0)), DEAD_KEY_LOG_WEIGHT).astype(q.dtype)
        q = jnp.concatenate([q, jnp.ones(q.shape[:-1] + (1,), q.dtype)], -1)
        kk = jnp.concatenate([kk, jnp.broadcast_to(log_c[:, :, None, None], kk.shape[:-1] + (1,))], -1)
        lw = jnp.einsum("nqhd,nkhd->nhqk", q, kk)  # [n, H, K, M] log-weights log(c_k) + s_jk
        sink = self.param("sink", nn.initializers.zeros, (h,), cfg.param_dtype).astype(lw.dtype)
        sink = sink[None, :, None, None]  # [1, H, 1, 1]
        mx = jax.lax.stop_gradient(jnp.maximum(jnp.max(lw, -1, keepdims=True), sink))
        e = jnp.exp(lw - mx)  # [n, H, K, M], each <= 1; exactly 0 for dead keys
        denominator = jnp.exp(sink - mx) + jnp.sum(e, -1, keepdims=True)  # [n, H, K, 1], >= 1
        if self.is_mutable_collection("intermediates"):  # for a2ijax.analysis: the weights and the sink's share
            self.sow("intermediates", "weights", e / denominator)  # [n, H, K, M]
            self.sow("intermediates", "sink", (jnp.exp(sink - mx) / denominator)[..., 0])  # [n, H, K]
        # Normalise after the value product: a [n, K, H, dh] division instead of a [n, H, K, M] one.
        out = jnp.einsum("nhqk,nkhd->nqhd", e, v) / jnp.moveaxis(denominator, 1, 2)
        out = out.reshape(n, k, d)
        return nn.Dense(d, name="out", **dense)(out)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    config: A2IConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, c: Array, angular: list[Array] | None, keys: Array | None = None) -> Array:
        cfg = self.config
        dense = dict(dtype=self.dtype, param_dtype=cfg.param_dtype)
        attention = SelfAttention(cfg, self.dtype, name="attention")
        x = x + attention(nn.LayerNorm(name="norm_attention", **dense)(x), c, angular, keys)
        y = nn.LayerNorm(name="norm_mlp", **dense)(x)
        y = nn.Dense(cfg.mlp_ratio * cfg.width, name="mlp_in", **dense)(y)
        y = nn.Dense(cfg.width, name="mlp_out", **dense)(nn.silu(y))
        return x + y


class A2ITransformer(nn.Module):
    """Per-atom energies from neighbour displacements.

    Inputs are per atom, so any subset of atoms (a chunk) can be evaluated on its own:
      dR: ``[n, K, dim]`` displacements ``r_ij = R_j - R_i`` to the ``K`` neighbour slots.
      species_center: ``[n]`` species ids of the atoms.
      species_neighbor: ``[n, K]`` species ids of the neighbours.
      pair_mask: ``[n, K]`` True where the slot holds a real neighbour.
    Returns ``[n]`` per-atom energies. ``dtype`` is the compute dtype (None: promote from the inputs
    and parameters; ``"bfloat16"`` halves matmul traffic), a run setting that parameters do not depend on.
    """

    config: A2IConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, dR: Array, species_center: Array, species_neighbor: Array, pair_mask: Array) -> Array:
        cfg = self.config
        dense = dict(dtype=self.dtype, param_dtype=cfg.param_dtype)
        n, k, dim = dR.shape
        rc = jnp.asarray(cfg.cutoff, dR.dtype)
        # Empty slots become a vector at 2 r_c: outside the envelope, finite gradients.
        far = jnp.zeros((dim,), dR.dtype).at[0].set(2.0 * rc)
        dR = jnp.where(pair_mask[..., None], dR, far)  # [n, K, dim]
        d = jnp.sqrt(jnp.sum(dR * dR, -1))  # [n, K]
        x = d / rc
        c = envelope(x, cfg.envelope, cfg.envelope_exponent)  # [n, K]

        keys, c_keys, crowded = None, c, None
        if cfg.attention_keys:
            # The M nearest slots are the keys, weighted by an envelope that vanishes at r_att: a
            # neighbour entering or leaving them at r_att carries no weight, so the energy stays smooth.
            r_att = jnp.asarray(cfg.attention_cutoff, d.dtype)
            minus_d, keys = jax.lax.top_k(-d, min(cfg.attention_keys, k))  # [n, M] each
            c_keys = envelope(-minus_d / r_att, cfg.envelope, cfg.envelope_exponent)  # [n, M]
            crowded = jnp.sum(d < r_att, -1) > cfg.attention_keys  # [n]: keys with weight were cut off
        # The tokens: every neighbour slot, or with the pair pathway and an attention range, the M keys.
        t_dR, t_d, t_x, t_species, t_c, pooled_count = dR, d, x, species_neighbor, c, cfg.avg_neighbors
        if cfg.pair_radial and keys is not None:
            t_dR, t_species = _gather_slots(dR, keys), _gather_slots(species_neighbor, keys)  # [n, M, ...]
            t_d, t_c = -minus_d, c_keys
            t_x = t_d / r_att
            pooled_count = cfg.avg_neighbors * (cfg.attention_cutoff / cfg.cutoff) ** 3
            self.sow("intermediates", "tokens", keys)  # the token slots (every token is a key)
            keys = None
        if keys is not None:
            self.sow("intermediates", "keys", keys)  # for a2ijax.analysis; nothing unless asked for

        init = nn.initializers.normal(1.0)
        center_table = self.param("center_embedding", init, (cfg.n_species, cfg.width), cfg.param_dtype)
        neighbor_table = self.param("neighbor_embedding", init, (cfg.n_species, cfg.width), cfg.param_dtype)
        center = _lookup(center_table, species_center)  # [n, D]
        neighbor = _lookup(neighbor_table, t_species)  # [n, T, D]

        angular = None
        if cfg.featurization == "invariant":
            geometry = bessel_basis(t_x, cfg.n_radial)  # [n, T, n_radial]
            if cfg.angular_order > 0:
                angular = tensor_powers(t_dR / t_d[..., None], cfg.angular_order)  # [n, T, dim^l] each
        else:
            geometry = jnp.concatenate([t_dR / rc, (t_d / rc)[..., None]], -1)  # [n, T, dim + 1]
        embedded = nn.Dense(cfg.width, name="embed_geometry", **dense)(geometry)  # [n, T, D]
        if cfg.radial_embedding == "pair_mlp":
            pair_table = self.param("pair_embedding", init, (cfg.n_species**2, cfg.width), cfg.param_dtype)
            pair = _lookup(pair_table, species_center[:, None] * cfg.n_species + t_species)  # [n, T, D]
            embedded = nn.Dense(cfg.width, name="embed_geometry_out", **dense)(nn.silu(embedded + pair))
        tokens = embedded + neighbor + center[:, None, :]

        for layer in range(cfg.layers):
            tokens = Block(cfg, self.dtype, name=f"block_{layer}")(tokens, c_keys, angular, keys)  # [n, T, D]
        tokens = nn.LayerNorm(name="norm_out", **dense)(tokens)
        # With the pair pathway the readout starts at zero: step 0 is the pair potential alone.
        readout = nn.Dense(1, name="readout", **dense,
                           **(dict(kernel_init=nn.initializers.zeros) if cfg.pair_radial else {}))
        if cfg.readout == "tokens":  # sum of per-token energies
            y = nn.Dense(cfg.width, name="readout_hidden", **dense)(tokens + center[:, None, :].astype(tokens.dtype))
            y = readout(nn.silu(y))[..., 0]  # [n, T]
            y = jnp.einsum("nk,nk->n", t_c.astype(y.dtype), y) / pooled_count  # [n]
        else:  # an MLP of the pooled tokens
            pooled = jnp.einsum("nk,nkd->nd", t_c.astype(tokens.dtype), tokens) / pooled_count  # [n, D]
            y = nn.Dense(cfg.width, name="readout_hidden", **dense)(pooled + center.astype(pooled.dtype))
            y = readout(nn.silu(y))[:, 0]  # [n]

        scale = self.param("energy_scale", nn.initializers.ones, (cfg.n_species,), cfg.param_dtype)
        shift = self.param("energy_shift", nn.initializers.zeros, (cfg.n_species,), cfg.param_dtype)
        energy = _lookup(scale, species_center) * y + _lookup(shift, species_center)
        if cfg.pair_radial:
            w = self.param("pair_weights", nn.initializers.zeros, (cfg.n_species, cfg.n_species, cfg.pair_radial),
                           cfg.param_dtype)
            w = 0.5 * (w + jnp.swapaxes(w, 0, 1))  # V_ab = V_ba
            phi = c[..., None] * bessel_basis(x, cfg.pair_radial)  # [n, K, P]; 0 at empty slots (x = 2)
            w_ij = w[species_center[:, None], species_neighbor]  # [n, K, P]
            energy = energy + 0.5 * jnp.einsum("nkp,nkp->n", phi.astype(w_ij.dtype), w_ij).astype(energy.dtype)
        if cfg.core_radii:
            radii = jnp.asarray(cfg.core_radii, d.dtype).reshape(cfg.n_species, cfg.n_species)
            r_ab = radii[species_center[:, None], species_neighbor]  # [n, K]; padded slots sit at 2 r_c
            wall = jnp.where(pair_mask, core_repulsion(d / r_ab), 0.0)
            energy = energy + 0.5 * cfg.core_energy * jnp.sum(wall, -1).astype(energy.dtype)  # half of each pair
        if crowded is not None:
            # NaN, with NaN gradients (forces), where an atom has more than M keys inside r_att.
            energy = energy * jnp.where(crowded, jnp.nan, 1.0).astype(energy.dtype)
        return energy
