"""Training-step time of a config on its dataset, before and after the cheaper-step settings.

    python experiments/step_time.py experiments/configs/lj.toml --chunks 0 16 32 64 128 \
        --neighbor-buckets 1 3 --steps 40 --out runs/step_time_lj.json

Every variant runs the trainer's own step (``a2ijax.train.make_train_step`` on a one-device mesh)
over the first ``--steps`` batches of the training data's epoch order, after one step on every
bucket (compilation excluded), and reports wall seconds per step. Two ways to drive it:

* ``sync`` 1: the host reads the loss and the finiteness flag after every step (the trainer before
  ``[train] sync_every``), so it cannot prepare and queue the next batch while the device computes;
* ``sync`` N: read every N steps (the trainer's ``sync_every``).

Variants: every ``--chunks`` value (the model's ``atom_chunk``: atoms per rematerialised chunk;
0 = one program without rematerialisation) with every ``--neighbor-buckets`` value, each with sync
1 and the config's ``sync_every``. One process, one variant after another; repeat the run to see
this machine's noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from a2ijax.batching import epoch_batches
from a2ijax.config import load_config
from a2ijax.dataset import read_dataset
from a2ijax.files import atomic_write
from a2ijax.parallel import global_batch, make_mesh, padded_rows, replicate
from a2ijax.train import init_state, make_train_step, prepare_run


def time_variant(dataset, config, atom_chunk: int, steps: int, syncs: list[int]) -> dict:
    run = prepare_run(dataset, config, atom_chunk=atom_chunk)
    mesh = make_mesh()
    step_fn = make_train_step(run, mesh)
    buckets = run.data.buckets["train"]
    rows = padded_rows(config.train.batch_size, mesh)
    order = epoch_batches(buckets, config.train.batch_size, config.train.seed, 0)
    batches = [buckets[b].batch(r, rows) for b, r in order[:steps]]
    state = replicate(init_state(run), mesh)
    for bucket in buckets:  # compile every shape
        state, metrics = step_fn(state, global_batch(bucket.batch(np.arange(1), rows), mesh))
    jax.block_until_ready(state)
    out = dict(atom_chunk=atom_chunk, neighbor_buckets=config.train.neighbor_buckets,
               capacities=[int(b.idx.shape[2]) for b in buckets], bucket_frames=[len(b) for b in buckets])
    for sync in syncs:
        pending = []
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = step_fn(state, global_batch(batches[i % len(batches)], mesh))
            pending.append(metrics["loss"])
            if (i + 1) % sync == 0:
                jax.device_get(pending)
                pending = []
        jax.block_until_ready(state)
        out[f"seconds_per_step_sync{sync}"] = (time.perf_counter() - t0) / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--chunks", type=int, nargs="+", default=[32])
    parser.add_argument("--neighbor-buckets", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = load_config(args.config)
    dataset = read_dataset(config.data.path, config.data.symbols or None)
    syncs = sorted({1, config.train.sync_every})
    rows = []
    for buckets in args.neighbor_buckets:
        variant = dataclasses.replace(config, train=dataclasses.replace(config.train, neighbor_buckets=buckets))
        for chunk in args.chunks:
            row = time_variant(dataset, variant, chunk, args.steps, syncs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, lambda f: json.dump(dict(config=args.config, steps=args.steps, rows=rows), f, indent=1))


if __name__ == "__main__":
    main()
