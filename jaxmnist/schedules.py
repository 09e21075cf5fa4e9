"""Learning-rate schedules by name, over a run's steps, each equal to a PyTorch scheduler:

- ``constant``: the rate throughout (no scheduler);
- ``cosine``: cosine decay to 0 over the run (``CosineAnnealingLR(T_max=steps)``, stepped every batch);
- ``warmup-cosine``: linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0;
- ``step``: times ``gamma`` every ``step_size`` epochs (``StepLR``, stepped every epoch);
- ``exponential``: times ``gamma`` every epoch (``ExponentialLR``, every epoch);
- ``multistep``: times ``gamma`` at each epoch of ``milestones`` (``MultiStepLR``, every epoch);
- ``linear``: from ``start_factor`` to ``end_factor`` times the rate over the run
  (``LinearLR(start_factor, end_factor, total_iters=steps)``, every batch);
- ``one-cycle``: cosine from rate/``div_factor`` up to the rate over ``pct_start`` of the run, then down
  to rate/(``div_factor`` · ``final_div_factor``) (``OneCycleLR(max_lr=rate, total_steps=steps)``, every batch).

``SCHEDULE_ARGUMENTS`` gives each schedule's arguments and their defaults (PyTorch's).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

# Every schedule's arguments with their defaults; None: required.
SCHEDULE_ARGUMENTS: dict[str, dict[str, Any]] = {
    "constant": {},
    "cosine": {},
    "warmup-cosine": {},
    "step": {"step_size": 1, "gamma": 0.1},
    "exponential": {"gamma": None},
    "multistep": {"milestones": None, "gamma": 0.1},
    "linear": {"start_factor": 1.0, "end_factor": 0.0},
    "one-cycle": {"pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4},
}
SCHEDULES = tuple(SCHEDULE_ARGUMENTS)


def schedule_problem(name: str, arguments: dict[str, Any]) -> str | None:
    """What is wrong with ``arguments`` for schedule ``name`` (None: nothing), in words naming the argument.

    Example:
        >>> schedule_problem("step", {"gamma": 0.7})
        >>> schedule_problem("step", {"gama": 0.7})
        "'step' takes no 'gama' (it takes step_size, gamma)"
    """
    accepted = SCHEDULE_ARGUMENTS[name]
    for key, value in arguments.items():
        if key not in accepted:
            return f"{name!r} takes no {key!r} (it takes {', '.join(accepted) or 'no arguments'})"
        if key == "milestones":
            if not (isinstance(value, list | tuple) and value and all(_whole(each, 1) for each in value)):
                return f"the {name!r} schedule's milestones must be a list of epochs >= 1, e.g. [5,10], got {value!r}"
        elif key == "step_size":
            if not _whole(value, 1):
                return f"the {name!r} schedule's step_size must be a whole number of epochs >= 1, got {value!r}"
        elif isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
            return f"the {name!r} schedule's {key} must be a finite number >= 0, got {value!r}"
    missing = [key for key, default in accepted.items() if default is None and key not in arguments]
    if missing:
        example = "[5,10]" if missing[0] == "milestones" else "0.9"
        return f"{name!r} needs {', '.join(missing)} (e.g. {missing[0]}={example})"
    if name == "one-cycle" and not 0 < arguments.get("pct_start", 0.3) < 1:
        return f"the 'one-cycle' schedule's pct_start must be in (0, 1), got {arguments['pct_start']!r}"
    return None


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def linear(total_steps: int, start: float, end: float) -> optax.Schedule:
    """From ``start`` at step 0 to ``end`` at ``total_steps``, linearly, in the precision of the run (optax's
    ``linear_schedule`` computes in float32).

    Example:
        >>> [float(linear(4, 1.0, 0.0)(step)) for step in (0, 1, 4, 9)]
        [1.0, 0.75, 0.0, 0.0]
    """

    def schedule(step):
        done = jnp.minimum(jnp.asarray(step, jnp.result_type(float)), total_steps) / total_steps
        return start + (end - start) * done

    return schedule


def one_cycle(
    total_steps: int, peak: float, pct_start: float, div_factor: float, final_div_factor: float
) -> optax.Schedule:
    """PyTorch's ``OneCycleLR`` (cosine annealing, two phases) as an optax schedule: from
    ``peak / div_factor`` up to ``peak`` at step ``pct_start · total_steps − 1``, then down to
    ``peak / (div_factor · final_div_factor)`` at the last step, each phase ``end + (start − end)/2 ·
    (1 + cos(π · fraction))``. (optax's ``cosine_onecycle_schedule`` puts the peak one step later.)

    Example:
        >>> schedule = one_cycle(10, 1.0, 0.3, 25.0, 1e4)
        >>> [round(float(schedule(step)), 4) for step in (0, 2, 9)]
        [0.04, 1.0, 0.0]
    """
    initial, peak_step = peak / div_factor, pct_start * total_steps - 1
    final, last_step = initial / final_div_factor, total_steps - 1

    def anneal(start, end, fraction):
        return end + (start - end) / 2 * (jnp.cos(jnp.pi * fraction) + 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.result_type(float))
        rising = anneal(initial, peak, step / peak_step)
        falling = anneal(peak, final, (step - peak_step) / (last_step - peak_step))
        return jnp.where(step <= peak_step, rising, falling)

    return schedule


def build_schedule(name: str, arguments: dict[str, Any], learning_rate: float, total_steps: int, steps_per_epoch: int,
                   warmup_steps: int = 0) -> float | optax.Schedule:  # fmt: skip
    """The learning rate of schedule ``name`` at every step of a run of ``total_steps``.

    Args:
        name: one of ``SCHEDULES``.
        arguments: its arguments (``SCHEDULE_ARGUMENTS`` gives their defaults).
        learning_rate: the rate the schedule starts from (``one-cycle``: its peak).
        total_steps: the run's steps.
        steps_per_epoch: steps of one epoch (the epoch-wise schedules change at epoch ends).
        warmup_steps: the warm-up of ``warmup-cosine``.

    Returns:
        ``learning_rate`` itself for ``constant``, else an optax schedule.

    Example:
        >>> schedule = build_schedule("step", {"gamma": 0.5}, 1.0, total_steps=40, steps_per_epoch=10)
        >>> [float(schedule(step)) for step in (0, 9, 10, 25)]
        [1.0, 1.0, 0.5, 0.25]
    """
    values = {**SCHEDULE_ARGUMENTS[name], **arguments}
    if name == "constant":
        return learning_rate
    if name == "cosine":
        return optax.cosine_decay_schedule(learning_rate, total_steps)
    if name == "warmup-cosine":
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps)
    # Epoch-wise decays as optax's piecewise constant schedule: one multiplication by gamma per change, as
    # PyTorch's schedulers make them (optax's exponential decay computes in float32 whatever the run's dtype).
    epochs = -(-total_steps // steps_per_epoch)
    if name in ("step", "exponential"):
        every = values.get("step_size", 1)
        boundaries = {steps_per_epoch * epoch: values["gamma"] for epoch in range(every, epochs, every)}
        return optax.piecewise_constant_schedule(learning_rate, boundaries)
    if name == "multistep":  # a milestone given twice multiplies twice, as in PyTorch
        milestones = values["milestones"]
        boundaries = {steps_per_epoch * epoch: values["gamma"] ** milestones.count(epoch) for epoch in set(milestones)}
        return optax.piecewise_constant_schedule(learning_rate, boundaries)
    if name == "linear":
        return linear(total_steps, learning_rate * values["start_factor"], learning_rate * values["end_factor"])
    return one_cycle(total_steps, learning_rate, values["pct_start"], values["div_factor"], values["final_div_factor"])
