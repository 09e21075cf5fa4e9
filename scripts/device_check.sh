#!/usr/bin/env bash
# The GPU/TPU check, as one short script: the device-independent tests, then the lesson's run and the
# benchmark on whatever accelerator JAX finds. Prints platform, device kind, epoch times, final losses.
#
#   JAXMNIST_DATA_DIR=/path/to/mnist bash scripts/device_check.sh [OUT_DIR]
#
# Needs the project installed (pip install -e '.[dev]'; on a GPU, jax[cuda12] or jax[cuda13]) and
# the MNIST IDX files. Writes benchmark.json and the logs into OUT_DIR (default: .).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"

python - <<'PY'
import jax
devices = jax.devices()
print(f"platform {devices[0].platform}, device kind {devices[0].device_kind}, {len(devices)} device(s), jax {jax.__version__}")
PY

python -m pytest -q tests/test_losses.py tests/test_model.py tests/test_train.py tests/test_backprop.py 2>&1 | tee "$out/tests.log" | tail -n 3

python -m jaxmnist.train --epochs 5 --no-compile-cache --quiet 2>&1 | tee "$out/train.log"

python scripts/benchmark.py --repeats 3 --epochs 3 --json "$out/benchmark.json" 2> "$out/benchmark.err" | tee "$out/benchmark.log"

# Many seeds: 100 seeds in one program against one run (on an accelerator, 100 runs should cost about one).
python scripts/benchmark.py --seeds 100 --epochs 1 --no-torch --json "$out/benchmark_seeds.json" 2> "$out/benchmark_seeds.err" | tee "$out/benchmark_seeds.log"
