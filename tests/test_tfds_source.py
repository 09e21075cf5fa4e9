"""The TFDS backend, offline: tfds.testing.mock_data for the data path, an empty folder for the failure."""

from __future__ import annotations

from pathlib import Path

import chex
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="TFDS is not installed: pip install 'jaxmnist[tfds]'")

from jaxmnist.commands.train import main  # noqa: E402
from jaxmnist.data import load_mnist  # noqa: E402
from jaxmnist.idx import DataError  # noqa: E402


@pytest.mark.parametrize("split, count", [("train", 40), ("test", 40)])
def test_tfds_source_returns_the_idx_contract(split: str, count: int):
    with tfds.testing.mock_data(num_examples=count):
        images, labels = load_mnist(split, source="tfds")
    chex.assert_shape([images, labels], [(count, 28, 28), (count,)])
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() <= 9


def test_unprepared_tfds_fails_without_trying_to_download_or_prepare(tmp_path: Path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("TFDS tried to download or prepare MNIST")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(DataError, match="tfds build mnist") as error:
        load_mnist("train", tmp_path, source="tfds")
    assert "tried to download" not in str(error.value)


def test_cli_trains_from_tfds(capsys: pytest.CaptureFixture):
    with tfds.testing.mock_data(num_examples=128):
        assert main(["--source", "tfds", "--epochs", "1", "--no-compile-cache"]) == 0
    output = capsys.readouterr().out
    assert "128 training images" in output and "Training loss:" in output


def test_cli_with_unprepared_tfds_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["--source", "tfds", "--data-dir", str(tmp_path), "--no-compile-cache"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "tfds" in error
