"""Energy+forces of the default A2I model on a Lennard-Jones liquid, next to jax-md's own LJ.

What it measures, for an LJ liquid at density 0.84 in a periodic box (positions on a jittered
grid; the cost of one evaluation does not depend on the configuration, only on N and K):

* compile time (lower + compile, ahead of time) apart from steady-state time per evaluation
  (median of ``--repeats`` calls after one warm-up), for A2I and for
  ``jax_md.energy.lennard_jones_neighbor_list`` in the same process: the ratio is the figure;
* XLA's cost analysis of one unchunked evaluation (floating-point operations per atom; XLA counts
  a loop body once, so the chunked program cannot be costed directly) and its buffer plan
  (temporary bytes) for A2I with and without atom chunking;
* peak resident memory of a fresh process that runs A2I energy+forces at each ``--memory-sizes``.

Usage::

    python experiments/bench_core.py                       # N = 1000, 8000; memory at 8000, 32000
    python experiments/bench_core.py --sizes 1000 --memory-sizes 1000 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import jax
from jax_md import energy, space

from a2ijax import A2IConfig, a2i_neighbor_list
from a2ijax.bench import DENSITY, liquid


def energy_and_forces_a2i(n: int, config: A2IConfig, dr_threshold: float):
    R, box = liquid(n)
    displacement, _ = space.periodic(box)
    neighbor_fn, init_fn, energy_fn = a2i_neighbor_list(displacement, box, config, dr_threshold=dr_threshold)
    nbrs = neighbor_fn.allocate(R)
    params = init_fn(jax.random.PRNGKey(0), R, nbrs)

    def fn(params, R, nbrs):
        E, G = jax.value_and_grad(lambda R: energy_fn(params, R, nbrs))(R)
        return E, -G

    return fn, (params, R, nbrs), nbrs.idx.shape[1]


def energy_and_forces_lj(n: int, dr_threshold: float):
    R, box = liquid(n)
    displacement, _ = space.periodic(box)
    neighbor_fn, energy_fn = energy.lennard_jones_neighbor_list(displacement, box, dr_threshold=dr_threshold)
    nbrs = neighbor_fn.allocate(R)

    def fn(R, nbrs):
        E, G = jax.value_and_grad(lambda R: energy_fn(R, neighbor=nbrs))(R)
        return E, -G

    return fn, (R, nbrs)


def measure(fn, args, repeats: int) -> dict:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return dict(compile_s=compile_s, step_s=statistics.median(times), flops=float(cost.get("flops", float("nan"))),
                temp_bytes=int(memory.temp_size_in_bytes))


def unchunked_analysis(n: int, dr_threshold: float) -> dict:
    """XLA's flops and temporary bytes for the unchunked program (compiled, never run)."""
    fn, args, _ = energy_and_forces_a2i(n, A2IConfig(atom_chunk=0), dr_threshold)
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return dict(flops=float(cost["flops"]), temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes))


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def memory_child(n: int, dr_threshold: float) -> None:
    """Runs in a fresh process: A2I energy+forces once, then prints peak RSS as JSON."""
    rss_setup = peak_rss_mib()
    fn, args, k = energy_and_forces_a2i(n, A2IConfig(), dr_threshold)
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    print(json.dumps(dict(n=n, neighbors=k, peak_rss_mib=peak_rss_mib(), rss_after_import_mib=rss_setup,
                          temp_mib=compiled.memory_analysis().temp_size_in_bytes / 2**20)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 8000])
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[8000, 32000])
    parser.add_argument("--dr-threshold", type=float, default=0.3, help="neighbour-list skin (both models)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.dr_threshold)
        return {}

    config = A2IConfig()
    results = dict(
        command=" ".join([sys.executable.split("/")[-1], *sys.argv]),
        backend=jax.default_backend(), device=str(jax.devices()[0]), machine=platform.machine(),
        cpus=len(jax.devices()), jax=jax.__version__, config=config.to_dict(),
        dr_threshold=args.dr_threshold, density=DENSITY, speed=[], memory=[])
    for n in args.sizes:
        fn, fargs, k = energy_and_forces_a2i(n, config, args.dr_threshold)
        a2i = measure(fn, fargs, args.repeats)
        lj = measure(*energy_and_forces_lj(n, args.dr_threshold), args.repeats)
        row = dict(n=n, neighbors=k, a2i=a2i, lj=lj, ratio=a2i["step_s"] / lj["step_s"],
                   a2i_atoms_per_s=n / a2i["step_s"])
        if n <= 2000:  # XLA counts a loop body once: cost the unchunked program instead
            flops = unchunked_analysis(n, args.dr_threshold)["flops"]
            row["a2i_mflop_per_atom"] = flops / n / 1e6
            row["a2i_gflops"] = flops / a2i["step_s"] / 1e9
        results["speed"].append(row)
        print(json.dumps(row), flush=True)
    for n in args.memory_sizes:
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n),
                              "--dr-threshold", str(args.dr_threshold)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["unchunked_planned_temp_mib"] = unchunked_analysis(n, args.dr_threshold)["temp_bytes"] / 2**20
        results["memory"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
