"""What each speed setting of A2I MD is worth: predicted and measured, one setting at a time.

    python experiments/speed_ablation.py --n 1000 --out runs/speed_ablation

Every variant is the default A2I (``a2ijax.bench``'s ``a2i``: the LJ liquid, skin 0.3, capacity
multiplier 1.25, atom chunks of 32 rematerialised in the backward pass, float32, a compiled scan of
``--chunk`` NVE steps through ``a2ijax.md.run``) with one setting changed, measured with
``a2ijax.bench.measure`` in this one process, the default first and again last (the spread of the
two is the run's noise). Each variant's prediction comes from counts that do not depend on the
timings (:func:`predict`):

* neighbour capacity and skin (trimming the list): the ratio of XLA's FLOP counts of the two
  energy+forces programs (attention costs K^2, the rest K);
* ``atom_chunk`` 0 (one program, no rematerialisation): E+F FLOPs / (E+F FLOPs + energy FLOPs),
  the forward pass no longer computed twice; a larger chunk: 1 (same FLOPs);
* bfloat16 compute (the builders' ``dtype``: bf16 activations and matmul inputs, f32 parameters and
  energies): this device's bfloat16 over float32 time of a square 1024 matmul;
* one step per call and a host read of the overflow flag after every step: 1 + the measured
  round trip of a trivial compiled call per step over the step time (also for jax-md's LJ, whose
  steps are short enough for it to matter);
* a fused query/key/value/angle projection (the model's) against five separate ones: timed apart
  on the model's token shapes (forward and backward), predicted 1 (same FLOPs).

Each variant's forces are compared with the default's on the same configuration (same parameters):
a setting that changes the result beyond float rounding is reported, not hidden.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from a2ijax import bench
from a2ijax.files import atomic_write
from a2ijax.potential import default_atom_chunk

#: (label, bench.measure settings) of the A2I variants; "default" is measured first and last.
VARIANTS = (  # the settings that matter on accelerators first: a time-limited GPU run measures those
    ("bfloat16 compute", dict(dtype="bfloat16")),
    ("atom_chunk 0 (no remat)", dict(atom_chunk=0)),
    ("atom_chunk 128", dict(atom_chunk=128)),
    ("capacity multiplier 1.05", dict(capacity_multiplier=1.05)),
    ("skin 0.1", dict(skin=0.1)),
    ("skin 0.1, capacity 1.05", dict(skin=0.1, capacity_multiplier=1.05)),
    ("host sync every step", dict(sync_every_step=True)),
)


def round_trip_s() -> float:
    """Dispatch + result read of a trivial compiled call (what a per-step host sync adds)."""
    f = jax.jit(lambda x: x + 1)
    x = jnp.zeros(3)
    return bench.median_seconds(lambda: bool(f(x)[0] > 0), 200)


def matmul_time_ratio(size: int = 1024) -> float:
    """bfloat16 over float32 time of a square product on this device."""
    times = {}
    dot = jax.jit(lambda a: a @ a)
    for dtype in (jnp.float32, jnp.bfloat16):
        a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
        times[dtype] = bench.median_seconds(lambda a=a: dot(a), 10)
    return times[jnp.bfloat16] / times[jnp.float32]


def fused_projection(tokens: int, width: int, heads: int, n_angular: int) -> dict:
    """Forward+backward of the model's one ``[D, 3D + 2H(L+1)]`` projection against five separate
    ones (q, k, v, angle-a, angle-b) on ``tokens`` rows; seconds of each and their ratio."""
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (tokens, width))
    sizes = (width, width, width, heads * n_angular, heads * n_angular)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (width, s)) / np.sqrt(width) for i, s in enumerate(sizes)]
    fused_w = jnp.concatenate(ws, axis=1)

    def loss_fused(x, w):
        return jnp.sum(jnp.tanh(x @ w))

    def loss_split(x, ws):
        return sum(jnp.sum(jnp.tanh(x @ w)) for w in ws)

    fused = jax.jit(jax.grad(loss_fused, argnums=(0, 1)))
    split = jax.jit(jax.grad(loss_split, argnums=(0, 1)))
    t_fused = bench.median_seconds(lambda: fused(x, fused_w), 20)
    t_split = bench.median_seconds(lambda: split(x, ws), 20)
    return dict(tokens=tokens, fused_s=t_fused, split_s=t_split, fused_over_split=t_fused / t_split)


def forces(n: int, settings: dict, seed: int = 0) -> np.ndarray:
    """Forces of the default A2I with ``settings`` on the bench liquid (same parameters for all)."""
    keep = ("skin", "capacity_multiplier", "overrides", "atom_chunk", "dtype")
    built = bench.build("a2i", n, seed=seed, **{k: v for k, v in settings.items() if k in keep})
    nbrs = built.potential.neighbor_fn.allocate(built.R)
    if bool(nbrs.did_buffer_overflow):
        raise RuntimeError(f"neighbour list overflow with {settings}")
    return np.asarray(-jax.grad(lambda R: built.potential.energy_fn(R, neighbor=nbrs))(built.R), np.float64)


def predict(settings: dict, row: dict, reference: dict, energy_flops: float, bf16_ratio: float,
            trip_s: float) -> float:
    """The predicted time of the variant (``row``) over ``reference``'s, from counts that do not
    depend on the timings: XLA's FLOP counts of the two programs, the measured matmul and round-trip
    times."""
    ef_flops = reference["force_flop_per_atom"] * reference["n"]
    if "dtype" in settings:
        return bf16_ratio
    if settings.get("atom_chunk") == 0:
        return ef_flops / (ef_flops + energy_flops)
    if "atom_chunk" in settings or settings.get("overrides"):
        return 1.0
    if "skin" in settings or "capacity_multiplier" in settings:
        return row["force_flop_per_atom"] / reference["force_flop_per_atom"]
    if settings.get("sync_every_step"):
        return 1 + trip_s / (reference["md_chunk_s"] / reference["chunk"])
    return 1.0  # the reference's own settings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="atoms")
    parser.add_argument("--chunk", type=int, default=10, help="MD steps per compiled chunk")
    parser.add_argument("--chunks", type=int, default=2, help="chunks timed after a warm-up chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed energy+forces calls")
    parser.add_argument("--out", type=Path, default=Path("runs/speed_ablation"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    n, timing = args.n, dict(chunk=args.chunk, chunks=args.chunks, repeats=args.repeats)
    result = dict(environment=bench.environment(["python", *sys.argv]), n=n, rows=[])
    trip = round_trip_s()
    bf16 = matmul_time_ratio()
    energy_flops = bench.flops("a2i", n, forces=False)
    config = bench.A2I_VARIANTS["a2i"]
    result.update(round_trip_s=trip, bf16_over_f32_matmul=bf16, energy_flops=energy_flops)
    f_default = forces(n, {})

    def save():
        atomic_write(args.out / "ablation.json", lambda f: json.dump(result, f, indent=1))
        atomic_write(args.out / "ablation.md", lambda f: f.write(table(result) + "\n"))

    def record(label: str, potential: str, settings: dict, reference: dict | None):
        try:
            row = bench.measure(potential, n, **settings, **timing)
        except bench.BlowUp as error:  # a trimmed list that overflows is a result, not a crash
            result["rows"].append(dict(label=label, potential=potential, failed=str(error)))
            print(f"{label:>32}: {error}", flush=True)
            save()
            return None
        row.update(label=label, chunk=args.chunk)
        if reference is not None:
            row["predicted"] = predict(settings, row, reference, energy_flops, bf16, trip)
            row["measured"] = row["us_per_atom_step"] / reference["us_per_atom_step"]
        if potential == "a2i":
            f = forces(n, settings)
            row["force_change"] = float(np.sqrt(np.mean((f - f_default) ** 2)) / np.sqrt(np.mean(f_default**2)))
        result["rows"].append(row)
        print(f"{label:>32}: {row['us_per_atom_step']:.4g} us/atom-step, predicted {row.get('predicted')}, "
              f"measured {row.get('measured')}", flush=True)
        save()
        return row

    base = record("default", "a2i", {}, None)
    for label, settings in VARIANTS:
        record(label, "a2i", settings, base)
    record("default, again", "a2i", {}, base)
    lj = record("jax-md LJ", "lj", {}, None)
    record("jax-md LJ, host sync every step", "lj", dict(sync_every_step=True), lj)
    n_angular = config.angular_order + 1
    result["fused_projection"] = fused_projection(default_atom_chunk() * base["neighbors"], config.width, config.heads,
                                                  n_angular)
    save()
    print(table(result))
    return result


def table(result: dict) -> str:
    env = result["environment"]
    lines = [f"{env['backend']} ({env['device']}), {env['dtype']}, jax {env['jax']}; N = {result['n']}; "
             f"`{env['command']}`", "",
             "| variant | K | us/atom-step | predicted / default | measured / default | E+F MFLOP/atom | "
             "peak RSS MiB | force change (RMS rel.) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "failed" in r:
            lines.append(f"| {r['potential']}: {r['label']} | | {r['failed']} | | | | | |")
            continue
        pred = "" if r.get("predicted") is None else f"{r['predicted']:.3f}"
        meas = "" if r.get("measured") is None else f"{r['measured']:.3f}"
        change = "" if r.get("force_change") is None else f"{r['force_change']:.1e}"
        planned = "" if r["host_peak_rss_mib"] is None else f"{r['host_peak_rss_mib']:.0f}"
        lines.append(f"| {r['potential']}: {r['label']} | {r['neighbors']} | {r['us_per_atom_step']:.4g} | {pred} | "
                     f"{meas} | {r['force_flop_per_atom'] / 1e6:.3g} | {planned} | {change} |")
    fp = result.get("fused_projection")
    if fp:
        lines.append(f"\nfused projection ({fp['tokens']} tokens, forward+backward): {1e3 * fp['fused_s']:.3g} ms "
                     f"fused vs {1e3 * fp['split_s']:.3g} ms as five products: ratio {fp['fused_over_split']:.3f} "
                     "(predicted 1.000, same FLOPs)")
    lines.append(f"\nround trip of a trivial compiled call: {1e6 * result['round_trip_s']:.0f} us; bfloat16 / float32 "
                 f"time of a 1024^3 matmul: {result['bf16_over_f32_matmul']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
