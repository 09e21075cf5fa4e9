"""Step-for-step parity of jaxmnist with the PyTorch lesson, and where jaxmnist sits in PyTorch's band.

Parity (default): the lesson's torch model is built from ``--seed``, its initial weights copied into
jaxmnist, and both frameworks are fed identical batches (jaxmnist's per-epoch permutations, the last
batch of 32 kept) with SGD(lr=0.003). Reports the per-step loss differences, the per-epoch losses of
both beside the lesson's published ones, the final parameter difference and both test accuracies;
writes a JSON report and a PNG of both loss curves.

    python scripts/compare_pytorch.py                   # one epoch, float32
    python scripts/compare_pytorch.py --dtype float64   # one epoch, both frameworks in float64
    python scripts/compare_pytorch.py --seeds 100       # 100 seeds in one program vs PyTorch's 100 seeds

Needs torch for parity (``pip install torch==2.13.0``), matplotlib for the PNG (skipped without it).
"""

from __future__ import annotations

import argparse
import dataclasses
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
        "--seeds",
        type=int,
        default=0,
        help="distribution mode: jaxmnist's default run on this many seeds (one program), compared with PyTorch's",
    )
    parser.add_argument(
        "--run-torch",
        action="store_true",
        help="with --seeds: run PyTorch's seeds here instead of using its 100 measured ones",
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

    from jaxmnist.data import load_mnist
    from jaxmnist.lesson import PUBLISHED_LOSSES
    from jaxmnist.model import MLP
    from jaxmnist.normalization import normalize
    from jaxmnist.plan import epoch_key, run_keys
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


def torch_seed_runs(seeds: int, data_dir: Path | None) -> dict[str, np.ndarray]:
    """The lesson in tuned eager PyTorch for ``torch.manual_seed(0 .. seeds - 1)``: epoch losses and accuracy."""
    import torch

    from jaxmnist.data import load_mnist
    from jaxmnist.torch_compat import lesson_model, normalize_torch, torch_accuracy

    (images, labels), (test_images, test_labels) = load_mnist("train", data_dir), load_mnist("test", data_dir)
    inputs = normalize_torch(images, torch.float32).reshape(len(images), -1)
    targets = torch.from_numpy(labels.astype(np.int64))
    losses, accuracies = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = lesson_model()
        optimizer, criterion = torch.optim.SGD(model.parameters(), lr=0.003), torch.nn.NLLLoss()
        epochs = []
        for _ in range(5):
            order, total = torch.randperm(len(inputs)), 0.0
            for start in range(0, len(inputs), 64):
                batch = order[start : start + 64]
                optimizer.zero_grad()
                loss = criterion(model(inputs[batch]), targets[batch])
                loss.backward()
                optimizer.step()
                total += loss.item()
            epochs.append(total / -(-len(inputs) // 64))
        losses.append(epochs)
        accuracies.append(torch_accuracy(model, test_images, test_labels))
        print(f"PyTorch seed {seed}: " + "  ".join(f"{loss:.4f}" for loss in epochs), flush=True)
    return {"epoch_losses": np.array(losses), "test_accuracy": np.array(accuracies)}


def plot_bands(ours: np.ndarray, theirs: np.ndarray, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return
    figure, axes = plt.subplots(figsize=(7, 4))
    epochs = np.arange(1, ours.shape[1] + 1)
    for values, label in (
        (theirs[:, : len(epochs)], f"PyTorch, {len(theirs)} seeds"),
        (ours, f"jaxmnist, {len(ours)} seeds"),
    ):
        axes.fill_between(epochs, values.min(axis=0), values.max(axis=0), alpha=0.3)
        axes.plot(epochs, values.mean(axis=0), "o-", label=f"{label}: mean, [min, max]")
    axes.set_xlabel("epoch")
    axes.set_ylabel("training loss")
    axes.set_xticks(epochs)
    axes.set_title("The lesson's loss band: jaxmnist beside PyTorch")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


def distribution(args: argparse.Namespace) -> dict:
    """jaxmnist's default run on ``--seeds`` seeds (one vmapped program) against PyTorch's seeds."""
    from jaxmnist.comparison import compare_bands, verdict
    from jaxmnist.config import TrainConfig
    from jaxmnist.data import load_mnist
    from jaxmnist.lesson import pytorch_seed_runs
    from jaxmnist.loop import fit

    train_data, test_data = load_mnist("train", args.data_dir), load_mnist("test", args.data_dir)
    started = time.perf_counter()
    history = list(fit(TrainConfig(seeds=args.seeds), train_data, test_data))[-1].history
    seconds = time.perf_counter() - started
    ours = np.array([[r.train_loss for r in history if r.seed == seed] for seed in range(args.seeds)])
    accuracy = np.array([r.test_accuracy for r in history if r.epoch == 5])
    theirs = torch_seed_runs(args.seeds, args.data_dir) if args.run_torch else pytorch_seed_runs()
    source = (
        f"PyTorch run here on {args.seeds} seeds"
        if args.run_torch
        else "PyTorch's 100 measured seeds (jaxmnist/reference)"
    )
    comparisons = compare_bands(ours, theirs["epoch_losses"])
    print(f"\njaxmnist: {args.seeds} seeds in one program, {seconds:.1f} s; against {source}")
    print("epoch  jaxmnist mean ± std    PyTorch mean ± std     diff/SE   Welch p   KS p")
    for c in comparisons:
        print(f"{c.epoch:>5}  {c.ours_mean:.4f} ± {c.ours_std:.4f}      {c.theirs_mean:.4f} ± {c.theirs_std:.4f}"
              f"      {c.difference_in_standard_errors:+6.2f}   {c.welch_p:7.3f}  {c.ks_p:6.3f}")  # fmt: skip
    print(f"test accuracy: jaxmnist {accuracy.mean():.4f} ± {accuracy.std(ddof=1):.4f}; "
          f"PyTorch {theirs['test_accuracy'].mean():.4f} ± {theirs['test_accuracy'].std(ddof=1):.4f}")  # fmt: skip
    print("verdict:", verdict(comparisons))
    plot_bands(ours, theirs["epoch_losses"], args.png)
    comparisons_json = [dataclasses.asdict(comparison) for comparison in comparisons]
    return {"seeds": args.seeds, "seconds": seconds, "epoch_losses": ours.tolist(),
            "test_accuracy": accuracy.tolist(), "comparisons": comparisons_json}  # fmt: skip


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
