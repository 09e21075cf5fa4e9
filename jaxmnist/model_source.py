"""Where a run's model comes from: an object given to ``fit``, or a ``"FILE.py:NAME"`` /
``"package.module:NAME"`` spec given to the train command (and recorded in saved files, so ``predict``
can build the model again).

Every source becomes a ``ModelSource``: a function from a seed's initialization key to a model, so that
each of several seeds gets its own initialization (a linen module is initialized from the key later; an
NNX module is built from ``nnx.Rngs(key)``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

Model = nn.Module | nnx.Module


class ModelSpecError(ValueError):
    """A model spec or object that cannot give a model; the message says what and how to fix it.

    Example:
        >>> try:
        ...     load_model("jaxmnist.model:NoSuchModel")
        ... except ModelSpecError as error:
        ...     print(error)
        `model`=jaxmnist.model:NoSuchModel: jaxmnist.model has no NoSuchModel
    """


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model for every seed: ``build(init_key)`` gives the module for the seed with that key.

    Attributes:
        build: from a seed's initialization key to a linen or NNX module.
        name: what the run calls the model (its class name).
        spec: the ``"FILE.py:NAME"`` or ``"package.module:NAME"`` it was loaded from; None for an object.
        per_seed: whether each seed gets its own initialization (False for an NNX module built without
            ``rngs``: an instance, or a class or function that does not take them).
    """

    build: Callable[[jax.Array], Model]
    name: str
    spec: str | None = None
    per_seed: bool = True


def _takes_rngs(function: Callable) -> bool:
    # A class is asked through its __init__: NNX's metaclass hides the constructor's own signature.
    target = function.__init__ if inspect.isclass(function) else function
    try:
        return "rngs" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _as_model(value: Any, what: str) -> Model:
    if isinstance(value, nn.Module | nnx.Module):
        return value
    raise ModelSpecError(f"{what} gave a {type(value).__name__}, not a flax linen or NNX module")


def from_object(model: Model | Callable[..., Model], spec: str | None = None) -> ModelSource:
    """A ``ModelSource`` from what a caller gives ``fit(model=...)`` or what a spec names.

    Args:
        model: a linen module (instance, or class built without arguments), an NNX module instance (one
            initialization: one seed), an NNX module class whose constructor takes ``rngs``, or a
            function returning either (given ``rngs=nnx.Rngs(key)`` when it takes ``rngs``).
        spec: where it was loaded from, to record in saved files.

    Returns:
        The source; a function is called once here to check what it returns.

    Raises:
        ModelSpecError: ``model`` is none of these, or the function raised (its message is kept).

    Example:
        >>> import jax
        >>> from jaxmnist.model import MLP
        >>> source = from_object(MLP)
        >>> source.name, type(source.build(jax.random.key(0))).__name__
        ('MLP', 'MLP')
    """
    if isinstance(model, nn.Module):
        return ModelSource(lambda key: model, type(model).__name__, spec)
    if isinstance(model, nnx.Module):
        return ModelSource(lambda key: model, type(model).__name__, spec, per_seed=False)
    if not callable(model):
        raise ModelSpecError(f"`model` must be a flax linen or NNX module or a function returning one, got {model!r}")
    label = spec or getattr(model, "__name__", repr(model))

    def build(key: jax.Array) -> Model:
        try:
            built = model(rngs=nnx.Rngs(key)) if _takes_rngs(model) else model()
        except ModelSpecError:
            raise
        except Exception as error:  # the user's code: say what it raised, in one line
            first_line = str(error).splitlines()[0] if str(error) else ""
            raise ModelSpecError(f"building {label} raised {type(error).__name__}: {first_line}") from error
        return _as_model(built, label)

    built = build(jax.random.key(0))  # fails here, before any training, if it cannot build
    # An NNX module built without rngs has one initialization, whatever the seed: like an instance.
    per_seed = isinstance(built, nn.Module) or _takes_rngs(model)
    return ModelSource(build, type(built).__name__, spec, per_seed=per_seed)


def _load_file(path: Path, spec: str, argument: str) -> Any:
    if not path.is_file():
        raise ModelSpecError(f"`{argument}`={spec}: no such file {path}")
    module_name = f"jaxmnist_user_model_{abs(hash(str(path)))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclass-based modules (linen) look their module up
    try:
        loader_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ModelSpecError(f"`{argument}`={spec}: importing {path} raised {type(error).__name__}: {error}") from error
    return module


def absolute_spec(spec: str) -> str:
    """``spec`` with a relative ``FILE.py`` made absolute (against the working folder); others unchanged.

    Example:
        >>> absolute_spec("package.module:Net")
        'package.module:Net'
    """
    location, _, name = spec.rpartition(":")
    if not location.endswith(".py"):
        return spec
    return f"{Path(location).expanduser().resolve()}:{name}"


def load_model(spec: str) -> ModelSource:
    """The model that ``spec`` names: ``"FILE.py:NAME"`` (a path, relative to the working folder or
    absolute) or ``"package.module:NAME"`` (importable).

    Args:
        spec: where the model is; NAME may be anything ``from_object`` takes.

    Returns:
        Its ``ModelSource``, with ``spec`` recorded (a relative file made absolute, so saved files find it
        from any folder).

    Raises:
        ModelSpecError: no ``:NAME``, a file or module that does not exist, a NAME not in it, a NAME that
            is not a model, or a factory that raises.

    Example:
        >>> load_model("jaxmnist.model:MLP").name
        'MLP'
    """
    return from_object(load_attribute(spec, "model"), absolute_spec(spec))


def load_attribute(spec: str, argument: str) -> Any:
    """What ``spec`` (``"FILE.py:NAME"`` or ``"package.module:NAME"``) names; ``ModelSpecError`` naming
    ``argument`` when there is no ``:NAME``, no such file or module, or no such NAME in it.

    Example:
        >>> load_attribute("optax:adam", "optimizer").__name__
        'adam'
    """
    location, _, name = spec.rpartition(":")
    if not location or not name.isidentifier():
        raise ModelSpecError(f"`{argument}`={spec}: expected FILE.py:NAME or package.module:NAME")
    if location.endswith(".py"):
        spec = absolute_spec(spec)
        module = _load_file(Path(spec.rpartition(":")[0]), spec, argument)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise ModelSpecError(f"`{argument}`={spec}: cannot import {location} ({error})") from error
    if not hasattr(module, name):
        raise ModelSpecError(f"`{argument}`={spec}: {location} has no {name}")
    return getattr(module, name)
