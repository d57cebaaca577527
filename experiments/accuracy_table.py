"""Speed at equal accuracy: A2I next to jax-md's NequIP, GraphNetwork and Behler-Parrinello, each
fitted by the same trainer to the same dataset within the same wall-clock budget.

    python experiments/accuracy_table.py --systems lj sw ka --budget-s 1500 --out runs/accuracy

For every system and potential: the system's config ``experiments/configs/<system>.toml`` (data,
cutoff, species, batch size, learning rate, loss weights), with ``[baseline] name`` set for the
jax-md potentials. The budget is turned into a step count first: ``--probe`` compiled training steps
are timed (median) and ``steps = 0.85 * budget / step time`` (the rest pays for compilation and the
validation passes: four, of 10 frames each, for every potential); the learning-rate schedule then
spans those steps. Then ``train_and_evaluate``
in ``<out>/<system>_<potential>`` and the test report. Speed, two ways (weights do not change the
cost): energy+forces per atom on a batch of the system's own test frames with the trainer's
neighbour lists (its cutoff, density and species), and MD from ``a2ijax.bench`` (NVE with a
neighbour list on the LJ liquid at N = 256, each potential's default size). Results go to
``<out>/accuracy.json`` and ``accuracy.md`` after every run; finished runs are read back, not redone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from a2ijax import bench
from a2ijax.config import BaselineConfig, load_config
from a2ijax.dataset import read_dataset
from a2ijax.files import atomic_write
from a2ijax.loss import predict_fn
from a2ijax.train import init_state, prepare_run, step_seconds, train_and_evaluate

POTENTIALS = ("a2i", "nequip", "graph_network", "behler_parrinello")


def configured(system: str, potential: str):
    config = load_config(Path("experiments/configs") / f"{system}.toml")
    return dataclasses.replace(config, baseline=BaselineConfig("" if potential == "a2i" else potential))


@functools.cache
def dataset_of(system: str):
    """The system's dataset, read once for all its potentials and uses."""
    config = configured(system, "a2i")
    return read_dataset(config.data.path, config.data.symbols or None)


def force_us_per_atom(config, dataset, repeats: int) -> float:
    """Energy+forces of ``config``'s potential on a batch of the system's own test frames, with the
    data's neighbour lists (compiled, median of ``repeats``), in microseconds per atom. The weights
    do not change the cost, so the untrained initial ones serve."""
    run = prepare_run(dataset, config)
    bucket = run.data.buckets["test"][0]
    size = run.config.train.batch_size
    batch = {k: jnp.asarray(v) for k, v in bucket.batch(np.arange(size) % len(bucket), size).items()}
    predict = jax.jit(predict_fn(run.energy_fn, run.per_atom))
    params = init_state(run).params
    atoms = float(np.sum(np.asarray(batch["mask"])))
    return 1e6 * bench.median_seconds(lambda: predict(params, batch), repeats) / atoms


def fit(config, steps: int):
    train = dataclasses.replace(config.train, steps=steps, warmup_steps=min(config.train.warmup_steps, steps // 10),
                                eval_every=max(1, steps // 4), eval_frames=10, checkpoint_every=max(1, steps // 4))
    return dataclasses.replace(config, train=train)


def table(result: dict) -> str:
    lines = [f"budget {result['budget_s']:.0f} s per run; `{result['command']}`", "",
             "| system | potential | params | steps | s/step | train min | worst / best E ratio | "
             "worst / best F ratio | F RMSE | E+F us/atom (own frames) | MD us/atom-step (LJ N=256) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        e = [sp["energy_ratio"] for sp in r["report"]["state_points"].values()]
        f = [sp["force_ratio"] for sp in r["report"]["state_points"].values()]
        md = result["md"].get(r["potential"], {}).get("us_per_atom_step")
        latency = result.get("latency", {}).get(f"{r['system']}/{r['potential']}")
        lines.append(f"| {r['system']} | {r['potential']} | {r['report']['parameters']:,} | {r['steps']} | "
                     f"{r['step_s']:.3g} | {r['seconds'] / 60:.1f} | {100 * max(e):.1f}% / {100 * min(e):.1f}% | "
                     f"{100 * max(f):.1f}% / {100 * min(f):.1f}% | {r['report']['force_rmse']:.4g} | "
                     f"{'' if latency is None else f'{latency:.4g}'} | {'' if md is None else f'{md:.4g}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=["lj", "sw", "ka"])
    parser.add_argument("--potentials", nargs="+", default=list(POTENTIALS), choices=POTENTIALS)
    parser.add_argument("--budget-s", type=float, default=1500.0, help="wall-clock training budget per run")
    parser.add_argument("--probe", type=int, default=5, help="training steps timed to size the run")
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "accuracy.json"
    result = dict(command=" ".join(["python", *sys.argv]), budget_s=args.budget_s, runs=[], md={}, latency={})
    if path.exists():
        saved = json.loads(path.read_text())
        result["runs"] = [r for r in saved["runs"] if r["budget_s"] == args.budget_s]
        result["md"], result["latency"] = saved.get("md", {}), saved.get("latency", {})
    done = {(r["system"], r["potential"]) for r in result["runs"]}

    def save():
        atomic_write(path, lambda f: json.dump(result, f, indent=1))
        atomic_write(args.out / "accuracy.md", lambda f: f.write(table(result) + "\n"))

    for system in args.systems:
        for potential in args.potentials:
            if (system, potential) in done:
                continue
            config = configured(system, potential)
            step_s = step_seconds(dataset_of(system), config, args.probe)
            steps = max(10, int(0.85 * args.budget_s / step_s))
            t0 = time.perf_counter()
            run = train_and_evaluate(fit(config, steps), args.out / f"{system}_{potential}", progress=False,
                                     dataset=dataset_of(system))
            result["runs"].append(dict(system=system, potential=potential, budget_s=args.budget_s, step_s=step_s,
                                       steps=steps, seconds=time.perf_counter() - t0, report=run.report))
            print(f"{system} {potential}: {steps} steps in {result['runs'][-1]['seconds']:.0f} s, "
                  f"F RMSE {run.report['force_rmse']:.4g}", flush=True)
            save()
    for system in args.systems:
        for potential in args.potentials:
            if f"{system}/{potential}" not in result["latency"]:
                result["latency"][f"{system}/{potential}"] = force_us_per_atom(
                    configured(system, potential), dataset_of(system), args.probe)
                save()
    for potential in args.potentials:
        if potential not in result["md"]:
            result["md"][potential] = bench.measure(potential, 256, chunk=10, chunks=2, repeats=3)
            save()
    print(table(result))
    return result


if __name__ == "__main__":
    main()
