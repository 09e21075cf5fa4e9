"""Convolutions in XLA:CPU's fast layout: the rewrite keeps every value and gradient, reaches the compiled
epoch's loop body, and a CNN's scanned epoch equals its steps one call at a time."""

from __future__ import annotations

import re
from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmnist.config import TrainConfig
from jaxmnist.loop import fit
from jaxmnist.plan import RunPlan
from jaxmnist.programs import Programs
from jaxmnist.train import create_train_state, gather_batch, train_epoch, train_step
from jaxmnist.train.convolutions import COMPILER_OPTIONS, canonical_convolutions

from conftest import make_digits


@pytest.fixture(autouse=True)
def standard_promotion():
    """flax's pooling layers mix a Python float into integer-free math that strict promotion refuses."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def numpy_convolution(images, kernel, strides, padding, dilation, groups):
    """A direct float64 convolution in NCHW/OIHW, written out by hand: the independent reference."""
    images = np.pad(images, ((0, 0), (0, 0), *padding))
    _, _, height, width = images.shape
    out_features, group_features, kernel_height, kernel_width = kernel.shape
    out_height = (height - (kernel_height - 1) * dilation[0] - 1) // strides[0] + 1
    out_width = (width - (kernel_width - 1) * dilation[1] - 1) // strides[1] + 1
    out = np.zeros((images.shape[0], out_features, out_height, out_width))
    per_group = out_features // groups
    for group in range(groups):
        group_images = images[:, group * group_features : (group + 1) * group_features]
        group_kernel = kernel[group * per_group : (group + 1) * per_group]
        for row in range(kernel_height):
            for column in range(kernel_width):
                top, left = row * dilation[0], column * dilation[1]
                window = group_images[
                    :,
                    :,
                    top : top + strides[0] * (out_height - 1) + 1 : strides[0],
                    left : left + strides[1] * (out_width - 1) + 1 : strides[1],
                ]
                out[:, group * per_group : (group + 1) * per_group] += np.einsum(
                    "nchw,oc->nohw", window, group_kernel[:, :, row, column]
                )
    return out


CANONICAL = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"


def _lowered_convolutions(function, *arguments) -> list[str]:
    """The dimension numbers of every convolution of ``function`` as lowered for this (CPU) backend."""
    lowered = jax.jit(function).lower(*arguments).as_text()
    return re.findall(r"stablehlo.convolution.*? dim_numbers = (.*?), window", lowered)


# (images layout, kernel layout, output layout) and the transposes from NCHW / OIHW / NCHW to them.
LAYOUTS = {
    "NCHW": (("NCHW", "OIHW", "NCHW"), (0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3)),
    "NHWC": (("NHWC", "HWIO", "NHWC"), (0, 2, 3, 1), (2, 3, 1, 0), (0, 2, 3, 1)),
    "mixed": (("CHWN", "IHWO", "NWHC"), (1, 2, 3, 0), (1, 2, 3, 0), (0, 3, 2, 1)),
}
OPTIONS = {
    "plain": dict(strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), groups=1),
    "strided": dict(strides=(2, 1), padding=((0, 1), (2, 0)), dilation=(1, 1), groups=1),
    "dilated": dict(strides=(1, 2), padding=((1, 1), (0, 0)), dilation=(2, 1), groups=1),
    "grouped": dict(strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), groups=2),
}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize(
    "layout", [pytest.param(name, marks=[pytest.mark.slow] if name != "NCHW" else []) for name in LAYOUTS]
)
def test_rewrite_keeps_every_convolution_value_and_gradient_in_float64(layout, option):
    numbers, image_order, kernel_order, out_order = LAYOUTS[layout]
    settings = OPTIONS[option]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 4, 9, 8))
    kernel = rng.standard_normal((6, 4 // settings["groups"], 3, 2))
    expected = numpy_convolution(images, kernel, **settings)
    weights = rng.standard_normal(expected.shape).transpose(out_order)

    def convolution(images, kernel):
        return jax.lax.conv_general_dilated(
            images, kernel, settings["strides"], settings["padding"], rhs_dilation=settings["dilation"],
            dimension_numbers=numbers, feature_group_count=settings["groups"],
        )  # fmt: skip

    def value_and_gradients(images, kernel):
        return jax.value_and_grad(lambda i, k: (convolution(i, k) * weights).sum(), argnums=(0, 1))(images, kernel)

    with jax.enable_x64(True):
        arguments = (jnp.asarray(images.transpose(image_order)), jnp.asarray(kernel.transpose(kernel_order)))
        np.testing.assert_allclose(canonical_convolutions(convolution)(*arguments), expected.transpose(out_order),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
        rewritten = canonical_convolutions(value_and_gradients)
        chex.assert_trees_all_close(rewritten(*arguments), value_and_gradients(*arguments), rtol=1e-12, atol=1e-12)
        assert _lowered_convolutions(rewritten, *arguments) == [CANONICAL] * 3  # forward and both gradients


def test_gradients_of_a_cnn_have_convolutions_in_other_layouts_until_rewritten():
    model = nn.Conv(4, (3, 3))
    params = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))

    def loss(params, images):
        return model.apply(params, images).sum()

    images = jnp.ones((2, 8, 8, 1))
    before = _lowered_convolutions(jax.grad(loss), params, images)
    after = _lowered_convolutions(canonical_convolutions(jax.grad(loss)), params, images)
    assert len(before) == 1 and before != [CANONICAL]  # the weight gradient, in a layout of its own
    assert after == [CANONICAL]


class BatchNormDropoutCNN(nn.Module):
    """Convolutions with a stride, BatchNorm, max pooling and Dropout: each with a gradient of its own kind."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        layer = partial(nn.Conv, dtype=self.dtype, param_dtype=self.dtype)
        x = layer(8, (3, 3))(images.reshape((images.shape[0], 28, 28, 1)))
        x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, param_dtype=self.dtype)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(layer(16, (3, 3), strides=2, padding="VALID")(x)))
        return nn.Dense(10, dtype=self.dtype, param_dtype=self.dtype)(x.reshape((x.shape[0], -1)))


def _compiled_convolutions(hlo: str) -> tuple[list[str], set[str]]:
    """The dimension labels of every convolution in a compiled program, and the computations that hold a
    convolution and are run by a YNNPACK fusion."""
    labels = re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", hlo)
    computations = dict(re.findall(r"^%?([\w.-]+) [^\n]*\{\n(.*?)\n\}", hlo, flags=re.S | re.M))
    with_convolution = {name for name, body in computations.items() if "convolution(" in body}
    by_ynnpack = set(re.findall(r"calls=%?([\w.-]+)[^\n]*__ynn_fusion", hlo))
    return labels, with_convolution & by_ynnpack


def test_the_rewrite_traces_a_step_once_and_leaves_a_program_without_convolutions_as_it_was():
    traces = []

    def step(params, images):
        traces.append(None)  # a Python side effect: once per trace
        return jax.value_and_grad(lambda p: jnp.tanh(images @ p).sum())(params)

    params, images = jnp.ones((4, 3)), jnp.ones((2, 4))
    assert jax.jit(canonical_convolutions(step)).lower(params, images).as_text() == (
        jax.jit(step).lower(params, images).as_text()
    )
    assert len(traces) == 2  # one for each program (the rewrite traced its function twice)
    # The lesson's own step: the same program as its undecorated function's.
    state = create_train_state(jax.random.key(0))
    batch = gather_batch(jnp.zeros((64, 28, 28), jnp.uint8), jnp.arange(64) % 10, jnp.arange(64), jnp.ones(64, bool),
                         jnp.float32)  # fmt: skip
    undecorated = train_step.__wrapped__.__wrapped__
    assert train_step.lower(state, batch).as_text() == jax.jit(undecorated).lower(state, batch).as_text()


@pytest.mark.slow
def test_a_cnn_epoch_program_runs_every_convolution_in_the_fast_layout_and_kernels():
    images, labels = make_digits(96, seed=1)
    config = TrainConfig(epochs=1, batch_size=32, optimizer="adam", learning_rate=1e-3)
    state = create_train_state(jax.random.key(0), BatchNormDropoutCNN(), optax.adam(1e-3), loss="ce")
    programs = Programs(RunPlan.of(config), state, jnp.asarray(images), jnp.asarray(labels, jnp.int32), 3, None)
    labels_found, run_by_ynnpack = _compiled_convolutions(programs.epoch.as_text())
    # Forward, input-gradient and weight-gradient convolutions of both layers, inside the epoch's loop.
    assert len(labels_found) >= 5
    assert set(labels_found) == {"b01f_01io->b01f"}
    assert not run_by_ynnpack


@pytest.mark.slow
def test_the_compiler_options_leave_a_program_without_convolutions_unchanged():
    images, labels = jnp.zeros((128, 28, 28), jnp.uint8), jnp.arange(128) % 10
    state = create_train_state(jax.random.key(0))
    program = jax.jit(partial(train_epoch, batch_size=64)).lower(state, images, labels, jax.random.key(1))
    strip = lambda text: re.sub(r"^HloModule[^\n]*\n", "", text)
    assert strip(program.compile().as_text()) == strip(program.compile(COMPILER_OPTIONS).as_text())


@pytest.mark.slow
def test_a_scanned_cnn_epoch_equals_its_steps_one_call_at_a_time_in_float64():
    images, labels = make_digits(400, seed=2)
    test_images, test_labels = make_digits(64, seed=3)
    finals = {}
    with jax.enable_x64(True):
        for loop in ("scan", "step"):
            config = TrainConfig(epochs=2, batch_size=48, loop=loop, optimizer="adam", learning_rate=1e-3,
                                 dtype="float64")  # fmt: skip
            runs = fit(config, (images, labels), (test_images, test_labels),
                       model=BatchNormDropoutCNN(jnp.float64), loss="ce")  # fmt: skip
            finals[loop] = list(runs)[-1]
    scanned, stepped = finals["scan"], finals["step"]
    chex.assert_type(scanned.state.params["Conv_0"]["kernel"], jnp.float64)
    chex.assert_trees_all_close(scanned.state.params, stepped.state.params, rtol=1e-12, atol=1e-15)
    chex.assert_trees_all_close(scanned.state.collections, stepped.state.collections, rtol=1e-12, atol=1e-15)
    for scanned_epoch, stepped_epoch in zip(scanned.history, stepped.history, strict=True):
        for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            np.testing.assert_allclose(getattr(scanned_epoch, name), getattr(stepped_epoch, name), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["PyTorchExampleNet", "FlaxExampleCNN"])
def test_the_reference_cnns_have_their_pytorch_twins_sizes_and_output_shapes(name):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: see the README (its CPU build)")
    from jaxmnist import cnns
    from jaxmnist.torch_compat import reference_cnn

    twin = reference_cnn(name)
    variables = getattr(cnns, name)().init(jax.random.key(0), jnp.zeros((2, 28, 28)))
    assert sum(leaf.size for leaf in jax.tree.leaves(variables)) == sum(p.numel() for p in twin.parameters())
    outputs = getattr(cnns, name)().apply(variables, jnp.zeros((2, 28, 28)))
    assert outputs.shape == tuple(twin(torch.zeros(2, 1, 28, 28)).shape) == (2, 10)
