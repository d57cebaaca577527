#!/usr/bin/env bash
# `a2ijax bench` on one GPU (H100/H200) in under 9 minutes, from a copy of this repository: the shipped
# models through Checkpoint.potential + md.run (what users run) at 10^3 to 10^6 atoms first, then
# jax-md's LJ, NequIP and GraphNetwork, each row in its own process (its own peak memory).
#
# The GPU machine has jax, flax, optax, orbax and chex but no network and none of the pure-Python
# packages jax-md's import needs; they travel as wheels in .whl/ (ignored by git):
#
#   bash experiments/gpu_bench.sh fetch          # here, with the package index: .whl/*.whl
#   bash experiments/gpu_bench.sh                # there (carry .whl): install into /tmp/site, run
#
# Results go to $OUT/bench (the device tool's output folder) or ./bench_gpu: bench.json (rows,
# backend, device, dtype, versions, the command), bench.md, bench.png, and the speed ablation in
# $OUT/ablation; each row is written as soon as it is measured, and the run stops itself before the
# 9 minutes are up (BUDGET_S + ABLATION_S = 490 s of timing, plus installation and start-up).
# A dry run on a CPU machine (same steps, small sizes, this project's Python):
#   PYTHON=.venv/bin/python SIZES="256" POTENTIALS="lj-pretrained lj" BUDGET_S=300 ABLATION_N=128 \
#       ABLATION_S=600 bash experiments/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(jax-md==0.2.29 jraph==0.0.6.dev0 e3nn-jax==0.21.0 ml-collections==1.1.0)

if [[ "${1:-run}" == "fetch" ]]; then
    mkdir -p .whl
    # Pure-Python wheels (py3-none-any): the platform tags only satisfy pip's cross-download rules.
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls -l .whl
    exit 0
fi

PYTHON=${PYTHON:-python3}
SIZES=${SIZES:-1000 10000 100000 1000000}
POTENTIALS=${POTENTIALS:-lj-pretrained lj sw-pretrained ka-pretrained nequip graph_network}
BUDGET_S=${BUDGET_S:-400}
ABLATION_N=${ABLATION_N:-16000}
ABLATION_S=${ABLATION_S:-90}
OUTDIR=${OUT:-bench_gpu}/bench

if ! "$PYTHON" -c "import jax_md" 2>/dev/null; then
    [[ -d .whl ]] || { echo "jax-md is missing and there is no .whl/: run 'bash $0 fetch' first" >&2; exit 2; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# No preallocation of GPU memory: the device's peak bytes then mean what the runs used.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

"$PYTHON" - <<'EOF'
import jax
print("backend", jax.default_backend(), "devices", jax.devices(), "jax", jax.__version__)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

# The bench stops a potential's larger sizes once a 20-step chunk takes over 20 s; `timeout` keeps
# the whole run inside the budget, and every row measured before that is already on disk.
timeout --signal=INT "$BUDGET_S" "$PYTHON" -m a2ijax.cli bench --sizes $SIZES --potentials $POTENTIALS \
    --chunk 20 --chunks 2 --repeats 3 --max-chunk-s 20 --out "$OUTDIR" || echo "bench ended with status $?"
cat "$OUTDIR/bench.md" 2>/dev/null || echo "no rows were measured"

# What each speed setting is worth on this device (bfloat16, atom chunks, list trimming, donation,
# host sync), each against the default in the same process; rows are on disk as they come.
timeout --signal=INT "$ABLATION_S" "$PYTHON" experiments/speed_ablation.py --n "$ABLATION_N" --chunk 20 \
    --out "${OUT:-bench_gpu}/ablation" || echo "ablation ended with status $?"
cat "${OUT:-bench_gpu}/ablation/ablation.md" 2>/dev/null || echo "no ablation rows were measured"

# Atoms split over several GPUs (a2i_neighbor_list(mesh=)), and batches split for training, against
# one GPU in the same run; only where the machine has more than one GPU.
NDEV=$("$PYTHON" -c "import jax; print(jax.device_count())")
if [[ "$NDEV" -gt 1 ]]; then
    timeout --signal=INT "${SCALING_S:-120}" "$PYTHON" experiments/scaling.py --accelerator --atoms "$ABLATION_N" \
        --out "${OUT:-bench_gpu}/scaling.json" || echo "scaling ended with status $?"
else
    echo "one device: no multi-device scaling run"
fi
