"""``a2ijax bench``: speed and memory of A2I next to jax-md's own potentials, on the path users run.

Every potential is built into the package's one potential shape (:class:`a2ijax.potential.Potential`)
and stepped by :func:`a2ijax.md.run`, the driver of ``a2ijax md``: jax-md's NVE integrator, the
neighbour list updated every step, compiled chunks of ``chunk`` steps with the list checked (and
reallocated, the chunk rerun, where it overflowed) between chunks, float32 unless ``jax_enable_x64``.
The rows:

* **shipped models** ``lj-pretrained``, ``ka-pretrained``, ``sw-pretrained``:
  ``a2ijax.pretrained.load(name).potential(box, species)`` (this package's linear-memory cell list,
  the model's own attention range), each on its own reference system: the LJ liquid at density
  0.84, the Kob-Andersen mixture at 1.2, a Stillinger-Weber diamond crystal (``8 k^3`` atoms, the
  ``k`` nearest the asked-for size);
* ``lj``: ``jax_md.energy.lennard_jones_neighbor_list`` on the LJ liquid (the floor any learned
  potential pays), and jax-md's ``nequip``, ``graph_network`` and ``behler_parrinello`` at the same
  cutoff with their jax-md default sizes (:data:`BASELINES`), on jax-md's own neighbour lists;
* ``a2i-small``/``a2i``/``a2i-large``: untrained A2I with full attention (no attention range) on
  jax-md's Dense list, the model's cost without the shipped models' range.

The LJ liquid is a jittered simple-cubic lattice at density 0.84, so every N has the same
neighbour density. For each row:

* **energy+forces**: ahead-of-time compile time (``lower().compile()``) apart from the median time
  of ``repeats`` calls after a warm-up; XLA's count of floating-point operations per atom (of the
  same model compiled without atom chunks: XLA counts a loop body once) and the rate it reaches as
  a fraction of this device's measured matmul rate;
* **MD**: a first chunk (compilation included) apart from ``chunks`` timed chunks; atom-steps/s
  and simulated time per day at the system's time step;
* **the list**: its kind (cell list or all pairs), slots K, attention-key slots M, reallocations;
* **memory**: the peak resident memory of the process and the device's peak bytes in use. With
  ``isolate`` (the command's default) every row runs in its own interpreter, so both are the row's
  own and a crash (out of memory) is that row's; in one process they are "so far".

A potential that fails (out of memory, non-finite positions, a crash) gets a row saying why, and
the bench goes on with the next potential; a chunk slower than ``max_chunk_s`` ends that
potential's larger sizes.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import energy, partition, simulate, space

from a2ijax import md
from a2ijax.baselines import DESCRIPTIONS, baseline_neighbor_list
from a2ijax.errors import InputError
from a2ijax.files import atomic_write
from a2ijax.model import A2IConfig
from a2ijax.potential import Potential, a2i_neighbor_list, default_atom_chunk
from a2ijax.systems import diamond_positions, get_system, lattice_positions

DENSITY = 0.84
CUTOFF = 2.5
DT = 0.005
KT = 0.1  # small initial temperature: the lattice start stays a lattice start during timing

#: A2I variants (untrained, full attention): small, the default, large.
A2I_VARIANTS = {
    "a2i-small": A2IConfig(cutoff=CUTOFF, width=16, heads=2, layers=1, avg_neighbors=55.0),
    "a2i": A2IConfig(cutoff=CUTOFF, avg_neighbors=55.0),
    "a2i-large": A2IConfig(cutoff=CUTOFF, width=64, heads=4, layers=3, avg_neighbors=55.0),
}
#: The shipped models (a2ijax.pretrained) and the reference system each runs on.
PRETRAINED = {"lj-pretrained": "lj", "ka-pretrained": "ka", "sw-pretrained": "sw"}
#: jax-md potentials and the settings that differ from jax-md's defaults.
BASELINES = {"lj": "jax_md.energy.lennard_jones_neighbor_list(sigma=1, epsilon=1, r_cutoff=2.5)", **DESCRIPTIONS}
POTENTIALS = tuple(PRETRAINED) + tuple(BASELINES) + tuple(A2I_VARIANTS)
KINDS = {**{name: "A2I shipped" for name in PRETRAINED}, **{name: "jax-md" for name in BASELINES},
         **{name: "A2I untrained, full attention" for name in A2I_VARIANTS}}


class BlowUp(RuntimeError):
    """A potential's MD produced non-finite positions while timed."""


@dataclasses.dataclass
class Built:
    """A potential on one system: the bundle MD runs, the starting positions, box and species, the
    time step, starting temperature and mass, the parameter count, and what the system is."""

    potential: Potential
    R: jax.Array
    side: float
    species: jax.Array | None
    dt: float
    kT: float
    mass: float
    parameters: int
    system: str


def liquid(n: int, seed: int = 0, density: float = DENSITY) -> tuple[jax.Array, float]:
    """``n`` atoms on a jittered lattice at ``density`` and the box side."""
    side = (n / density) ** (1 / 3)
    return lattice_positions(n, side, jitter=0.1, seed=seed), side


def count(params: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def build(name: str, n: int, *, skin: float = 0.3, capacity_multiplier: float = 1.25, overrides: dict | None = None,
          atom_chunk: int | None = None, dtype: str | None = None, seed: int = 0) -> Built:
    """The potential ``name`` (one of :data:`POTENTIALS`) on its system of about ``n`` atoms;
    ``overrides`` replace fields of an A2I variant's config (e.g. ``width=64``); ``atom_chunk`` and
    ``dtype`` are the A2I run settings (:func:`a2ijax.a2i_neighbor_list`). ``skin`` is in units of
    the LJ sigma; the shipped models scale it by their cutoff over the LJ cutoff."""
    if name not in POTENTIALS:
        raise InputError(f"unknown potential {name!r}; known: {POTENTIALS}")
    if (overrides or atom_chunk is not None or dtype is not None) and name in BASELINES:
        raise InputError(f"config overrides {overrides}, atom_chunk and dtype apply to the A2I variants only, "
                         f"not to {name!r}")
    if overrides and name in PRETRAINED:
        raise InputError(f"a shipped model's config cannot be overridden ({name!r})")
    key = jax.random.PRNGKey(seed)
    nl = dict(dr_threshold=skin, capacity_multiplier=capacity_multiplier)
    if name in PRETRAINED:
        from a2ijax import pretrained

        checkpoint = pretrained.load(PRETRAINED[name])
        system = get_system(checkpoint.meta["system"])
        if system.name == "sw":
            R, side = diamond_positions(max(3, round((n / 8) ** (1 / 3))))
            kT, label = 0.05, "SW diamond crystal"
        else:
            density = DENSITY if system.name == "lj" else system.state_points[0].density
            R, side = liquid(n, seed, density)
            kT, label = KT, f"{system.name.upper()} liquid, density {density:g}"
        species = jnp.asarray(system.species(R.shape[0]))
        cutoff = checkpoint.config.model.cutoff
        potential = checkpoint.potential(np.eye(3) * side, species, atom_chunk=atom_chunk, dtype=dtype,
                                         dr_threshold=skin * cutoff / CUTOFF, capacity_multiplier=capacity_multiplier)
        return Built(potential, jnp.asarray(R, jnp.result_type(float)), side, species, system.dt, kT, system.mass,
                     count(checkpoint.params), label)
    R, side = liquid(n, seed)
    displacement, shift = space.periodic(side)
    system = f"LJ liquid, density {DENSITY:g}"
    if name == "lj":
        _, energy_fn = energy.lennard_jones_neighbor_list(displacement, side, r_cutoff=CUTOFF, **nl)
        # jax-md's LJ list carries its cutoff as an array in the list's static fields, which breaks
        # jit's cache comparison when the same shapes come back; the same list with a float cutoff:
        neighbor_fn = partition.neighbor_list(displacement, side, CUTOFF, format=partition.OrderedSparse, **nl)
        return Built(Potential(neighbor_fn, energy_fn, displacement, shift), R, side, None, DT, KT, 1.0, 0, system)
    if name in A2I_VARIANTS:
        config = dataclasses.replace(A2I_VARIANTS[name], **(overrides or {}))
        neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement, side, config, atom_chunk=atom_chunk,
                                                             dtype=dtype, **nl)
        params = init_fn(key, R, neighbor=neighbor_fn.allocate(R))
    else:
        neighbor_fn, init_fn, energy_fn = baseline_neighbor_list(name, displacement, side, cutoff=CUTOFF,
                                                                 avg_neighbors=55.0, key=key, **nl)
        params = init_fn(key, R, neighbor_fn.allocate(R))

    def bound(R, neighbor=None, **kwargs):
        return energy_fn(params, R, neighbor, **kwargs)

    return Built(Potential(neighbor_fn, bound, displacement, shift), R, side, None, DT, KT, 1.0, count(params), system)


def _compile(fn: Callable, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


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
    def fn(R, neighbor):
        e, g = jax.value_and_grad(energy_fn)(R, neighbor=neighbor)
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
            sync_every_step: bool = False, chunk: int = 50, chunks: int = 3, repeats: int = 5, seed: int = 0) -> dict:
    """Energy+forces latency, MD throughput, compile times, the list and memory of ``name`` at ``n`` atoms.

    The defaults are the bench's; the other settings exist to measure what each costs
    (``experiments/speed_ablation.py``): ``overrides`` of the A2I config, its run settings
    ``atom_chunk`` and ``dtype``, or ``sync_every_step``: :func:`a2ijax.md.run` with chunks of one
    step, a host check after every step instead of one per ``chunk``-step scan.
    """
    settings = dict(skin=skin, capacity_multiplier=capacity_multiplier, overrides=overrides, atom_chunk=atom_chunk,
                    dtype=dtype)
    built = build(name, n, seed=seed, **settings)
    pot, R, n = built.potential, built.R, built.R.shape[0]
    nbrs, _ = md.allocate(pot.neighbor_fn, R)
    row = dict(potential=name, kind=KINDS[name], system=built.system, n=n, parameters=built.parameters,
               neighbors=int(nbrs.idx.shape[-1]), neighbor_format=str(nbrs.format.name),
               neighbor_list="cell list" if nbrs.cell_list_fn is not None else "all pairs",
               attention_keys=int(getattr(nbrs, "key_capacity", 0)) or None, skin=skin,
               capacity_multiplier=capacity_multiplier, overrides=overrides or {}, atom_chunk=atom_chunk, dtype=dtype,
               sync_every_step=sync_every_step, chunk=chunk, dt=built.dt)

    compiled, row["force_compile_s"] = _compile(_energy_and_forces(pot.energy_fn), R, nbrs)
    row["force_s"] = median_seconds(lambda: compiled(R, nbrs), repeats)
    row["force_us_per_atom"] = 1e6 * row["force_s"] / n
    # XLA counts a loop body once: a chunked A2I is costed as the same model compiled unchunked.
    chunked = name not in BASELINES and (default_atom_chunk() if atom_chunk is None else atom_chunk) > 0
    row["force_flop_per_atom"] = (flops(name, n, seed=seed, **settings) if chunked else _flops(compiled)) / n

    init, apply = simulate.nve(pot.energy_fn, pot.shift_fn, built.dt)
    state = init(jax.random.PRNGKey(seed + 1), R, kT=built.kT, mass=built.mass, neighbor=nbrs)
    length = 1 if sync_every_step else chunk
    stamps: list[float] = []
    t0 = time.perf_counter()
    try:
        result = md.run(apply, state, pot.neighbor_fn, nbrs, chunk * (chunks + 1), chunk_steps=length,
                        on_chunk=lambda *_: stamps.append(time.perf_counter()))
    except FloatingPointError as error:
        raise BlowUp(f"{name} at N={n}: {error}") from error
    warm = chunk // length  # the first `chunk` steps compile and warm up
    row["md_first_chunk_s"] = stamps[warm - 1] - t0
    seconds = stamps[-1] - stamps[warm - 1]
    row["md_chunk_s"] = seconds / chunks
    row["atom_steps_per_s"] = n * chunk * chunks / seconds
    row["us_per_atom_step"] = 1e6 / row["atom_steps_per_s"]
    row["time_per_day"] = row["atom_steps_per_s"] / n * built.dt * 86400
    row["reallocations"] = result.reallocations
    row["neighbors"] = int(result.neighbor.idx.shape[-1])
    row["attention_keys"] = int(getattr(result.neighbor, "key_capacity", 0)) or None
    peak = _device_peak()
    row["device_peak_mib"] = None if peak is None else peak / 2**20
    row["host_peak_rss_mib"] = _host_peak_mib()
    return row


def flops(name: str, n: int, *, skin: float = 0.3, capacity_multiplier: float = 1.25, overrides: dict | None = None,
          atom_chunk: int | None = None, dtype: str | None = None, seed: int = 0, forces: bool = True) -> float:
    """XLA's FLOP count of one energy+forces call (``forces=False``: energy only) of the potential
    ``name`` at ``n`` atoms, an A2I model without atom chunking (compiled, never run)."""
    del atom_chunk  # XLA counts a loop body once: cost the same model as one program
    built = build(name, n, skin=skin, capacity_multiplier=capacity_multiplier, overrides=overrides,
                  atom_chunk=None if name in BASELINES else 0, dtype=dtype, seed=seed)
    pot = built.potential
    fn = _energy_and_forces(pot.energy_fn) if forces else (lambda R, neighbor: pot.energy_fn(R, neighbor=neighbor))
    compiled, _ = _compile(fn, built.R, md.allocate(pot.neighbor_fn, built.R)[0])
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
                density=DENSITY, cutoff=CUTOFF, dt=DT, baselines=BASELINES, pretrained=PRETRAINED,
                a2i_variants={k: dataclasses.asdict(v) for k, v in A2I_VARIANTS.items()})


def _isolated(name: str, n: int, kw: dict) -> dict:
    """:func:`measure` in a fresh interpreter: the row's own peak memory, and a crash is the row's."""
    done = subprocess.run([sys.executable, "-m", "a2ijax.bench", json.dumps(dict(name=name, n=n, kw=kw))],
                          capture_output=True, text=True)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    lines = done.stderr.strip().splitlines()
    reason = next((line for line in reversed(lines) if "Error" in line or "error" in line), None)
    if reason and "BlowUp" in reason:
        raise BlowUp(reason.split("BlowUp: ", 1)[-1])
    raise RuntimeError(reason or f"the row's process ended with status {done.returncode}")


def run(potentials: Sequence[str], sizes: Sequence[int], *, out: str | Path, max_chunk_s: float = 60.0,
        argv: Sequence[str] = (), isolate: bool = False, **kw) -> dict:
    """Measures every potential at every size (smallest first); writes ``bench.json``, ``bench.md``,
    ``bench.png`` in ``out`` after every row, so an interrupted run keeps what it measured.
    ``isolate``: each row in its own interpreter (its own peak memory; a crash fails that row only)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(environment=environment(argv), rows=[], skipped=[])
    for name in potentials:
        if name not in POTENTIALS:
            raise InputError(f"unknown potential {name!r}; known: {POTENTIALS}")
    for name in potentials:
        for n in sorted(sizes):
            try:
                row = _isolated(name, n, kw) if isolate else measure(name, n, **kw)
            except Exception as error:  # out of memory (XLA raises its own type), a blow-up, a crash: a row says why
                text = str(error)
                reason = f"out of memory: {text[:200]}" if "RESOURCE_EXHAUSTED" in text or isinstance(
                    error, MemoryError) else f"{type(error).__name__}: {text[:300]}"
                result["skipped"].append(dict(potential=name, n=n, reason=reason))
                print(f"{name:>18} N={n:>6}: failed, {reason}", flush=True)
                write(result, out)
                break
            row["force_fraction_of_matmul"] = (row["force_flop_per_atom"] * row["n"] / row["force_s"]
                                               / result["environment"]["matmul_flop_per_s"])
            result["rows"].append(row)
            print(f"{name:>18} N={row['n']:>6}: {row['atom_steps_per_s']:.4g} atom-steps/s, "
                  f"{row['force_us_per_atom']:.3g} us/atom energy+forces, first chunk {row['md_first_chunk_s']:.1f} s,"
                  f" {row['neighbor_list']}, K {row['neighbors']}", flush=True)
            write(result, out)
            if row["md_chunk_s"] > max_chunk_s:
                result["skipped"].append(dict(potential=name, n=f"> {n}",
                                              reason=f"a chunk took {row['md_chunk_s']:.0f} s > {max_chunk_s:.0f} s"))
                break
    write(result, out)
    return result


def table(result: dict) -> str:
    """Markdown: one row per (potential, N), with time per atom-step relative to jax-md LJ at the
    same N (the shipped models' systems differ from LJ's: the ratio is of cost, not of like jobs)."""
    rows = result["rows"]
    by = {(r["potential"], r["n"]): r for r in rows}
    env = result["environment"]
    lines = [f"{env['backend']} ({env['device']}), {env['dtype']}, jax {env['jax']}, jax-md {env['jax_md']}, "
             f"flax {env['flax']}; measured matmul rate {env['matmul_flop_per_s'] / 1e9:.4g} GFLOP/s; "
             f"`{env['command']}`", "",
             "| potential | kind | system | params | N | list | K (Sparse: edges) | M | atom-steps/s | time/day "
             "| us/atom-step | x LJ | E+F us/atom | E+F MFLOP/atom | of matmul rate | first chunk s | peak RSS MiB "
             "| device peak MiB |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(r: dict) -> str:
        other = next((o for (p, m), o in by.items() if p == "lj" and abs(m - r["n"]) <= 0.2 * r["n"]), None)
        return "" if other is None else f"{r['us_per_atom_step'] / other['us_per_atom_step']:.3g}"

    def number(value: Any, form: str) -> str:
        return "" if value is None else format(value, form)

    for r in rows:
        lines.append(f"| {r['potential']} | {r['kind']} | {r['system']} | {r['parameters']:,} | {r['n']:,} | "
                     f"{r['neighbor_list']} | {r['neighbors']} | {number(r['attention_keys'], 'd')} | "
                     f"{r['atom_steps_per_s']:.4g} | {r['time_per_day']:.3g} | {r['us_per_atom_step']:.3g} | "
                     f"{ratio(r)} | {r['force_us_per_atom']:.3g} | {r['force_flop_per_atom'] / 1e6:.3g} | "
                     f"{100 * r['force_fraction_of_matmul']:.2g}% | {r['md_first_chunk_s']:.1f} | "
                     f"{number(r['host_peak_rss_mib'], '.0f')} | {number(r['device_peak_mib'], '.0f')} |")
    for s in result["skipped"]:
        lines.append(f"\nfailed or skipped: {s['potential']} N {s['n']}: {s['reason']}")
    return "\n".join(lines)


def flatness(result: dict, name: str = "lj-pretrained") -> float | None:
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
                 argv=["a2ijax", *sys.argv[1:]], isolate=True, skin=args.skin, chunk=args.chunk, chunks=args.chunks,
                 repeats=args.repeats)
    print(table(result))
    for name in dict.fromkeys(r["potential"] for r in result["rows"]):
        flat = flatness(result, name)
        if flat is not None and name not in BASELINES:
            print(f"{name}: time per atom-step, largest over smallest from N = 1,000: {flat:.3f}")
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return result


if __name__ == "__main__":  # one row of an isolated run: python -m a2ijax.bench '{"name": ..., "n": ..., "kw": {...}}'
    job = json.loads(sys.argv[1])
    print(json.dumps(measure(job["name"], job["n"], **job["kw"])))
