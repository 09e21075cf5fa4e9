"""Where jaxmnist keeps its files: the data folder and the per-user cache folder."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "JAXMNIST_DATA_DIR"


def default_data_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/jaxmnist``, else ``~/.cache/jaxmnist``.

    Returns:
        The folder (it may not exist yet).

    Example:
        >>> default_data_dir().name
        'jaxmnist'
    """
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "jaxmnist"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where to look for MNIST: ``data_dir``, else ``$JAXMNIST_DATA_DIR``, else the cache folder.

    Args:
        data_dir: a folder given by the caller, or None.

    Returns:
        The folder to search.

    Example:
        >>> resolve_data_dir("/data/mnist")
        PosixPath('/data/mnist')
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return default_data_dir()
