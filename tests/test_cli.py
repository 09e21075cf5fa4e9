from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmnist.commands.train import main
from jaxmnist.lesson import PYTORCH_LOSS_BAND, PYTORCH_TEST_ACCURACY


def _training_losses(output: str) -> list[float]:
    return [float(value) for value in re.findall(r"^Training loss: (\S+)$", output, flags=re.MULTILINE)]


def _run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxmnist.train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_module_trains_end_to_end_on_a_small_idx_data_set(tiny_mnist_dir: Path, tmp_path: Path):
    result = _run_module(
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--data-dir",
        str(tiny_mnist_dir),
        "--no-verify",
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    losses = _training_losses(result.stdout)
    assert len(losses) == 3 and losses[2] < losses[0]
    assert "300 training images" in result.stdout
    accuracies = [float(value) for value in re.findall(r"test accuracy (\S+),", result.stdout)]
    assert len(accuracies) == 3 and accuracies[-1] > 0.5
    assert "RuntimeWarning" not in result.stderr
    assert any((tmp_path / "cache" / "jaxmnist" / "xla-cache").iterdir()), "the compiled epoch was not cached"


@pytest.mark.slow
def test_step_loop_prints_the_same_losses_as_the_scan(tiny_mnist_dir: Path, capsys: pytest.CaptureFixture):
    common = [
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--data-dir",
        str(tiny_mnist_dir),
        "--no-verify",
        "--no-compile-cache",
    ]
    assert main([*common, "--loop", "scan"]) == 0
    scanned = _training_losses(capsys.readouterr().out)
    assert main([*common, "--loop", "step"]) == 0
    stepped = _training_losses(capsys.readouterr().out)
    assert len(scanned) == 2
    assert stepped == pytest.approx(scanned, rel=1e-6)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "two"], "--epochs"),
        (["--batch-size", "-64"], "--batch-size"),
        (["--lr", "-0.1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--hidden", "128,,64"], "--hidden"),
        (["--hidden", "0"], "--hidden"),
        (["--init", "xavier"], "--init"),
        (["--loss", "mse"], "--loss"),
        (["--seed", "-1"], "--seed"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_flag_values_are_refused_in_one_line_with_exit_code_2(flags, named, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and named in error and "Traceback" not in error


def test_missing_data_is_one_line_saying_where_it_looked(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["--data-dir", str(tmp_path / "empty"), "--no-download", "--no-compile-cache"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(tmp_path / "empty") in error and "JAXMNIST_DATA_DIR" in error


def test_damaged_test_file_is_reported_before_training(tiny_mnist_dir: Path, capsys: pytest.CaptureFixture):
    damaged = tiny_mnist_dir / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:20])
    assert main(["--data-dir", str(tiny_mnist_dir), "--no-verify", "--no-compile-cache"]) == 2
    captured = capsys.readouterr()
    assert "Training loss" not in captured.out
    assert captured.err.count("\n") == 1 and str(damaged) in captured.err


def test_help_explains_every_flag(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--epochs", "--batch-size", "--lr", "--seed", "--hidden", "--init", "--loss", "--data-dir", "--loop"):
        assert flag in text


@pytest.mark.parametrize("command", ["train", "predict", "backprop"])
def test_every_flag_of_every_command_has_help(command: str):
    parser = importlib.import_module(f"jaxmnist.commands.{command}").build_parser()
    unexplained = [action.option_strings or action.dest for action in parser._actions if not action.help]
    assert unexplained == []


def test_a_mistyped_flag_gets_the_closest_real_one_with_the_one_error_prefix(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        main(["--epcohs", "3"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: unrecognized arguments: --epcohs 3; did you mean --epochs?")
    assert error.count("\n") == 1


def test_one_epoch_is_said_in_the_singular(tiny_mnist_dir: Path, capsys: pytest.CaptureFixture):
    assert main(["--data-dir", str(tiny_mnist_dir), "--no-verify", "--no-compile-cache", "--epochs", "1"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert ", 1 epoch, " in header, header


@pytest.mark.slow
def test_readme_quick_start_on_real_mnist_lands_in_the_pytorch_band(real_mnist_dir: Path):
    result = _run_module(env={"JAXMNIST_DATA_DIR": str(real_mnist_dir)})
    assert result.returncode == 0, result.stderr
    losses = _training_losses(result.stdout)
    assert len(losses) == 5
    for epoch, (loss, (_, _, low, high)) in enumerate(zip(losses, PYTORCH_LOSS_BAND), start=1):
        assert low <= loss <= high, f"epoch {epoch}: {loss} outside PyTorch's band [{low}, {high}]"
    final_accuracy = float(re.findall(r"test accuracy (\S+),", result.stdout)[-1])
    assert final_accuracy >= PYTORCH_TEST_ACCURACY[0]


@pytest.mark.slow
def test_no_compile_cache_leaves_the_cache_folder_alone(tiny_mnist_dir: Path, tmp_path: Path):
    result = _run_module(
        "--epochs",
        "1",
        "--data-dir",
        str(tiny_mnist_dir),
        "--no-verify",
        "--no-compile-cache",
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "cache" / "jaxmnist" / "xla-cache").exists()
