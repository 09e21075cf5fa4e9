"""``python -m jaxmnist.backprop``: the chain rule walked through on one real MNIST batch (``jaxmnist.backprop``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from jaxmnist.commands.kit import (
    EXIT_BAD_INPUT,
    OneLineParser,
    add_data_arguments,
    configure_jax,
    load_splits,
    positive_float,
    positive_int,
    report_error,
)
from jaxmnist.idx import DataError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m jaxmnist.backprop",
        description="Compute the lesson's gradients three ways (chain rule factor by factor, by hand, "
        "jax.grad) on one MNIST batch and show that they agree.",
    )
    parser.add_argument(
        "--loss", choices=("mse", "ce"), default="mse", help="the lesson's MSE (default) or cross-entropy"
    )
    parser.add_argument(
        "--hidden", type=positive_int, default=128, help="hidden units of the sigmoid network (default 128)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images in the batch (default 64)")
    parser.add_argument(
        "--lr", type=positive_float, default=0.01, help="alpha of the one SGD update shown (default 0.01)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="float64 enables JAX's 64-bit mode: the hand-derived gradients then match jax.grad to ~1e-17 "
        "(default float32)",
    )
    add_data_arguments(parser)
    return parser


def walk_through(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp

    from jaxmnist import backprop
    from jaxmnist.model import MLP
    from jaxmnist.normalization import normalize
    from jaxmnist.train import create_train_state

    dtype = jnp.dtype(args.dtype)
    ((images, labels),) = load_splits(args, ["train"])
    inputs = normalize(images[: args.batch_size], dtype).reshape(-1, 784)
    labels = jnp.asarray(labels[: args.batch_size])
    params = backprop.init_params(jax.random.key(0), (784, args.hidden, 10), dtype)
    values = backprop.forward(params, inputs, labels, args.loss)

    print(f"One MNIST batch of {len(inputs)} images, {args.dtype}, {args.loss} loss\n")
    print(
        "forward:  x {} -> L1 = x W1 + b1 {} -> S = sigmoid(L1) {} -> L2 = S W2 + b2 {} -> l = {:.6f}".format(
            inputs.shape, values["L1"].shape, values["S"].shape, values["L2"].shape, float(values["loss"])
        )
    )
    chain, upstream = backprop.chain_rule_grads(params, inputs, labels, args.loss)
    manual = backprop.manual_grads(params, inputs, labels, args.loss)
    autodiff = backprop.autodiff_grads(params, inputs, labels, args.loss)
    print("\nbackward, the chain rule dl/dW1 = dL1/dW1 . dS/dL1 . dL2/dS . dl/dL2, one factor (a VJP) at a time:")
    print(f"  dl/dL2                          {upstream['dl/dL2'].shape}")
    print(f"  . dL2/dS  (W2^T)      -> dl/dS  {upstream['dl/dS'].shape}")
    print(f"  . dS/dL1  (S(1 - S))  -> dl/dL1 {upstream['dl/dL1'].shape}")
    print(f"  . dL1/dW1 (x^T)       -> dl/dW1 {chain['W1'].shape}")
    print("\ngradient norms   chain rule       by hand          jax.grad")
    for name in ("W1", "b1", "W2", "b2"):
        norms = [float(jnp.linalg.norm(grads[name])) for grads in (chain, manual, autodiff)]
        print(f"  dl/d{name:<4}      " + "  ".join(f"{norm:.12f}" for norm in norms))
    print(
        f"largest difference: chain rule vs jax.grad {backprop.largest_difference(chain, autodiff):.3e}, "
        f"by hand vs jax.grad {backprop.largest_difference(manual, autodiff):.3e}"
    )

    updated = backprop.sgd_update(params, autodiff, args.lr)
    after = float(backprop.forward(updated, inputs, labels, args.loss)["loss"])
    print(f"\nW' = W - alpha dl/dW with alpha = {args.lr}: loss {float(values['loss']):.6f} -> {after:.6f}")

    state = create_train_state(jax.random.key(0), MLP(param_dtype=dtype))
    layerwise = backprop.mlp_layerwise_grads(state.params, inputs, labels, state.loss_fn)
    whole = jax.grad(lambda p: state.loss_fn(state.apply_fn({"params": p}, inputs), labels, None))(state.params)
    print(
        f"\nThe lesson's MLP 784-128-64-10 (ReLU, LogSoftmax + NLLLoss): each layer's VJP composed backwards "
        f"vs jax.grad of the flax model, largest difference {backprop.largest_difference(layerwise, whole):.3e}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_jax(args.dtype == "float64", compile_cache=False)
    try:
        walk_through(args)
    except DataError as error:
        report_error(error, {}, debug=False)
        return EXIT_BAD_INPUT
    return 0
