"""A/B pilots at equal wall clock: variants of a config, each trained for the same CPU time.

    python experiments/pilot.py experiments/configs/lj.toml --minutes 3 --out runs/pilots/lj \
        --variant control= \
        --variant dataset_loss=train.loss_normalization=dataset,train.energy_weight_final=20 \
        --variant pair_mlp=model.radial_embedding=pair_mlp

Each variant is the config with ``table.key=value`` overrides (values parsed as TOML). Its step
time is measured first (``a2ijax.train.step_seconds``, compilation excluded); it then trains for
``steps = minutes * 60 / step time`` steps (the learning-rate schedule spans them, so every
variant gets a whole schedule), evaluating every ``steps / 4``. The figure compared is the
validation split's (never the test split's) energy and force error per state point over the MD
fluctuation, of the EMA parameters after the last step, on ``--eval-frames`` frames spread over
the split. Results: ``<out>/pilot.json`` and one work directory per variant.

``--steps N`` gives every variant the same number of steps instead (variants that cost the same per
step but differ in data, such as the frames axis of ``learning_curves.py``):

    python experiments/pilot.py experiments/configs/sw.toml --steps 1500 --out runs/frames_sw \
        --variant f40=data.max_train_frames=40 --variant f160=data.max_train_frames=160 --variant all=
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import tomllib
from pathlib import Path

from a2ijax.config import experiment_from_dict, load_config
from a2ijax.dataset import read_dataset
from a2ijax.files import atomic_write
from a2ijax.train import step_seconds, train_and_evaluate


def apply_overrides(config, text: str):
    """``config`` with comma-separated ``table.key=value`` overrides (TOML values)."""
    values = config.to_dict()
    for item in filter(None, text.split(",")):
        path, value = item.split("=", 1)
        table, key = path.split(".")
        values[table][key] = tomllib.loads(f"v = {value}")["v"]
    return experiment_from_dict(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--variant", action="append", required=True, help="NAME=table.key=value,...")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=0, help="the same steps for every variant (not equal minutes)")
    parser.add_argument("--eval-frames", type=int, default=40)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.minutes <= 0 or args.steps < 0:
        parser.error(f"--minutes must be > 0 and --steps >= 0, got {args.minutes} and {args.steps}")
    base = load_config(args.config)
    dataset = read_dataset(base.data.path, base.data.symbols or None)
    out = Path(args.out)
    results = {}
    for spec in args.variant:
        name, overrides = spec.split("=", 1)
        config = apply_overrides(base, overrides)
        seconds = step_seconds(dataset, config, steps=5)
        steps = args.steps or max(20, int(args.minutes * 60 / seconds))
        every = max(1, steps // 4)
        warmup = min(config.train.warmup_steps, steps // 10)
        train = dataclasses.replace(config.train, steps=steps, eval_every=every, checkpoint_every=steps,
                                    eval_frames=args.eval_frames, warmup_steps=warmup)
        config = dataclasses.replace(config, train=train)
        t0 = time.perf_counter()
        train_and_evaluate(config, out / name, dataset=dataset, progress=False)
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
        ratios = rows[-1]["valid_ratios"]
        results[name] = dict(overrides=overrides, step_seconds=seconds, steps=steps,
                             train_seconds=time.perf_counter() - t0,
                             worst_energy_ratio=max(r[0] for r in ratios.values()),
                             worst_force_ratio=max(r[1] for r in ratios.values()), valid_ratios=ratios,
                             curve=[(r["step"], r["valid_ratios"]) for r in rows])
        print(name, json.dumps({k: v for k, v in results[name].items() if k not in ("curve", "valid_ratios")}),
              flush=True)
        atomic_write(out / "pilot.json", lambda f: json.dump(dict(config=args.config, minutes=args.minutes,
                                                                  steps=args.steps, variants=results), f, indent=1))


if __name__ == "__main__":
    main()
