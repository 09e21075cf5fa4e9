from __future__ import annotations

import importlib.util
import subprocess
import sys

import jaxmnist

HEAVY_OPTIONAL_MODULES = ("tensorflow", "tensorflow_datasets", "torch", "matplotlib")


def test_import_loads_no_optional_heavy_dependency():
    code = (
        "import sys, jaxmnist; from jaxmnist import train_step, load_mnist, fit; "
        f"print([m for m in {HEAVY_OPTIONAL_MODULES!r} if m in sys.modules])"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_public_api_is_importable_typed_and_documented():
    for name in jaxmnist.__all__:
        value = getattr(jaxmnist, name)
        assert value.__doc__, f"jaxmnist.{name} has no docstring"
    assert {
        "MLP",
        "create_train_state",
        "train_step",
        "evaluate",
        "load_mnist",
        "normalize",
        "cross_entropy_loss",
        "nll_loss",
        "mse_loss",
        "accuracy",
    } <= set(jaxmnist.__all__)


def test_unknown_attribute_is_an_attribute_error():
    try:
        jaxmnist.no_such_thing  # noqa: B018
    except AttributeError as error:
        assert "no_such_thing" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_no_export_shares_its_name_with_a_submodule():
    # Importing a submodule sets the package attribute of its name, which would hide the export.
    clashes = [name for name in jaxmnist.__all__ if importlib.util.find_spec(f"jaxmnist.{name}") is not None]
    assert not clashes


def test_the_errors_a_caller_catches_are_exported_and_catch_real_failures(tmp_path):
    # Each top-level name must be the class the library raises, not one that would catch nothing.
    import flax.linen as nn
    import jax
    import numpy as np

    from jaxmnist.checkpoint import load_params
    from jaxmnist.data import load_mnist
    from jaxmnist.model_source import load_model

    class NeedsAMask(nn.Module):
        @nn.compact
        def __call__(self, images, mask):
            return nn.Dense(10)(images.reshape(len(images), -1))

    float_images = (np.zeros((8, 28, 28), np.float32), np.zeros(8, np.int32))
    (tmp_path / "garbage.msgpack").write_bytes(b"not a checkpoint")
    failures = {
        "SettingsError": lambda: jaxmnist.TrainConfig(optimizer="sgd", momentum=0.9),
        "DataError": lambda: load_mnist("train", tmp_path, download=False),
        "ModelSpecError": lambda: load_model(f"{tmp_path / 'absent.py'}:Net"),
        "CheckpointError": lambda: load_params(tmp_path / "garbage.msgpack"),
        "ModelCallError": lambda: jaxmnist.create_train_state(jax.random.key(0), NeedsAMask()),
        "RunError": lambda: next(jaxmnist.fit(jaxmnist.TrainConfig(), float_images, float_images)),
    }
    for name, fail in failures.items():
        assert name in jaxmnist.__all__
        try:
            fail()
        except getattr(jaxmnist, name) as caught:
            assert str(caught), name
        else:
            raise AssertionError(f"{name}: nothing raised")
    assert "DivergenceError" in jaxmnist.__all__  # raised after steps: test_checkpoint catches it by that name
