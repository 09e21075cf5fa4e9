"""The IDX file format of MNIST: find the files, read, validate and verify them, write small ones.

Reading is plain numpy (no TensorFlow, no torchvision): the four IDX files of MNIST, gzip-compressed or
raw, under either of the two common spellings, in a flat folder or in torchvision's ``MNIST/raw`` layout.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from jaxmnist.paths import DATA_DIR_ENV, default_data_dir

Split = Literal["train", "test"]

IMAGE_SIZE = 28
NUM_CLASSES = 10

# IDX magic numbers: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
_LABELS_MAGIC = 0x00000801
_IMAGES_MAGIC = 0x00000803
_GZIP_MAGIC = b"\x1f\x8b"

FILE_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


# SHA-256 of the canonical files' decompressed bytes (re-compressed copies have other .gz bytes but these).
CANONICAL_SHA256 = {
    ("train", "images"): "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ("train", "labels"): "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ("test", "images"): "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ("test", "labels"): "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_VERIFIED_RECORD = "verified.json"


class DataError(ValueError):
    """MNIST could not be found or a file is damaged; the message names the file and what is wrong.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "train-images-idx3-ubyte"
        >>> _ = path.write_bytes(b"not an IDX file")
        >>> try:
        ...     read_images(path)
        ... except DataError as error:
        ...     print(type(error).__name__)
        DataError
    """


def _file_names(stem: str) -> list[str]:
    """Both spellings (``...-idx3-ubyte`` and ``....idx3-ubyte``), each gzipped or raw."""
    dotted = stem.replace("-idx", ".idx")
    return [name for base in (stem, dotted) for name in (base + ".gz", base)]


def candidate_folders(data_dir: Path) -> list[Path]:
    """The folder itself, then torchvision's ``<root>/MNIST/raw`` layout (or ``<root>/raw``)."""
    return [data_dir, data_dir / "MNIST" / "raw", data_dir / "raw"]


def find_idx_file(data_dir: Path, split: Split, kind: Literal["images", "labels"]) -> Path | None:
    """The first existing file for ``split``/``kind`` under ``data_dir``, or ``None``."""
    names = _file_names(FILE_STEMS[(split, kind)])
    for folder in candidate_folders(data_dir):
        for name in names:
            path = folder / name
            if path.is_file():
                return path
    return None


def missing_data_message(data_dir: Path, split: Split) -> str:
    """Says where we looked and how to provide the files."""
    looked = ", ".join(str(folder) for folder in candidate_folders(data_dir))
    return (
        f"MNIST {split} files not found; looked in {looked} for "
        f"{FILE_STEMS[(split, 'images')]}[.gz] and {FILE_STEMS[(split, 'labels')]}[.gz]. "
        f"Put the four MNIST IDX files in one folder and pass `data_dir`=FOLDER "
        f"or set {DATA_DIR_ENV}=FOLDER."
    )


def read_idx_bytes(path: Path) -> bytes:
    """The decompressed content of an IDX file; gzip is recognised by its magic bytes, not its name."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read file ({error.strerror or error})") from error
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: damaged gzip data ({error})") from error


def _parse_idx(path: Path, content: bytes, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Checks the header, dimensions and length of one IDX file and returns its uint8 array."""
    header_size = 4 * (1 + 1 + len(item_shape))
    if len(content) < header_size:
        raise DataError(f"{path}: file too short for an IDX header ({len(content)} bytes)")
    header = np.frombuffer(content, dtype=">u4", count=header_size // 4)
    if int(header[0]) != magic:
        raise DataError(
            f"{path}: wrong magic number 0x{int(header[0]):08x}, expected 0x{magic:08x} "
            "(not an MNIST IDX file of this kind)"
        )
    count = int(header[1])
    dims = tuple(int(d) for d in header[2:])
    if dims != item_shape:
        raise DataError(f"{path}: items of shape {dims}, expected {item_shape}")
    expected = header_size + count * int(np.prod(item_shape, dtype=np.int64))
    if len(content) != expected:
        raise DataError(
            f"{path}: header declares {count} items ({expected} bytes) but the file has {len(content)} bytes "
            "(truncated or padded)"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape((count, *item_shape))


def _read_idx(path: Path, magic: int, item_shape: tuple[int, ...], expected_sha256: str | None) -> np.ndarray:
    content = read_idx_bytes(path)
    array = _parse_idx(path, content, magic, item_shape)
    if magic == _LABELS_MAGIC and array.size and array.max() >= NUM_CLASSES:
        bad = int(np.argmax(array >= NUM_CLASSES))
        raise DataError(f"{path}: label {int(array[bad])} at index {bad} is outside 0..9")
    if expected_sha256 is not None:
        verify_content(path, content, expected_sha256)
    return array


def read_images(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """uint8 images ``(N, 28, 28)`` from an IDX3 file, checked against ``expected_sha256`` if given."""
    return _read_idx(path, _IMAGES_MAGIC, (IMAGE_SIZE, IMAGE_SIZE), expected_sha256)


def read_labels(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """int32 labels ``(N,)`` in 0..9 from an IDX1 file, checked against ``expected_sha256`` if given."""
    return _read_idx(path, _LABELS_MAGIC, (), expected_sha256).astype(np.int32)


def _verified_record_path() -> Path:
    return default_data_dir() / _VERIFIED_RECORD


def _file_stamp(path: Path) -> list:
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def _load_verified_record() -> dict:
    try:
        return json.loads(_verified_record_path().read_text())
    except (OSError, ValueError):
        return {}


def verify_content(path: Path, content: bytes, expected_sha256: str) -> None:
    """Checks the decompressed ``content`` of ``path`` against the canonical SHA-256.

    A file already verified with the same size and mtime is trusted without hashing again; the record
    lives in the cache folder and is best effort (a read-only cache only costs the hash each time).
    """
    key = str(path.resolve())
    record = _load_verified_record()
    if record.get(key) == [*_file_stamp(path), expected_sha256]:
        return
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise DataError(
            f"{path}: content SHA-256 {actual} is not MNIST's {expected_sha256} "
            "(modified or another data set; pass `verify`=False to use it anyway)"
        )
    record[key] = [*_file_stamp(path), expected_sha256]
    try:
        _verified_record_path().parent.mkdir(parents=True, exist_ok=True)
        _verified_record_path().write_text(json.dumps(record))
    except OSError:
        pass


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Writes a uint8 array as an IDX file (gzip-compressed when the name ends in ``.gz``).

    For small synthetic data sets in tests and demos; the inverse of the readers above.
    """
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = np.array([0x0800 | array.ndim, *array.shape], dtype=">u4").tobytes()
    content = header + array.tobytes()
    path.write_bytes(gzip.compress(content, mtime=0) if path.name.endswith(".gz") else content)
    return path
