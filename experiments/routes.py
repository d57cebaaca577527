"""The two training routes side by side (issue: the paper's claim): attention only, and with the pair
pathway (docs/design.md, "The pair pathway").

    python experiments/routes.py --before lj=runs/attention_only/lj --after lj=a2ijax/models/lj \
        --run lj=runs/lj --out runs/routes.json

``--before`` and ``--after`` are models in the shipped layout (an earlier shipped version kept as
files: ``git show REF:a2ijax/models/lj/params.msgpack > ...``); ``--run`` the new route's training
directory, whose ``metrics.jsonl`` gives its training minutes. Both models' step times are measured
in this one process, on the same data (``a2ijax.train.step_seconds``, compilation excluded), so their
ratio holds even where the machine's speed drifts between runs; the worst state points come from each
model's test report (the same split: the same data file and seed).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", action="append", required=True, help="system=model directory (attention only)")
    parser.add_argument("--after", action="append", required=True, help="system=model directory (pair pathway)")
    parser.add_argument("--run", action="append", default=[], help="system=training directory of --after")
    parser.add_argument("--before-minutes", action="append", default=[],
                        help="system=minutes: the --before model's training time as recorded when it was trained")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from a2ijax.dataset import read_dataset
    from a2ijax.pretrained import resolve
    from a2ijax.train import step_seconds

    before, after = (dict(item.split("=", 1) for item in group) for group in (args.before, args.after))
    runs = dict(item.split("=", 1) for item in args.run)
    before_minutes = {k: float(v) for k, v in (item.split("=", 1) for item in args.before_minutes)}
    rows = []
    for system in before:
        for route, path in (("attention only", before[system]), ("pair pathway", after[system])):
            model = resolve(path)
            dataset = read_dataset(model.config.data.path, model.symbols)
            seconds = step_seconds(dataset, model.config, steps=10)
            points = model.meta["report"]["state_points"].values()
            minutes = before_minutes.get(system) if route == "attention only" else None
            if route == "pair pathway" and system in runs:
                metrics = [json.loads(line) for line in (Path(runs[system]) / "metrics.jsonl").read_text().splitlines()
                           if line.strip()]
                minutes = metrics[-1]["seconds"] / 60
            rows.append(dict(system=system, route=route, model=str(path), steps=model.step, step_seconds=seconds,
                             train_minutes=minutes, worst_energy_ratio=max(r["energy_ratio"] for r in points),
                             worst_force_ratio=max(r["force_ratio"] for r in points)))
            print(json.dumps(rows[-1]), flush=True)
    out = dict(command="python experiments/routes.py " + " ".join(
        [f"--before {b}" for b in args.before] + [f"--after {a}" for a in args.after] + [f"--run {r}" for r in args.run]
        + [f"--before-minutes {m}" for m in args.before_minutes]),
        date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.machine(), rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
