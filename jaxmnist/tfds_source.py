"""MNIST from TensorFlow Datasets, with the same contract as the IDX reader.

TFDS is imported only here, only when asked for (``load_mnist(..., source="tfds")``). It prefers the
TensorFlow-free ``tfds.data_source`` (random access over ArrayRecord files) and falls back to
``tfds.load(..., batch_size=-1)`` when TensorFlow is installed. Downloads stay off unless asked for:
offline, TFDS retries a download for minutes before failing.

Note: TFDS orders the examples differently from the IDX files; compare the two as sets, never
element by element.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np

from jaxmnist.idx import IMAGE_SIZE, NUM_CLASSES, DataError

_HOW_TO_PREPARE = (
    "prepare it with `tfds build mnist` (needs TensorFlow, about 1.25 GB installed) or "
    "`tfds.data_source('mnist', download=True)`, or use the IDX files instead (`source`='idx')"
)


def _from_data_source(tfds, split: str, data_dir: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    source = tfds.data_source("mnist", split=split, data_dir=data_dir, download=download)
    examples = [source[index] for index in range(len(source))]
    images = np.stack([np.asarray(example["image"]) for example in examples])
    labels = np.array([example["label"] for example in examples])
    return images, labels


def _from_tf_load(tfds, split: str, data_dir: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    arrays = tfds.as_numpy(tfds.load("mnist", split=split, data_dir=data_dir, download=download, batch_size=-1))
    return arrays["image"], arrays["label"]


def _as_lesson_arrays(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TFDS gives ``(N, 28, 28, 1)`` uint8 and int64; the contract is ``(N, 28, 28)`` uint8 and int32."""
    images = np.asarray(images, np.uint8).reshape(len(images), IMAGE_SIZE, IMAGE_SIZE)
    labels = np.asarray(labels)
    if len(images) != len(labels) or (labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES):
        raise DataError(
            f"TFDS mnist gave {len(images)} images and {len(labels)} labels in {labels.min()}..{labels.max()}"
        )
    return images, labels.astype(np.int32)


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")


def _load_with_fallback(tfds, split: str, folder: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """``tfds.data_source`` first; ``tfds.load`` when that fails and TensorFlow is installed."""
    try:
        images, labels = _from_data_source(tfds, split, folder, download)
    except Exception as data_source_error:  # TFDS raises assorted types for "not prepared here"
        if importlib.util.find_spec("tensorflow") is None:
            raise DataError(
                f"TFDS has no MNIST prepared for tfds.data_source in {folder or 'its default data folder'} "
                f"({_first_sentence(data_source_error)}); {_HOW_TO_PREPARE}"
            ) from data_source_error
        try:
            images, labels = _from_tf_load(tfds, split, folder, download)
        except Exception as load_error:
            raise DataError(
                f"TFDS could not load MNIST from {folder or 'its default data folder'} "
                f"({_first_sentence(load_error)}); {_HOW_TO_PREPARE}"
            ) from load_error
    return images, labels


def load_tfds(
    split: str, data_dir: str | os.PathLike | None = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One split of TFDS's MNIST as uint8 images ``(N, 28, 28)`` and int32 labels ``(N,)``.

    ``data_dir`` is TFDS's data folder (default: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DataError("`source`='tfds' needs TensorFlow Datasets: pip install 'jaxmnist[tfds]'") from error
    folder = None if data_dir is None else os.fspath(data_dir)
    # TFDS warns through absl about folders it does not find; our error says it in one line.
    absl_logger = logging.getLogger("absl")
    previous_level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        images, labels = _load_with_fallback(tfds, split, folder, download)
    finally:
        absl_logger.setLevel(previous_level)
    return _as_lesson_arrays(images, labels)
