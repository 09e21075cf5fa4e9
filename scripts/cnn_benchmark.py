"""Convolutional networks side by side: the train command against tuned eager PyTorch of the same network.

For PyTorch's and flax's MNIST example networks (``jaxmnist.cnns``; Adam lr 0.001, batch 64), each round
times, one after another in their own processes:

- ``python -m jaxmnist.train --model jaxmnist.cnns:NAME ...``, the default loop (the epoch as one scan);
- the same with ``--loop step`` (one compiled call per batch);
- tuned eager PyTorch of the same network (data preloaded as one tensor, randperm, slicing);
- the same under ``torch.compile``, where it compiles.

Each reports its steady epochs (the first is a warm-up, not timed); the table gives medians over rounds
and, per round, the ratio to eager PyTorch's epoch of the same round.

    python scripts/benchmark.py --cnn                      # the whole training set, 3 rounds
    python scripts/benchmark.py --cnn --cnn-images 12800 --repeats 2 --epochs 1   # 200 steps an epoch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NETWORKS = {"PyTorchExampleNet": "nll", "FlaxExampleCNN": "ce"}
BATCH_SIZE = 64
FULL_EPOCH = 60_000


def torch_worker(network: str, data_dir: Path, epochs: int, compiled: bool) -> dict:
    """Seconds of each steady epoch of tuned eager PyTorch (or ``torch.compile``) training ``network``."""
    import numpy as np
    import torch

    from jaxmnist.data import load_mnist
    from jaxmnist.torch_compat import normalize_torch, reference_cnn

    torch.set_num_threads(os.cpu_count() or 1)
    images, labels = load_mnist("train", data_dir, verify=False)  # a subset is no longer MNIST's file
    inputs = normalize_torch(images, torch.float32).reshape(len(images), 1, 28, 28)
    targets = torch.from_numpy(np.asarray(labels, np.int64))
    torch.manual_seed(0)
    model = reference_cnn(network)
    step_model = torch.compile(model) if compiled else model
    criterion = torch.nn.NLLLoss() if NETWORKS[network] == "nll" else torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    times = []
    for _ in range(epochs + 1):  # the first epoch warms up (and compiles) and is not timed
        started = time.perf_counter()
        order = torch.randperm(len(inputs))
        for first in range(0, len(inputs), BATCH_SIZE):
            batch = order[first : first + BATCH_SIZE]
            optimizer.zero_grad()
            loss = criterion(step_model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
        loss.item()
        times.append(time.perf_counter() - started)
    return {"epoch_seconds": times[1:]}


def command_epochs(network: str, data_dir: Path, epochs: int, loop: str, verify: bool) -> dict:
    """Seconds of each steady epoch of ``python -m jaxmnist.train --model jaxmnist.cnns:NETWORK``, as its
    ``--metrics-out`` records them (training only, the evaluation after each epoch left out)."""
    with tempfile.TemporaryDirectory() as folder:
        metrics = Path(folder) / "metrics.jsonl"
        command = [sys.executable, "-m", "jaxmnist.train", "--model", f"jaxmnist.cnns:{network}", "--optimizer",
                   "adam", "--lr", "0.001", "--loss", NETWORKS[network], "--epochs", str(epochs + 1), "--loop", loop,
                   "--data-dir", str(data_dir), "--metrics-out", str(metrics), "--quiet"]  # fmt: skip
        subprocess.run(command + ([] if verify else ["--no-verify"]), check=True, capture_output=True)
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"epoch_seconds": [record["seconds"] for record in records[1:]]}


def _subset(data_dir: Path, num_images: int, folder: Path) -> Path:
    """The first ``num_images`` training images (and 1,000 test images) as IDX files in ``folder``."""
    from jaxmnist.data import load_mnist, write_mnist

    images, labels = load_mnist("train", data_dir)
    write_mnist(folder, "train", images[:num_images], labels[:num_images])
    images, labels = load_mnist("test", data_dir)
    write_mnist(folder, "test", images[:1000], labels[:1000])
    return folder


def _torch_run(network: str, data_dir: Path, epochs: int, compiled: bool) -> dict:
    command = [sys.executable, __file__, "--worker", network, "--data-dir", str(data_dir), "--epochs", str(epochs)]
    output = subprocess.run(command + (["--compiled"] if compiled else []), capture_output=True, text=True)
    if output.returncode != 0:
        return {"failed": output.stderr.strip().splitlines()[-1] if output.stderr.strip() else "failed"}
    return json.loads(output.stdout.strip().splitlines()[-1])


def cnn_benchmark(args: argparse.Namespace) -> dict:
    """Rounds of every contender for both networks; prints the table and returns the report."""
    data_dir = args.data_dir or Path(os.environ.get("JAXMNIST_DATA_DIR", ""))
    with tempfile.TemporaryDirectory() as folder:
        subset = args.cnn_images < FULL_EPOCH
        source = _subset(data_dir, args.cnn_images, Path(folder)) if subset else data_dir
        contenders = {
            "jaxmnist command (scan)": lambda net: command_epochs(net, source, args.epochs, "scan", not subset),
            "jaxmnist command --loop step": lambda net: command_epochs(net, source, args.epochs, "step", not subset),
            "PyTorch tuned eager": lambda net: _torch_run(net, source, args.epochs, compiled=False),
            "PyTorch torch.compile": lambda net: _torch_run(net, source, args.epochs, compiled=True),
        }
        runs = {net: {label: [] for label in contenders} for net in NETWORKS}
        for round_index in range(args.repeats):
            for net in NETWORKS:
                for label, run in contenders.items():
                    runs[net][label].append(run(net))
                    print(f"round {round_index + 1}/{args.repeats}: {net}, {label} done", file=sys.stderr, flush=True)
    steps = -(-args.cnn_images // BATCH_SIZE)
    rows = []
    for net, results in runs.items():
        eager = [statistics.median(run["epoch_seconds"]) for run in results["PyTorch tuned eager"]]
        for label, rounds in results.items():
            if any("failed" in run for run in rounds):
                rows.append({"network": net, "contender": label, "failed": rounds[0].get("failed")})
                continue
            per_round = [statistics.median(run["epoch_seconds"]) for run in rounds]
            seconds = statistics.median(per_round)
            rows.append({
                "network": net, "contender": label, "epoch_seconds": seconds, "ms_per_step": 1000 * seconds / steps,
                "full_epoch_seconds": seconds * FULL_EPOCH / args.cnn_images,
                "times_torch_eager_per_round": [mine / theirs for mine, theirs in zip(per_round, eager)],
            })  # fmt: skip
    print(
        f"\nconvolutional networks, batch {BATCH_SIZE}, Adam, {args.cnn_images:,} training images an epoch "
        f"({steps} steps), {os.cpu_count()} CPU cores, median of {args.repeats} rounds x {args.epochs} epochs"
    )
    print(f"{'network':<18} {'contender':<30} {'s/epoch':>8} {'ms/step':>8} {'s/60k':>7}  x eager PyTorch per round")
    for row in rows:
        if "failed" in row:
            print(f"{row['network']:<18} {row['contender']:<30} failed: {row['failed']}")
            continue
        ratios = ", ".join(f"{ratio:.2f}" for ratio in row["times_torch_eager_per_round"])
        print(f"{row['network']:<18} {row['contender']:<30} {row['epoch_seconds']:>8.2f} {row['ms_per_step']:>8.1f} "
              f"{row['full_epoch_seconds']:>7.1f}  {ratios}")  # fmt: skip
    return {"images_per_epoch": args.cnn_images, "repeats": args.repeats, "rows": rows, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=sorted(NETWORKS), required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--compiled", action="store_true")
    args = parser.parse_args()
    print(json.dumps(torch_worker(args.worker, args.data_dir, args.epochs, args.compiled)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
