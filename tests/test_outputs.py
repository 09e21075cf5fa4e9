"""The training tool's comforts: progress bar, metrics file, loss plot, saved parameters and predict."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxmnist.checkpoint import save_params
from jaxmnist.commands import predict
from jaxmnist.commands.train import main
from jaxmnist.config import TrainConfig
from jaxmnist.data import load_mnist
from jaxmnist.paths import DATA_DIR_ENV

from conftest import template_state

README = Path(__file__).parent.parent / "README.md"


@pytest.fixture
def data_flags(tiny_mnist_dir: Path) -> list[str]:
    """Real MNIST when available (so predictions are meaningful), else the tiny generated set."""
    real = os.environ.get(DATA_DIR_ENV)
    if real and Path(real).is_dir():
        return ["--data-dir", real]
    return ["--data-dir", str(tiny_mnist_dir), "--no-verify", "--lr", "0.05", "--batch-size", "16"]


def _data_dir(flags: list[str]) -> Path:
    return Path(flags[flags.index("--data-dir") + 1])


@pytest.mark.slow
def test_metrics_plot_and_save_then_predict_a_test_digit(data_flags, tmp_path: Path, capsys):
    metrics, plot, params = tmp_path / "metrics.jsonl", tmp_path / "loss.png", tmp_path / "params.msgpack"
    assert (
        main(
            [
                *data_flags,
                "--epochs",
                "3",
                "--no-compile-cache",
                "--metrics-out",
                str(metrics),
                "--plot",
                str(plot),
                "--save",
                str(params),
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2, 3]
    assert {"train_loss", "test_loss", "test_accuracy", "seconds", "samples_per_second"} <= set(records[0])
    printed = [float(value) for value in re.findall(r"Training loss: (\S+)", capsys.readouterr().out)]
    assert printed == [record["train_loss"] for record in records]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        assert image.size[0] > 300

    images, labels = load_mnist("test", _data_dir(data_flags), verify="--no-verify" not in data_flags)
    digit = int(np.argmax(labels == labels[0]))
    Image.fromarray(images[digit]).save(tmp_path / "digit.png")
    Image.fromarray(255 - images[digit]).resize((84, 84)).save(tmp_path / "digit-large-inverted.png")
    assert (
        predict.main(["--params", str(params), str(tmp_path / "digit.png"), str(tmp_path / "digit-large-inverted.png")])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        top = re.findall(r"(\d) \(([0-9.]+)\)", line)
        assert len(top) == 3 and int(top[0][0]) == labels[digit]
        assert float(top[0][1]) >= float(top[1][1]) >= float(top[2][1])


@pytest.mark.slow
def test_resume_appends_to_the_metrics_file(data_flags, tmp_path: Path):
    common = [
        *data_flags,
        "--no-compile-cache",
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--metrics-out",
        str(tmp_path / "m.jsonl"),
    ]
    assert main([*common, "--epochs", "1"]) == 0
    assert main([*common, "--epochs", "2", "--resume"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def _run_in_terminal(args: list[str], env: dict[str, str]) -> str:
    """Runs with stderr on a pseudo-terminal and returns what appeared there."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxmnist.train", *args],
        stdout=subprocess.DEVNULL,
        stderr=follower,
        env={**os.environ, **env},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=300)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_progress_bar_only_on_a_terminal_and_not_with_quiet(tiny_mnist_dir: Path, tmp_path: Path):
    args = [
        "--data-dir",
        str(tiny_mnist_dir),
        "--no-verify",
        "--epochs",
        "2",
        "--checkpoint-every",
        "2",
        "--checkpoint-dir",
        str(tmp_path / "ck"),
    ]
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    shown = _run_in_terminal(args, env)
    assert re.search(r"\d+/10 \[", shown), shown  # 2 epochs of 5 steps: "4/10 [00:00<...]"
    assert "/10 [" not in _run_in_terminal([*args, "--quiet"], env)
    piped = subprocess.run(
        [sys.executable, "-m", "jaxmnist.train", *args], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert piped.returncode == 0 and "/10 [" not in piped.stderr


@pytest.mark.parametrize(
    "flags, fault",
    [
        (["--plot", "{tmp}"], "is a folder"),
        (["--plot", "{tmp}/loss.txt"], ".png"),
        (["--save", "{tmp}/file/params"], "{tmp}/file is a file, not a folder"),
        (["--metrics-out", "{tmp}/file/deeper/m.jsonl"], "{tmp}/file is a file, not a folder"),
        (["--plot", "/proc/jaxmnist-test/loss.png"], "cannot create folders under /proc"),
    ],
)
def test_unwritable_outputs_are_refused_before_training(tiny_mnist_dir: Path, tmp_path: Path, capsys, flags, fault):
    (tmp_path / "file").write_text("x")
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert main(["--data-dir", str(tiny_mnist_dir), "--no-verify", "--no-compile-cache", *flags]) == 2
    captured = capsys.readouterr()
    assert "Training loss" not in captured.out and captured.err.count("\n") == 1
    assert fault.format(tmp=tmp_path) in captured.err, captured.err


def test_missing_output_folders_are_created(tiny_mnist_dir: Path, tmp_path: Path):
    metrics = tmp_path / "new" / "deeper" / "m.jsonl"
    assert main(["--data-dir", str(tiny_mnist_dir), "--no-verify", "--no-compile-cache", "--epochs", "1",
                 "--metrics-out", str(metrics)]) == 0  # fmt: skip
    assert len(metrics.read_text().splitlines()) == 1


def test_predict_errors_are_one_line_exit_2(tmp_path: Path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "blank.png")
    assert predict.main(["--params", str(tmp_path / "missing.msgpack"), str(tmp_path / "blank.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert predict.main(["--params", str(tmp_path / "notes.txt"), str(tmp_path / "blank.png")]) == 2
    assert "not a jaxmnist parameters file" in capsys.readouterr().err
    params = save_params(tmp_path / "params.msgpack", TrainConfig(), template_state(TrainConfig(), 60_000).params)
    assert predict.main(["--params", str(params), str(tmp_path / "blank.png"), str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt: cannot read as an image" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_python_examples_run_as_written(real_mnist_dir: Path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    runnable = [block for block in blocks if "load_mnist(" in block]
    assert runnable, "the README lost its research-code example"
    for block in runnable:
        exec(compile(block, str(README), "exec"), {})


def test_loss_plots_are_written_as_the_named_format(tmp_path: Path):
    from jaxmnist.loop import EpochResult
    from jaxmnist.plots import plot_loss_band, plot_losses

    plot_losses([2.0, 1.0, 0.5], [1.5, 0.9, 0.6], str(tmp_path / "loss.png"), val_losses=[1.6, 1.0, 0.7])
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = [EpochResult(epoch, 2.0 / epoch + seed, 0, 1.0 / epoch, 0, 1, 0, 0, seed=seed)
               for epoch in (1, 2) for seed in (0, 1)]  # fmt: skip
    plot_loss_band(history, tmp_path / "band.svg")
    assert (tmp_path / "band.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("runs", ["one run", "seeds", "grid"])
def test_an_epoch_resumed_inside_says_its_seconds_count_from_the_resume(runs):
    from jaxmnist.commands.reporting import band_lines, epoch_lines, grid_lines
    from jaxmnist.loop import EpochResult

    config = {"one run": TrainConfig(), "seeds": TrainConfig(seeds=2), "grid": TrainConfig(learning_rate=(0.1, 0.2))}
    config = config[runs]
    swept = [{"learning_rate": 0.1}, {"learning_rate": 0.2}] if runs == "grid" else [{}, {}]
    count = 1 if runs == "one run" else 2
    lines = {
        "one run": lambda results: epoch_lines(results[0], config, None),
        "seeds": lambda results: band_lines(results, config),
        "grid": lambda results: grid_lines(results, config),
    }[runs]
    for resumed_at_step, shown in [(300, "0.50 s since the resume at step 300 (20,000 images/s)"), (None, "0.50 s (")]:
        results = tuple(
            EpochResult(
                2, 0.5, 0.8, 0.4, 0.9, 0.5, 0.0, 2e4, seed=seed, swept=swept[seed], resumed_at_step=resumed_at_step
            )
            for seed in range(count)
        )
        assert shown in lines(results)
    assert "resume" not in lines(results)
