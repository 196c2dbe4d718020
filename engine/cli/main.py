"""The ``engine`` command line: train, evaluate, predict, bench, info and models.

    python -m engine train                      # MNIST-1D, the paper's CNN, every usable core
    python -m engine train --data my_folder/ --model mlp --model-arg hidden=256,128 --epochs 30
    python -m engine evaluate --checkpoint runs/cnn1d-.../model.h5

Exit status: 0 on success, 1 when the run fails (bad data, missing file, training error), 2 for a
bad command line, 130 when interrupted. Failures print one line, never a traceback.
"""
import argparse
import contextlib
import json
import os
import sys
import textwrap
import warnings

from engine.cli.config import DEFAULTS, parse_model_args, parse_phases
from engine.core.errors import EngineError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage dump) and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}. See '{self.prog} --help'.\n")


def _default(key):
    value = DEFAULTS[key]
    return "" if value is None or value is False else f" (default: {value})"


def _add_train_arguments(parser):
    # Defaults are SUPPRESSed so that a resumed run can tell the flags given now from the
    # configuration stored in its checkpoint (given flags win, the checkpoint fills the rest).
    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="PATH", help="folder with features.npy and labels.npy, "
                       "an .npz (x/y or x_train/y_train[/x_test/y_test]) or an HDF5 file; "
                       "default: the bundled MNIST-1D")
    group.add_argument("--x-key", help="HDF5 dataset of the features (default x, or features)")
    group.add_argument("--y-key", help="HDF5 dataset of the labels (default y, or labels)")
    group.add_argument("--val-split", type=float, help="fraction of the training data held out "
                       "for validation, stratified" + _default("val_split"))
    group.add_argument("--test-split", type=float, help="fraction held out for the test report "
                       "when the data has no test split" + _default("test_split"))
    group.add_argument("--standardize", action="store_true", help="scale each feature by the "
                       "training mean and std (stored in checkpoints, applied at evaluation)")
    group = parser.add_argument_group("model and loss")
    group.add_argument("--model", metavar="NAME", help="registered model, see 'engine models'"
                       + _default("model"))
    group.add_argument("--model-arg", action="append", metavar="K=V", dest="model_args",
                       help="model argument, repeatable, e.g. channels=32 or hidden=256,128")
    group.add_argument("--loss", choices=("ce", "focal"), help="cross-entropy or focal loss"
                       + _default("loss"))
    group.add_argument("--focal-gamma", type=float, help="focal loss gamma" + _default(
        "focal_gamma"))
    group.add_argument("--focal-alpha", type=float, help="focal loss alpha" + _default(
        "focal_alpha"))
    group.add_argument("--label-smoothing", type=float, metavar="S", help="in [0, 1)"
                       + _default("label_smoothing"))
    group.add_argument("--class-weights", choices=("balanced",), help="weight each class by "
                       "n / (classes * count), from the training labels")
    group = parser.add_argument_group("optimization")
    add = group.add_argument
    add("--epochs", type=int, help="last epoch to train" + _default("epochs"))
    add("--batch-size", type=int, help="examples per step, all workers" + _default("batch_size"))
    add("--lr", type=float, help="learning rate" + _default("lr"))
    add("--optimizer", choices=("sgd", "adam", "adamw"), help=_default("optimizer").strip())
    add("--schedule", choices=("constant", "step", "warmup-cosine", "plateau"),
        help="learning-rate schedule, per epoch" + _default("schedule"))
    add("--warmup-epochs", type=int, help="linear warmup epochs (warmup-cosine)")
    add("--min-lr", type=float, help="floor of warmup-cosine and plateau" + _default("min_lr"))
    add("--step-epochs", type=int, help="epochs between step decays" + _default("step_epochs"))
    add("--lr-factor", type=float, help="decay factor of step and plateau" + _default(
        "lr_factor"))
    add("--plateau-patience", type=int, help="epochs without improvement before plateau reduces"
        + _default("plateau_patience"))
    add("--clip-norm", type=float, help="clip gradients to this global norm")
    add("--grad-accum", type=int, metavar="K", help="accumulate K micro-batches per step"
        + _default("grad_accum"))
    add("--early-stopping", type=int, metavar="PATIENCE", help="stop after PATIENCE epochs "
        "without improvement of --monitor, restoring the best state")
    add("--monitor", help="metric early stopping and the plateau schedule watch (best.h5 "
        "always keeps the lowest val_loss)" + _default("monitor"))
    add("--freeze", action="append", metavar="PATTERN", help="keep the weights whose names match "
        "this fnmatch pattern fixed for the whole run, repeatable (e.g. 'conv1d_1/*'; a pattern "
        "that matches nothing is refused with the list of names)")
    add("--init-from", metavar="CHECKPOINT", help="start from the arrays of this state or "
        "checkpoint whose names and shapes match (a pretrained base; a new head keeps its "
        "initialisation); a new run, unlike --resume")
    add("--phases", metavar="PLAN", help="a phase plan, e.g. 'epochs=5,freeze=conv*,lr=1e-3; "
        "epochs=10,lr=1e-4' (fields epochs, freeze=P1|P2, lr, schedule, reset_optimizer); "
        "--epochs defaults to their total")
    group = parser.add_argument_group("parallelism")
    group.add_argument("--workers", type=int, help="worker processes (default: every usable core)")
    group.add_argument("--sync", choices=("gradients", "states"), help=_default("sync").strip())
    group.add_argument("--update-interval", type=int, help="steps between state averages "
                       "(sync=states)" + _default("update_interval"))
    group.add_argument("--device", choices=("auto", "cpu", "gpu"), help="auto: Keras models run "
                       "under tf.distribute.MirroredStrategy when TensorFlow sees GPUs, the rest "
                       "on the engine's CPU workers" + _default("device"))
    group.add_argument("--mixed-precision", action="store_true", help="mixed_float16 with loss "
                       "scaling (GPU path)")
    group.add_argument("--xla", action="store_true", help="compile with XLA (GPU path)")
    group.add_argument("--timeout", type=float, metavar="SECONDS", help="hang detection: a worker "
                       "whose step phase takes longer is killed and replaced; 0 turns it off "
                       "(default: auto, 300 s in the first epoch, then the larger of 60 s and 20x "
                       "the median step time)")
    group.add_argument("--timeline", metavar="PATH", help="write a Chrome trace (Perfetto, "
                       "chrome://tracing) of every step's compute, wait, reduce and update per "
                       "worker to PATH (relative paths go in the run folder)")
    group.add_argument("--cluster", choices=("mpi",), help="run across nodes: one process per "
                       "node under mpirun or srun, each with its workers; rank 0 writes the "
                       "results (docs/cluster.md)")
    _add_shm_dir(group)
    group = parser.add_argument_group("output")
    group.add_argument("--output-dir", metavar="DIR", help="results folder (default: "
                       "runs/MODEL-TIMESTAMP, or the resumed run's)")
    group.add_argument("--checkpoint-every", type=int, metavar="N", help="also keep "
                       "checkpoints/epoch_NNNN.h5 every N epochs")
    group.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from its "
                       "checkpoints/last.h5, in the folder that holds it; its configuration is "
                       "the default for every flag")
    group.add_argument("--overwrite", action="store_true", help="replace the run already in "
                       "--output-dir (by default a folder holding a run is refused)")
    group.add_argument("--tensorboard", action="store_true", help="write TensorBoard event "
                       "files to DIR/tensorboard (needs the tensorboardX package)")
    group.add_argument("--export-keras", action="store_true", help="also write DIR/model.keras "
                       "of a native model (models' to_keras; needs TensorFlow)")
    group.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar")
    group.add_argument("--seed", type=int, help="seeds initialization, splits and shuffling"
                       + _default("seed"))
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS


def _add_shm_dir(parser):
    parser.add_argument("--shm-dir", metavar="DIR", help="keep the shared blocks as files in DIR "
                        "instead of /dev/shm (for a small /dev/shm, e.g. Docker's 64 MB); the "
                        "same as ENGINE_SHM_DIR=DIR")


def build_parser():
    parser = _Parser(prog="engine", description="Data-parallel CPU training: train, evaluate, "
                     "inspect. 'engine COMMAND --help' describes each command.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    train = commands.add_parser("train", help="train a model and write a results folder",
                                description="Train a registered model with the parallel engine "
                                "and write checkpoints, history.csv, config.json, results.json, "
                                "classification_report.txt and plots into --output-dir.")
    _add_train_arguments(train)
    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint and write the report",
                                   description="Evaluate a checkpoint written by 'engine train' "
                                   "on its run's test split (or --split) and write the report.")
    evaluate.add_argument("--checkpoint", required=True, metavar="PATH",
                          help="model.h5 or checkpoints/*.h5 of a run")
    evaluate.add_argument("--data", metavar="PATH", help="data to evaluate (default: the run's)")
    evaluate.add_argument("--split", choices=("test", "val", "train", "all"), default="test",
                          help="which examples: the run's test/validation/training split, or "
                          "all of --data (default: test)")
    evaluate.add_argument("--output-dir", metavar="DIR", help="report folder (default: "
                          "evaluation/ in the run folder)")
    evaluate.add_argument("--workers", type=int, help="worker processes (default: every core)")
    _add_shm_dir(evaluate)
    info = commands.add_parser("info", help="cores, memory, library versions, GPUs",
                               description="Usable cores, memory, numba and TensorFlow "
                               "availability and versions, and the GPUs seen.")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--no-tensorflow", dest="probe_tensorflow", action="store_false",
                      help="do not start TensorFlow (in a child process) to list its GPUs")
    from engine.cli.predict import add_predict_command
    add_predict_command(commands)
    from engine.cli.bench import add_bench_command
    add_bench_command(commands)
    models = commands.add_parser("models", help="registered models and their arguments",
                                 description="The model names --model takes, with arguments.")
    models.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _train_config(args):
    given = {key: value for key, value in vars(args).items() if key not in _NOT_CONFIG}
    if "model_args" in given:
        given["model_args"] = parse_model_args(given["model_args"])
    if "phases" in given:
        given["phases"] = parse_phases(given["phases"])
        given.setdefault("epochs", None)  # the phases' total (engine.cli.jobs.run_train)
    config = dict(DEFAULTS)
    if given.get("resume"):
        from engine.training.checkpoint import load_checkpoint
        saved = load_checkpoint(given["resume"]).metadata.get("config")
        if saved is None:
            raise ValueError(f"{given['resume']!r} was not written by 'engine train' (no "
                             "configuration inside); resume it from Python with engine.fit.")
        # The run continues in the folder holding the checkpoint, never in a path read from it.
        config.update({key: value for key, value in saved.items() if key in DEFAULTS and
                       key != "output_dir"})
    config.update(given)
    config["overwrite"] = getattr(args, "overwrite", False)
    return config


_NOT_CONFIG = ("command", "overwrite", "shm_dir")  # options of this invocation, not of the run


@contextlib.contextmanager
def _shm_dir(args):
    """--shm-dir: ENGINE_SHM_DIR for this command (workers of every start method see it), then
    restored, so a command run from Python leaves the environment as it was."""
    directory = getattr(args, "shm_dir", None)
    previous = os.environ.get("ENGINE_SHM_DIR")
    if directory:
        os.environ["ENGINE_SHM_DIR"] = os.path.abspath(directory)
    try:
        yield
    finally:
        if directory and previous is None:
            os.environ.pop("ENGINE_SHM_DIR", None)
        elif directory:
            os.environ["ENGINE_SHM_DIR"] = previous


def _train(args):
    from engine.cli.jobs import run_train
    with _shm_dir(args):
        run_train(_train_config(args))


def _evaluate(args):
    from engine.cli.jobs import run_evaluate
    with _shm_dir(args):
        run_evaluate(args.checkpoint, data=args.data, split=args.split,
                     output_dir=args.output_dir, workers=args.workers)


def _predict(args):
    from engine.cli.predict import run_predict
    run_predict(args.checkpoint, args.data, args.output, x_key=args.x_key, workers=args.workers)


def _bench(args):
    from engine.cli.bench import run_bench
    run_bench(args.kind, model=args.model, model_args=args.model_args,
              input_shape=args.input_shape, classes=args.classes, batch_size=args.batch_size,
              examples=args.examples, workers=args.workers, sizes=args.sizes,
              output_dir=args.output_dir, quick=args.quick)


def _info(args):
    from engine.cli.system_report import system_info
    info = system_info(probe_tensorflow=args.probe_tensorflow)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    gib = 1 << 30
    versions = info["versions"]
    print(f"python        {info['python']} on {info['platform']}")
    print(f"cores         {info['usable_cores']} usable (of {info['cpu_count']} on the machine)")
    print(f"memory        {info['memory_available_bytes'] / gib:.1f} GiB available of "
          f"{info['memory_total_bytes'] / gib:.1f} GiB")
    threads = "" if info["numba_threads"] is None else f" ({info['numba_threads']} threads)"
    print(f"numba         {versions['numba'] or 'not installed'}{threads}")
    print(f"tensorflow    {info['tensorflow'] or 'not installed'}")
    for package in ("numpy", "scikit-learn", "h5py", "matplotlib", "tensorboard"):
        print(f"{package:<13} {versions[package] or 'not installed'}")
    for pool in info["blas"]:
        kernels = pool["architecture"] or "unnamed"
        print(f"blas          {pool['library']} {pool['version']}, {kernels} kernels, "
              f"{pool['threads']} threads")
    if info["blas_hint"]:
        print(textwrap.fill(info["blas_hint"], width=100, initial_indent=" " * 14 + "note: ",
                            subsequent_indent=" " * 20))
    gpus = info["gpus"]
    print(f"gpus          {', '.join(gpus) if gpus else 'none seen by nvidia-smi'}")
    if info["tensorflow"]:
        seen = info["tensorflow_gpus"]
        print("tensorflow    sees " + ("(not probed: --no-tensorflow)" if seen is None and
                                       not args.probe_tensorflow else
                                       f"{len(seen or [])} GPU(s) {seen or ''}".rstrip()))
    from engine.backends.device import describe_device_path
    path = describe_device_path()
    where = "tf.distribute" if path["path"] == "tf_distribute" else "the engine"
    print(f"keras path    {where}: {path['reason']}")


def _models(args):
    from models import available_models
    from models.keras_zoo import available_keras_models
    described = {**available_models(), **available_keras_models()}
    if args.json:
        print(json.dumps(described, indent=2))
        return
    for name, text in described.items():
        print(f"{name}\n    {text}")
    print("\nFrom the data, train fills input_shape / input_dim / num_classes, and for mlp "
          "sizes=(features, *hidden, classes) with --model-arg hidden=256,128 (default 256).")


def _one_line_warning(command):
    def show(message, *args, **kwargs):
        print(f"engine {command}: warning: {message}", file=sys.stderr)
    return show


def main(argv=None):
    """Run one command; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler = {"train": _train, "evaluate": _evaluate, "info": _info, "models": _models,
               "predict": _predict, "bench": _bench}
    try:
        with warnings.catch_warnings():  # one line per warning, no source line under it
            warnings.showwarning = _one_line_warning(args.command)
            handler[args.command](args)
    except KeyboardInterrupt:
        print(f"engine {args.command}: interrupted. A run resumes from its checkpoints/last.h5 "
              "with --resume.", file=sys.stderr)
        return 130
    except EngineError as error:  # a worker's traceback is part of what the user needs here
        print(f"engine {args.command}: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, ImportError) as error:
        message = " ".join(str(error).split())
        print(f"engine {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0
