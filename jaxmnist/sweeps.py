"""A grid's results summed up: each configuration's final numbers over its seeds, and the best one.

``fit`` trains a grid when settings are given as tuples (``TrainConfig(learning_rate=(0.01, 0.1),
seeds=4)``); every ``EpochResult`` then names its values in ``swept``. These functions group the final
epoch's results by those values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxmnist.loop import EpochResult


@dataclasses.dataclass(frozen=True)
class Spread:
    """Mean and standard deviation (``ddof=0``) of one number over a configuration's ``count`` seeds."""

    mean: float
    std: float
    count: int = 1

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        array = np.asarray(values, np.float64)
        return cls(float(array.mean()), float(array.std()), len(array))

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f}" if self.count > 1 else f"{self.mean:.4f}"


@dataclasses.dataclass(frozen=True)
class ConfigurationSummary:
    """One configuration of a grid at its last epoch: its values and its seeds' numbers.

    The numbers are those of the seeds that did not diverge (``diverged``); None when every seed did, or,
    for ``val_loss``, without validation.
    """

    values: dict[str, float]
    seeds: tuple[int, ...]
    train_loss: Spread | None
    test_loss: Spread | None
    test_accuracy: Spread | None
    val_loss: Spread | None
    diverged: tuple[int, ...] = ()


def final_results(history: Sequence[EpochResult]) -> list[EpochResult]:
    """The results of the last epoch in ``history`` (one per run)."""
    return [result for result in history if history and result.epoch == history[-1].epoch]


def diverged_runs(history: Sequence[EpochResult]) -> set[tuple[tuple, int]]:
    """The runs of ``history`` that diverged at some epoch, each as ``(tuple(swept.items()), seed)``."""
    return {(tuple(result.swept.items()), result.seed) for result in history if result.diverged}


def summarize(results: Sequence[EpochResult]) -> list[ConfigurationSummary]:
    """One summary per configuration (distinct ``swept`` values, in their order) of one epoch's results.

    Example:
        >>> from jaxmnist.loop import EpochResult
        >>> results = [EpochResult(1, loss, 0, 0, 0.9, 1, 0, 0, seed=seed, swept={"learning_rate": rate})
        ...            for rate, seed, loss in [(0.1, 0, 1.0), (0.1, 1, 3.0), (0.2, 0, 0.5), (0.2, 1, 0.5)]]
        >>> [(s.values, str(s.train_loss)) for s in summarize(results)]
        [({'learning_rate': 0.1}, '2.0000 ± 1.0000'), ({'learning_rate': 0.2}, '0.5000 ± 0.0000')]
    """
    groups: dict[tuple, list[EpochResult]] = {}
    for result in results:
        groups.setdefault(tuple(result.swept.items()), []).append(result)

    def spread(members: list[EpochResult], name: str) -> Spread | None:
        values = [getattr(member, name) for member in members if not member.diverged]
        return None if not values or None in values else Spread.of(values)

    return [
        ConfigurationSummary(
            values=dict(key),
            seeds=tuple(member.seed for member in members),
            train_loss=spread(members, "train_loss"),
            test_loss=spread(members, "test_loss"),
            test_accuracy=spread(members, "test_accuracy"),
            val_loss=spread(members, "val_loss"),
            diverged=tuple(member.seed for member in members if member.diverged),
        )
        for key, members in groups.items()
    ]


def best_configuration(summaries: Sequence[ConfigurationSummary]) -> tuple[ConfigurationSummary, str]:
    """The configuration with the lowest mean validation loss, or training loss without validation, and
    which of the two chose it (``"val_loss"`` or ``"train_loss"``); the first of equals.

    Configurations with a diverged seed are passed over while any other is left (then the mean of the
    seeds that did not diverge decides); ``ValueError`` when every seed of every configuration diverged.
    """
    ranked, criterion = rank_configurations(summaries)
    if not ranked:
        raise ValueError("every run of the grid diverged: there is no best configuration")
    return ranked[0], criterion


def rank_configurations(summaries: Sequence[ConfigurationSummary]) -> tuple[list[ConfigurationSummary], str]:
    """The configurations that can be chosen, best first (as ``best_configuration`` chooses), and the loss
    that ranks them."""
    candidates = [summary for summary in summaries if not summary.diverged] or [
        summary for summary in summaries if summary.train_loss is not None
    ]
    criterion = "val_loss" if all(summary.val_loss is not None for summary in candidates) else "train_loss"
    return sorted(candidates, key=lambda summary: getattr(summary, criterion).mean), criterion
