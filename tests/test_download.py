"""The download path against a local HTTP server, and the SHA-256 verification of local files."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from jaxmnist import download, idx
from jaxmnist.data import load_mnist, write_mnist
from jaxmnist.download import DownloadError, download_file, download_mnist
from jaxmnist.idx import DataError

from conftest import make_digits


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; ``server.behaviour`` can make it lie, truncate, stall or fail first."""

    def do_GET(self):
        self.server.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        behaviour = self.server.behaviour
        if name not in self.server.files:
            self.send_error(404)
            return
        if behaviour == "fail_first" and len(self.server.requests) == 1:
            self.send_error(503)
            return
        body = self.server.files[name]
        if behaviour == "stalled":
            self.server.released.wait()  # until the test ends: any client timeout fires first
            return  # and the client is gone (an answer would meet a broken pipe, printed by the server)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if behaviour == "truncated":
            body = body[: len(body) // 2]
        if behaviour == "wrong_bytes":
            body = bytes(reversed(body))
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[http.server.ThreadingHTTPServer]:
    """A local mirror of four small MNIST-format gz files, their checksums published as the real ones are."""
    source = tmp_path / "mirror"
    write_mnist(source, "train", *make_digits(50, seed=4))
    write_mnist(source, "test", *make_digits(20, seed=5))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    server.files = {path.name: path.read_bytes() for path in source.iterdir()}
    server.behaviour = "normal"
    server.requests = []
    server.released = threading.Event()
    monkeypatch.setattr(
        download, "MIRROR_SHA256", {name: hashlib.sha256(body).hexdigest() for name, body in server.files.items()}
    )
    monkeypatch.setenv("JAXMNIST_MIRROR", f"http://127.0.0.1:{server.server_port}/mnist/")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_download_fetches_all_four_files_and_load_reads_them(mirror, tmp_path: Path):
    cache = tmp_path / "cache"
    paths = download_mnist(cache, progress=False)
    assert _leftovers(cache) == sorted(download.MIRROR_SHA256)
    for path in paths:
        assert path.read_bytes() == mirror.files[path.name]
    images, _labels = load_mnist("train", cache, verify=False)
    np.testing.assert_array_equal(images, make_digits(50, seed=4)[0])


def test_load_mnist_downloads_only_what_is_missing(mirror, tmp_path: Path):
    folder = tmp_path / "data"
    write_mnist(folder, "train", *make_digits(50, seed=4))
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    _images, labels = load_mnist("train", folder, verify=False)
    assert mirror.requests == ["/mnist/train-labels-idx1-ubyte.gz"]
    assert labels.shape == (50,)


@pytest.mark.parametrize("behaviour, message", [("wrong_bytes", "SHA-256"), ("truncated", "could not download")])
def test_damaged_download_leaves_nothing_behind(mirror, tmp_path: Path, behaviour: str, message: str):
    mirror.behaviour = behaviour
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=message):
        download_mnist(cache, ["t10k-labels-idx1-ubyte.gz"], retries=1, progress=False)
    assert _leftovers(cache) == []


@pytest.fixture
def backoffs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses the download asks for between tries, recorded instead of slept."""
    pauses: list[float] = []
    monkeypatch.setattr(download.time, "sleep", pauses.append)
    return pauses


def test_server_down_fails_without_retrying_and_leaves_nothing(tmp_path: Path, monkeypatch, backoffs):
    monkeypatch.setenv("JAXMNIST_MIRROR", "http://127.0.0.1:9/")
    with pytest.raises(DataError, match=r"Downloading them failed.*could not download"):
        load_mnist("test", tmp_path / "cache")
    assert backoffs == []  # a refused connection is not worth another try
    assert _leftovers(tmp_path / "cache") == []


def test_a_stalled_server_times_out_within_the_bounded_retries(mirror, tmp_path: Path, backoffs):
    mirror.behaviour = "stalled"
    (tmp_path / "out").mkdir()
    with pytest.raises(DownloadError, match="timed out"):
        download_file(
            f"http://127.0.0.1:{mirror.server_port}/t10k-labels-idx1-ubyte.gz",
            tmp_path / "out" / "labels.gz",
            download.MIRROR_SHA256["t10k-labels-idx1-ubyte.gz"],
            timeout=0.5,
            retries=1,
            progress=False,
        )
    assert len(mirror.requests) == 2 and backoffs == [0.5]
    assert _leftovers(tmp_path / "out") == []


def test_a_server_error_is_retried_and_a_missing_file_is_not(mirror, tmp_path: Path):
    mirror.behaviour = "fail_first"
    download_mnist(tmp_path / "cache", ["t10k-labels-idx1-ubyte.gz"], progress=False)
    assert len(mirror.requests) == 2
    mirror.requests.clear()
    with pytest.raises(DownloadError, match="404"):
        download_file(
            f"http://127.0.0.1:{mirror.server_port}/nothing.gz", tmp_path / "cache" / "x.gz", "0" * 64, progress=False
        )
    assert len(mirror.requests) == 1


def test_no_download_reports_missing_files_without_a_request(mirror, tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        load_mnist("train", tmp_path / "empty", download=False)
    assert mirror.requests == []


def test_downloaded_real_files_pass_verification(
    real_mnist_dir: Path, mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    mirror.files = {path.name: path.read_bytes() for path in real_mnist_dir.glob("*.gz")}
    monkeypatch.setattr(
        download, "MIRROR_SHA256", {name: hashlib.sha256(body).hexdigest() for name, body in mirror.files.items()}
    )
    images, labels = load_mnist("test", tmp_path / "cache")
    assert images.shape == (10000, 28, 28) and labels[:3].tolist() == [7, 2, 1]


def test_recompressed_real_files_pass_and_a_modified_copy_is_rejected(real_mnist_dir: Path, tmp_path: Path):
    load_mnist("test", real_mnist_dir)  # the shared copies are re-compressed: other .gz bytes, same content
    for path in real_mnist_dir.glob("t10k-*"):
        shutil.copy(path, tmp_path / path.name)
    labels_path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels_path.read_bytes()))
    content[-1] = (content[-1] + 1) % 10
    labels_path.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(DataError, match=f"{labels_path}.*SHA-256.*`verify`=False"):
        load_mnist("test", tmp_path)
    assert load_mnist("test", tmp_path, verify=False)[1][-1] == content[-1]


def test_verified_files_are_remembered_by_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    images, labels = make_digits(10)
    write_mnist(tmp_path, "test", images, labels)
    content = gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    expected = hashlib.sha256(content).hexdigest()
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(idx.hashlib, "sha256", lambda payload: hashed.append(1) or real_sha256(payload))
    idx.verify_content(path, content, expected)
    idx.verify_content(path, content, expected)
    assert len(hashed) == 1
    os.utime(path, ns=(0, 12345))
    idx.verify_content(path, content, expected)
    assert len(hashed) == 2
    with pytest.raises(DataError, match="SHA-256"):
        idx.verify_content(path, content, "f" * 64)
