"""Shared fixtures; every test runs with strict dtype promotion so silent float32/float64 mixes fail."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# The suite's two workers already keep the cores busy: a library's own pool of OpenMP threads in each
# (PyTorch's, the BLAS under numpy) would fight them for the cores, its idle threads spinning. One thread
# each, for the workers and the commands they start (before anything reads it at import).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax
import numpy as np
import pytest

from jaxmnist.data import write_mnist
from jaxmnist.paths import DATA_DIR_ENV

jax.config.update("jax_numpy_dtype_promotion", "strict")

# A persistent compilation cache for each test worker, shared by its own calls and by the commands its
# tests start (given it through JAX's environment variables): each small program compiles once per worker,
# not in every test. A worker and its commands take turns, so none reads an entry another is still
# writing (JAX writes in place, unlocked); a command a test kills, signals or runs beside another gets a
# cache of its own (``own_compile_cache``), so a half-written entry never meets the tests after it.
_SHARED_XLA_CACHE = "JAXMNIST_TESTS_XLA_CACHE"
COMPILE_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"  # where JAX in a command the tests start caches
_CACHE_MADE_HERE = pytest.StashKey[str]()


# The suite compiles with XLA:CPU's loop emitters instead of its fusion emitters: the same programs' numbers
# (test_train checks a lesson and a CNN epoch to the bit) in about a third less compile time, and the suite
# is mostly compilation. Workers and the commands tests start inherit it through the environment.
SUITE_XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _with_suite_xla_flag() -> None:
    """Adds ``SUITE_XLA_FLAG`` to ``XLA_FLAGS`` where this XLA knows it (an unknown flag aborts a process)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAG}".strip()
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    if subprocess.run(probe, env={**os.environ, "XLA_FLAGS": flags}, capture_output=True).returncode == 0:
        os.environ["XLA_FLAGS"] = flags


def with_xla_flags(*flags: str) -> dict[str, str]:
    """The environment for a command started by a test with ``flags`` as its XLA flags, beside the suite's."""
    suite = [SUITE_XLA_FLAG] if SUITE_XLA_FLAG in os.environ.get("XLA_FLAGS", "") else []
    return {**os.environ, "XLA_FLAGS": " ".join([*suite, *flags])}


def pytest_configure(config: pytest.Config) -> None:
    folder = os.environ.get(_SHARED_XLA_CACHE)
    if folder is None:  # the first process of the session: the workers it starts inherit the folder
        folder = os.environ[_SHARED_XLA_CACHE] = tempfile.mkdtemp(prefix="jaxmnist-tests-xla-")
        config.stash[_CACHE_MADE_HERE] = folder
        _with_suite_xla_flag()  # before this process's JAX starts its backend
    worker_folder = str(Path(folder) / os.environ.get("PYTEST_XDIST_WORKER", "main"))
    settings = {"jax_compilation_cache_dir": worker_folder, "jax_persistent_cache_min_compile_time_secs": 0.0}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)  # how JAX in a command the tests start reads its settings


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(_CACHE_MADE_HERE, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def own_compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A compilation cache for this test's commands alone (those it kills or signals, or runs side by side)."""
    folder = tmp_path / "xla-cache"
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(folder))
    return folder


def make_digits(num_examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small learnable stand-in for MNIST: each class lights up its own band of rows, plus noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(num_examples) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(num_examples, 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        images[index, 2 * label + 4 : 2 * label + 7, 4:24] = 255
    return images, labels


@pytest.fixture(autouse=True)
def isolated_cache_and_no_internet(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test writes to the user's cache or reaches the internet: downloads go to a closed local port."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
    monkeypatch.setenv("JAXMNIST_MIRROR", "http://127.0.0.1:9/")


@pytest.fixture
def tiny_mnist_dir(tmp_path: Path) -> Path:
    """A folder with all four IDX files: 300 training and 100 test images (load with verify=False)."""
    write_mnist(tmp_path, "train", *make_digits(300, seed=1))
    write_mnist(tmp_path, "test", *make_digits(100, seed=2))
    return tmp_path


@pytest.fixture(scope="session")
def small_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with 1,200 training and 100 test images, for command-line runs (load with --no-verify)."""
    folder = tmp_path_factory.mktemp("small-mnist")
    write_mnist(folder, "train", *make_digits(1200, seed=3))
    write_mnist(folder, "test", *make_digits(100, seed=4))
    return folder


@pytest.fixture
def real_mnist_dir() -> Path:
    """The real MNIST folder named by $JAXMNIST_DATA_DIR; the test is skipped without it."""
    folder = os.environ.get(DATA_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        pytest.skip(f"real MNIST not available: set {DATA_DIR_ENV} to the folder of the IDX files")
    return Path(folder)


def step_loop(state, images, labels, indices, mask, first_step: int = 0, num_steps: int | None = None, step_fn=None):
    """Reference loop: the batches of ``indices``/``mask``, one jitted ``train_step`` call each."""
    import jax.numpy as jnp

    from jaxmnist.train import gather_batch, param_dtype, train_step

    step_fn = train_step if step_fn is None else step_fn
    last_step = len(indices) if num_steps is None else first_step + num_steps
    history = []
    for step in range(first_step, last_step):
        state, metrics = step_fn(state, gather_batch(images, labels, indices[step], mask[step], param_dtype(state)))
        history.append(metrics)
    return state, jax.tree.map(lambda *values: jnp.stack(values), *history)


def epoch_step_loop(state, images, labels, key, batch_size: int = 64, step_fn=None):
    """Reference loop: the same epoch as ``train_epoch`` (same batches, same math), one step per call."""
    from jaxmnist.train import epoch_batch_indices

    indices, mask = epoch_batch_indices(key, images.shape[0], batch_size)
    return step_loop(state, images, labels, indices, mask, step_fn=step_fn)


def train_exit_code(data_dir: Path, *flags: str) -> int:
    """The train command's exit code on the generated data in ``data_dir``, whether it returns or exits."""
    from jaxmnist.commands.train import main

    try:
        return main(["--data-dir", str(data_dir), "--no-verify", "--no-compile-cache", *flags])
    except SystemExit as exit_info:
        return exit_info.code


def wait_for(condition: Callable[[], bool], process: subprocess.Popen) -> bool:
    """Waits until ``condition()`` holds (True) or ``process`` has ended without it (False).

    No clock decides: the test waits for what the program reports (a file, a line), however fast or busy
    the machine is; between looks it waits on the process itself, so an ended process ends the wait.
    """
    while not condition():
        try:
            process.wait(timeout=0.005)
        except subprocess.TimeoutExpired:
            continue
        return condition()
    return True


def template_state(config, num_train_images: int, image_shape: tuple[int, ...] = (28, 28)):
    """The initial state of the run ``config`` describes (its MLP and optimizer): what a checkpoint of that
    run is restored onto."""
    from jaxmnist.runs import build_run, initial_state

    return initial_state(build_run(config, image_shape, num_train_images))


def kept(progresses) -> list:
    """Every ``Progress`` a ``fit`` yields, with its state copied before the next compiled call takes its
    buffers over (``fit`` donates them), so that all of them stay usable."""
    import dataclasses

    import jax.numpy as jnp

    return [dataclasses.replace(progress, state=jax.tree.map(jnp.copy, progress.state)) for progress in progresses]


def tensorboard_events(folder: Path) -> list:
    """Every event in the folder's event files, read as plain TFRecords of tensorboardX's Event protos."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        content = path.read_bytes()
        while content:
            (length,) = struct.unpack("<Q", content[:8])
            event = event_pb2.Event()
            event.ParseFromString(content[12 : 12 + length])
            events.append(event)
            content = content[12 + length + 4 :]
    return events
