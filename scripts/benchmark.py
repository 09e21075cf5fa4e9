"""Side-by-side speed of jaxmnist and PyTorch on the lesson, in one run on one machine.

Each contender runs in its own subprocess (so its peak RSS is its own), round-robin over ``--repeats``
rounds (so machine noise hits all of them alike); each reports its steady-state seconds per epoch, and
the table gives medians and the ratios to jaxmnist.

    python scripts/benchmark.py                  # table on stdout, benchmark.json beside it
    python scripts/benchmark.py --repeats 5 --json out.json

Contenders: jaxmnist's compiled epoch (batch 64, plus a sweep over 256 and 1024), the same epoch as the
library loop ``fit`` runs it (its steady epoch beside ``train_epoch`` called alone); with torch installed,
the tuned eager PyTorch loop (data preloaded as one tensor, randperm, slicing) and the lesson's own
loop (a DataLoader with a per-image transform). torchvision is not needed: without it the lesson's
``datasets.MNIST`` + ``ToTensor()`` + ``Normalize`` per image is emulated (PIL image per item, then the
same tensor ops), and the table says so. The lesson's loop is timed on its first ``--lesson-steps``
batches and scaled to a whole epoch of 938. Also measured: ``import jaxmnist``, the CLI's one-epoch wall
time with a cold and a warm compilation cache, and the peak RSS of a 5-epoch CLI run.

    python scripts/benchmark.py --seeds 16 --epochs 2   # N seeds together vs apart, beside the GEMM floor
    python scripts/benchmark.py --grid 0.001,0.003,0.01,0.03 --seeds 4 --epochs 2   # a grid in one program
    python scripts/benchmark.py --cnn    # two MNIST CNNs: the train command against PyTorch of the same network

``--seeds N`` times N seeds in one vmapped program against N single-seed runs one after another (in one
process, and as N commands with a fresh compilation cache) and N tuned PyTorch runs; the floor is the
lesson's GEMMs (forward, weight and input gradients at batch 64) timed under XLA and summed per epoch,
and each row says what fraction of that floor it reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EPOCH_STEPS = 938


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_jaxmnist(args: argparse.Namespace) -> dict:
    import jax

    # Only the public API, so that --baseline can time another checkout of jaxmnist with this worker.
    from jaxmnist import create_train_state, load_mnist, train_epoch

    images, labels = (jax.device_put(array) for array in load_mnist("train", args.data_dir))
    init_key, data_key = jax.random.split(jax.random.key(0))  # as a run with --seed 0 derives them
    state = create_train_state(init_key)
    started = time.perf_counter()
    first_key = jax.random.fold_in(data_key, 1)
    compiled = train_epoch.lower(state, images, labels, first_key, batch_size=args.batch_size).compile()
    compile_seconds = time.perf_counter() - started
    state, metrics = compiled(state, images, labels, jax.random.fold_in(data_key, 0))  # warm-up, not timed
    jax.block_until_ready(metrics)
    times = []
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        state, metrics = compiled(state, images, labels, jax.random.fold_in(data_key, epoch))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    device = jax.devices()[0]
    return {
        "epoch_seconds": times,
        "compile_seconds": compile_seconds,
        "platform": device.platform,
        "device_kind": device.device_kind,
    }


def _torch_data(args: argparse.Namespace):
    import numpy as np
    import torch

    from jaxmnist.data import load_mnist

    torch.set_num_threads(os.cpu_count() or 1)
    images, labels = load_mnist("train", args.data_dir)
    return np.asarray(images), torch.from_numpy(labels.astype(np.int64))


def _torch_step(model, optimizer, criterion, inputs, targets) -> float:
    optimizer.zero_grad()
    loss = criterion(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss.item()


def _torch_setup():
    import torch

    from jaxmnist.torch_compat import lesson_model

    torch.manual_seed(0)
    model = lesson_model()
    return model, torch.optim.SGD(model.parameters(), lr=0.003), torch.nn.NLLLoss()


def worker_torch_tuned(args: argparse.Namespace) -> dict:
    import torch

    from jaxmnist.torch_compat import normalize_torch

    images, labels = _torch_data(args)
    inputs = normalize_torch(images, torch.float32).reshape(len(images), -1)
    model, optimizer, criterion = _torch_setup()
    times = []
    for _ in range(args.epochs + 1):  # the first epoch warms up and is not timed
        started = time.perf_counter()
        order = torch.randperm(len(inputs))
        running_loss = 0.0
        for start in range(0, len(inputs), 64):
            batch = order[start : start + 64]
            running_loss += _torch_step(model, optimizer, criterion, inputs[batch], labels[batch])
        times.append(time.perf_counter() - started)
    return {"epoch_seconds": times[1:], "threads": torch.get_num_threads()}


def worker_torch_lesson(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    images, labels = _torch_data(args)
    try:
        from torchvision import transforms

        to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        emulated = False
    except ImportError:  # the same work per image: uint8 HxW -> float CxHxW / 255, then (x - 0.5) / 0.5

        def to_tensor(image):
            tensor = torch.from_numpy(np.array(image, np.uint8, copy=True)).unsqueeze(0).float().div(255)
            return (tensor - 0.5) / 0.5

        emulated = True

    class LessonMNIST(torch.utils.data.Dataset):
        """torchvision.datasets.MNIST's __getitem__: a PIL image per item, then the transform."""

        def __len__(self):
            return len(images)

        def __getitem__(self, index):
            return to_tensor(Image.fromarray(images[index], mode="L")), labels[index]

    loader = torch.utils.data.DataLoader(LessonMNIST(), batch_size=64, shuffle=True)
    model, optimizer, criterion = _torch_setup()
    times = []
    for _ in range(args.epochs):
        started = time.perf_counter()
        for step, (inputs, targets) in enumerate(loader, start=1):
            _torch_step(model, optimizer, criterion, inputs.view(inputs.shape[0], -1), targets)
            if step == args.lesson_steps:
                break
        times.append((time.perf_counter() - started) * EPOCH_STEPS / step)
    return {"epoch_seconds": times, "emulated_torchvision": emulated, "steps_timed": step}


def worker_jaxmnist_seeds(args: argparse.Namespace) -> dict:
    """Epoch seconds, as ``fit`` reports them, of ``--seeds`` runs (times the ``--rates`` grid) in one
    vmapped program (one run: ``fit``'s plain loop), after one untimed epoch. Several runs spread over
    one CPU device per core, as the train command spreads them."""
    import jax

    from jaxmnist.config import TrainConfig, num_runs
    from jaxmnist.data import load_mnist
    from jaxmnist.loop import fit
    from jaxmnist.parallel import make_mesh, runs_devices

    rates = tuple(float(rate) for rate in args.rates.split(",")) if args.rates else 0.003
    config = TrainConfig(seeds=args.seeds, epochs=args.epochs + 1, learning_rate=rates)
    mesh = None
    if num_runs(config) > 1 and not args.one_device:
        jax.config.update("jax_num_cpu_devices", os.cpu_count())
        mesh = make_mesh(runs_devices(num_runs(config), len(jax.devices())))
    data = load_mnist("train", args.data_dir), load_mnist("test", args.data_dir)
    history = list(fit(config, *data, mesh=mesh))
    return {"epoch_seconds": [p.results[0].seconds for p in history if p.results][1:]}


def worker_jaxmnist_separate(args: argparse.Namespace) -> dict:
    """Seconds of ``--seeds`` single-seed runs of ``--epochs`` epochs one after another, in one process
    (compilation and evaluation included, as for the seeds together)."""
    from jaxmnist.config import TrainConfig
    from jaxmnist.data import load_mnist
    from jaxmnist.loop import fit

    data = load_mnist("train", args.data_dir), load_mnist("test", args.data_dir)
    started = time.perf_counter()  # each fit compiles its own programs, as a loop over fit does
    for seed in range(args.seeds):
        list(fit(TrainConfig(seed=seed, epochs=args.epochs), *data))
    return {"total_seconds": time.perf_counter() - started}


def worker_torch_seeds(args: argparse.Namespace) -> dict:
    """Seconds of ``--seeds`` tuned eager PyTorch runs of ``--epochs`` epochs, one after another."""
    import torch

    from jaxmnist.torch_compat import normalize_torch

    images, labels = _torch_data(args)
    inputs = normalize_torch(images, torch.float32).reshape(len(images), -1)
    started = time.perf_counter()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model, optimizer, criterion = _torch_setup()
        for _ in range(args.epochs):
            order = torch.randperm(len(inputs))
            for start in range(0, len(inputs), 64):
                batch = order[start : start + 64]
                _torch_step(model, optimizer, criterion, inputs[batch], labels[batch])
    return {"total_seconds": time.perf_counter() - started}


# The lesson's GEMMs per step (batch 64): forward, weight gradients, and the gradients of the hidden inputs.
LESSON_GEMMS = {
    "forward 64x784 @ 784x128": ((64, 784), (784, 128)),
    "forward 64x128 @ 128x64": ((64, 128), (128, 64)),
    "forward 64x64 @ 64x10": ((64, 64), (64, 10)),
    "weight grad 784x64 @ 64x128": ((784, 64), (64, 128)),
    "weight grad 128x64 @ 64x64": ((128, 64), (64, 64)),
    "weight grad 64x64 @ 64x10": ((64, 64), (64, 10)),
    "input grad 64x10 @ 10x64": ((64, 10), (10, 64)),
    "input grad 64x64 @ 64x128": ((64, 64), (64, 128)),
}


def worker_floor(args: argparse.Namespace) -> dict:
    """The machine's floor: each of the lesson's GEMMs timed under XLA, 938 times in one compiled scan."""
    import jax
    import jax.numpy as jnp

    seconds = {}
    for name, (left_shape, right_shape) in LESSON_GEMMS.items():
        left, right = jnp.ones(left_shape) / 100, jnp.ones(right_shape) / 100

        @jax.jit
        def repeated(left, right):
            def step(carry, _):  # a dependent chain, so XLA runs every product
                return carry + jnp.dot(left + carry, right)[0, 0] * 1e-12, None

            return jax.lax.scan(step, jnp.zeros(()), None, length=EPOCH_STEPS)[0]

        jax.block_until_ready(repeated(left, right))
        times = []
        for _ in range(5):
            started = time.perf_counter()
            jax.block_until_ready(repeated(left, right))
            times.append(time.perf_counter() - started)
        seconds[name] = statistics.median(times)
    return {"gemm_epoch_seconds": seconds, "floor_epoch_seconds": sum(seconds.values())}


WORKERS = {
    "jaxmnist": worker_jaxmnist,
    "torch_tuned": worker_torch_tuned,
    "torch_lesson": worker_torch_lesson,
    "jaxmnist_seeds": worker_jaxmnist_seeds,
    "jaxmnist_separate": worker_jaxmnist_separate,
    "torch_seeds": worker_torch_seeds,
    "floor": worker_floor,
}


def seeds_benchmark(args: argparse.Namespace) -> dict:
    """N seeds together against N separate runs (in one process, as N commands) and N PyTorch runs, beside
    the machine's GEMM floor; prints a table of seconds per seed-epoch and the floor fraction of each."""
    n, epochs = args.seeds, args.epochs
    floor = run_worker("floor", args)
    together = run_worker("jaxmnist_seeds", args, seeds=n)
    separate = run_worker("jaxmnist_separate", args, seeds=n)
    env = {**os.environ, **({"JAXMNIST_DATA_DIR": str(args.data_dir)} if args.data_dir else {})}
    with tempfile.TemporaryDirectory() as cache:
        env["XDG_CACHE_HOME"] = cache  # every command compiles for itself, as on a fresh machine
        command = [sys.executable, "-m", "jaxmnist.train", "--epochs", str(epochs), "--quiet"]
        one_command, rss = timed_command([*command, "--seeds", str(n)], env)
        n_commands = sum(timed_command([*command, "--seed", str(seed)], env)[0] for seed in range(n))
    rows = {
        f"{n} seeds in one program (steady epoch)": statistics.median(together["epoch_seconds"]) / n,
        f"{n} runs one after another, one process": separate["total_seconds"] / (n * epochs),
        f"python -m jaxmnist.train --seeds {n}": one_command / (n * epochs),
        f"{n} x python -m jaxmnist.train --seed S": n_commands / (n * epochs),
    }
    if has_torch() and not args.no_torch:
        rows[f"{n} tuned PyTorch runs"] = run_worker("torch_seeds", args, seeds=n)["total_seconds"] / (n * epochs)
    print(
        f"\n{n} seeds x {epochs} epochs; floor: the lesson's GEMMs under XLA, "
        f"{floor['floor_epoch_seconds']:.3f} s/epoch"
    )
    print(f"{'contender':<44} {'s per seed-epoch':>16} {'of floor':>9}")
    for label, seconds in rows.items():
        print(f"{label:<44} {seconds:>16.3f} {floor['floor_epoch_seconds'] / seconds:>9.0%}")
    print(f"{n} commands / one --seeds command: {n_commands / one_command:.1f}x; "
          f"the --seeds command's peak RSS {rss:.0f} MiB")  # fmt: skip
    return {"floor": floor, "rows": rows, "one_command_seconds": one_command, "n_commands_seconds": n_commands,
            "one_command_peak_rss_mib": rss}  # fmt: skip


def grid_benchmark(args: argparse.Namespace) -> dict:
    """A grid of learning rates × seeds as one command against one command per run; the peak RSS of 64
    runs; and the steady epoch per run of 16 and 64 runs in one program beside a single run's."""
    rates, n, epochs = args.grid.split(","), args.seeds, args.epochs
    env = {**os.environ, **({"JAXMNIST_DATA_DIR": str(args.data_dir)} if args.data_dir else {})}
    with tempfile.TemporaryDirectory() as cache:
        env["XDG_CACHE_HOME"] = cache  # every command compiles for itself, as on a fresh machine
        command = [sys.executable, "-m", "jaxmnist.train", "--epochs", str(epochs), "--quiet"]
        one_command, rss = timed_command([*command, "--lr", args.grid, "--seeds", str(n)], env)
        separate = [timed_command([*command, "--lr", rate, "--seed", str(seed)], env)[0]
                    for rate in rates for seed in range(n)]  # fmt: skip
        rss_64 = timed_command([*command[:3], "--epochs", "1", "--quiet", "--lr", args.grid, "--seeds",
                                str(64 // len(rates))], env)[1]  # fmt: skip
    runs = len(rates) * n
    print(f"\n{len(rates)} rates x {n} seeds x {epochs} epochs: one command {one_command:.1f} s, {runs} commands "
          f"{sum(separate):.1f} s: {sum(separate) / one_command:.1f}x faster; peak RSS {rss:.0f} MiB "
          f"({runs} runs), {rss_64:.0f} MiB (64 runs)")  # fmt: skip
    single, per_run = [], {count: [] for count in (16, 64)}
    per_run["64, one device"] = []
    for _ in range(args.repeats):  # interleaved, so machine noise hits every size alike
        single.append(statistics.median(run_worker("jaxmnist_seeds", args, seeds=1, rates="")["epoch_seconds"]))
        for label in per_run:
            count, one_device = (64, 1) if label == "64, one device" else (label, 0)
            options = {"seeds": count // len(rates), "rates": args.grid, "one_device": one_device}
            epoch = statistics.median(run_worker("jaxmnist_seeds", args, **options)["epoch_seconds"])
            per_run[label].append(epoch / count)
    print(f"steady epoch, one run: {statistics.median(single):.3f} s (median of {args.repeats})")
    for count, values in per_run.items():
        ratios = [value / one for value, one in zip(values, single)]
        print(f"  {count:>14} runs in one program: {statistics.median(values):.3f} s per run-epoch, "
              f"{statistics.median(ratios):.2f}x a single run's epoch")  # fmt: skip
    return {
        "one_command_seconds": one_command,
        "separate_commands_seconds": separate,
        "peak_rss_mib": rss,
        "peak_rss_64_runs_mib": rss_64,
        "single_epoch_seconds": single,
        "per_run_epoch_seconds": per_run,
    }


def run_worker(name: str, args: argparse.Namespace, source: Path | None = None, **overrides) -> dict:
    options = {"epochs": args.epochs, "batch_size": 64, "lesson_steps": args.lesson_steps, "seeds": args.seeds,
               "rates": "", "one_device": 0, **overrides}  # fmt: skip
    command = [sys.executable, __file__, "--worker", name] + [
        f"--{key.replace('_', '-')}={value}" for key, value in options.items()
    ]
    if args.data_dir:
        command.append(f"--data-dir={args.data_dir}")
    env = dict(os.environ)
    if source is not None:  # another checkout of jaxmnist, e.g. the commit before a change
        env["PYTHONPATH"] = f"{source}{os.pathsep}{env.get('PYTHONPATH', '')}"
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def timed_command(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 1024


def startup_checks(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if args.data_dir:
        env["JAXMNIST_DATA_DIR"] = str(args.data_dir)
    imports = [
        timed_command([sys.executable, "-c", "import jaxmnist, jaxmnist.train"], env)[0] for _ in range(args.repeats)
    ]
    with tempfile.TemporaryDirectory() as cache:
        env["XDG_CACHE_HOME"] = cache
        one_epoch = [sys.executable, "-m", "jaxmnist.train", "--epochs", "1"]
        cold = timed_command(one_epoch, env)[0]
        warm = [timed_command(one_epoch, env)[0] for _ in range(args.repeats)]
        five_epochs_seconds, five_epochs_rss = timed_command([*one_epoch[:-1], "5"], env)
    return {
        "import_seconds": statistics.median(imports),
        "cli_one_epoch_cold_seconds": cold,
        "cli_one_epoch_warm_seconds": statistics.median(warm),
        "cli_five_epochs_seconds": five_epochs_seconds,
        "cli_five_epochs_peak_rss_mib": five_epochs_rss,
    }


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="round-robin rounds (default 5)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per contender per round (default 3)")
    parser.add_argument("--lesson-steps", type=int, default=300, help="batches of the lesson's loop timed per epoch")
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST folder (default: $JAXMNIST_DATA_DIR)")
    parser.add_argument("--json", type=Path, default=Path("benchmark.json"))
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="CHECKOUT",
        help="also time the lesson's epoch with the jaxmnist of another checkout (e.g. a git worktree of the "
        "commit before a change), interleaved with this one",
    )
    parser.add_argument("--no-torch", action="store_true", help="time jaxmnist only")
    parser.add_argument("--no-startup", action="store_true", help="skip the import and command-line timings")
    parser.add_argument(
        "--seeds",
        type=int,
        default=0,
        metavar="N",
        help="instead: N seeds in one program against N separate runs and N PyTorch runs, with the GEMM floor",
    )
    parser.add_argument(
        "--grid",
        default=None,
        metavar="LR,LR,...",
        help="instead: these learning rates x --seeds as one command against one command per run, the peak RSS of "
        "64 runs, and the epoch per run of 16 and 64 runs in one program beside a single run's",
    )
    parser.add_argument(
        "--cnn",
        action="store_true",
        help="instead: PyTorch's and flax's MNIST CNNs through the train command (scan and --loop step) against "
        "tuned eager PyTorch and torch.compile of the same networks (scripts/cnn_benchmark.py)",
    )
    parser.add_argument(
        "--cnn-images", type=int, default=60_000, help="training images an epoch for --cnn (default 60000)"
    )
    parser.add_argument("--rates", default="", help=argparse.SUPPRESS)
    parser.add_argument("--one-device", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](args)
        print(json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))
        return 0
    if args.cnn:
        from cnn_benchmark import cnn_benchmark  # beside this script

        args.json.write_text(json.dumps(cnn_benchmark(args), indent=1))
        print(f"wrote {args.json}")
        return 0
    if args.grid:
        args.json.write_text(json.dumps(grid_benchmark(args), indent=1))
        print(f"wrote {args.json}")
        return 0
    if args.seeds:
        args.json.write_text(json.dumps(seeds_benchmark(args), indent=1))
        print(f"wrote {args.json}")
        return 0

    contenders = {f"jaxmnist batch {size}": ("jaxmnist", {"batch_size": size}) for size in (64, 256, 1024)}
    # The library's loop against the bare compiled epoch it calls: what fit adds per epoch.
    contenders["fit, batch 64"] = ("jaxmnist_seeds", {"seeds": 1})
    if args.baseline is not None:
        contenders["baseline batch 64"] = ("jaxmnist", {"batch_size": 64, "source": args.baseline})
    if has_torch() and not args.no_torch:
        contenders["PyTorch tuned eager"] = ("torch_tuned", {})
        contenders["PyTorch lesson loop"] = ("torch_lesson", {})
    else:
        print("torch is not installed: only jaxmnist is measured", file=sys.stderr)
    runs: dict[str, list[dict]] = {label: [] for label in contenders}
    for round_index in range(args.repeats):
        for label, (worker, overrides) in contenders.items():
            runs[label].append(run_worker(worker, args, **overrides))
            print(f"round {round_index + 1}/{args.repeats}: {label} done", file=sys.stderr, flush=True)
    startup = None if args.no_startup else startup_checks(args)

    first = runs["jaxmnist batch 64"][0]
    reference_per_round = [statistics.median(run["epoch_seconds"]) for run in runs["jaxmnist batch 64"]]
    rows = []
    for label, results in runs.items():
        seconds = statistics.median(t for run in results for t in run["epoch_seconds"])
        # Ratios are taken within each round (same machine state), then their median.
        ratios = [statistics.median(run["epoch_seconds"]) / ref for run, ref in zip(results, reference_per_round)]
        rows.append(
            {
                "contender": label,
                "epoch_seconds": seconds,
                "samples_per_second": 60000 / seconds,
                "times_jaxmnist": statistics.median(ratios),
                "times_jaxmnist_per_round": ratios,
                "compile_seconds": statistics.median(run["compile_seconds"] for run in results)
                if "compile_seconds" in results[0]
                else None,
                "peak_rss_mib": max(run["peak_rss_mib"] for run in results),
                "note": "torchvision emulated" if results[0].get("emulated_torchvision") else "",
            }
        )
    report = {
        "platform": first["platform"],
        "device_kind": first["device_kind"],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "epochs_per_run": args.epochs,
        "rows": rows,
        "startup": startup,
        "runs": runs,
    }

    print(
        f"\njaxmnist benchmark on {first['platform']} ({first['device_kind']}), {os.cpu_count()} CPU cores, "
        f"median of {args.repeats} rounds x {args.epochs} epochs"
    )
    print(
        f"{'contender':<22} {'s/epoch':>8} {'images/s':>10} {'x jaxmnist':>10} {'compile s':>9} {'peak RSS MiB':>12}"
        "  (x jaxmnist: median of per-round ratios)"
    )
    for row in rows:
        compile_text = f"{row['compile_seconds']:.2f}" if row["compile_seconds"] is not None else "-"
        print(
            f"{row['contender']:<22} {row['epoch_seconds']:>8.3f} {row['samples_per_second']:>10,.0f} "
            f"{row['times_jaxmnist']:>10.2f} {compile_text:>9} {row['peak_rss_mib']:>12.0f}  {row['note']}"
        )
    if startup is not None:
        print(
            f"\nimport jaxmnist: {startup['import_seconds']:.2f} s; python -m jaxmnist.train --epochs 1: "
            f"{startup['cli_one_epoch_cold_seconds']:.2f} s cold cache, "
            f"{startup['cli_one_epoch_warm_seconds']:.2f} s warm; 5 epochs: "
            f"{startup['cli_five_epochs_seconds']:.2f} s, peak RSS {startup['cli_five_epochs_peak_rss_mib']:.0f} MiB"
        )
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
