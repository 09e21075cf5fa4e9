"""Fetching MNIST's four gz files from the mirror TFDS uses, checksummed, atomically, with a bounded retry.

A file lands under its final name only after its SHA-256 matches the published value; anything that
goes wrong (offline, timeout, truncated body, wrong bytes) removes the partial file, so a later run can
never mistake it for data.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

MIRROR_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
MIRROR_ENV = "JAXMNIST_MIRROR"

# SHA-256 of the canonical mirror's .gz files, as TFDS lists them.
MIRROR_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

_CHUNK_BYTES = 1 << 16


class DownloadError(OSError):
    """A file could not be fetched or did not match its checksum; nothing was left behind."""


def _is_offline(error: BaseException) -> bool:
    """Errors that another try will not fix soon: no name resolution, refused or unreachable network."""
    reason = getattr(error, "reason", error)
    return isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or (
        isinstance(reason, OSError) and reason.errno in (101, 113)  # ENETUNREACH, EHOSTUNREACH
    )


def _worth_retrying(error: BaseException) -> bool:
    """Timeouts, resets, truncated bodies and server errors may pass; offline, 4xx and bad bytes will not."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500
    if isinstance(error, DownloadError):
        return "SHA-256" not in str(error)
    return not _is_offline(error)


def _fetch_once(url: str, destination: Path, expected_sha256: str, timeout: float, progress: bool) -> None:
    from tqdm.auto import tqdm

    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as output, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=destination.name, disable=not progress, leave=False
            ) as bar:
                while chunk := response.read(_CHUNK_BYTES):
                    output.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and output.tell() != total:
                raise DownloadError(f"{url}: received {output.tell()} of {total} bytes")
            output.flush()
            os.fsync(output.fileno())
        if digest.hexdigest() != expected_sha256:
            raise DownloadError(f"{url}: SHA-256 {digest.hexdigest()} does not match the published {expected_sha256}")
        os.replace(temporary, destination)
    finally:
        Path(temporary).unlink(missing_ok=True)


def download_file(
    url: str,
    destination: str | os.PathLike,
    expected_sha256: str,
    timeout: float = 10.0,
    retries: int = 2,
    progress: bool = True,
) -> Path:
    """Fetches ``url`` to ``destination`` (atomically, after the checksum matches); retries ``retries`` times."""
    destination = Path(destination)
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, destination, expected_sha256, timeout, progress)
            return destination
        except (OSError, EOFError, http.client.HTTPException) as error:
            last_error = error
            if not _worth_retrying(error) or attempt == retries:
                break
            time.sleep(0.5 * 2**attempt)
    if isinstance(last_error, urllib.error.HTTPError):
        reason = f"HTTP {last_error.code} {last_error.reason}"
    else:
        reason = getattr(last_error, "reason", None) or last_error
    raise DownloadError(f"could not download {url}: {reason}") from last_error


def download_mnist(
    folder: str | os.PathLike, names: Iterable[str] = tuple(MIRROR_SHA256), base_url: str | None = None, **options
) -> list[Path]:
    """Downloads the named MNIST gz files (default: all four) into ``folder``, skipping those present.

    The mirror is ``base_url``, else ``$JAXMNIST_MIRROR``, else the canonical one TFDS uses.
    """
    base_url = base_url or os.environ.get(MIRROR_ENV) or MIRROR_URL
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        destination = folder / name
        if not destination.is_file():
            download_file(base_url.rstrip("/") + "/" + name, destination, MIRROR_SHA256[name], **options)
        paths.append(destination)
    return paths
