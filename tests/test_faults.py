"""Faults made for real: kills at random instants, a truncated checkpoint, a file too large, a full disk.

Every run here is the same command line with ``--resume``, as a scheduler restarting a preempted job
would issue it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxmnist import checkpoint

from conftest import COMPILE_CACHE_ENV, tensorboard_events, wait_for

# Whole runs killed and resumed in subprocesses, which compile into a cache of the test's own.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_compile_cache")]

EXIT_WRITE_FAILED = 74


def _command(data: Path, checkpoint_dir: Path, metrics: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxmnist.train", "--data-dir", str(data), "--no-verify", "--epochs", "3",
            "--batch-size", "16", "--checkpoint-dir", str(checkpoint_dir), "--checkpoint-every", "10",
            "--metrics-out", str(metrics), "--resume", "--no-compile-cache", *extra]  # fmt: skip


def _final_params(folder: Path) -> list[bytes]:
    restored = checkpoint.serialization.msgpack_restore(checkpoint.checkpoint_paths(folder)[-1].read_bytes())
    return [leaf.tobytes() for leaf in jax.tree.leaves(restored["state"]["params"])]


def _losses(metrics: Path) -> list[tuple[int, float]]:
    return [(record["epoch"], record["train_loss"]) for record in map(json.loads, metrics.read_text().splitlines())]


@pytest.fixture(scope="module")
def uninterrupted(small_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(
        _command(small_mnist_dir, folder / "ck", folder / "m.jsonl"), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "starting a new run" in result.stdout
    return _losses(folder / "m.jsonl"), _final_params(folder / "ck")


def _newest_step(folder: Path) -> int:
    paths = checkpoint.checkpoint_paths(folder)
    return int(paths[-1].stem.split("-")[1]) if paths else 0


def _kill_when(command: list[str], log: Path, reported) -> bool:
    """Starts ``command``, waits until ``reported(log)`` holds, then SIGKILLs it; whether the kill landed."""
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    wait_for(lambda: reported(log), process)
    process.send_signal(signal.SIGKILL)
    return process.wait() == -signal.SIGKILL


def test_ten_kills_at_moments_the_run_reports_then_the_same_command_ends_like_the_uninterrupted_run(
    small_mnist_dir: Path, uninterrupted, tmp_path: Path
):
    """Kills at random points of the run, each chosen by what the run has reported (never by a clock):
    at once after starting, after its first line (start-up, compilation), while a checkpoint is being
    written, or once the newest checkpoint has passed a random step."""
    folder = tmp_path / "ck"
    command = _command(small_mnist_dir, folder, tmp_path / "m.jsonl")
    total_steps = 3 * 75  # 3 epochs of 1,200 images in batches of 16
    rng = random.Random(2026)
    # Random steps, each far enough from the end that the run cannot finish between a look and the kill.
    targets = sorted(rng.sample(range(5, total_steps - 40), 6))
    moments = [
        lambda log: True,  # at once: during start-up
        lambda log: log.stat().st_size > 0,  # its first line: the data is read, compilation comes next
        lambda log: log.stat().st_size > 0,
        lambda log: any(folder.glob(".ckpt-*.tmp")) or _newest_step(folder) >= targets[0],  # mid-write, if seen
        *[lambda log, step=step: _newest_step(folder) >= step for step in targets],
    ]
    killed = [_kill_when(command, tmp_path / f"run-{index}.log", moment) for index, moment in enumerate(moments)]
    assert all(killed), f"a run ended before its kill: {killed}"
    finish = subprocess.run(command, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    losses, params = uninterrupted
    assert _losses(tmp_path / "m.jsonl") == losses  # one record per epoch, none missing or repeated
    assert _final_params(folder) == params
    assert not list(folder.glob(".*.tmp"))


def _logged_batch_steps(folder: Path) -> set[int]:
    return {event.step for event in tensorboard_events(folder) for value in event.summary.value
            if value.tag == "batch/loss"}  # fmt: skip


def test_what_tensorboard_logged_before_a_checkpoint_survives_the_kill_that_follows_it(
    small_mnist_dir: Path, tmp_path: Path
):
    """Every batch loss up to the newest checkpoint's step is in the event files after a SIGKILL, and so is
    every epoch's scalar: kills as an epoch's line shows, then once a checkpoint has passed a random step,
    each run resuming the last."""
    pytest.importorskip("tensorboardX", reason="pip install 'jaxmnist[tensorboard]'")
    folder, events = tmp_path / "ck", tmp_path / "tb"
    command = _command(small_mnist_dir, folder, tmp_path / "m.jsonl", "--tensorboard", str(events),
                       "--tensorboard-every", "1")  # fmt: skip
    # Killed as epoch 1's line shows: the epoch's batch losses, scalars and metrics record are already on disk.
    assert _kill_when(command, tmp_path / "run-line.log", lambda log: "epoch 1/3:" in log.read_text())
    assert set(range(1, 76)) <= _logged_batch_steps(events)
    assert any(value.tag == "epoch/train_loss" and event.step == 1
               for event in tensorboard_events(events) for value in event.summary.value)  # fmt: skip
    assert [epoch for epoch, _ in _losses(tmp_path / "m.jsonl")] == [1]
    targets = sorted(random.Random(34).sample(range(20, 3 * 75 - 40), 3))
    for index, step in enumerate(targets):
        assert _kill_when(command, tmp_path / f"run-{index}.log", lambda log, step=step: _newest_step(folder) >= step)
        saved = _newest_step(folder)
        assert set(range(1, saved + 1)) <= _logged_batch_steps(events), f"killed after the checkpoint of step {saved}"
        epochs_done = saved // 75
        epoch_steps = {event.step for event in tensorboard_events(events) for value in event.summary.value
                       if value.tag == "epoch/train_loss"}  # fmt: skip
        assert set(range(1, epochs_done + 1)) <= epoch_steps


def test_a_reader_that_closes_the_pipe_costs_the_run_nothing(small_mnist_dir: Path, uninterrupted, tmp_path: Path):
    """``python -m jaxmnist.train | head -1``: the reader goes; the run trains on and writes its files."""
    command = _command(small_mnist_dir, tmp_path / "ck", tmp_path / "m.jsonl")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the run writes anything: every line it prints meets a closed pipe
    errors = process.stderr.read()
    assert process.wait() == 0, errors
    assert errors == ""
    losses, params = uninterrupted
    assert _losses(tmp_path / "m.jsonl") == losses and _final_params(tmp_path / "ck") == params
    # ``2>&1 | head -1`` on a grid with a diverged run: its warning goes to stderr, into the closed pipe too.
    grid = _command(small_mnist_dir, tmp_path / "grid", tmp_path / "grid.jsonl", "--lr", "0.05,10000")
    process = subprocess.Popen(grid, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    process.stdout.close()
    assert process.wait() == 0
    records = [json.loads(line) for line in (tmp_path / "grid.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 and records[-1]["diverged"].startswith("epoch 1, step ")


def test_a_truncated_newest_checkpoint_is_skipped_naming_it(small_mnist_dir: Path, uninterrupted, tmp_path: Path):
    command = _command(small_mnist_dir, tmp_path / "ck", tmp_path / "m.jsonl")
    first = subprocess.run([*command[:-2], "--epochs", "2", command[-1]], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    newest = checkpoint.checkpoint_paths(tmp_path / "ck")[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    warning = [line for line in resumed.stderr.splitlines() if "damaged" in line]
    assert len(warning) == 1 and str(newest) in warning[0] and "incomplete input" in warning[0]
    losses, params = uninterrupted
    assert _losses(tmp_path / "m.jsonl") == losses and _final_params(tmp_path / "ck") == params

    for path in checkpoint.checkpoint_paths(tmp_path / "ck"):
        path.write_bytes(b"")
    none_left = subprocess.run(command, capture_output=True, text=True)
    assert none_left.returncode == 2 and none_left.stderr.count("\n") == 1
    assert f"{tmp_path / 'ck'}: none of its" in none_left.stderr


def _with_file_size_limit(command: list[str], limit: int) -> list[str]:
    """``command`` run with files capped at ``limit`` bytes: set in the child's own Python, then exec'd (a
    ``preexec_fn`` would fork this multithreaded JAX process)."""
    setup = f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
    return [sys.executable, "-c", setup + "os.execv(sys.argv[1], sys.argv[1:])", *command]


def test_a_file_too_large_is_one_line_exit_74_and_leaves_no_temporary_file(small_mnist_dir, uninterrupted, tmp_path):
    command = _command(small_mnist_dir, tmp_path / "ck", tmp_path / "m.jsonl")
    # Without a compilation cache: the limit would hold its writes too.
    environment = {name: value for name, value in os.environ.items() if name != COMPILE_CACHE_ENV}
    limited = _with_file_size_limit(command, 200_000)  # < a checkpoint
    failed = subprocess.run(limited, capture_output=True, text=True, env=environment)
    assert failed.returncode == EXIT_WRITE_FAILED, failed.stderr
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert "cannot write" in failed.stderr and "file too large" in failed.stderr and "--resume" in failed.stderr
    assert not [path for path in (tmp_path / "ck").iterdir()]
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _final_params(tmp_path / "ck") == uninterrupted[1]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs: room for two checkpoints of the lesson's MLP, not three."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk for real")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_says_which_checkpoint_is_good_and_resuming_matches(
    small_mnist_dir, uninterrupted, small_disk, tmp_path
):
    command = _command(small_mnist_dir, small_disk / "ck", tmp_path / "m.jsonl")
    failed = subprocess.run(command, capture_output=True, text=True)
    assert failed.returncode == EXIT_WRITE_FAILED, failed.stderr
    good = checkpoint.checkpoint_paths(small_disk / "ck")[-1]
    assert failed.stderr.count("\n") == 1 and "no space left on device" in failed.stderr
    assert f"the last good checkpoint is {good}" in failed.stderr and "resume with:" in failed.stderr
    assert not list((small_disk / "ck").glob(".*.tmp"))
    shutil.copytree(small_disk / "ck", tmp_path / "ck")
    moved = [
        *command[: command.index("--checkpoint-dir") + 1],
        str(tmp_path / "ck"),
        *command[command.index("--checkpoint-dir") + 2 :],
    ]
    resumed = subprocess.run(moved, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _final_params(tmp_path / "ck") == uninterrupted[1]
    assert _losses(tmp_path / "m.jsonl") == uninterrupted[0]
