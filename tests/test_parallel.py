"""Data parallelism on host CPU devices (8 made by an XLA flag, in subprocesses so the rest of the suite
keeps one device), against the single-device run."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxmnist.parallel import DeviceError, make_mesh, padded_batch_width
from jaxmnist.train import epoch_batch_indices

from conftest import with_xla_flags

pytestmark = pytest.mark.slow  # 8 simulated devices and two processes, in subprocesses

EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"


def _python(args: list[str], *xla_flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=with_xla_flags(*xla_flags)
    )


def test_one_epoch_on_8_and_3_devices_matches_one_device():
    result = _python([str(Path(__file__).parent / "parallel_check.py")], EIGHT_DEVICES)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices_seen"] == 8
    for devices in (8, 3):
        float32, float64 = report[f"float32_{devices}"], report[f"float64_{devices}"]
        assert float32["steps"] == float64["steps"] == 300
        assert float32["first_100"] < 1e-5, report
        assert float64["epoch"] < 1e-12, report
        assert float32["epoch_loss_relative"] < 2e-4, report
    # BatchNorm statistics are taken over the global batch: the same as on one device, within rounding.
    assert report["batchnorm_dropout_8"]["losses"] < 1e-4, report
    assert report["batchnorm_dropout_8"]["running_stats"] < 1e-4, report


def test_batches_that_do_not_divide_are_padded_with_masked_slots():
    indices, mask = epoch_batch_indices(jax.random.key(0), 100, 64, width=66)
    assert indices.shape == mask.shape == (2, 66)
    np.testing.assert_array_equal(np.asarray(mask).sum(axis=1), [64, 36])
    assert not np.asarray(mask)[:, 64:].any()
    real = np.asarray(indices)[np.asarray(mask)]
    np.testing.assert_array_equal(np.sort(real), np.arange(100))
    assert padded_batch_width(64, None) == 64


def test_asking_for_more_devices_than_exist_is_a_clear_error():
    with pytest.raises(DeviceError, match="`num_devices`=9999: only"):
        make_mesh(9999)


def _epoch_one_loss(output: str) -> float:
    return float(re.search(r"^Training loss: (\S+)$", output, flags=re.MULTILINE).group(1))


@pytest.fixture(scope="module")
def cli_flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from jaxmnist.data import write_mnist

    from conftest import make_digits

    folder = tmp_path_factory.mktemp("parallel-data")
    write_mnist(folder, "train", *make_digits(6400, seed=1))
    write_mnist(folder, "test", *make_digits(500, seed=2))
    return ["--data-dir", str(folder), "--no-verify", "--epochs", "1", "--no-compile-cache"]


def test_cli_on_8_and_3_devices_says_so_and_matches_one_device(cli_flags):
    single = _python(["-m", "jaxmnist.train", *cli_flags])
    assert single.returncode == 0, single.stderr
    reference = _epoch_one_loss(single.stdout)
    for devices in (8, 3):
        result = _python(["-m", "jaxmnist.train", *cli_flags, "--devices", str(devices)], EIGHT_DEVICES)
        assert result.returncode == 0, result.stderr
        assert f"on {devices} cpu (cpu) devices" in result.stdout
        assert abs(_epoch_one_loss(result.stdout) - reference) / reference < 2e-4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.usefixtures("own_compile_cache")  # two commands at once
def test_two_processes_on_localhost_train_as_one(tmp_path: Path):
    from jaxmnist.data import write_mnist

    from conftest import make_digits

    write_mnist(tmp_path, "train", *make_digits(640, seed=1))
    write_mnist(tmp_path, "test", *make_digits(100, seed=2))
    flags = ["-m", "jaxmnist.train", "--data-dir", str(tmp_path), "--no-verify", "--epochs", "2", "--no-compile-cache"]
    single = _python(flags)
    assert single.returncode == 0, single.stderr
    coordinator = f"127.0.0.1:{_free_port()}"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                *flags,
                "--coordinator",
                coordinator,
                "--num-processes",
                "2",
                "--process-id",
                str(rank),
                "--checkpoint-dir",
                str(tmp_path / "ck"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    leader, follower = outputs[0][0], outputs[1][0]
    assert "on 2 cpu (cpu) devices" in leader and "Training loss" not in follower  # process 0 speaks for all
    ours = [float(v) for v in re.findall(r"Training loss: (\S+)", leader)]
    theirs = [float(v) for v in re.findall(r"Training loss: (\S+)", single.stdout)]
    assert len(ours) == 2 and np.allclose(ours, theirs, rtol=1e-5)
    assert len(list((tmp_path / "ck").glob("ckpt-*.msgpack"))) == 2
