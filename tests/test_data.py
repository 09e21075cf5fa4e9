from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmnist import data, paths
from jaxmnist.data import load_mnist
from jaxmnist.idx import DataError, write_idx
from jaxmnist.normalization import normalize


def _idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file written by hand with struct, independent of the module's writer."""
    return struct.pack(f">I{len(dims)}I", magic, *dims) + payload


def test_reads_hand_written_raw_and_gzip_files(tmp_path: Path):
    pixels = bytes(i % 256 for i in range(2 * 28 * 28))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(0x803, (2, 28, 28), pixels))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(0x801, (2,), bytes([7, 3]))))
    images, labels = load_mnist("test", tmp_path, download=False, verify=False)
    chex.assert_shape(images, (2, 28, 28))
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images.reshape(-1), np.frombuffer(pixels, np.uint8))
    np.testing.assert_array_equal(labels, [7, 3])


@pytest.mark.parametrize("dotted", [False, True])
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", [".", "MNIST/raw", "raw"])
def test_finds_files_in_every_spelling_and_layout(tmp_path: Path, dotted: bool, gz: bool, layout: str):
    folder = tmp_path / layout
    folder.mkdir(parents=True, exist_ok=True)
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    labels = np.array([1, 2, 9], np.uint8)
    for stem, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        name = stem.replace("-idx", ".idx") if dotted else stem
        write_idx(folder / (name + (".gz" if gz else "")), array)
    loaded_images, loaded_labels = load_mnist("train", tmp_path, download=False, verify=False)
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_labels, labels)


def test_data_dir_argument_beats_environment_beats_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(paths.DATA_DIR_ENV, raising=False)
    assert paths.resolve_data_dir() == tmp_path / "xdg" / "jaxmnist"
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path / "env"))
    assert paths.resolve_data_dir() == tmp_path / "env"
    assert paths.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_default_cache_is_home_cache_without_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.default_data_dir() == tmp_path / ".cache" / "jaxmnist"


def test_missing_data_says_where_it_looked_and_what_to_do(tmp_path: Path):
    with pytest.raises(DataError) as error:
        load_mnist("train", tmp_path, download=False, verify=False)
    message = str(error.value)
    assert str(tmp_path) in message and str(tmp_path / "MNIST" / "raw") in message
    assert "`data_dir`=FOLDER" in message and paths.DATA_DIR_ENV in message


def _corrupt(tmp_path: Path, name: str, content: bytes) -> Path:
    data.write_mnist(tmp_path, "train", np.zeros((4, 28, 28), np.uint8), np.arange(4, dtype=np.uint8))
    for existing in tmp_path.glob(f"{name.split('-idx')[0]}*"):
        existing.unlink()
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


GOOD_LABELS = _idx_bytes(0x801, (4,), bytes([0, 1, 2, 3]))
CORRUPTIONS = {
    "truncated images": ("train-images-idx3-ubyte", _idx_bytes(0x803, (4, 28, 28), bytes(100)), "truncated"),
    "wrong magic": ("train-images-idx3-ubyte", _idx_bytes(0x801, (4, 28, 28), bytes(4 * 784)), "magic"),
    "wrong dimensions": ("train-images-idx3-ubyte", _idx_bytes(0x803, (4, 32, 32), bytes(4 * 1024)), "shape"),
    "count mismatch": ("train-labels-idx1-ubyte", _idx_bytes(0x801, (5,), bytes(5)), "4 images but"),
    "label out of range": ("train-labels-idx1-ubyte", _idx_bytes(0x801, (4,), bytes([0, 1, 10, 3])), "outside 0..9"),
    "garbage gzip": ("train-labels-idx1-ubyte.gz", b"\x1f\x8b" + bytes(range(50)), "gzip"),
    "truncated gzip": ("train-labels-idx1-ubyte.gz", gzip.compress(GOOD_LABELS)[:-10], "gzip"),
    "empty file": ("train-labels-idx1-ubyte", b"", "too short"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_each_corrupt_file_gives_an_error_naming_file_and_fault(tmp_path: Path, case: str):
    name, content, fault = CORRUPTIONS[case]
    path = _corrupt(tmp_path, name, content)
    with pytest.raises(DataError) as error:
        load_mnist("train", tmp_path, download=False, verify=False)
    assert fault in str(error.value)
    assert str(path) in str(error.value) or path.name.split("-idx")[0] in str(error.value)


def test_unreadable_file_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data.write_mnist(tmp_path, "train", np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.uint8))

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(DataError, match=r"cannot read file.*Permission denied"):
        load_mnist("train", tmp_path, download=False, verify=False)


def test_unknown_split_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", tmp_path)


def test_normalize_is_the_lessons_transform_and_jittable():
    pixels = jnp.array([0, 51, 127, 255], jnp.uint8)
    expected = (np.array([0, 51, 127, 255]) / 255 - 0.5) / 0.5
    for function in (normalize, jax.jit(normalize)):
        result = function(pixels)
        chex.assert_type(result, jnp.float32)
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)
    with jax.enable_x64(True):
        result64 = jax.jit(normalize, static_argnums=1)(pixels, jnp.float64)
        chex.assert_type(result64, jnp.float64)
        np.testing.assert_allclose(result64, expected, rtol=1e-15, atol=1e-16)


def test_real_mnist_matches_its_published_facts(real_mnist_dir: Path):
    train_images, train_labels = load_mnist("train", real_mnist_dir)
    test_images, test_labels = load_mnist("test", real_mnist_dir)
    chex.assert_shape(
        [train_images, train_labels, test_images, test_labels], [(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)]
    )
    np.testing.assert_array_equal(train_labels[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    np.testing.assert_array_equal(
        np.bincount(train_labels), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    )
    np.testing.assert_array_equal(np.bincount(test_labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    scaled = train_images / 255.0
    assert abs(scaled.mean() - 0.1307) < 1e-4 and abs(scaled.std() - 0.3081) < 1e-4


def test_torchvision_layout_of_the_real_files(real_mnist_dir: Path, tmp_path: Path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in real_mnist_dir.glob("t10k-*"):
        shutil.copy(path, raw / path.name)
    images, labels = load_mnist("test", tmp_path, download=False)
    chex.assert_shape(images, (10000, 28, 28))
    assert labels.shape == (10000,)
