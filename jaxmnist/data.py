"""Loading MNIST: one call that finds, downloads if allowed, reads and checks a split.

The IDX format itself lives in ``jaxmnist.idx``, the download in ``jaxmnist.download`` and the TFDS
backend in ``jaxmnist.tfds_source``; this module chooses among them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np

from jaxmnist.idx import (
    CANONICAL_SHA256,
    FILE_STEMS,
    DataError,
    Split,
    find_idx_file,
    missing_data_message,
    read_images,
    read_labels,
    write_idx,
)
from jaxmnist.paths import resolve_data_dir

Source = Literal["idx", "tfds"]
SOURCES: tuple[Source, ...] = ("idx", "tfds")


def _download_missing(folder: Path, split: Split, missing: list[str]) -> None:
    from jaxmnist.download import DownloadError, download_mnist

    names = [FILE_STEMS[(split, kind)] + ".gz" for kind in missing]
    try:
        download_mnist(folder, names)
    except DownloadError as error:
        raise DataError(f"{missing_data_message(folder, split)} Downloading them failed: {error}") from error


def load_mnist(
    split: Split,
    data_dir: str | os.PathLike | None = None,
    *,
    source: Source = "idx",
    download: bool | None = None,
    verify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of MNIST as uint8 images ``(N, 28, 28)`` and int32 labels ``(N,)``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        data_dir: with ``source="idx"``, the folder of the IDX files (default ``$JAXMNIST_DATA_DIR``,
            else ``~/.cache/jaxmnist``), flat or in torchvision's ``MNIST/raw`` layout; with
            ``source="tfds"``, TFDS's data folder.
        source: ``"idx"`` (the four IDX files) or ``"tfds"`` (TensorFlow Datasets' prepared MNIST).
        download: IDX: missing files are downloaded unless False. TFDS: downloads only if True.
        verify: check every IDX file against MNIST's SHA-256.

    Returns:
        ``(images, labels)`` as numpy arrays.

    Raises:
        DataError: a file is missing or damaged; the message names it and what is wrong.

    Example:
        >>> import tempfile, numpy as np
        >>> folder = tempfile.mkdtemp()
        >>> write_mnist(folder, "train", np.zeros((5, 28, 28), np.uint8), np.arange(5))
        >>> images, labels = load_mnist("train", folder, download=False, verify=False)
        >>> images.shape, labels.dtype
        ((5, 28, 28), dtype('int32'))
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    if source == "tfds":
        from jaxmnist.tfds_source import load_tfds

        # TFDS downloads only when asked: offline it retries for minutes before failing.
        return load_tfds(split, data_dir, download=bool(download))
    if source != "idx":
        raise ValueError(f"`source` must be one of {SOURCES}, got {source!r}")
    folder = resolve_data_dir(data_dir)
    paths = {kind: find_idx_file(folder, split, kind) for kind in ("images", "labels")}
    missing = [kind for kind, path in paths.items() if path is None]
    if missing and download is not False:
        _download_missing(folder, split, missing)
        paths = {kind: find_idx_file(folder, split, kind) for kind in ("images", "labels")}
    images_path, labels_path = paths["images"], paths["labels"]
    if images_path is None or labels_path is None:
        raise DataError(missing_data_message(folder, split))
    images = read_images(images_path, CANONICAL_SHA256[(split, "images")] if verify else None)
    labels = read_labels(labels_path, CANONICAL_SHA256[(split, "labels")] if verify else None)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return images, labels


def write_mnist(folder: str | os.PathLike, split: Split, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes one split as the two gzipped IDX files ``load_mnist`` reads (for small synthetic sets).

    Args:
        folder: created if missing.
        split: ``"train"`` or ``"test"``.
        images: uint8 ``(N, 28, 28)``.
        labels: integers 0..9, ``(N,)``.

    Example:
        >>> import tempfile, numpy as np
        >>> folder = tempfile.mkdtemp()
        >>> write_mnist(folder, "test", np.zeros((2, 28, 28), np.uint8), np.array([3, 7]))
        >>> load_mnist("test", folder, download=False, verify=False)[1].tolist()
        [3, 7]
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{FILE_STEMS[(split, 'images')]}.gz", images)
    write_idx(folder / f"{FILE_STEMS[(split, 'labels')]}.gz", labels)
