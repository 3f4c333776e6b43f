"""Where and how `vae_utils.main_train_loop` runs: devices, precision, compiled steps, checkpoints and resuming.

The homework's loop in `vae_utils` stays as plain as the TensorFlow tutorial's; what a notebook in Colab needs around
it lives here, behind one object, `TrainingRun`. This module imports nothing from `vae_utils`: the loop hands in its
model, its loss and its `train_step`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import platform
import re
import sys
import tempfile
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

# ---------------------------------------------------------------------------------------------------------------------
# Checks of what users hand in: images, labels and codes. Each names the argument, before any TensorFlow work.
# ---------------------------------------------------------------------------------------------------------------------

def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_images(images, config=None, name: str = "images") -> np.ndarray:
    """`images` as float32 after checking they are model-ready: (N, H, W, C), finite, in [0, 1], the model's shape."""
    if isinstance(images, tuple):
        raise TypeError(f"{name} is a tuple; pass the images alone (e.g. data.train_images), not (images, labels)")
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0 or not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name} must be a non-empty float (N, H, W, C) array, got {images.dtype} {images.shape}; "
                         f"use preprocess_images() on raw uint8 images")
    images = images.astype(np.float32, copy=False)
    if not np.isfinite(images).all() or images.min() < 0.0 or images.max() > 1.0:
        raise ValueError(f"{name} must be finite and lie in [0, 1]; use preprocess_images() on raw uint8 images")
    if config is not None and images.shape[1:] != (config.img_size, config.img_size, config.channels):
        raise ValueError(f"{name} have shape {images.shape[1:]} but the model expects "
                         f"({config.img_size}, {config.img_size}, {config.channels})")
    return images


def check_labels(labels, count: int, name: str = "labels") -> np.ndarray:
    """`labels` as a flat int64 array after checking: integer class indices >= 0, one per image."""
    labels = np.asarray(labels)
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer) or (count and labels.min() < 0):
        raise ValueError(f"{name} must be {count} integer class indices >= 0, one per image, got {labels.dtype} "
                         f"{labels.shape}")
    return labels.astype(np.int64)


def check_codes(codes, name: str = "codes", min_dims: int = 1) -> np.ndarray:
    """Latent codes: a finite real (N, D) array with N >= 1 and D >= `min_dims`."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(codes) == 0 or codes.shape[1] < min_dims or not np.issubdtype(codes.dtype, np.number):
        raise ValueError(f"{name} must be a real (N, D) array, N >= 1, D >= {min_dims}: {codes.dtype} {codes.shape}")
    if not np.isfinite(codes).all():
        raise ValueError(f"{name} hold NaN or infinite values (a class without images has a NaN mean)")
    return codes


# ---------------------------------------------------------------------------------------------------------------------
# Devices and precision
# ---------------------------------------------------------------------------------------------------------------------

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


def get_strategy(verbose: bool = True) -> tf.distribute.Strategy:
    """TPUStrategy where TensorFlow lists TPUs or `TPU_NAME` names one, MirroredStrategy over several GPUs, else one
    device; say which and why. (Colab's TPU runtimes have no TensorFlow today.)"""
    strategy, reason = None, ""
    tpu_name = os.environ.get("TPU_NAME", "")
    if tpu_name or tf.config.list_physical_devices("TPU"):
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_name or "local")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            strategy, reason = tf.distribute.TPUStrategy(resolver), f"TPU {tpu_name or 'local'}"
        except Exception as error:  # noqa: BLE001 - whatever the resolver raises, the next-best strategy is used
            print(f"TPU not used ({type(error).__name__}: {str(error).strip().partition(chr(10))[0][:160]}); trying "
                  f"the GPUs and the CPU.")
    gpus = tf.config.list_logical_devices("GPU")
    if strategy is None and len(gpus) > 1:
        strategy, reason = tf.distribute.MirroredStrategy(), f"{len(gpus)} GPUs, one replica each"
    if strategy is None:
        strategy = tf.distribute.get_strategy()
        reason = "one device: " + ("the GPU" if gpus else "the CPU, as TensorFlow sees no GPU or TPU")
    if verbose:
        print(f"Strategy: {type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s); {reason}")
    return strategy


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where there is no such file."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), set())
    except OSError:
        return set()


def _gpu_capabilities() -> list[tuple[int, int]]:
    return [tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)))
            for gpu in tf.config.list_physical_devices("GPU")]


def choose_precision(requested: str = "auto", *, cpu_flags: set[str] | None = None,
                     gpu_capabilities: Sequence[tuple[int, int]] | None = None, tpu: bool | None = None,
                     verbose: bool = False) -> str:
    """The Keras dtype policy for `requested` on this machine (or on the one the keywords describe), and say why.

    "auto": mixed_bfloat16 on TPUs, on GPUs of compute capability 8.0 or more (A100, L4) and on CPUs with native
    bfloat16 (avx512_bf16 or amx_bf16); mixed_float16, with loss scaling, on GPUs of capability 7.x (T4, V100);
    float32 otherwise. Variables and the loss stay float32 in every policy (see CVAE.decode).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision={requested!r} must be one of {PRECISIONS}")
    policy, reason = requested, "as configured"
    if requested == "auto":
        tpu = bool(tf.config.list_logical_devices("TPU")) if tpu is None else tpu
        gpus = _gpu_capabilities() if gpu_capabilities is None else [tuple(c) for c in gpu_capabilities]
        flags = (_cpu_flags() if cpu_flags is None else set(cpu_flags)) & {"avx512_bf16", "amx_bf16"}
        if tpu:
            policy, reason = "mixed_bfloat16", "TPUs multiply bfloat16 natively"
        elif gpus and min(gpus) >= (8, 0):
            policy, reason = "mixed_bfloat16", f"GPU compute capability {min(gpus)[0]}.{min(gpus)[1]} >= 8.0"
        elif gpus and min(gpus) >= (7, 0):
            policy, reason = "mixed_float16", f"GPU compute capability {min(gpus)[0]}.{min(gpus)[1]}: float16, no bf16"
        elif gpus:
            policy, reason = "float32", "the GPU predates float16 tensor cores (compute capability < 7.0)"
        elif flags:
            policy, reason = "mixed_bfloat16", f"the CPU has {' and '.join(sorted(flags))}"
        else:
            policy, reason = "float32", "no bfloat16 or float16 hardware found"
    if verbose:
        print(f"Precision: {policy} ({reason})")
    return policy


def model_precision(model: tf.keras.Model) -> str:
    """The dtype policy the model's layers compute in (what the losses read, codes and logits, is float32)."""
    return model.encoder.layers[0].dtype_policy.name


def describe_machine() -> str:
    """One line naming the machine: Colab or not, CPU cores, accelerators, Python, TensorFlow and Keras versions."""
    accelerators = [device.device_type for device in tf.config.list_logical_devices() if device.device_type != "CPU"]
    devices = ", ".join(f"{accelerators.count(t)} {t}" for t in sorted(set(accelerators))) or "no accelerator"
    where = "Google Colab, " if "google.colab" in sys.modules else ""
    return (f"{where}{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {devices}, Python "
            f"{platform.python_version()}, TensorFlow {tf.__version__}, Keras {tf.keras.__version__}")


def show(figure) -> None:
    """Display a matplotlib Figure, or the PNG file at a path, in IPython; elsewhere do nothing."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(Image(filename=figure) if isinstance(figure, str) else figure)


# ---------------------------------------------------------------------------------------------------------------------
# The optimizer, the compiled steps and the compiled evaluations
# ---------------------------------------------------------------------------------------------------------------------

def make_optimizer(config, steps_per_epoch: int) -> tf.keras.optimizers.Optimizer:
    """Adam at the configured learning rate, constant or decayed along a cosine over all the run's steps."""
    if config.lr_schedule == "constant":
        return tf.keras.optimizers.Adam(config.learning_rate)
    # The schedule is a function of the optimizer's step count, which the checkpoint restores.
    return tf.keras.optimizers.Adam(tf.keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=config.epochs * steps_per_epoch, alpha=0.05))


def compile_steps(train_step: Callable, model, optimizer, loss_fn: Callable, strategy: tf.distribute.Strategy):
    """A `tf.function` running `num_steps` calls of `train_step` on each replica; returns each step's global loss.

    Several steps per call mean one round trip to Python (and to the device) per call, not per step.
    """
    replicas = strategy.num_replicas_in_sync

    def replica_loss(model, x):
        # Each replica sees an equal share of the global batch and the replicas' gradients are summed: dividing by
        # their number makes the sum the gradient of the global-batch mean.
        return loss_fn(model, x) / replicas

    @tf.function
    def train_steps(iterator, num_steps):
        losses = tf.TensorArray(tf.float32, size=num_steps)
        for step in tf.range(num_steps):
            per_replica = strategy.run(train_step, args=(model, next(iterator), optimizer, replica_loss))
            losses = losses.write(step, strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
        return losses.stack()

    return train_steps


def map_batches(model: tf.keras.Model, function: Callable, images: np.ndarray, batch_size: int = 1000,
                **kwargs) -> np.ndarray:
    """Apply `function(model, x, **kwargs)` to `images` in batches and concatenate the per-example results.

    The compiled function is kept on the model, keyed by `function` and `kwargs`, with the batch size left open, so
    each evaluation traces once per model however often it runs.
    """
    images = check_images(images, model.config)
    # A plain attribute, set past Keras's attribute tracking: the functions live and die with their model.
    compiled = model.__dict__.setdefault("_compiled_evaluations", {})
    key = (function, tuple(sorted(kwargs.items())))
    if key not in compiled:
        signature = [tf.TensorSpec((None,) + images.shape[1:], tf.float32)]
        compiled[key] = tf.function(functools.partial(function, model, **kwargs), input_signature=signature)
    batches = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return np.concatenate([compiled[key](batch).numpy() for batch in batches])


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


# ---------------------------------------------------------------------------------------------------------------------
# The run: checks, optimizer, steps, checkpoints
# ---------------------------------------------------------------------------------------------------------------------

class TrainingRun:
    """Everything around one call of `main_train_loop`: its checks, optimizer, compiled steps and checkpoints.

    On creation it checks the arguments, then restores the newest checkpoint of `checkpoint_dir` that restores (see
    `RunCheckpoint`); `history` holds the epochs done. `train_epoch` trains one epoch, `save` checkpoints it.
    """

    def __init__(self, model, train_images, test_images, config, loss_fn: Callable, train_step: Callable, *,
                 test_sample=None, train_labels=None, strategy=None, checkpoint_dir=None, allow_new_settings=False,
                 on_epoch_end=None, verbose=True):
        _check_arguments(model, config, loss_fn, strategy, checkpoint_dir, allow_new_settings, on_epoch_end, verbose)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.train_images = check_images(train_images, model.config, "train_images")
        check_images(test_images, model.config, "test_images")
        if test_sample is not None:
            check_images(test_sample, model.config, "test_sample")
        replicas = self.strategy.num_replicas_in_sync
        if config.batch_size > len(self.train_images) or config.batch_size % replicas:
            raise ValueError(f"batch_size={config.batch_size} must be at most the {len(self.train_images)} training "
                             f"images and divisible by the {replicas} replica(s)")
        # A conditional model trains on (image, one-hot label) pairs, a CVAE on images.
        self.inputs = self.train_images
        if train_labels is not None:
            labels = check_labels(train_labels, len(self.train_images), "train_labels")
            self.inputs = (self.train_images, np.eye(model.num_classes, dtype=np.float32)[labels])
        _check_loss(loss_fn, model, tf.nest.map_structure(lambda array: tf.constant(array[:2]), self.inputs))
        self.model, self.config, self.loss_fn, self.verbose = model, config, loss_fn, verbose
        self.steps_per_epoch = len(self.train_images) // config.batch_size  # whole batches: static shapes
        with self.strategy.scope():
            self.optimizer = make_optimizer(config, self.steps_per_epoch)
            if model_precision(model) == "mixed_float16":  # float16 gradients underflow without a loss scale
                self.optimizer = tf.keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(model.trainable_variables)
        self._train_steps = compile_steps(train_step, model, self.optimizer, loss_fn, self.strategy)
        self.checkpoint = RunCheckpoint(checkpoint_dir, model, self.optimizer,
                                        run_record(model, config, loss_fn, self.inputs), allow_new_settings,
                                        verbose)
        self.history = self.checkpoint.history

    def train_epoch(self, epoch: int) -> float:
        """One shuffled pass of `train_step` over the training images, with a progress bar; returns the mean loss."""
        config = self.config
        # The shuffle and the model's noise are keyed on (seed, epoch), as Haiku and Flax thread their keys: an
        # epoch trained again after an interruption draws exactly what the uninterrupted run drew.
        key = config.seed * 100_003 + epoch
        self.model.rng.reset_from_seed(key)
        dataset = tf.data.Dataset.from_tensor_slices(self.inputs).shuffle(len(self.train_images), seed=key)
        dataset = dataset.batch(config.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        iterator = iter(self.strategy.experimental_distribute_dataset(dataset))
        if hasattr(self.loss_fn, "start_epoch"):
            self.loss_fn.start_epoch(epoch)  # e.g. the KL weight of a warm-up schedule
        progress = tf.keras.utils.Progbar(self.steps_per_epoch, stateful_metrics=["loss"], verbose=int(self.verbose))
        loss_sum, done = 0.0, 0
        while done < self.steps_per_epoch:
            steps = min(config.steps_per_execution, self.steps_per_epoch - done)
            losses = self._train_steps(iterator, tf.constant(steps)).numpy()
            if not np.isfinite(losses).all():
                self._stop(epoch, done, losses)
            loss_sum, done = loss_sum + float(losses.sum()), done + len(losses)
            progress.update(done, [("loss", loss_sum / done)])  # the bar's time: this epoch's training so far
        return loss_sum / done

    def _stop(self, epoch: int, done: int, losses) -> None:
        """Raise NonFiniteLossError naming the epoch and step of the first NaN or infinite loss in `losses`."""
        bad = int(np.flatnonzero(~np.isfinite(losses))[0])
        kept = f" (the checkpoint of epoch {epoch - 1} is kept)" if self.checkpoint.directory and epoch > 1 else ""
        raise NonFiniteLossError(f"loss became {losses[bad]} at epoch {epoch}, step {done + bad + 1} of "
                                 f"{self.steps_per_epoch}; training stopped{kept}. Lower the learning rate "
                                 f"(allow_new_settings=True continues the checkpoint with it) or check the inputs.")

    def save(self, row: dict, figure=None) -> None:
        """Append `row` to the history and checkpoint the epoch, with the figure it showed."""
        self.history.append(row)
        self.checkpoint.save(self.history, figure)

    def saved_figure(self, epoch: int) -> str | None:
        """The PNG of the figure epoch `epoch` showed, where its checkpoint folder holds one."""
        return self.checkpoint.figure_path(epoch)


def _check_arguments(model, config, loss_fn, strategy, checkpoint_dir, allow_new_settings, on_epoch_end,
                     verbose) -> None:
    """Refuse, naming it, an argument of `main_train_loop` that is not of the kind it takes."""
    if not isinstance(model, tf.keras.Model) or not hasattr(model, "rng"):
        raise TypeError(f"model must be a CVAE (see build_model), got {type(model).__name__}")
    if type(config).__name__ != "TrainConfig":
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function loss_fn(model, x), got {loss_fn!r}")
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise TypeError(f"on_epoch_end must be None or a function on_epoch_end(epoch, model, row), got {on_epoch_end!r}")
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(f"strategy must be a tf.distribute.Strategy (see get_strategy) or None, got {strategy!r}")
    if checkpoint_dir is not None and (not isinstance(checkpoint_dir, (str, os.PathLike))
                                       or isinstance(os.fspath(checkpoint_dir), bytes) or not str(checkpoint_dir)):
        raise TypeError(f"checkpoint_dir must be a folder name (a non-empty str or path) or None, got "
                        f"{checkpoint_dir!r}")
    for name, value in (("allow_new_settings", allow_new_settings), ("verbose", verbose)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_loss(loss_fn: Callable, model, batch) -> None:
    """Run the loss once on a batch of two, so that a loss that fails or is not a scalar stops before any training."""
    name = describe_loss(loss_fn)
    try:
        loss = loss_fn(model, batch)
    except (ValueError, TypeError, tf.errors.OpError) as error:
        first_line = str(error).strip().partition("\n")[0][:200]
        raise ValueError(f"loss_fn {name} fails on this model ({type(error).__name__}: {first_line}). The homework's "
                         f"compute_loss and compute_mmd_loss read the decoder's output as Bernoulli logits; for a "
                         f"model with another likelihood use vae_extensions.KLWarmup (the ELBO) or "
                         f"vae_extensions.ExtendedMMDLoss") from error
    if loss.shape.rank != 0:
        raise ValueError(f"loss_fn {name} returns shape {loss.shape.as_list()}, not one number: return the mean over "
                         f"the batch (e.g. tf.reduce_mean)")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: one per epoch, found by their files; each holds the run's record and history
# ---------------------------------------------------------------------------------------------------------------------

class CheckpointMismatchError(ValueError):
    """The checkpoint folder holds another run, or this run with other optimisation settings."""


NEW_SETTINGS = ("training.learning_rate", "training.lr_schedule", "training.epochs")  # allow_new_settings=True
KEEP = 2  # checkpoints kept: the newest, and one to fall back on when the newest is damaged


def describe_loss(loss_fn) -> str:
    """The loss's `description`, else its module-qualified name (with the arguments of a `functools.partial`)."""
    description = getattr(loss_fn, "description", None)
    if isinstance(description, str):
        return description
    if isinstance(loss_fn, functools.partial):
        arguments = [repr(a) for a in loss_fn.args] + [f"{k}={v!r}" for k, v in sorted(loss_fn.keywords.items())]
        return f"{describe_loss(loss_fn.func)}({', '.join(arguments)})"
    return f"{loss_fn.__module__}.{getattr(loss_fn, '__qualname__', type(loss_fn).__qualname__)}"


def run_record(model, config, loss_fn: Callable, train_inputs) -> dict:
    """What a run trains, flat: the model and training configurations, the loss, the data's shape and fingerprint.

    The settings that change nothing that is trained (steps per call, evaluation batch, precision) are left out.
    """
    training = {key: value for key, value in dataclasses.asdict(config).items()
                if key not in ("steps_per_execution", "eval_batch_size", "precision")}
    fingerprint = hashlib.sha256()
    for array in tf.nest.flatten(train_inputs):  # the images, and the labels of a conditional model
        fingerprint.update(np.ascontiguousarray(array))
    train_images = tf.nest.flatten(train_inputs)[0]
    architecture = dataclasses.asdict(model.config)
    record = {"model.class": type(model).__name__, **{f"model.{k}": v for k, v in architecture.items()},
              **{f"training.{k}": v for k, v in training.items()}, "loss": describe_loss(loss_fn),
              "data": f"{train_images.dtype} {list(train_images.shape)} sha256 {fingerprint.hexdigest()[:16]}"}
    return json.loads(json.dumps(record))  # as a checkpoint reads it back: tuples as lists


class _JSONState(tf.train.experimental.PythonState):
    """A JSON value saved inside the checkpoint: the run record and the history."""

    def __init__(self):
        self.value = {}

    def serialize(self) -> str:
        return json.dumps(self.value)

    def deserialize(self, string_value) -> None:
        self.value = json.loads(string_value)


class _OptimizerState(tf.Module):
    """An optimizer's step count and slot variables (Adam's moments), but not its learning rate, which comes from the
    call that resumes; a LossScaleOptimizer is saved as its inner optimizer, so every precision writes the same."""

    def __init__(self, optimizer):
        super().__init__()
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        self.iterations = inner.iterations
        self.slots = [v for v in inner.variables if v is not inner.iterations and v is not inner._learning_rate]


class RunCheckpoint:
    """One checkpoint `ckpt-<epoch>` per epoch of model (with its random generator), optimizer, record and history.

    Checkpoints are found by their files, so no index file can be lost or go stale; the newest that restores is
    used, after checking that its record is this run's, and the newest two are kept. With `directory=None` nothing
    is read or written.
    """

    def __init__(self, directory, model, optimizer, record: dict, allow_new_settings: bool = False,
                 verbose: bool = True):
        self.record, self.history, self.verbose = record, [], verbose
        self._state = _JSONState()
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=_OptimizerState(optimizer), run=self._state)
        self.directory = None if directory is None else os.path.abspath(os.path.expanduser(os.fspath(directory)))
        if self.directory is None:
            return
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(f"checkpoint_dir {self.directory} is a file; pass a folder")
        self._restore(allow_new_settings)
        if len(self.history) < record["training.epochs"]:
            _check_writable(self.directory)  # before an epoch is trained, not after

    def epochs(self) -> list[int]:
        """The epochs this folder holds checkpoints of, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        found = (re.fullmatch(r"ckpt-(\d+)\.index", name) for name in os.listdir(self.directory))
        return sorted(int(match.group(1)) for match in found if match)

    def _restore(self, allow_new_settings: bool) -> None:
        damaged = []
        for epoch in reversed(self.epochs()):
            with _readable(self.directory) as folder:
                path = os.path.join(folder, f"ckpt-{epoch}")
                try:
                    saved = json.loads(tf.train.load_checkpoint(path).get_tensor("run/.ATTRIBUTES/py_state"))
                    _compare_records(saved["record"], self.record, allow_new_settings, self.directory)
                    self._checkpoint.read(path).assert_existing_objects_matched().expect_partial()
                except CheckpointMismatchError:
                    raise
                # What TensorFlow's reader raises for a truncated file (IndexError), a bad checksum or index
                # (OpError), a record that is not JSON (ValueError) or lacks a key, or a tensor that does not match.
                except (tf.errors.OpError, IndexError, ValueError, KeyError, AssertionError) as error:
                    damaged.append(f"ckpt-{epoch}")
                    print(f"{self.directory}/ckpt-{epoch} does not restore ({type(error).__name__}); trying the "
                          f"older checkpoint.")
                    continue
            self.history = saved["history"]
            if self.verbose:
                done = len(self.history)
                print(f"Restored {self.directory}/ckpt-{epoch}: {done} epoch{'s' * (done != 1)} done, " + (
                      f"resuming at epoch {done + 1}." if done < self.record["training.epochs"] else "complete."))
            return
        if damaged:
            raise OSError(f"no checkpoint in {self.directory} restores ({', '.join(damaged)}); move the folder away "
                          f"to train from the start")

    def figure_path(self, epoch: int) -> str | None:
        path = None if self.directory is None else os.path.join(self.directory, f"epoch-{epoch}.png")
        return path if path and os.path.isfile(path) else None

    def save(self, history: list[dict], figure=None) -> None:
        """Checkpoint the epoch that `history` ends with (its figure first), then delete all but the newest two."""
        if self.directory is None:
            return
        epoch = len(history)
        if figure is not None:
            figure.savefig(os.path.join(self.directory, f"epoch-{epoch}.png"), dpi=80, bbox_inches="tight")
        self._state.value = {"record": self.record, "history": history}
        # TensorFlow writes the data files first and the .index last: a checkpoint whose .index exists is whole.
        self._checkpoint.write(os.path.join(self.directory, f"ckpt-{epoch}"))
        for old in self.epochs()[:-KEEP]:
            for path in glob.glob(os.path.join(glob.escape(self.directory), f"ckpt-{old}.*")):
                os.remove(path)


@contextlib.contextmanager
def _readable(directory: str):
    """`directory`, or a link to it where its name holds [, ], * or ?: TensorFlow's reader takes paths as patterns."""
    if not glob.has_magic(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory() as folder:
        link = os.path.join(folder, "run")
        os.symlink(directory, link)
        yield link


def _check_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise OSError(f"checkpoint_dir {directory} cannot be written ({type(error).__name__}: {error.strerror}); "
                      f"pass a folder you can write to") from None


def _compare_records(saved: dict, current: dict, allow_new_settings: bool, directory: str) -> None:
    """Raise CheckpointMismatchError naming each difference, unless only allowed settings changed.

    More epochs need nothing on a constant learning rate; on the cosine schedule they stretch the decay, so they are a
    new setting.
    """
    constant = current.get("training.lr_schedule") == saved.get("training.lr_schedule") == "constant"
    changed = [key for key in sorted(saved.keys() | current.keys()) if saved.get(key) != current.get(key)
               and not (key == "training.epochs" and constant and current[key] > saved.get(key, math.inf))]
    if not changed:
        return
    listed = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now" for key in changed)
    if any(key not in NEW_SETTINGS for key in changed):
        raise CheckpointMismatchError(f"{directory} holds another run ({listed}); use a new checkpoint_dir, or move "
                                      f"this one away to start again")
    cosine = " (the cosine schedule decays over all the epochs: its learning rate changes)" if not constant else ""
    if not allow_new_settings:
        raise CheckpointMismatchError(f"{directory} holds this model trained with other settings ({listed}){cosine}; "
                                      f"pass allow_new_settings=True to continue it with the new ones")
    print(f"Continuing {directory} with new settings: {listed}{cosine}.")
