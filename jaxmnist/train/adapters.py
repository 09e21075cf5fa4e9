"""One pure calling convention for flax linen and flax NNX models.

``train_step`` and ``evaluate`` call every model as

    outputs, collections, sown = model_call(params, collections, images, train=..., key=..., inputs=...)

where ``params`` are the trainable parameters, ``collections`` the model's carried state (BatchNorm's
running statistics, ...), ``key`` the PRNG key of this step's stochastic layers (dropout) and ``inputs``
the batch's other entries that ``__call__`` takes as keywords. ``outputs`` is what the model returns
(logits, or ``(logits, extra)``); ``sown`` holds what it sowed in this call (linen ``self.sow``, NNX
``nnx.Intermediate``): a per-step output, never carried, so it cannot grow from step to step. All are
plain nested dicts of arrays, so a train state checkpoints, shards and vmaps the same whatever the model.

- linen: ``module.apply({"params": params, **collections}, images[, train=train])`` with every
  collection mutable in training and a ``dropout`` key (flax's convention: a ``__call__`` that accepts
  ``train`` gets it; one that does not is called with the images alone). Collections that grow when
  applied (sown ones) are found once, at initialization, by shape alone.
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
ModelOutput = tuple[Any, Collections, Collections]
# Every keyword a __call__ may take from the batch, when it has **kwargs.
ANY_KEYWORD = frozenset({"*"})


class ModelCallError(TypeError):
    """A model cannot be called the way jaxmnist calls models.

    Example:
        >>> import jax
        >>> from jaxmnist.train import create_train_state
        >>> class NeedsMore(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, images, scale):
        ...         return nn.Dense(10)(images) * scale
        >>> try:
        ...     create_train_state(jax.random.key(0), NeedsMore())
        ... except ModelCallError as error:
        ...     print(type(error).__name__)
        ModelCallError
    """


@dataclasses.dataclass(frozen=True)
class CallSignature:
    """What a model's ``__call__`` takes besides the images: ``train``, and which batch keywords."""

    takes_train: bool = False
    keywords: frozenset[str] = frozenset()

    def inputs(self, batch_inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch entries this ``__call__`` takes."""
        if self.keywords == ANY_KEYWORD:
            return dict(batch_inputs)
        return {name: value for name, value in batch_inputs.items() if name in self.keywords}


def split_outputs(outputs: Any) -> tuple[jax.Array, Any]:
    """``(logits, extra)`` from what a model returns: its logits alone (extra None), or ``(logits, extra)``."""
    if isinstance(outputs, tuple) and len(outputs) == 2:
        return outputs
    return outputs, None


def _check_call_signature(function: Callable, owner: str) -> CallSignature:
    """What ``function`` takes; raises if it needs an argument jaxmnist cannot give."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # builtins and some C callables have no signature: call with images
        return CallSignature()
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
    names = {parameter.name for parameter in parameters[1:] if parameter.kind != parameter.VAR_KEYWORD}
    takes_any = any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters[1:])
    return CallSignature("train" in names, ANY_KEYWORD if takes_any else frozenset(names - {"train"}))


@dataclasses.dataclass(frozen=True)
class LinenModel:
    """A ``flax.linen.Module`` behind the pure calling convention."""

    module: nn.Module
    signature: CallSignature
    sown: frozenset[str] = frozenset()  # collections that grow when applied: outputs, not state

    @classmethod
    def wrap(cls, module: nn.Module) -> LinenModel:
        return cls(module, _check_call_signature(module.__call__, type(module).__name__))

    def _train_kwargs(self, train: bool) -> dict[str, bool]:
        return {"train": train} if self.signature.takes_train else {}

    def initial_variables(self, key: jax.Array, sample: jax.Array) -> Collections:
        """The module's variables as ``init`` draws them from ``key`` on a batch like ``sample``."""
        return self._initialized(self._init_rngs(key), sample)

    def _initialized(self, rngs: dict[str, jax.Array], sample: jax.Array) -> Collections:
        return self.module.init(rngs, sample, **self._train_kwargs(False))

    def _init_rngs(self, key: jax.Array) -> dict[str, jax.Array]:
        # A dropout key too, for models whose dropout is on at init; "params" is drawn from ``key`` alone.
        return {"params": key, "dropout": jax.random.fold_in(key, 1)}

    def init(
        self, key: jax.Array, sample: jax.Array, variables: Collections | None = None
    ) -> tuple[LinenModel, Params, Collections]:
        """The model with its sown collections known, its parameters and its carried collections (those of
        ``variables`` when given: what ``initial_variables`` gave, e.g. from a compiled call)."""
        rngs = self._init_rngs(key)
        variables = self._initialized(rngs, sample) if variables is None else variables
        others = {name: value for name, value in variables.items() if name != "params"}

        def train_apply(variables):
            return self.module.apply(variables, sample, rngs=rngs, mutable=True, **self._train_kwargs(True))[1]

        # Sown collections change their structure when applied again (sow appends); carried ones keep it.
        updated = jax.eval_shape(train_apply, variables) if others else {}
        sown = frozenset(
            name for name in others if jax.tree.structure(updated.get(name)) != jax.tree.structure(others[name])
        )
        collections = {name: value for name, value in others.items() if name not in sown}
        return dataclasses.replace(self, sown=sown), variables["params"], collections

    @property
    def apply_fn(self) -> Callable[..., Any]:
        return self.module.apply

    def __call__(
        self,
        params: Params,
        collections: Collections,
        images: jax.Array,
        *,
        train: bool,
        key: jax.Array | None,
        inputs: dict[str, Any] | None = None,
    ) -> ModelOutput:
        variables = {"params": params, **collections}
        kwargs = {**self._train_kwargs(train), **self.signature.inputs(inputs or {})}
        if not train:
            if not self.sown:
                return self.module.apply(variables, images, **kwargs), collections, {}
            outputs, sown = self.module.apply(variables, images, mutable=sorted(self.sown), **kwargs)
            return outputs, collections, sown
        rngs = {} if key is None else {"dropout": key}
        outputs, updated = self.module.apply(variables, images, rngs=rngs, mutable=True, **kwargs)
        carried = {name: updated.get(name, value) for name, value in collections.items()}
        sown = {name: value for name, value in updated.items() if name not in collections}
        return outputs, carried, sown


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity: it holds array templates
class NnxModel:
    """An ``nnx.Module`` split into graph definition and state, behind the pure calling convention."""

    graphdef: Any
    params_template: nnx.State
    rng_template: nnx.State
    collections_template: nnx.State
    stream_names: tuple[str, ...]

    signature: CallSignature = CallSignature()

    @classmethod
    def wrap(cls, module: nnx.Module) -> tuple[NnxModel, Params, Collections]:
        signature = _check_call_signature(module.__call__, type(module).__name__)
        nnx.pop(module, nnx.Intermediate)  # values sown by an earlier call are its outputs, not state
        graphdef, params, rng_state, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        streams = sorted(
            {variable.tag for _, variable in nnx.to_flat_state(rng_state) if isinstance(variable, nnx.RngKey)}
        )
        model = cls(graphdef, params, rng_state, rest, tuple(streams), signature)
        return model, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def module(self, params: Params, collections: Collections) -> nnx.Module:
        """A new NNX module holding ``params`` and ``collections`` (fresh variables, usable inside a trace)."""
        fresh_params = jax.tree.map(lambda leaf: leaf, self.params_template)
        fresh_rest = jax.tree.map(lambda leaf: leaf, self.collections_template)
        nnx.replace_by_pure_dict(fresh_params, params)
        nnx.replace_by_pure_dict(fresh_rest, collections)
        return nnx.merge(self.graphdef, fresh_params, jax.tree.map(lambda leaf: leaf, self.rng_template), fresh_rest)

    def apply_fn(self, variables: dict[str, Any], images: jax.Array) -> Any:
        """Inference outputs from ``{"params": params, **collections}``, like linen's ``apply``."""
        params = variables["params"]
        collections = {name: value for name, value in variables.items() if name != "params"}
        return self(params, collections, images, train=False, key=None)[0]

    def __call__(
        self,
        params: Params,
        collections: Collections,
        images: jax.Array,
        *,
        train: bool,
        key: jax.Array | None,
        inputs: dict[str, Any] | None = None,
    ) -> ModelOutput:
        module = self.module(params, collections)
        if train:
            module.train()
        else:
            module.eval()
        if train and key is not None and self.stream_names:
            nnx.reseed(module, **{name: jax.random.fold_in(key, index) for index, name in enumerate(self.stream_names)})
        call_inputs = self.signature.inputs(inputs or {})
        if hasattr(nnx, "capture"):  # flax >= 0.12.6 deprecates a sow outside nnx.capture
            outputs, sown = nnx.capture(module, nnx.Intermediate)(images, **call_inputs)
        else:
            outputs = module(images, **call_inputs)
            sown = nnx.pop(module, nnx.Intermediate)
        if not train:
            return outputs, collections, nnx.to_pure_dict(sown)
        _, _, _, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        return outputs, nnx.to_pure_dict(rest), nnx.to_pure_dict(sown)


ModelCall = LinenModel | NnxModel
