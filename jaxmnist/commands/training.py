"""One training run from parsed flags: outputs checked, devices, resume, fit, printing, files, signals."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import shlex
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from jaxmnist.commands.kit import EXIT_WRITE_FAILED, configure_jax, counted, load_splits
from jaxmnist.commands.stopping import GracefulStop
from jaxmnist.config import TrainConfig
from jaxmnist.files import reason

if TYPE_CHECKING:  # the command imports JAX only once its flags are checked
    from jaxmnist.plan import RunPlan

OPTIMIZER_NAMES = {"sgd": "SGD", "momentum": "SGD with momentum", "nesterov": "SGD with Nesterov momentum",
                   "adam": "Adam", "adamw": "AdamW"}  # fmt: skip
# API arguments of the library that flags other than the config's set.


class OutputError(ValueError):
    """An output path cannot be written; found before training starts."""


def _path_problem(folder: Path) -> str | None:
    """What stands in the way of creating ``folder``: a file among its parents, or a parent that is read-only."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            if not os.access(parent, os.W_OK):
                return f"{parent} does not allow writing (read-only or not yours)"
            return None
    return None


def check_writable_folder(folder: Path, flag: str) -> None:
    """Creates ``folder`` (and missing parents) if needed and proves a file can be written there."""
    problem = _path_problem(folder)
    if problem is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            problem = f"cannot create or write there: {reason(error)}"
            if error.errno == errno.ENOENT:  # e.g. under /proc: a folder that refuses new entries
                problem = f"cannot create folders under {_nearest_existing(folder)}"
    if problem is not None:
        raise OutputError(f"{flag} {folder}: {problem}")


def _nearest_existing(folder: Path) -> Path:
    return next(parent for parent in (folder, *folder.parents) if parent.exists())


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path is proven writable before the first training step."""
    if args.checkpoint_dir is not None:
        check_writable_folder(args.checkpoint_dir, "--checkpoint-dir")
    if args.tensorboard is not None:
        from jaxmnist.commands.tensorboard import INSTALL_HINT, tensorboard_available

        if not tensorboard_available():
            raise OutputError(f"--tensorboard needs tensorboardX: {INSTALL_HINT}")
        check_writable_folder(args.tensorboard, "--tensorboard")
    files = {"--metrics-out": args.metrics_out, "--plot": args.plot, "--save": args.save, "--save-best": args.save_best}
    for flag, path in files.items():
        if path is None:
            continue
        if path.is_dir():
            raise OutputError(f"{flag} {path}: is a folder, expected a file name")
        check_writable_folder(path.parent, flag)
    if args.plot is not None and args.plot.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise OutputError(f"--plot {args.plot}: use a .png, .pdf or .svg file name")


def describe(plan: RunPlan, num_images: int, mesh, model_name: str, num_params: int) -> str:
    """One line: the model and its size, the optimization, the data and the devices."""
    from jaxmnist.config import held_out_images, value_text, values_label
    from jaxmnist.parallel import padded_batch_width

    config, swept = plan.config, plan.swept
    device = mesh.devices.flat[0]
    dropout = f", dropout {config.dropout}" if config.dropout and "dropout" not in swept else ""
    layers = "-".join(str(size) for size in (784, *config.hidden_sizes, 10))
    model = f"MLP {layers} ({config.activation}, {config.weight_init} init{dropout})"
    if config.model is not None:
        model = f"{model_name} from {config.model}"
    where = f"{device.platform} ({device.device_kind})"
    if mesh.size > 1 and plan.stacked:
        each = plan.num_runs // mesh.size
        where = f"{mesh.size} {where} devices, {counted(each, 'whole run')} on each"
    elif mesh.size > 1:
        width = padded_batch_width(config.batch_size, mesh)
        where = f"{mesh.size} {where} devices, {width // mesh.size} images of each batch per device"
    schedule_args = f", {config.schedule_args}" if config.schedule_args else ""
    schedule = "" if config.schedule == "constant" else f" ({config.schedule} schedule{schedule_args})"
    optimizer_args = f" ({config.optimizer_args})" if config.optimizer_args else ""
    optimizer = OPTIMIZER_NAMES.get(config.optimizer, config.optimizer) + optimizer_args
    held = held_out_images(config, num_images)
    held_out = f" ({held} held out for validation)" if held else ""
    epochs = counted(config.epochs, "epoch")
    seeds = f"{config.seeds} seeds ({config.seed}..{config.seed + config.seeds - 1})"
    if swept:
        axes = " × ".join(
            f"{len(values)} {values_label({name: values[0]}).split()[0]}" for name, values in swept.items()
        )
        where += (
            f", {plan.num_runs} runs ({len(plan.rows)} configurations: {axes}; "
            f"{seeds if config.seeds > 1 else f'seed {config.seed}'}) in one program"
        )
    elif config.seeds > 1:
        where += f", {seeds} in one program"
    rate = "swept" if "learning_rate" in swept else value_text(config.learning_rate)
    return (
        f"{model}, {num_params:,} parameters, {config.loss} loss, "
        f"{optimizer} lr {rate}{schedule}, batch {config.batch_size}, "
        f"{epochs}, {num_images - held} training images{held_out}, {config.dtype} on {where}"
    )


def start_devices(args: argparse.Namespace, plan: RunPlan):
    """Joins the other processes (several hosts) and builds the device mesh the flags ask for.

    Several runs on one host's CPU are spread over one CPU device per core (``jax_num_cpu_devices``):
    whole runs on each, so every core trains its own runs with their weights in its own cache. A single
    run keeps one device, as before, unless ``--devices`` asks for more.
    """
    import jax

    from jaxmnist.parallel import make_mesh, runs_devices

    runs = plan.num_runs
    if args.coordinator is not None:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif (
        runs > 1
        and args.platform in (None, "cpu")
        and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
    ):
        with contextlib.suppress(
            RuntimeError
        ):  # JAX already started (the command called in a process): keep its devices
            jax.config.update("jax_num_cpu_devices", max(os.cpu_count() or 1, args.devices or 1))
    if runs > 1 and args.devices is None:
        return make_mesh(runs_devices(runs, len(jax.devices(args.platform))), args.platform)
    return make_mesh(args.devices, args.platform)


def run(args: argparse.Namespace, argv: list[str], config: TrainConfig, stop: GracefulStop) -> int:
    """Trains as the flags say; returns the exit code (130/143 when ``stop`` caught a signal)."""
    import jax

    from jaxmnist.plan import RunPlan

    configure_jax(args.dtype == "float64", not args.no_compile_cache)
    plan = RunPlan.of(config)  # the runs, read from the settings here once
    mesh = start_devices(args, plan)
    if jax.process_index() == 0:
        return _train(args, argv, plan, mesh, stop, writer=True)
    # Several hosts: process 0 prints and writes every file; the others train in step, silently.
    args = argparse.Namespace(**{**vars(args), "quiet": True, "metrics_out": None, "plot": None, "save": None})
    with contextlib.redirect_stdout(io.StringIO()):
        return _train(args, argv, plan, mesh, stop, writer=False)


def _resume(args: argparse.Namespace, plan: RunPlan, template):
    """The checkpoint to continue from (restored onto ``template``, the run's own initial state), saying which
    damaged ones were passed over; None: a new run."""
    from jaxmnist.checkpoint import resume

    restored, damaged = resume(args.checkpoint_dir, plan, template)
    for line in damaged:
        print(f"warning: skipping damaged checkpoint {line}", file=sys.stderr, flush=True)
    if restored is None:
        print(f"no checkpoint in {args.checkpoint_dir} yet: starting a new run", flush=True)
        return None
    epoch, position = restored.progress.epoch, restored.progress.position
    where = f"epoch {epoch}, {position} steps into it"
    if position == 0 and epoch > 1:
        where = f"the end of epoch {epoch - 1}"
    print(f"resuming from {restored.path}: {where}", flush=True)
    return restored


def _reporter(args: argparse.Namespace, plan: RunPlan, steps_per_epoch: int, start):
    from jaxmnist.commands.reporting import Reporter
    from jaxmnist.commands.tensorboard import TensorBoardLog

    tensorboard = None
    if args.tensorboard is not None:
        tensorboard = TensorBoardLog(args.tensorboard, plan, steps_per_epoch, args.tensorboard_every)
    return Reporter(
        plan, steps_per_epoch, start, quiet=args.quiet, metrics_out=args.metrics_out, plot=args.plot,
        save_best=args.save_best, tensorboard=tensorboard,
    )  # fmt: skip


def _say_how_it_ended(plan: RunPlan, history, args: argparse.Namespace) -> None:
    from jaxmnist.commands.reporting import grid_table
    from jaxmnist.loop import best_epoch, early_stop_due

    config = plan.config
    if plan.swept and history:
        print(grid_table(tuple(history), config))
        return
    best = best_epoch(history)
    if best is None or config.seeds > 1:
        return
    if early_stop_due(history, config.early_stopping):
        print(f"early stopping: the validation loss has not improved for {counted(config.early_stopping, 'epoch')}")
    saved = ""
    if args.save_best is not None:
        saved = (f"; its parameters are in {args.save_best}" if _holds_this_run(args.save_best, config) else
                 f"; {args.save_best} not written: the checkpoint holds the last epoch's parameters alone")  # fmt: skip
    print(f"best epoch {best.epoch}: val loss {best.val_loss:.4f}, val accuracy {best.val_accuracy:.4f}{saved}")


def _holds_this_run(path: Path, config: TrainConfig) -> bool:
    """Whether ``path`` is a parameters file of this run's settings (written when its best epoch ended, by this
    command or by the one it resumes): a file of other settings is not this run's best epoch."""
    from jaxmnist.checkpoint import CheckpointError, config_differences, load_saved_model

    try:
        return not config_differences(load_saved_model(path).config, config)
    except CheckpointError:
        return False


def _train(args: argparse.Namespace, argv: list[str], plan: RunPlan, mesh, stop: GracefulStop, writer: bool) -> int:
    from jaxmnist.checkpoint import checkpoint_path, save_checkpoint
    from jaxmnist.commands.reporting import OutputWriteError, saved_model_bytes, write_output
    from jaxmnist.config import check_against_data, steps_per_epoch
    from jaxmnist.loop import best_epoch, fit, run_complete, start_of_run
    from jaxmnist.model import count_params
    from jaxmnist.parallel import runs_sharded
    from jaxmnist.runs import build_run, check_images, initial_shapes

    if writer:
        check_outputs(args)
    config = plan.config
    train_data, test_data = load_splits(args)
    num_train_images = len(train_data[0])
    check_against_data(config, num_train_images)
    run = build_run(plan, check_images(train_data[0], "train_data"), num_train_images)
    if mesh.size > 1 and plan.stacked:
        runs_sharded(mesh, plan.num_runs)  # runs that do not divide over the devices: refused before the header
    # fit initializes a new run (the header needs its shapes alone); a resumed one is restored onto its initial state.
    restored = _resume(args, plan, start_of_run(run).state) if args.resume else None
    start = restored.progress if restored else None
    stop.arm()  # from the header line on, a first signal stops at a step boundary and saves
    num_params = count_params(initial_shapes(run).params) // plan.num_runs
    print(describe(plan, num_train_images, mesh, run.model.name, num_params), flush=True)
    finished = start is not None and run_complete(config, start)
    if finished:  # e.g. stopped after its last checkpoint and before its outputs: they are written now
        done = counted(start.epoch - 1, "epoch")
        print(f"the checkpoint has finished its run ({done}, --epochs {config.epochs}): writing its outputs")

    saved_at = restored.path if restored else None
    try:
        reporter = _reporter(args, plan, steps_per_epoch(config, num_train_images), start)
        progress = start
        with contextlib.closing(reporter):
            if finished and args.save_best is not None and best_epoch(start.history) is start.history[-1]:
                write_output(args.save_best, saved_model_bytes(config, start.state))  # the best is the last epoch
            steps = () if finished else fit(
                run,
                train_data,
                test_data,
                start,
                steps_per_call=args.checkpoint_every,
                max_loss=args.max_loss,
                mesh=mesh if mesh.size > 1 else None,
            )  # fmt: skip
            for progress in _recording_divergence(steps, reporter):
                # The metrics record goes first: a kill before the checkpoint redoes the epoch, and the
                # resumed run rewrites the file from the checkpoint's history.
                reporter.update(progress)
                checkpoint_now = progress.epoch_done or args.checkpoint_every or stop.signal_number
                if writer and args.checkpoint_dir is not None and checkpoint_now:
                    path = checkpoint_path(args.checkpoint_dir, progress.global_step)
                    try:
                        saved_at = save_checkpoint(args.checkpoint_dir, plan, progress, keep=args.keep)
                    except OSError as error:
                        raise OutputWriteError(path, error) from error
                # A stop asked for during the last call has nothing left to stop: the run ends as usual.
                if stop.signal_number is not None and not run_complete(config, progress):
                    reporter.draw_plot()
                    return _report_stop(stop.signal_number, progress, saved_at, argv)
        reporter.draw_plot()
        if progress is not None:
            _say_how_it_ended(plan, progress.history, args)
        if args.save is not None and progress is not None:
            write_output(args.save, saved_model_bytes(config, progress.state, list(progress.diverged)))
            print(f"trained parameters written to {args.save}")
        if stop.signal_number is not None:
            print(
                f"{signal.Signals(stop.signal_number).name}: the run had finished: nothing to resume", file=sys.stderr
            )
    except OutputWriteError as error:
        _report_write_failure(error, saved_at, argv, args.checkpoint_dir is not None)
        return EXIT_WRITE_FAILED
    return 0


def _recording_divergence(steps, reporter):
    """``steps``, and a single run's divergence recorded (what was measured of its epoch) before it stops it."""
    from jaxmnist.loop import DivergenceError

    try:
        yield from steps
    except DivergenceError as error:
        reporter.diverged(error)
        raise


def _report_write_failure(error, saved_at: Path | None, argv: list[str], checkpointing: bool) -> None:
    if saved_at is not None:
        then = f"the last good checkpoint is {saved_at}; make room, then resume with: {resume_command(argv)}"
    elif checkpointing:
        then = f"no checkpoint was written yet; make room, then rerun: {resume_command(argv)}"
    else:
        then = "nothing was saved (no --checkpoint-dir)"
    print(f"error: {error.strerror}; {then}", file=sys.stderr)


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run from its checkpoints."""
    return shlex.join(["python", "-m", "jaxmnist.train", *argv, *([] if "--resume" in argv else ["--resume"])])


def _report_stop(signal_number: int, progress, saved_at: Path | None, argv: list[str]) -> int:
    name = signal.Signals(signal_number).name
    where = f"epoch {progress.epoch}, step {progress.position}"
    if saved_at is None:
        print(f"{name}: stopped at {where}; nothing saved (no --checkpoint-dir)", file=sys.stderr)
    else:
        print(
            f"{name}: stopped at {where}; checkpoint saved to {saved_at}\nresume with: {resume_command(argv)}",
            file=sys.stderr,
        )
    return 128 + signal_number
