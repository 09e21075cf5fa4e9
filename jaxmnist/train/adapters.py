"""One pure calling convention for flax linen and flax NNX models.

``train_step`` and ``evaluate`` call every model as

    logits, collections = model_call(params, collections, images, train=..., key=...)

where ``params`` are the trainable parameters, ``collections`` the model's other state (BatchNorm's
running statistics, ...) and ``key`` the PRNG key of this step's stochastic layers (dropout). Both are
plain nested dicts of arrays, so a train state checkpoints, shards and vmaps the same whatever the model.

- linen: ``module.apply({"params": params, **collections}, images[, train=train])`` with the non-param
  collections mutable in training and a ``dropout`` key (flax's convention: a ``__call__`` that accepts
  ``train`` gets it; one that does not is called with the images alone).
- NNX: the module is split once into its graph definition and state; each call merges them inside the
  compiled function, sets NNX's own ``train()``/``eval()`` mode, reseeds its RNG streams from ``key``,
  and splits the new state off again. No object graph is walked per step outside the trace.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

Params = Any
Collections = dict[str, Any]
ModelOutput = tuple[jax.Array, Collections]

# Collections that are outputs, not state: sown intermediates grow on every call.
_NOT_STATE = frozenset({"params", "intermediates"})


class ModelCallError(TypeError):
    """A model cannot be called the way jaxmnist calls models."""


def _check_call_signature(function: Callable, owner: str) -> bool:
    """Whether ``function`` takes ``train``; raises if it needs an argument jaxmnist cannot give."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # builtins and some C callables have no signature: call with images
        return False
    if not parameters or parameters[0].kind not in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD):
        raise ModelCallError(f"{owner}.__call__ must take the images as its first argument")
    needed = [
        parameter.name
        for parameter in parameters[1:]
        if parameter.default is parameter.empty
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        and parameter.name != "train"
    ]
    if needed:
        raise ModelCallError(
            f"{owner}.__call__ needs argument {needed[0]!r}, which jaxmnist cannot give: it calls "
            "model(images) or, when __call__ accepts it, model(images, train=...); give it a default"
        )
    return "train" in {parameter.name for parameter in parameters[1:]}


@dataclasses.dataclass(frozen=True)
class LinenModel:
    """A ``flax.linen.Module`` behind the pure calling convention."""

    module: nn.Module
    takes_train: bool

    @classmethod
    def wrap(cls, module: nn.Module) -> LinenModel:
        return cls(module, _check_call_signature(module.__call__, type(module).__name__))

    def _train_kwargs(self, train: bool) -> dict[str, bool]:
        return {"train": train} if self.takes_train else {}

    def init(self, key: jax.Array, sample: jax.Array) -> tuple[Params, Collections]:
        # A dropout key too, for models whose dropout is on at init; "params" is drawn from ``key`` alone.
        rngs = {"params": key, "dropout": jax.random.fold_in(key, 1)}
        variables = self.module.init(rngs, sample, **self._train_kwargs(False))
        collections = {name: value for name, value in variables.items() if name not in _NOT_STATE}
        return variables["params"], collections

    @property
    def apply_fn(self) -> Callable[..., Any]:
        return self.module.apply

    def __call__(
        self, params: Params, collections: Collections, images: jax.Array, *, train: bool, key: jax.Array | None
    ) -> ModelOutput:
        variables = {"params": params, **collections}
        kwargs = self._train_kwargs(train)
        if not train:
            return self.module.apply(variables, images, **kwargs), collections
        rngs = {} if key is None else {"dropout": key}
        if not collections:
            return self.module.apply(variables, images, rngs=rngs, **kwargs), collections
        logits, updated = self.module.apply(variables, images, rngs=rngs, mutable=list(collections), **kwargs)
        return logits, {**collections, **updated}


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity: it holds array templates
class NnxModel:
    """An ``nnx.Module`` split into graph definition and state, behind the pure calling convention."""

    graphdef: Any
    params_template: nnx.State
    rng_template: nnx.State
    collections_template: nnx.State
    stream_names: tuple[str, ...]

    @classmethod
    def wrap(cls, module: nnx.Module) -> tuple[NnxModel, Params, Collections]:
        _check_call_signature(module.__call__, type(module).__name__)
        graphdef, params, rng_state, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        streams = sorted(
            {variable.tag for _, variable in nnx.to_flat_state(rng_state) if isinstance(variable, nnx.RngKey)}
        )
        model = cls(graphdef, params, rng_state, rest, tuple(streams))
        return model, params.to_pure_dict(), rest.to_pure_dict()

    def module(self, params: Params, collections: Collections) -> nnx.Module:
        """A new NNX module holding ``params`` and ``collections`` (fresh variables, usable inside a trace)."""
        fresh_params = jax.tree.map(lambda leaf: leaf, self.params_template)
        fresh_rest = jax.tree.map(lambda leaf: leaf, self.collections_template)
        nnx.replace_by_pure_dict(fresh_params, params)
        nnx.replace_by_pure_dict(fresh_rest, collections)
        return nnx.merge(self.graphdef, fresh_params, jax.tree.map(lambda leaf: leaf, self.rng_template), fresh_rest)

    def apply_fn(self, variables: dict[str, Any], images: jax.Array) -> jax.Array:
        """Inference logits from ``{"params": params, **collections}``, like linen's ``apply``."""
        params = variables["params"]
        collections = {name: value for name, value in variables.items() if name != "params"}
        return self(params, collections, images, train=False, key=None)[0]

    def __call__(
        self, params: Params, collections: Collections, images: jax.Array, *, train: bool, key: jax.Array | None
    ) -> ModelOutput:
        module = self.module(params, collections)
        if train:
            module.train()
        else:
            module.eval()
        if train and key is not None and self.stream_names:
            nnx.reseed(module, **{name: jax.random.fold_in(key, index) for index, name in enumerate(self.stream_names)})
        logits = module(images)
        if not train:
            return logits, collections
        return logits, nnx.split(module, nnx.Param, nnx.RngState, ...)[3].to_pure_dict()


ModelCall = LinenModel | NnxModel
