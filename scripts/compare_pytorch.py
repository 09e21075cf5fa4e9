"""Step-for-step parity of jaxmnist with the PyTorch lesson, and where jaxmnist sits in PyTorch's band.

Parity (default): the lesson's torch model is built from ``--seed``, its initial weights copied into
jaxmnist, and both frameworks are fed identical batches (jaxmnist's per-epoch permutations, the last
batch of 32 kept) with SGD(lr=0.003). Reports the per-step loss differences, the per-epoch losses of
both beside the lesson's published ones, the final parameter difference and both test accuracies;
writes a JSON report and a PNG of both loss curves.

    python scripts/compare_pytorch.py                   # one epoch, float32
    python scripts/compare_pytorch.py --dtype float64   # one epoch, both frameworks in float64
    python scripts/compare_pytorch.py --seeds 5         # jaxmnist's default run on 5 seeds vs the band

Needs torch for parity (``pip install torch==2.13.0``), matplotlib for the PNG (skipped without it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

STEPS_COMPARED_IN_FLOAT32 = 100


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs to compare (default 1)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--loss", choices=("nll", "ce"), default="nll", help="LogSoftmax+NLLLoss or CrossEntropyLoss")
    parser.add_argument(
        "--seed", type=int, default=0, help="torch.manual_seed of the initial weights and the jax shuffle seed"
    )
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST folder (default: $JAXMNIST_DATA_DIR)")
    parser.add_argument(
        "--seeds", type=int, default=0, help="distribution mode: train jaxmnist's default run on this many seeds"
    )
    parser.add_argument("--json", type=Path, default=Path("compare_pytorch.json"), help="report file")
    parser.add_argument("--png", type=Path, default=Path("compare_pytorch.png"), help="loss-curve plot")
    return parser.parse_args()


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    return np.abs(ours - theirs) / np.maximum(np.abs(theirs), np.finfo(np.float64).tiny)


def compare(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from jaxmnist.config import epoch_key, run_keys
    from jaxmnist.data import load_mnist
    from jaxmnist.lesson import PUBLISHED_LOSSES
    from jaxmnist.model import MLP
    from jaxmnist.normalization import normalize
    from jaxmnist.torch_compat import lesson_model, params_from_torch, side_by_side_epoch, torch_accuracy
    from jaxmnist.train import create_train_state, evaluate

    dtype = jnp.dtype(args.dtype)
    train_images, train_labels = load_mnist("train", args.data_dir)
    test_images, test_labels = load_mnist("test", args.data_dir)

    torch.manual_seed(args.seed)
    model = lesson_model(log_softmax=(args.loss == "nll")).to(getattr(torch, args.dtype))
    state = create_train_state(
        jax.random.key(0),
        MLP(param_dtype=dtype),
        learning_rate=args.lr,
        loss=args.loss,
        params=params_from_torch(model.state_dict()),
    )
    images, labels = jax.device_put(train_images), jax.device_put(train_labels)
    data_key = run_keys(args.seed)[1]
    jax_losses, torch_losses = [], []
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        state, ours, theirs = side_by_side_epoch(
            model, state, images, labels, epoch_key(data_key, epoch), args.batch_size, args.lr, args.loss
        )
        jax_losses.append(ours)
        torch_losses.append(theirs)
        print(f"epoch {epoch}: jaxmnist {ours.mean():.6f}  PyTorch {theirs.mean():.6f}", flush=True)
    seconds = time.perf_counter() - started

    ours, theirs = np.concatenate(jax_losses), np.concatenate(torch_losses)
    relative = relative_difference(ours, theirs)
    first = slice(0, STEPS_COMPARED_IN_FLOAT32)
    final_torch_params = params_from_torch(model.state_dict())
    parameter_difference = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(final_torch_params))
    )
    return {
        "dtype": args.dtype,
        "loss": args.loss,
        "seed": args.seed,
        "steps": len(ours),
        "max_abs_step_difference": float(np.max(np.abs(ours - theirs))),
        "max_rel_step_difference": float(relative.max()),
        f"max_rel_step_difference_first_{STEPS_COMPARED_IN_FLOAT32}": float(relative[first].max()),
        "max_rel_step_difference_per_epoch": [float(r.max()) for r in np.split(relative, args.epochs)],
        "epoch_losses": {
            "jaxmnist": [float(losses.mean()) for losses in jax_losses],
            "pytorch": [float(losses.mean()) for losses in torch_losses],
            "published": list(PUBLISHED_LOSSES[: args.epochs]),
        },
        "max_abs_parameter_difference": parameter_difference,
        "test_accuracy": {
            "jaxmnist": float(evaluate(state, normalize(test_images, dtype), test_labels)["accuracy"]),
            "pytorch": torch_accuracy(model, test_images, test_labels),
        },
        "seconds_both": seconds,
        "step_losses": {"jaxmnist": ours.tolist(), "pytorch": theirs.tolist()},
    }


def print_parity(report: dict) -> None:
    first = f"max_rel_step_difference_first_{STEPS_COMPARED_IN_FLOAT32}"
    print(f"\n{report['steps']} steps in {report['dtype']}, {report['loss']} loss, seed {report['seed']}")
    print(
        f"  largest per-step loss difference: {report['max_abs_step_difference']:.3e} absolute, "
        f"{report['max_rel_step_difference']:.3e} relative"
    )
    print(f"  largest relative difference over the first {STEPS_COMPARED_IN_FLOAT32} steps: {report[first]:.3e}")
    print(f"  largest parameter difference at the end: {report['max_abs_parameter_difference']:.3e}")
    losses = report["epoch_losses"]
    print("\n  epoch  jaxmnist        PyTorch         published  max rel diff")
    for epoch, (ours, theirs, published, diff) in enumerate(
        zip(losses["jaxmnist"], losses["pytorch"], losses["published"], report["max_rel_step_difference_per_epoch"]),
        start=1,
    ):
        print(f"  {epoch:>5}  {ours:.12f}  {theirs:.12f}  {published:.4f}     {diff:.3e}")
    accuracy = report["test_accuracy"]
    print(f"\n  test accuracy: jaxmnist {accuracy['jaxmnist']:.4f}, PyTorch {accuracy['pytorch']:.4f}")


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return
    figure, (curves, differences) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    curves.plot(report["step_losses"]["pytorch"], label="PyTorch", linewidth=2.5, alpha=0.6)
    curves.plot(report["step_losses"]["jaxmnist"], label="jaxmnist", linewidth=1)
    curves.set_ylabel("batch loss")
    curves.set_title(f"The lesson, step for step ({report['dtype']}, {report['loss']} loss)")
    curves.legend()
    ours, theirs = np.array(report["step_losses"]["jaxmnist"]), np.array(report["step_losses"]["pytorch"])
    differences.semilogy(np.maximum(relative_difference(ours, theirs), 1e-18))
    differences.set_ylabel("relative difference")
    differences.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


def distribution(args: argparse.Namespace) -> dict:
    from jaxmnist.config import TrainConfig
    from jaxmnist.data import load_mnist
    from jaxmnist.lesson import PYTORCH_LOSS_BAND, PYTORCH_TEST_ACCURACY
    from jaxmnist.loop import fit

    train_data, test_data = load_mnist("train", args.data_dir), load_mnist("test", args.data_dir)
    losses, accuracies = [], []
    for seed in range(args.seeds):
        results = [progress.result for progress in fit(TrainConfig(seed=seed), train_data, test_data)]
        losses.append([result.train_loss for result in results])
        accuracies.append(results[-1].test_accuracy)
        print(
            f"seed {seed}: " + "  ".join(f"{loss:.4f}" for loss in losses[-1]) + f"  accuracy {accuracies[-1]:.4f}",
            flush=True,
        )
    losses_array = np.array(losses)
    print(f"\njaxmnist, {args.seeds} seeds, beside PyTorch's 100-seed band (jaxmnist/lesson.py)")
    print("epoch  jaxmnist mean  [min, max]          PyTorch mean ± std    [min, max]         z of our mean")
    for epoch, (column, (mean, std, low, high)) in enumerate(zip(losses_array.T, PYTORCH_LOSS_BAND), start=1):
        print(
            f"{epoch:>5}  {column.mean():.4f}         [{column.min():.4f}, {column.max():.4f}]    "
            f"{mean:.4f} ± {std:.4f}       [{low:.4f}, {high:.4f}]   {(column.mean() - mean) / std:+.2f}"
        )
    mean, low, high = PYTORCH_TEST_ACCURACY
    print(
        f"test accuracy: jaxmnist mean {np.mean(accuracies):.4f} [{min(accuracies):.4f}, {max(accuracies):.4f}]; "
        f"PyTorch mean {mean:.4f} [{low:.4f}, {high:.4f}]"
    )
    return {"seeds": args.seeds, "epoch_losses": losses, "test_accuracy": accuracies}


def main() -> int:
    args = parse_args()
    if args.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    if args.seeds:
        report = distribution(args)
    else:
        report = compare(args)
        print_parity(report)
        plot(report, args.png)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
