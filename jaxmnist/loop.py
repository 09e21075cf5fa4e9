"""The training loop as a library call, ``fit``: config in, progress and one result per epoch out.

``fit`` places the data on the device once, compiles ahead of time (timed on its own), and runs each
epoch as one compiled call, or in chunks of ``steps_per_call`` steps when the caller wants to
checkpoint or stop inside an epoch. It yields a ``Progress`` after every call (one host
synchronisation each) that holds everything needed to continue exactly; printing, files and signals
are the caller's job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxmnist.config import TrainConfig, value_text
from jaxmnist.model_source import Model, ModelSource
from jaxmnist.normalization import normalize
from jaxmnist.parallel import replicate, runs_sharded, shard_runs
from jaxmnist.plan import GridRun, RunPlan
from jaxmnist.programs import Programs, per_run
from jaxmnist.runs import (
    Run,
    RunError,
    build_run,
    check_images,
    check_labels,
    count_classes,
    first_run_shapes,
    hold_out,
    initial_state,
)
from jaxmnist.train import TrainState, num_batches, param_dtype
from jaxmnist.train.state import LossFn
from jaxmnist.train.steps import STEP_METRICS, Metrics, check_padding_leaves_statistics_exact

ArrayPair = tuple[np.ndarray, np.ndarray]

# A batch cross-entropy above this means the true class got probability below e^-1000: diverged.
DEFAULT_MAX_LOSS = 1000.0


@dataclasses.dataclass(frozen=True)
class EpochResult:
    """What one epoch of one run produced; ``train_loss`` is the lesson's mean of the batch losses.

    ``swept`` holds the run's value of every setting given as a list (a grid), e.g.
    ``{"learning_rate": 0.01}``; it is empty without a grid.
    """

    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float
    compile_seconds: float
    samples_per_second: float
    seed: int = 0
    learning_rate: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the loss's own, epoch means
    swept: dict[str, float] = dataclasses.field(default_factory=dict)
    diverged: str | None = None  # a grid's run that diverged (the others go on): where, e.g. "epoch 1, step 3"
    # The step a resumed run took this epoch up at: ``seconds`` and ``samples_per_second`` count from there.
    resumed_at_step: int | None = None


def best_epoch(history: Sequence[EpochResult]) -> EpochResult | None:
    """The epoch with the lowest validation loss (the first of equals); None without validation."""
    validated = [result for result in history if result.val_loss is not None]
    return min(validated, key=lambda result: result.val_loss) if validated else None


def early_stop_due(history: Sequence[EpochResult], patience: int) -> bool:
    """Whether the validation loss has not improved for ``patience`` epochs (0: never stop early).

    Example:
        >>> losses = [3.0, 2.0, 2.5, 2.1]
        >>> results = [EpochResult(epoch, 0, 0, 0, 0, 1, 0, 0, val_loss=loss) for epoch, loss in enumerate(losses, 1)]
        >>> early_stop_due(results, 2), early_stop_due(results, 3)
        (True, False)
    """
    best = best_epoch(history)
    return bool(patience and best is not None and history[-1].epoch - best.epoch >= patience)


def run_complete(config: TrainConfig, progress: Progress) -> bool:
    """Whether ``progress`` ends its run: its last epoch finished, or early stopping due."""
    epochs_done = progress.epoch if progress.epoch_done else progress.epoch - 1
    return epochs_done >= config.epochs or early_stop_due(progress.history, config.early_stopping)


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a run stands after a compiled call: enough to continue it exactly.

    ``epoch`` is the epoch in progress (from 1), ``position`` the number of its steps done, and
    ``step_losses``/``step_accuracies`` its per-step metrics so far (``(steps,)``, or ``(runs, steps)``
    for several runs). ``results`` are set when the call ended the epoch, one per run in the order of
    ``jaxmnist.plan.RunPlan.runs`` (then ``position`` equals the epoch's number of batches);
    ``history`` holds the results of every finished epoch, this one included. With several runs (seeds,
    grid rows), ``state`` has a leading run axis.
    """

    state: TrainState
    epoch: int
    position: int
    step_losses: np.ndarray
    step_accuracies: np.ndarray
    results: tuple[EpochResult, ...] = ()
    history: tuple[EpochResult, ...] = ()
    step_metrics: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # the loss's own, per step
    diverged: dict[int, str] = dataclasses.field(default_factory=dict)  # a grid's diverged runs: where

    @property
    def result(self) -> EpochResult | None:
        """The finished epoch's result (the first run's, when there are several); None inside an epoch."""
        return self.results[0] if self.results else None

    @property
    def epoch_done(self) -> bool:
        return bool(self.results)

    @property
    def global_step(self) -> int:
        """Steps taken since the start of the run."""
        return int(np.ravel(np.asarray(self.state.step))[0])

    def continuation(self) -> Progress:
        """The same point as the start of what comes next: a finished epoch becomes the next one's start."""
        if not self.epoch_done:
            return self
        empty_losses, empty_accuracies = self.step_losses[..., :0], self.step_accuracies[..., :0]
        empty_metrics = {name: values[..., :0] for name, values in self.step_metrics.items()}
        return Progress(self.state, self.epoch + 1, 0, empty_losses, empty_accuracies, history=self.history,
                        step_metrics=empty_metrics, diverged=self.diverged)  # fmt: skip


class DivergenceError(ArithmeticError):
    """The training loss became NaN, infinite or absurdly large; ``epoch`` and ``step`` say where (from 1).

    ``step`` is None when the batch losses stayed finite but an evaluation after the epoch did not (the
    epoch's last update made the parameters non-finite); ``measured`` then names it, e.g. ``"test loss"``.

    Example:
        >>> error = DivergenceError(epoch=2, step=17, loss=float("nan"))
        >>> (error.epoch, error.step), isinstance(error, ArithmeticError)
        ((2, 17), True)
    """

    def __init__(self, epoch: int, step: int | None, loss: float, seed: int | None = None, values: dict | None = None,
                 others: Sequence[str] = (), measured: str = "loss"):  # fmt: skip
        run = "" if seed is None else f" of seed {seed}"
        if values:
            run = f" of {_run_text(values, seed)}"
        # ``others``: the other runs of a grid whose every run diverged, as "values, seed S"
        also = f" (and of every other run: {_listed(others)})" if others else ""
        self.where = f"epoch {epoch}, step {step}" if step is not None else f"the end of epoch {epoch}"
        super().__init__(
            f"training diverged: the {measured}{run} became {loss:.6g} at {self.where}{also}; "
            "try a lower `learning_rate` (the lesson uses 0.003)"
        )
        self.epoch, self.step, self.loss, self.seed, self.values = epoch, step, loss, seed, values or {}
        self.measured = measured
        # Set by ``fit``: every run that diverged, as "where (loss)" by its row, and each run's epoch as
        # measured before the step that stopped them (one result per run), for their records.
        self.diverged_runs: dict[int, str] = {}
        self.partial: tuple[EpochResult, ...] = ()


@contextlib.contextmanager
def _measured_until_divergence(plan: RunPlan, progress: Progress, losses: np.ndarray, accuracies: np.ndarray,
                               max_loss: float) -> Iterator[None]:  # fmt: skip
    """A ``DivergenceError`` raised inside gets ``partial``: each run's epoch as measured before its own first
    diverged step (the earlier steps and this call's ``losses`` and ``accuracies``), or, for a run that did
    not diverge, before the step that stopped the runs."""
    try:
        yield
    except DivergenceError as error:
        runs = plan.runs
        stopped = progress.position + losses.shape[-1] if error.step is None else error.step - 1
        step_losses = per_run(_append_steps(progress.step_losses, losses, len(runs)), len(runs))
        step_accuracies = per_run(_append_steps(progress.step_accuracies, accuracies, len(runs)), len(runs))
        mean = lambda values: float(np.mean(values, dtype=np.float64)) if len(values) else math.nan
        partial = []
        for row, run in enumerate(runs):
            until = stopped
            if row in error.diverged_runs:
                bad = _beyond(step_losses[row], max_loss)
                until = int(np.argmax(bad)) if bad.any() else step_losses.shape[1]
            partial.append(EpochResult(progress.epoch, mean(step_losses[row, :until]),
                                       mean(step_accuracies[row, :until]), math.nan, math.nan, math.nan, 0.0,
                                       math.nan, seed=run.seed, swept=dict(run.values),
                                       diverged=error.diverged_runs.get(row)))  # fmt: skip
        error.partial = tuple(partial)
        raise


def _run_text(values: dict[str, float], seed: int) -> str:
    """One run of a grid in words, e.g. "`learning_rate`=0.01, seed 2"."""
    return f"{', '.join(f'`{name}`={value_text(value)}' for name, value in values.items())}, seed {seed}"


def _listed(items: Sequence[str], at_most: int = 3) -> str:
    more = f" and {len(items) - at_most} more" if len(items) > at_most else ""
    return "; ".join(items[:at_most]) + more


def start_of_run(run: Run, runs_sharding: jax.sharding.Sharding | None = None) -> Progress:
    """The progress of ``run`` before its first step (``runs_sharding``: see ``initial_state``)."""
    plan = run.plan
    empty = np.zeros((plan.num_runs, 0) if plan.stacked else 0, np.dtype(plan.config.dtype))
    state = initial_state(run, runs_sharding)
    return Progress(state, epoch=1, position=0, step_losses=empty, step_accuracies=empty)


def _append_steps(done: np.ndarray, new: jax.Array | np.ndarray, runs: int) -> np.ndarray:
    """``done``'s per-step values followed by ``new``'s: ``(steps,)`` for one run, ``(runs, steps)`` for several."""
    return np.concatenate([per_run(done, runs), per_run(new, runs)], axis=1).reshape(*done.shape[:-1], -1)


def _beyond(losses: np.ndarray, max_loss: float) -> np.ndarray:
    """Which of ``losses`` diverged: not finite or above ``max_loss``."""
    return ~(np.abs(losses) <= max_loss)  # NaN compares False: it counts as diverged


def _note_divergence(losses: np.ndarray, max_loss: float, epoch: int, position: int, runs: Sequence[GridRun],
                     diverged: dict[int, str]) -> dict[int, str]:  # fmt: skip
    """``diverged`` and the runs whose loss diverged in these steps (``losses``: one row per run).

    A grid goes on without its diverged runs (the rest of a sweep is still worth having); a single run or
    seeds alone, or a grid with no run left, stop with ``DivergenceError`` naming the first diverged step.
    """
    bad = _beyond(losses, max_loss)
    errors = {}
    for row in range(len(runs)):
        if row not in diverged and bad[row].any():
            step = int(np.argmax(bad[row]))
            errors[row] = _divergence(runs, row, epoch, position + step + 1, float(losses[row, step]))
    return _recorded(errors, runs, diverged)


def _note_evaluation_divergence(evaluations: dict[str, Metrics], epoch: int, runs: Sequence[GridRun],
                                diverged: dict[int, str]) -> dict[int, str]:  # fmt: skip
    """As ``_note_divergence``, for runs whose evaluation losses after the epoch are not finite: the batch
    losses are taken before each update, so the epoch's last update can leave non-finite parameters unseen."""
    errors = {}
    for name, evaluation in evaluations.items():
        losses = per_run(evaluation["loss"], len(runs))[:, 0]
        for row in range(len(runs)):
            if row not in diverged and row not in errors and not np.isfinite(losses[row]):
                errors[row] = _divergence(runs, row, epoch, None, float(losses[row]), f"{name} loss")
    return _recorded(errors, runs, diverged)


def _divergence(runs: Sequence[GridRun], row: int, epoch: int, step: int | None, loss: float,
                measured: str = "loss") -> DivergenceError:  # fmt: skip
    seed = runs[row].seed if len(runs) > 1 else None
    return DivergenceError(epoch, step, loss, seed, runs[row].values, measured=measured)


def _recorded(errors: dict[int, DivergenceError], runs: Sequence[GridRun], diverged: dict[int, str]) -> dict[int, str]:
    """``diverged`` with the runs of ``errors`` added; raises the error of the earliest step (of the first
    such run) when a run that is not one of a grid diverged, or when no run of the grid is left."""
    if not errors:
        return diverged
    where = {**diverged, **{row: f"{error.where} ({error.measured} {error.loss:.6g})" for row, error in errors.items()}}
    if runs[0].values and len(where) < len(runs):
        return where
    earliest = min(errors, key=lambda row: (errors[row].step or 0, row))  # step None: after the epoch, all alike
    first = errors[earliest]
    if runs[0].values:
        others = [_run_text(run.values, run.seed) for row, run in enumerate(runs) if row != earliest]
        first = DivergenceError(first.epoch, first.step, first.loss, first.seed, first.values, others, first.measured)
    first.diverged_runs = where
    raise first


def _epoch_results(
    progress: Progress,
    runs: Sequence[GridRun],
    evaluations: dict[str, Metrics],
    learning_rates: Sequence[float] | np.ndarray | None,
    seconds: float,
    compile_seconds: float,
    images_trained: int,
    resumed_at_step: int | None,
) -> tuple[EpochResult, ...]:
    """One result per run; ``evaluations`` and ``learning_rates`` hold one value per run."""
    seeds = [run.seed for run in runs]
    values = {f"{name}_{metric}": per_run(evaluation[metric], len(seeds))[:, 0]
              for name, evaluation in evaluations.items() for metric in ("loss", "accuracy")}  # fmt: skip
    losses, accuracies = per_run(progress.step_losses, len(seeds)), per_run(progress.step_accuracies, len(seeds))
    return tuple(
        EpochResult(
            epoch=progress.epoch,
            train_loss=float(np.mean(losses[row], dtype=np.float64)),
            train_accuracy=float(np.mean(accuracies[row], dtype=np.float64)),
            test_loss=float(values["test_loss"][row]),
            test_accuracy=float(values["test_accuracy"][row]),
            seconds=seconds,
            compile_seconds=compile_seconds,
            samples_per_second=images_trained * len(seeds) / seconds,
            seed=seed,
            learning_rate=None if learning_rates is None else float(learning_rates[row]),
            val_loss=float(values["val_loss"][row]) if "val_loss" in values else None,
            val_accuracy=float(values["val_accuracy"][row]) if "val_accuracy" in values else None,
            metrics={
                name: float(np.mean(per_run(steps, len(seeds))[row], dtype=np.float64))
                for name, steps in progress.step_metrics.items()
            },
            swept=dict(runs[row].values),
            diverged=progress.diverged.get(row),
            resumed_at_step=resumed_at_step,
        )
        for row, seed in enumerate(seeds)
    )


def fit(
    config: TrainConfig | RunPlan | Run,
    train_data: ArrayPair,
    test_data: ArrayPair,
    start: Progress | None = None,
    steps_per_call: int | None = None,
    max_loss: float = DEFAULT_MAX_LOSS,
    mesh: Mesh | None = None,
    *,
    model: Model | ModelSource | Callable[..., Model] | None = None,
    optimizer: optax.GradientTransformation | None = None,
    loss: str | LossFn | None = None,
) -> Iterator[Progress]:
    """Trains from ``start`` (default: a fresh run) to the end of epoch ``config.epochs``, or earlier when
    ``config.early_stopping`` epochs pass without a better validation loss.

    Before the first step the labels are checked against the model's number of outputs.

    Args:
        config: the run's settings (or their ``jaxmnist.plan.RunPlan``, or a ``jaxmnist.runs.Run`` built
            by ``build_run``, whose model, optimizer and loss it trains); ``config.val_split`` of the
            training images are held out (``jaxmnist.runs.hold_out``) and evaluated after every epoch;
            ``config.seeds`` runs train together, each from its own initialization, for every combination
            of the values of the settings given as tuples (a grid: ``learning_rate``, ``momentum``,
            ``weight_decay``, ``dropout``), all as one compiled program; each run's results equal its
            values' run alone.
        train_data: uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` of any size, and int labels.
        test_data: the same for evaluation after every epoch.
        start: where to continue from (e.g. a restored checkpoint); its state must be of the same model
            and optimizer.
        steps_per_call: run each epoch in compiled calls of this many steps (default: one call per epoch).
        max_loss: a step whose loss is not finite or above this raises ``DivergenceError`` (checked once
            per call, no extra host synchronisation), as does an evaluation loss after an epoch that is not
            finite; the call is not yielded. A grid's run is noted as diverged instead while others go on.
        mesh: a ``jaxmnist.parallel.make_mesh`` mesh to split every batch over its devices.
        model: a flax linen module, an NNX module (an instance trains one seed; a class or function taking
            ``rngs`` builds one per seed), or a function returning either; default: ``config.model`` when
            set, else the lesson's MLP from the settings.
        optimizer: any optax optimizer; default: the one the settings describe. The learning rate
            reported is the one it used when it exposes it (``optax.inject_hyperparams``), else None.
        loss: ``"nll"``, ``"ce"`` or any ``loss_fn(logits, labels, mask)``; default ``config.loss``.

    Yields:
        The ``Progress`` after every compiled call; its ``result`` is set when an epoch ends. Its state
        is valid until the next one is yielded: the next compiled call takes over (donates) its buffers,
        so copy it (``jax.tree.map(jnp.copy, progress.state)``) to keep it longer.

    Raises:
        RunError: images that are not uint8 ``(N, H, W[, C])``, a model whose output is not ``(B, classes)``
            logits, a label outside ``[0, classes)``, or ``dtype`` float64 with JAX's 64-bit mode off, all
            before the first step.
        jaxmnist.model_source.ModelSpecError: a ``model`` that cannot give a model.

    Example:
        >>> import numpy as np
        >>> images, labels = np.zeros((64, 28, 28), np.uint8), np.arange(64) % 10
        >>> [p.result.epoch for p in fit(TrainConfig(epochs=2), (images, labels), (images, labels))]
        [1, 2]
    """
    image_shape = check_images(train_data[0], "train_data")
    if check_images(test_data[0], "test_data") != image_shape:
        raise RunError(f"`test_data` images are {test_data[0].shape[1:]}, `train_data` images {image_shape}")
    run = _run_to_train(config, image_shape, len(train_data[0]), model, optimizer, loss)
    plan = run.plan
    config, runs = plan.config, plan.runs
    runs_sharding = runs_sharded(mesh, len(runs)) if mesh is not None and len(runs) > 1 else None
    progress = start_of_run(run, runs_sharding) if start is None else start
    one_run_state = progress.state  # of several runs, the first one's shapes: the checks need no more
    if len(runs) > 1:
        one_run_state = first_run_shapes(progress.state)
    try:  # several runs split over the devices, not the batch: no padding then
        check_padding_leaves_statistics_exact(one_run_state, config.batch_size, mesh if len(runs) == 1 else None)
    except ValueError as error:
        raise RunError(str(error)) from error
    check_labels(count_classes(one_run_state, image_shape), {"train_data": train_data[1], "test_data": test_data[1]})
    train_data, val_data = hold_out(config, *train_data)
    place = jax.device_put if mesh is None else partial(replicate, mesh=mesh)
    state = shard_runs(progress.state, mesh) if mesh is not None and len(runs) > 1 else place(progress.state)
    if start is not None:  # the compiled calls donate their input: leave the caller's start intact
        state = jax.tree.map(jnp.copy, state)
    images, labels = place(train_data)
    dtype = param_dtype(state)
    evaluation_sets = {"test": test_data, "val": val_data} if config.val_split else {"test": test_data}
    evaluation_sets = {
        name: (normalize(place(data[0]), dtype, config.normalize), place(data[1]))
        for name, data in evaluation_sets.items()
    }
    steps_per_epoch = num_batches(len(images), config.batch_size)
    programs = Programs(plan, state, images, labels, min(steps_per_call or steps_per_epoch, steps_per_epoch), mesh)
    compile_seconds = programs.compile_seconds
    while not run_complete(config, progress):
        keys = plan.epoch_keys(progress.epoch)
        whole_epoch = config.loop == "scan" and progress.position == 0 and programs.chunk == steps_per_epoch
        batches = None if whole_epoch else programs.batch_indices(keys)
        seconds, first_position = 0.0, progress.position
        while progress.position < steps_per_epoch:
            started = time.perf_counter()
            num_steps = min(programs.chunk, steps_per_epoch - progress.position)
            state, metrics = programs.run(state, keys, batches, progress.position, num_steps)
            losses = per_run(metrics["loss"], len(runs))
            seconds += time.perf_counter() - started
            accuracies = per_run(metrics["accuracy"], len(runs))
            with _measured_until_divergence(plan, progress, losses, accuracies, max_loss):
                diverged = _note_divergence(
                    losses, max_loss, progress.epoch, progress.position, runs, progress.diverged
                )
            step_losses = _append_steps(progress.step_losses, losses, len(runs))
            step_accuracies = _append_steps(progress.step_accuracies, accuracies, len(runs))
            own = {name: values for name, values in metrics.items() if name not in STEP_METRICS}
            empty = progress.step_losses[..., :0]
            step_metrics = {
                name: _append_steps(progress.step_metrics.get(name, empty), values, len(runs))
                for name, values in own.items()
            }
            progress = Progress(
                state,
                progress.epoch,
                progress.position + num_steps,
                step_losses,
                step_accuracies,
                history=progress.history,
                step_metrics=step_metrics,
                diverged=diverged,
            )
            if progress.position == steps_per_epoch:
                images_trained = len(images) - first_position * config.batch_size  # the last batch is padded
                evaluations = {name: programs.evaluate(state, *data) for name, data in evaluation_sets.items()}
                with _measured_until_divergence(plan, progress, losses[:, :0], accuracies[:, :0], max_loss):
                    diverged = _note_evaluation_divergence(evaluations, progress.epoch, runs, progress.diverged)
                progress = dataclasses.replace(progress, diverged=diverged)
                learning_rates = run.learning_rates()  # exact, rather than an injected float32 copy
                if learning_rates is None and "learning_rate" in metrics:
                    learning_rates = per_run(metrics["learning_rate"], len(runs))[:, -1]
                results = _epoch_results(
                    progress,
                    runs,
                    evaluations,
                    learning_rates,
                    seconds,
                    compile_seconds,
                    images_trained,
                    first_position or None,
                )
                progress = dataclasses.replace(progress, results=results, history=(*progress.history, *results))
                compile_seconds = 0.0
            yield progress
        progress = progress.continuation()


def _run_to_train(config: TrainConfig | RunPlan | Run, image_shape: tuple[int, ...], num_train_images: int,
                  model, optimizer, loss) -> Run:  # fmt: skip
    """``config`` when it is a ``Run`` built for these images (then ``model``, ``optimizer`` and ``loss`` must be
    None), else the ``Run`` of the settings and these arguments."""
    if not isinstance(config, Run):
        return build_run(config, image_shape, num_train_images, model, optimizer, loss)
    given = [name for name, value in (("model", model), ("optimizer", optimizer), ("loss", loss)) if value is not None]
    if given:
        raise RunError(f"`{given[0]}` is given and `config` is a Run, which holds its own: give one of them")
    if (config.image_shape, config.num_train_images) != (image_shape, num_train_images):
        raise RunError(
            f"`config` is a Run built for {config.num_train_images} training images of shape {config.image_shape}, "
            f"and `train_data` holds {num_train_images} of shape {image_shape}"
        )
    return config
