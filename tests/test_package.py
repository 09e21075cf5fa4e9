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
