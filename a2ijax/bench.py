"""``a2ijax bench``: speed and memory of A2I next to jax-md's own potentials, on one LJ liquid.

Every potential runs the same job: a Lennard-Jones liquid at density 0.84 (a jittered simple-cubic
lattice, so every N has the same neighbour density), cutoff 2.5 sigma, jax-md's neighbour list with
the same skin, float32 unless ``jax_enable_x64``. For each potential and each N:

* **energy+forces**: ahead-of-time compile time (``lower().compile()``) apart from the median time
  of ``repeats`` calls after a warm-up;
* **MD**: ``jax_md.simulate.nve`` with the neighbour list updated every step, ``chunk`` steps in one
  compiled ``lax.scan`` (the state and list donated, no host sync inside a chunk), compile time apart;
  atom-steps/s and simulated time per day at the LJ time step 0.005;
* **work**: XLA's count of floating-point operations per atom of one energy+forces call, and the
  rate it reaches as a fraction of this device's measured matmul rate (a square float product);
* **memory**: XLA's buffer plan of the compiled MD chunk (temporaries + arguments + outputs), the
  device's peak bytes in use where the device reports them, and the process's peak resident memory;
  both peaks are "so far" in the process (they never go down: run one potential and ascending sizes
  to read them per size).

The potentials, all built the jax-md way (``neighbor_fn`` + an energy of ``(params, R, neighbor)``):
``lj`` (``jax_md.energy.lennard_jones_neighbor_list``: the floor any learned potential pays),
``a2i-small``/``a2i``/``a2i-large`` (this package), and jax-md's ``nequip``, ``graph_network`` and
``behler_parrinello`` at the same cutoff, each with its jax-md default sizes unless stated in
:data:`BASELINES`. Parameter counts are reported with every row. An out-of-memory error is recorded
and skips the larger sizes of that potential; so does a chunk slower than ``max_chunk_s``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import energy, partition, simulate, space

from a2ijax.baselines import DESCRIPTIONS, baseline_neighbor_list
from a2ijax.files import atomic_write
from a2ijax.model import A2IConfig
from a2ijax.potential import a2i_neighbor_list, default_atom_chunk
from a2ijax.systems import lattice_positions

DENSITY = 0.84
CUTOFF = 2.5
DT = 0.005
KT = 0.1  # small initial temperature: the lattice start stays a lattice start during timing

#: A2I variants: small, the default, large.
A2I_VARIANTS = {
    "a2i-small": A2IConfig(cutoff=CUTOFF, width=16, heads=2, layers=1, avg_neighbors=55.0),
    "a2i": A2IConfig(cutoff=CUTOFF, avg_neighbors=55.0),
    "a2i-large": A2IConfig(cutoff=CUTOFF, width=64, heads=4, layers=3, avg_neighbors=55.0),
}
#: jax-md potentials and the settings that differ from jax-md's defaults.
BASELINES = {"lj": "jax_md.energy.lennard_jones_neighbor_list(sigma=1, epsilon=1, r_cutoff=2.5)", **DESCRIPTIONS}
POTENTIALS = tuple(BASELINES) + tuple(A2I_VARIANTS)


class BlowUp(RuntimeError):
    """A potential's MD overflowed its neighbour list or produced non-finite positions while timed."""


@dataclasses.dataclass
class Built:
    """A potential on one box: its neighbour-list builder, ``energy(params, R, neighbor)`` and params."""

    neighbor_fn: partition.NeighborFn
    energy: Callable[..., jax.Array]
    params: Any
    parameters: int


def liquid(n: int, seed: int = 0) -> tuple[jax.Array, float]:
    """``n`` atoms on a jittered lattice at :data:`DENSITY` and the box side."""
    side = (n / DENSITY) ** (1 / 3)
    return lattice_positions(n, side, jitter=0.1, seed=seed), side


def count(params: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def build(name: str, displacement: Callable, side: float, R: jax.Array, skin: float, key: jax.Array,
          capacity_multiplier: float = 1.25, overrides: dict | None = None, atom_chunk: int | None = None,
          dtype: str | None = None) -> Built:
    """The potential ``name`` (one of :data:`POTENTIALS`) in a cubic box of side ``side``;
    ``overrides`` replace fields of an A2I variant's config (e.g. ``width=64``); ``atom_chunk`` and
    ``dtype`` are the A2I run settings (:func:`a2ijax.a2i_neighbor_list`)."""
    if (overrides or atom_chunk is not None or dtype is not None) and name not in A2I_VARIANTS:
        raise ValueError(f"config overrides {overrides}, atom_chunk and dtype apply to the A2I variants only, "
                         f"not to {name!r}")
    nl = dict(dr_threshold=skin, capacity_multiplier=capacity_multiplier)
    if name == "lj":
        _, energy_fn = energy.lennard_jones_neighbor_list(displacement, side, r_cutoff=CUTOFF, **nl)
        # jax-md's LJ list carries its cutoff as an array in the list's static fields, which breaks
        # jit's cache comparison when the same shapes come back; the same list with a float cutoff:
        neighbor_fn = partition.neighbor_list(displacement, side, CUTOFF, format=partition.OrderedSparse, **nl)
        return Built(neighbor_fn, lambda params, R, neighbor: energy_fn(R, neighbor=neighbor), None, 0)
    if name in A2I_VARIANTS:
        config = dataclasses.replace(A2I_VARIANTS[name], **(overrides or {}))
        neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement, side, config, atom_chunk=atom_chunk,
                                                             dtype=dtype, **nl)
        params = init_fn(key, R, neighbor=neighbor_fn.allocate(R))
        return Built(neighbor_fn, lambda params, R, neighbor: energy_fn(params, R, neighbor=neighbor), params,
                     count(params))
    if name in DESCRIPTIONS:
        neighbor_fn, init_fn, energy_fn = baseline_neighbor_list(name, displacement, side, cutoff=CUTOFF,
                                                                 avg_neighbors=55.0, key=key, **nl)
        params = init_fn(key, R, neighbor_fn.allocate(R))
        return Built(neighbor_fn, energy_fn, params, count(params))
    raise ValueError(f"unknown potential {name!r}; known: {POTENTIALS}")


def _compile(fn: Callable, *args, donate: tuple[int, ...] = ()) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _planned_bytes(compiled: Any) -> int | None:
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return int(memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes)


def _flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def median_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``call()`` over ``repeats`` calls after one warm-up call."""
    jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _energy_and_forces(energy_fn: Callable) -> Callable:
    def fn(params, R, neighbor):
        e, g = jax.value_and_grad(energy_fn, argnums=1)(params, R, neighbor)
        return e, -g

    return fn


def _device_peak() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _host_peak_mib() -> float | None:
    """This process's peak resident memory so far (Linux ``VmHWM``; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def measure(name: str, n: int, *, skin: float = 0.3, capacity_multiplier: float = 1.25,
            overrides: dict | None = None, atom_chunk: int | None = None, dtype: str | None = None,
            donate: bool = True, sync_every_step: bool = False, chunk: int = 50, chunks: int = 3, repeats: int = 5,
            seed: int = 0) -> dict:
    """Energy+forces latency, MD throughput, compile times and memory of ``name`` at ``n`` atoms.

    The defaults are the bench's; the other settings exist to measure what each costs
    (``experiments/speed_ablation.py``): ``overrides`` of the A2I config, its run settings
    ``atom_chunk`` and ``dtype``, no buffer donation, or one
    compiled step per call with a host read of the overflow flag after every step instead of a
    ``chunk``-step scan.
    """
    R, side = liquid(n, seed)
    displacement, shift = space.periodic(side)
    settings = dict(skin=skin, capacity_multiplier=capacity_multiplier, overrides=overrides, atom_chunk=atom_chunk,
                    dtype=dtype)
    pot = build(name, displacement, side, R, key=jax.random.PRNGKey(seed), **settings)
    nbrs = pot.neighbor_fn.allocate(R)
    row = dict(potential=name, n=n, parameters=pot.parameters, neighbors=int(nbrs.idx.shape[-1]),
               neighbor_format=str(nbrs.format.name), skin=skin, capacity_multiplier=capacity_multiplier,
               overrides=overrides or {}, atom_chunk=atom_chunk, dtype=dtype, donate=donate,
               sync_every_step=sync_every_step)

    compiled, row["force_compile_s"] = _compile(_energy_and_forces(pot.energy), pot.params, R, nbrs)
    row["force_s"] = median_seconds(lambda: compiled(pot.params, R, nbrs), repeats)
    row["force_us_per_atom"] = 1e6 * row["force_s"] / n
    # XLA counts a loop body once: a chunked A2I is costed as the same model compiled unchunked.
    chunked = name in A2I_VARIANTS and (default_atom_chunk() if atom_chunk is None else atom_chunk) > 0
    row["force_flop_per_atom"] = (flops(name, n, seed=seed, **settings) if chunked else _flops(compiled)) / n

    length = 1 if sync_every_step else chunk

    def md_steps(params, state, neighbor):
        _, apply = simulate.nve(lambda R, neighbor: pot.energy(params, R, neighbor), shift, DT)

        def step(carry, _):
            state, neighbor = carry
            state = apply(state, neighbor=neighbor)
            return (state, neighbor.update(state.position)), None

        (state, neighbor), _ = jax.lax.scan(step, (state, neighbor), None, length=length)
        return state, neighbor

    init, _ = simulate.nve(lambda R, neighbor: pot.energy(pot.params, R, neighbor), shift, DT)
    state = init(jax.random.PRNGKey(seed + 1), R, kT=KT, neighbor=nbrs)
    md, row["md_compile_s"] = _compile(md_steps, pot.params, state, nbrs, donate=(1, 2) if donate else ())
    planned = _planned_bytes(md)
    row["md_planned_mib"] = None if planned is None else planned / 2**20

    def md_chunk(state, nbrs):  # chunk steps: one call, or chunk calls of one step
        for _ in range(chunk // length):
            state, nbrs = md(pot.params, state, nbrs)
            if sync_every_step and bool(nbrs.did_buffer_overflow):
                raise BlowUp(f"{name} at N={n}: the neighbour list overflowed")
        return state, nbrs

    state, nbrs = jax.block_until_ready(md_chunk(state, nbrs))  # warm-up chunk
    if bool(nbrs.did_buffer_overflow):
        raise BlowUp(f"{name} at N={n}: the neighbour list overflowed during the warm-up chunk")
    t0 = time.perf_counter()
    for _ in range(chunks):
        state, nbrs = md_chunk(state, nbrs)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    if bool(nbrs.did_buffer_overflow) or not bool(jnp.all(jnp.isfinite(state.position))):
        raise BlowUp(f"{name} at N={n}: overflow or non-finite positions while timing (the untrained "
                     "potential blew the liquid apart)")
    row["md_chunk_s"] = seconds / chunks
    row["atom_steps_per_s"] = n * chunk * chunks / seconds
    row["us_per_atom_step"] = 1e6 / row["atom_steps_per_s"]
    row["time_per_day"] = row["atom_steps_per_s"] / n * DT * 86400
    peak = _device_peak()
    row["device_peak_mib_so_far"] = None if peak is None else peak / 2**20
    row["host_peak_rss_mib_so_far"] = _host_peak_mib()
    return row


def flops(name: str, n: int, *, skin: float = 0.3, capacity_multiplier: float = 1.25, overrides: dict | None = None,
          atom_chunk: int | None = None, dtype: str | None = None, seed: int = 0, forces: bool = True) -> float:
    """XLA's FLOP count of one energy+forces call (``forces=False``: energy only) of the potential
    ``name`` at ``n`` atoms, an A2I variant without atom chunking (compiled, never run)."""
    R, side = liquid(n, seed)
    displacement, _ = space.periodic(side)
    del atom_chunk  # XLA counts a loop body once: cost the same model as one program
    pot = build(name, displacement, side, R, skin, jax.random.PRNGKey(seed), capacity_multiplier, overrides,
                atom_chunk=0 if name in A2I_VARIANTS else None, dtype=dtype)
    fn = _energy_and_forces(pot.energy) if forces else pot.energy
    compiled, _ = _compile(fn, pot.params, R, pot.neighbor_fn.allocate(R))
    return _flops(compiled)


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """This device's measured float matmul rate (FLOP/s): the median of ``repeats`` square products."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.result_type(float))
    dot = jax.jit(lambda a: a @ a)
    return 2 * size**3 / median_seconds(lambda: dot(a), repeats)


def environment(argv: Sequence[str]) -> dict:
    from importlib.metadata import version

    device = jax.devices()[0]
    return dict(backend=jax.default_backend(), device=str(getattr(device, "device_kind", device.platform)),
                devices=jax.device_count(), dtype=str(jnp.result_type(float)), jax=jax.__version__,
                jax_md=version("jax-md"), flax=version("flax"), python=platform.python_version(),
                machine=platform.machine(), command=" ".join(argv), matmul_flop_per_s=matmul_rate(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"),
                density=DENSITY, cutoff=CUTOFF, dt=DT, baselines=BASELINES,
                a2i_variants={k: dataclasses.asdict(v) for k, v in A2I_VARIANTS.items()})


def run(potentials: Sequence[str], sizes: Sequence[int], *, out: str | Path, max_chunk_s: float = 60.0,
        argv: Sequence[str] = (), **kw) -> dict:
    """Measures every potential at every size (smallest first); writes ``bench.json``, ``bench.md``,
    ``bench.png`` in ``out`` after every row, so an interrupted run keeps what it measured."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(environment=environment(argv), rows=[], skipped=[])
    for name in potentials:
        if name not in POTENTIALS:
            raise ValueError(f"unknown potential {name!r}; known: {POTENTIALS}")
    for name in potentials:
        for n in sorted(sizes):
            try:
                row = measure(name, n, **kw)
            except Exception as error:  # out of memory (XLA raises its own type) ends this potential's sizes
                if "RESOURCE_EXHAUSTED" in str(error) or isinstance(error, MemoryError):
                    reason = f"out of memory: {str(error)[:200]}"
                elif isinstance(error, BlowUp):
                    reason = str(error)
                else:
                    raise
                result["skipped"].append(dict(potential=name, n=n, reason=reason))
                print(f"{name:>18} N={n:>6}: skipped, {reason}", flush=True)
                write(result, out)
                break
            row["force_fraction_of_matmul"] = (row["force_flop_per_atom"] * n / row["force_s"]
                                               / result["environment"]["matmul_flop_per_s"])
            result["rows"].append(row)
            print(f"{name:>18} N={n:>6}: {row['atom_steps_per_s']:.4g} atom-steps/s, "
                  f"{row['force_us_per_atom']:.3g} us/atom energy+forces, compile {row['md_compile_s']:.1f} s",
                  flush=True)
            write(result, out)
            if row["md_chunk_s"] > max_chunk_s:
                result["skipped"].append(dict(potential=name, n=f"> {n}",
                                              reason=f"a chunk took {row['md_chunk_s']:.0f} s > {max_chunk_s:.0f} s"))
                break
    write(result, out)
    return result


def table(result: dict) -> str:
    """Markdown: one row per (potential, N), with time per atom-step relative to jax-md LJ and to A2I."""
    rows = result["rows"]
    by = {(r["potential"], r["n"]): r for r in rows}
    env = result["environment"]
    lines = [f"{env['backend']} ({env['device']}), {env['dtype']}, jax {env['jax']}, jax-md {env['jax_md']}, "
             f"flax {env['flax']}; measured matmul rate {env['matmul_flop_per_s'] / 1e9:.4g} GFLOP/s; "
             f"`{env['command']}`", "",
             "| potential | params | N | K (Sparse: edges) | atom-steps/s | time/day | us/atom-step | x LJ | x A2I "
             "| E+F us/atom | E+F MFLOP/atom | of matmul rate | compile MD s | planned MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def ratio(r: dict, base: str) -> str:
        other = by.get((base, r["n"]))
        return "" if other is None else f"{r['us_per_atom_step'] / other['us_per_atom_step']:.3g}"

    for r in rows:
        planned = "" if r["md_planned_mib"] is None else f"{r['md_planned_mib']:.0f}"
        lines.append(f"| {r['potential']} | {r['parameters']:,} | {r['n']:,} | {r['neighbors']} | "
                     f"{r['atom_steps_per_s']:.4g} | {r['time_per_day']:.3g} | {r['us_per_atom_step']:.3g} | "
                     f"{ratio(r, 'lj')} | {ratio(r, 'a2i')} | {r['force_us_per_atom']:.3g} | "
                     f"{r['force_flop_per_atom'] / 1e6:.3g} | {100 * r['force_fraction_of_matmul']:.2g}% | "
                     f"{r['md_compile_s']:.1f} | "
                     f"{planned} |")
    for s in result["skipped"]:
        lines.append(f"\nskipped: {s['potential']} N {s['n']}: {s['reason']}")
    return "\n".join(lines)


def flatness(result: dict, name: str = "a2i") -> float | None:
    """Largest over smallest time per atom-step of ``name`` over its sizes from 1,000 atoms up."""
    t = [r["us_per_atom_step"] for r in result["rows"] if r["potential"] == name and r["n"] >= 1000]
    return max(t) / min(t) if len(t) >= 2 else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in dict.fromkeys(r["potential"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["potential"] == name]
        ax.loglog([r["n"] for r in rows], [r["us_per_atom_step"] for r in rows], "o-", label=name)
    env = result["environment"]
    ax.set(xlabel="atoms N", ylabel="MD time per atom-step (us)", title=f"{env['backend']} {env['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out: Path) -> None:
    for name, text in (("bench.json", json.dumps(result, indent=1)), ("bench.md", table(result) + "\n")):
        atomic_write(out / name, lambda f, text=text: f.write(text))
    if result["rows"]:
        plot(result, out / "bench.png")


def main(args: Any) -> dict:
    """``a2ijax bench`` (arguments from :mod:`a2ijax.cli`)."""
    result = run(args.potentials, args.sizes, out=args.out, max_chunk_s=args.max_chunk_s,
                 argv=["a2ijax", *sys.argv[1:]],
                 skin=args.skin, chunk=args.chunk, chunks=args.chunks, repeats=args.repeats)
    print(table(result))
    flat = flatness(result)
    if flat is not None:
        print(f"a2i time per atom-step, largest / smallest from N = 1,000: {flat:.3f} (target within 1.10)")
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return result

