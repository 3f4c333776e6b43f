"""Training speed: the TensorFlow CVAE tutorial's loop against this project's training path, same architecture.

    python benchmarks/benchmark.py           # real MNIST (VAE_DATA_DIR or --data-dir); ~11 min on a quiet 2-core CPU
    python benchmarks/benchmark.py --quick   # synthetic data, about a minute: checks that everything runs (CI)
    python benchmarks/benchmark.py --tutorial-history benchmarks/tutorial_history.json   # reuse the tutorial's run

It measures, in one process:
  1. training throughput (images/s) of the tutorial's loop and of the project's path in each precision this machine
     has (float32; mixed_bfloat16 where `vae_utils.choose_precision("auto")` picks it and on any CPU; mixed_float16 on
     GPUs of compute capability 7.x), at the tutorial's settings, at the project's and at batch 128, alternating in
     short chunks, several rounds, medians; also images per CPU-second, which a machine shared with other jobs
     disturbs less;
  2. time to reach the tutorial's own 10-epoch test ELBO (latent 2, statically binarized MNIST) for each, the project
     in the precision `--precision` chooses ("auto" by default, as the notebook);
  3. each step's achieved GFLOP/s against a large matmul in the precision it computes in (float32, bfloat16, float16),
     measured in the same rounds, and a per-layer timing of the step in each precision that shows where the time goes.
It ends with the project's speed targets, as ratios measured in this run: throughput at equal architecture, the fastest
project row against the tutorial's (target at least 1.5x; the rows at the tutorial's batch size are printed beside
it), and time to the tutorial's test ELBO (target at least 8x sooner).

The baseline re-implements https://www.tensorflow.org/tutorials/generative/cvae faithfully: batch 32, Adam 1e-4,
float32, a `tf.function` step called once per batch from Python, and the test ELBO computed eagerly, batch by batch
(of 32). Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import vae_runtime as vr  # noqa: E402
import vae_utils as vu  # noqa: E402

TRAIN_SIZE = 60000  # the tutorial's shuffle buffer covers the whole training set
TUTORIAL_ARCHITECTURE = vu.VAEConfig(encoder_padding="valid", latent_dim=2)  # the project's CVAE, the tutorial's layers

# ---------------------------------------------------------------------------------------------------------------------
# The tutorial, as published (Keras 3 spelling of InputLayer; tf.shape instead of the static mean.shape)
# ---------------------------------------------------------------------------------------------------------------------


class TutorialCVAE(tf.keras.Model):
    """The tutorial's convolutional VAE for 28x28x1 images."""

    def __init__(self, latent_dim):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = tf.keras.Sequential([
            tf.keras.layers.InputLayer(shape=(28, 28, 1)),
            tf.keras.layers.Conv2D(filters=32, kernel_size=3, strides=(2, 2), activation="relu"),
            tf.keras.layers.Conv2D(filters=64, kernel_size=3, strides=(2, 2), activation="relu"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(latent_dim + latent_dim)])  # no activation
        self.decoder = tf.keras.Sequential([
            tf.keras.layers.InputLayer(shape=(latent_dim,)),
            tf.keras.layers.Dense(units=7 * 7 * 32, activation=tf.nn.relu),
            tf.keras.layers.Reshape(target_shape=(7, 7, 32)),
            tf.keras.layers.Conv2DTranspose(filters=64, kernel_size=3, strides=2, padding="same", activation="relu"),
            tf.keras.layers.Conv2DTranspose(filters=32, kernel_size=3, strides=2, padding="same", activation="relu"),
            tf.keras.layers.Conv2DTranspose(filters=1, kernel_size=3, strides=1, padding="same")])  # no activation

    def encode(self, x):
        mean, logvar = tf.split(self.encoder(x), num_or_size_splits=2, axis=1)
        return mean, logvar

    def reparameterize(self, mean, logvar):
        eps = tf.random.normal(shape=tf.shape(mean))
        return eps * tf.exp(logvar * .5) + mean

    def decode(self, z, apply_sigmoid=False):
        logits = self.decoder(z)
        return tf.sigmoid(logits) if apply_sigmoid else logits


def tutorial_log_normal_pdf(sample, mean, logvar, raxis=1):
    log2pi = tf.math.log(2. * np.pi)
    return tf.reduce_sum(-.5 * ((sample - mean) ** 2. * tf.exp(-logvar) + logvar + log2pi), axis=raxis)


def tutorial_compute_loss(model, x):
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    x_logit = model.decode(z)
    cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(logits=x_logit, labels=x)
    logpx_z = -tf.reduce_sum(cross_ent, axis=[1, 2, 3])
    logpz = tutorial_log_normal_pdf(z, 0., 0.)
    logqz_x = tutorial_log_normal_pdf(z, mean, logvar)
    return -tf.reduce_mean(logpx_z + logpz - logqz_x)


def make_tutorial_train_step():
    """The tutorial's `train_step`; a fresh `tf.function` per model, as the tutorial has one model."""
    @tf.function
    def train_step(model, x, optimizer):
        with tf.GradientTape() as tape:
            loss = tutorial_compute_loss(model, x)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return train_step


def tutorial_test_elbo(model, test_dataset) -> float:
    """The tutorial's evaluation: eager `compute_loss` per test batch, averaged by a Keras Mean metric."""
    loss = tf.keras.metrics.Mean()
    for test_x in test_dataset:
        loss(tutorial_compute_loss(model, test_x))
    return -float(loss.result())


# ---------------------------------------------------------------------------------------------------------------------
# Trainers that run a given number of images, continuing where the last call stopped
# ---------------------------------------------------------------------------------------------------------------------


class TutorialTrainer:
    """The tutorial's loop: one `tf.function` call per batch of 32 from a shuffled `tf.data` pipeline."""

    name = "tutorial loop (batch 32, Adam 1e-4)"
    precision = "float32"

    def __init__(self, train_images, seed=0):
        tf.keras.utils.set_random_seed(seed)
        self.model = TutorialCVAE(2)
        self.optimizer = tf.keras.optimizers.Adam(1e-4)
        self.batch_size = 32
        self.train_step = make_tutorial_train_step()
        dataset = tf.data.Dataset.from_tensor_slices(train_images).shuffle(TRAIN_SIZE).batch(self.batch_size)
        self.iterator = iter(dataset.repeat())

    def train(self, num_images: int) -> int:
        for _ in range(num_images // self.batch_size):
            self.train_step(self.model, next(self.iterator), self.optimizer)
        return num_images // self.batch_size * self.batch_size


class ProjectTrainer:
    """The project's path: `vae_utils.train_step` compiled by `vae_runtime.compile_steps`, fed through the strategy.

    Same layers and parameter count as the tutorial; the project's encoder also bounds the log-variance with a tanh.
    The model is built by `vae_utils.build_model` under the dtype policy `precision` (float32, mixed_bfloat16 or
    mixed_float16; variables, the encoder's output and the logits stay float32); for mixed_float16 Adam is wrapped in
    a `LossScaleOptimizer`, as `main_train_loop` does.
    """

    def __init__(self, train_images, batch_size, learning_rate, steps_per_execution, precision="float32", seed=0):
        train_config = vu.TrainConfig(batch_size=batch_size, learning_rate=learning_rate,
                                      steps_per_execution=steps_per_execution, seed=seed, precision=precision)
        self.model = vu.build_model(TUTORIAL_ARCHITECTURE, train_config)  # seeded; the tutorial's architecture
        self.precision = vr.model_precision(self.model)
        self.name = f"project (batch {batch_size}, steps/call {steps_per_execution}, {self.precision})"
        self.batch_size, self.steps_per_execution = batch_size, steps_per_execution
        self.learning_rate = learning_rate
        self.optimizer = tf.keras.optimizers.Adam(learning_rate)
        if self.precision == "mixed_float16":  # float16 gradients underflow without a loss scale
            self.optimizer = tf.keras.optimizers.LossScaleOptimizer(self.optimizer)
        self.optimizer.build(self.model.trainable_variables)
        strategy = tf.distribute.get_strategy()
        self.train_steps = vr.compile_steps(vu.train_step, self.model, self.optimizer, vu.compute_loss, strategy)
        dataset = vu.make_dataset(train_images, batch_size, shuffle_seed=seed, drop_remainder=True).repeat()
        self.iterator = iter(strategy.experimental_distribute_dataset(dataset))

    def train(self, num_images: int) -> int:
        steps = max(1, num_images // self.batch_size)
        done = 0
        while done < steps:
            num_steps = min(self.steps_per_execution, steps - done)
            self.train_steps(self.iterator, tf.constant(num_steps)).numpy()
            done += num_steps
        return steps * self.batch_size


class XLATrainer:
    """A lever, checked and left off: the project's loss in a per-batch step compiled with XLA (`jit_compile=True`)."""

    def __init__(self, train_images, batch_size, learning_rate, seed=0):
        self.name = f"lever: XLA step (batch {batch_size}, 1 step/call, float32)"
        self.batch_size, self.precision = batch_size, "float32"
        model = vu.build_model(TUTORIAL_ARCHITECTURE, vu.TrainConfig(batch_size=batch_size, seed=seed,
                                                                     precision="float32"))
        optimizer = tf.keras.optimizers.Adam(learning_rate)
        optimizer.build(model.trainable_variables)

        @tf.function(jit_compile=True)
        def train_step(x):
            with tf.GradientTape() as tape:
                loss = vu.compute_loss(model, x)
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss
        self.model, self.train_step = model, train_step
        self.iterator = iter(vu.make_dataset(train_images, batch_size, shuffle_seed=seed, drop_remainder=True).repeat())

    def train(self, num_images: int) -> int:
        steps = max(1, num_images // self.batch_size)
        for _ in range(steps):
            loss = self.train_step(next(self.iterator))
        loss.numpy()
        return steps * self.batch_size


class MatmulPeak:
    """A large square matmul in `dtype`, the practical peak of this machine's TensorFlow kernels in that precision."""

    def __init__(self, size: int, dtype: str = "float32"):
        self.size, self.dtype = size, tf.as_dtype(dtype)
        self.name = f"{self.dtype.name} matmul"
        self.a = tf.cast(tf.random.normal((size, size)), self.dtype)
        self.b = tf.cast(tf.random.normal((size, size)), self.dtype)
        self.matmul = tf.function(tf.linalg.matmul)

    def run(self, repeats: int) -> float:
        for _ in range(repeats):
            product = self.matmul(self.a, self.b)
        product.numpy()
        return 2.0 * self.size ** 3 * repeats / 1e9  # GFLOP done


# The dtype the matmuls and convolutions of each Keras dtype policy run in, hence the peak a step is measured against.
PEAK_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def precisions_to_measure(chosen: str) -> list[str]:
    """The dtype policies this machine gets a row for: float32; mixed_bfloat16 wherever `choose_precision("auto")`
    picks it, and on every CPU-only machine as a measured row (it can be slower where the CPU lacks bf16 kernels);
    mixed_float16 on GPUs of compute capability 7.x (where "auto" picks it); and `chosen`, the precision of part 2."""
    auto = vr.choose_precision("auto")
    on_cpu = not tf.config.list_logical_devices("GPU") and not tf.config.list_logical_devices("TPU")
    precisions = ["float32"]
    if auto == "mixed_bfloat16" or on_cpu:
        precisions.append("mixed_bfloat16")
    if auto == "mixed_float16":
        precisions.append("mixed_float16")
    if chosen not in precisions:
        precisions.append(chosen)
    return precisions


def _clock():
    return time.perf_counter(), time.process_time()


# ---------------------------------------------------------------------------------------------------------------------
# 1 and 3: throughput and FLOP rate, alternating
# ---------------------------------------------------------------------------------------------------------------------

def _layer_macs(layer) -> int:
    """Multiply-adds per image of one forward pass through a Conv2D, Conv2DTranspose or Dense layer (else 0)."""
    if isinstance(layer, tf.keras.layers.Conv2DTranspose):
        _, height, width, channels_in = layer.input.shape
        return height * width * layer.kernel_size[0] * layer.kernel_size[1] * channels_in * layer.filters
    if isinstance(layer, tf.keras.layers.Conv2D):
        _, height, width, channels_out = layer.output.shape
        return height * width * layer.kernel_size[0] * layer.kernel_size[1] * layer.input.shape[-1] * channels_out
    if isinstance(layer, tf.keras.layers.Dense):
        return layer.input.shape[-1] * layer.units
    return 0


def _weighted_layers(model):
    """(name, layer, sees_the_images) for every layer with weights, encoder first."""
    layers = [(f"{sub.name}/{layer.name}", layer) for sub in (model.encoder, model.decoder) for layer in sub.layers
              if layer.trainable_variables]
    return [(name, layer, index == 0) for index, (name, layer) in enumerate(layers)]


def _layer_flops(layer, sees_the_images: bool) -> float:
    # forward, weight gradient, and input gradient (which the layer that sees the images does not need); 2 FLOPs a MAC
    return 2.0 * _layer_macs(layer) * (2 if sees_the_images else 3)


def training_flops_per_image(model: tf.keras.Model) -> float:
    """FLOPs per image of one training step of the convolutions and dense layers, counted from their shapes.

    Element-wise work (activations, sampling, loss, Adam) is left out: it is a few percent of the FLOPs.
    """
    return sum(_layer_flops(layer, first) for _, layer, first in _weighted_layers(model))


def measure_alternating(trainers, peaks, chunk_images, rounds, peak_repeats):
    """Run each trainer for `chunk_images`, then each matmul peak, in turn, `rounds` times; return the samples."""
    samples = {t.name: {"wall": [], "cpu": []} for t in list(trainers) + list(peaks)}
    for trainer in trainers:  # warm up: trace, build the optimizer, fill the prefetch buffers
        trainer.train(4 * trainer.batch_size * getattr(trainer, "steps_per_execution", 1))
    for peak in peaks:
        peak.run(1)
    for _ in range(rounds):
        for trainer in trainers:
            wall, cpu = _clock()
            images = trainer.train(chunk_images)
            samples[trainer.name]["wall"].append(images / (time.perf_counter() - wall))
            samples[trainer.name]["cpu"].append(images / max(time.process_time() - cpu, 1e-9))
        for peak in peaks:
            wall, cpu = _clock()
            gflop = peak.run(peak_repeats)
            samples[peak.name]["wall"].append(gflop / (time.perf_counter() - wall))
            samples[peak.name]["cpu"].append(gflop / max(time.process_time() - cpu, 1e-9))
    return samples


def _layer_step(layer, batch, sees_the_images):
    """A tf.function running one layer forward and backward on random input, as in the training step.

    The input comes in the layer's compute dtype, as the layer before hands it over under a mixed policy (the images,
    float32, are cast by the first layer itself; that cast is left out here)."""
    x = tf.cast(tf.random.uniform((batch,) + tuple(layer.input.shape[1:])), layer.compute_dtype)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        sources = layer.trainable_variables if sees_the_images else [x] + layer.trainable_variables
        return tape.gradient(y, sources)
    return step


def layer_profile(models, batch, repeats, rounds=3):
    """{precision: [(layer, median seconds of its forward + backward at `batch`, its training FLOPs per image)]}.

    `models` maps a precision to a model built under it; in each round every layer of every model runs in turn, so
    that a busy moment on the machine falls on all precisions alike."""
    steps = {precision: [(name, _layer_step(layer, batch, first), _layer_flops(layer, first))
                         for name, layer, first in _weighted_layers(model)] for precision, model in models.items()}
    times = {precision: [[] for _ in layers] for precision, layers in steps.items()}
    # One trace per layer and precision is expected; TensorFlow counts the closures of `step` together and would
    # warn of "retracing", so its logger is quietened while they trace.
    level = tf.get_logger().level
    tf.get_logger().setLevel("ERROR")
    try:
        for layers in steps.values():
            for _, step, _ in layers:
                step()
    finally:
        tf.get_logger().setLevel(level)
    for _ in range(rounds):
        for precision, layers in steps.items():
            for index, (_, step, _) in enumerate(layers):
                start = time.perf_counter()
                for _ in range(repeats):
                    result = step()
                result[0].numpy()
                times[precision][index].append((time.perf_counter() - start) / repeats)
    return {precision: [(name, statistics.median(times[precision][index]), flops)
                        for index, (name, _, flops) in enumerate(layers)] for precision, layers in steps.items()}


def measure_evaluation(tutorial_model, project_model, images, rounds):
    """Images/s of the tutorial's eager evaluation (batches of 32) and of `vae_utils.evaluate_elbo`, alternating."""
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(32)
    tutorial_test_elbo(tutorial_model, dataset.take(2))
    vu.evaluate_elbo(project_model, images[:64])
    rates = {"tutorial": [], "project": []}
    for _ in range(rounds):
        start = time.perf_counter()
        tutorial_test_elbo(tutorial_model, dataset)
        rates["tutorial"].append(len(images) / (time.perf_counter() - start))
        start = time.perf_counter()
        vu.evaluate_elbo(project_model, images)
        rates["project"].append(len(images) / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


# ---------------------------------------------------------------------------------------------------------------------
# 2: time to the tutorial's 10-epoch test ELBO
# ---------------------------------------------------------------------------------------------------------------------

def run_tutorial(train_images, test_images, epochs, seed, verbose):
    """The tutorial's full loop; returns [(epoch, test ELBO, seconds so far)]."""
    tf.keras.utils.set_random_seed(seed)
    model, optimizer = TutorialCVAE(2), tf.keras.optimizers.Adam(1e-4)
    train_step = make_tutorial_train_step()
    test_dataset = tf.data.Dataset.from_tensor_slices(test_images).shuffle(len(test_images)).batch(32)
    train_dataset = tf.data.Dataset.from_tensor_slices(train_images).shuffle(TRAIN_SIZE).batch(32)
    history, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        for train_x in train_dataset:
            train_step(model, train_x, optimizer)
        history.append((epoch, tutorial_test_elbo(model, test_dataset), time.perf_counter() - start))
        if verbose:
            print(f"  tutorial epoch {epoch:2d}: test ELBO {history[-1][1]:8.2f}, {history[-1][2]:6.1f} s so far",
                  flush=True)
    return history


class _TargetReached(Exception):
    pass


def run_project(train_images, test_images, target, batch_size, learning_rate, steps_per_execution, max_epochs,
                seed, verbose, precision="float32"):
    """`vae_utils.main_train_loop` until the test ELBO after an epoch reaches `target`; returns [(epoch, ELBO, s)].

    The model is built under the dtype policy `precision`; main_train_loop adds the loss scale for mixed_float16."""
    train_config = vu.TrainConfig(epochs=max_epochs, batch_size=batch_size, learning_rate=learning_rate,
                                  steps_per_execution=steps_per_execution, seed=seed, precision=precision)
    model = vu.build_model(TUTORIAL_ARCHITECTURE, train_config)
    if verbose:
        print(f"  project runs in {vr.model_precision(model)}", flush=True)
    history, start = [], time.perf_counter()

    def on_epoch_end(epoch, _model, row):
        history.append((epoch, row["test_elbo"], time.perf_counter() - start))
        if verbose:
            print(f"  project  epoch {epoch:2d}: test ELBO {row['test_elbo']:8.2f}, {history[-1][2]:6.1f} s so far",
                  flush=True)
        if row["test_elbo"] >= target:
            raise _TargetReached

    try:
        vu.main_train_loop(model, train_images, test_images, train_config, on_epoch_end=on_epoch_end, verbose=False)
    except _TargetReached:
        pass
    return history


def first_reaching(history, target):
    return next((row for row in history if row[1] >= target), None)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------

def synthetic_images(count, seed):
    """Binarized blobs of random position and size: learnable, so the ELBO rises within an epoch."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    centres = rng.uniform(8, 20, size=(count, 2, 1, 1))
    radii = rng.uniform(3, 8, size=(count, 1, 1))
    inside = (yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2 < radii ** 2
    return inside.astype(np.float32)[..., np.newaxis]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="synthetic data and tiny sizes: checks that it runs")
    parser.add_argument("--data-dir", default=None, help="folder holding mnist.npz (default: $VAE_DATA_DIR)")
    parser.add_argument("--batch-size", type=int, default=32, help="the project's batch size")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="the project's Adam learning rate")
    parser.add_argument("--steps-per-execution", type=int, default=50, help="training steps per tf.function call")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the throughput measurement")
    parser.add_argument("--chunk-images", type=int, default=3200, help="images per trainer per round")
    parser.add_argument("--tutorial-epochs", type=int, default=10, help="epochs of the tutorial's run (its target)")
    parser.add_argument("--max-epochs", type=int, default=10, help="most epochs the project may take to the target")
    parser.add_argument("--precision", default="auto", choices=vr.PRECISIONS,
                        help="dtype policy of the project's run in part 2 (default auto: vae_utils.choose_precision); "
                             "part 1 measures every precision this machine has anyway")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tutorial-history", default=None,
                        help="reuse the tutorial run recorded in this JSON file (a full run writes "
                             "benchmarks/tutorial_history.json) instead of running it again")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.chunk_images, args.tutorial_epochs, args.max_epochs = 1, 64, 1, 1
    return args


def _ratio_text(value: float) -> str:
    return f"{value:.2f}x"


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    print(f"Machine: {vr.describe_machine()}")
    print(f"os.cpu_count() = {os.cpu_count()}; TensorFlow devices: "
          f"{', '.join(d.name for d in tf.config.list_logical_devices())}; TensorFlow {tf.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    chosen = vr.choose_precision(args.precision, verbose=True)  # part 2's precision; says why
    precisions = precisions_to_measure(chosen)
    print(f"Precisions measured: {', '.join(precisions)} (variables, the encoder's output, the logits and the loss "
          f"stay float32 in every one)")
    if args.quick:
        train_images, test_images = synthetic_images(256, 1), synthetic_images(64, 2)
        data = "synthetic blobs, 256 train / 64 test images (--quick: checks that it runs, the numbers mean nothing)"
    else:
        (x_train, _), (x_test, _) = vu.load_dataset("mnist", args.data_dir)
        train_images = vu.preprocess_images(x_train, binarize=True)  # the tutorial's static binarization
        test_images = vu.preprocess_images(x_test, binarize=True)
        data = "MNIST, statically binarized (pixel > 0.5), 60000 train / 10000 test images"
    print(f"Data: {data}\n", flush=True)
    settings = f"batch {args.batch_size}, Adam {args.learning_rate:g}, {args.steps_per_execution} steps/call"

    # 1 and 3. Throughput, alternating with the matmul peaks. Each precision at each setting, the same architecture.
    tutorial = TutorialTrainer(train_images, args.seed)
    trainers = [tutorial]
    main_rows = {}  # precision -> the trainer at the project's settings (those of part 2)
    if not args.quick and (args.batch_size, args.steps_per_execution) != (32, 1):
        # the tutorial's own settings on the project's path
        trainers += [ProjectTrainer(train_images, 32, 1e-4, 1, precision, args.seed) for precision in precisions]
    for precision in precisions:
        main_rows[precision] = ProjectTrainer(train_images, args.batch_size, args.learning_rate,
                                              args.steps_per_execution, precision, args.seed)
        trainers.append(main_rows[precision])
    if not args.quick and args.batch_size != 128:  # a large batch
        trainers += [ProjectTrainer(train_images, 128, args.learning_rate, args.steps_per_execution, precision,
                                    args.seed) for precision in precisions]
    trainers.append(XLATrainer(train_images, args.batch_size, args.learning_rate, args.seed))
    peak_size = 256 if args.quick else 2048
    peaks = {}  # peak dtype -> MatmulPeak
    for trainer in trainers:
        dtype = PEAK_DTYPE[trainer.precision]
        if dtype not in peaks:
            peaks[dtype] = MatmulPeak(peak_size, dtype)
    samples = measure_alternating(trainers, list(peaks.values()), args.chunk_images, args.rounds,
                                  1 if args.quick else 8)
    median = {name: {kind: statistics.median(values) for kind, values in by_kind.items()}
              for name, by_kind in samples.items()}
    project = main_rows[chosen]
    flops = training_flops_per_image(project.model)  # the same for every precision: the same layers

    def peak_of(trainer):
        return peaks[PEAK_DTYPE[trainer.precision]]

    def paired_ratio(name, kind):  # per round, so that a busy moment slows both sides of a ratio alike
        return statistics.median([p / t for p, t in zip(samples[name][kind], samples[tutorial.name][kind])])

    lines = [f"1. Training throughput at equal architecture: {args.rounds} alternating rounds of {args.chunk_images} "
             f"images per path, medians (ratios: median of the per-round ratios); each step's GFLOP/s against the "
             f"matmul peak of the precision it computes in", "",
             "| training path | images/s | ratio | images per CPU-second | ratio | GFLOP/s | fraction of its peak |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for trainer in trainers:
        m = median[trainer.name]
        gflops = m["wall"] * flops / 1e9
        peak = peak_of(trainer)
        lines.append(f"| {trainer.name} | {m['wall']:,.0f} | {paired_ratio(trainer.name, 'wall'):.2f} | "
                     f"{m['cpu']:,.0f} | {paired_ratio(trainer.name, 'cpu'):.2f} | {gflops:.1f} | "
                     f"{gflops / median[peak.name]['wall']:.2f} ({peak.dtype.name}) |")
    for peak in peaks.values():
        lines.append(f"| {peak.name} {peak.size}x{peak.size}, the {peak.dtype.name} peak | | | | | "
                     f"{median[peak.name]['wall']:.1f} | 1.00 |")
    per_cpu = []
    for precision, trainer in main_rows.items():
        peak = peak_of(trainer)
        cpu_gflop = median[trainer.name]["cpu"] * flops / 1e9
        per_cpu.append(f"{precision} {cpu_gflop:.1f} GFLOP against the {peak.name}'s {median[peak.name]['cpu']:.1f} "
                       f"({cpu_gflop / median[peak.name]['cpu']:.2f})")
    lines.append(f"\nTraining step: {flops / 1e6:.1f} MFLOP per image (forward, weight and input gradients of the "
                 f"convolutions and dense layers, counted from their shapes); per CPU-second at {settings}: "
                 f"{'; '.join(per_cpu)}.")
    print("\n".join(lines), flush=True)

    # 3. Where the time goes: each layer forward + backward at the project's batch size, in each precision.
    profiles = layer_profile({precision: trainer.model for precision, trainer in main_rows.items()}, args.batch_size,
                             1 if args.quick else 10, 1 if args.quick else 3)
    header = "| layer | MFLOP per image |" + "".join(f" {p}: ms per step | share | GFLOP/s |" for p in profiles)
    lines = [f"\n3. Where the project's step goes at batch {args.batch_size}: each layer run alone, forward and "
             f"backward, medians, the precisions alternating", "", header,
             "|---|---:|" + "---:|---:|---:|" * len(profiles)]
    layers_seconds = {p: sum(seconds for _, seconds, _ in rows) for p, rows in profiles.items()}
    first = next(iter(profiles.values()))
    for index, (name, _, layer_flops) in enumerate(first):
        cells = "".join(f" {rows[index][1] * 1e3:.2f} | {rows[index][1] / layers_seconds[p]:.0%} | "
                        f"{layer_flops * args.batch_size / rows[index][1] / 1e9:.1f} |" for p, rows in profiles.items())
        lines.append(f"| {name} | {layer_flops / 1e6:.2f} |{cells}")
    cells = ""
    for p in profiles:
        step_seconds = args.batch_size / median[main_rows[p].name]["wall"]
        cells += (f" {step_seconds * 1e3:.2f} | {step_seconds / layers_seconds[p]:.0%} | "
                  f"{flops * args.batch_size / step_seconds / 1e9:.1f} |")
    lines.append(f"| whole training step (part 1) | {flops / 1e6:.2f} |{cells}")
    print("\n".join(lines), flush=True)

    # Evaluation of the test set: the tutorial's eager batches of 32 against evaluate_elbo's tf.function batches.
    eval_images = test_images[:64] if args.quick else test_images[:2000]
    eval_rate = measure_evaluation(tutorial.model, project.model, eval_images, 1 if args.quick else 3)
    print(f"\nTest-set evaluation, {len(eval_images)} images, alternating, medians: tutorial (eager, batches of 32) "
          f"{eval_rate['tutorial']:,.0f} images/s; project (evaluate_elbo, tf.function, batches of 1000, {chosen}) "
          f"{eval_rate['project']:,.0f} images/s; ratio {eval_rate['project'] / eval_rate['tutorial']:.1f}",
          flush=True)

    # 2. Time to the tutorial's own final test ELBO.
    print(f"\n2. Time to the tutorial's {args.tutorial_epochs}-epoch test ELBO (wall time, training and evaluation)",
          flush=True)
    if args.tutorial_history:
        with open(args.tutorial_history) as handle:
            recorded = json.load(handle)
        tutorial_history = [tuple(row) for row in recorded["history"]][:args.tutorial_epochs]
        print(f"  tutorial run reused from {args.tutorial_history} ({recorded['note']})")
    else:
        load_before = os.getloadavg()[0]
        tutorial_history = run_tutorial(train_images, test_images, args.tutorial_epochs, args.seed, verbose=True)
        if not args.quick:
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tutorial_history.json"), "w") as handle:
                json.dump({"note": f"benchmark.py run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                                   f"seed {args.seed}, load average {load_before:.1f} before and "
                                   f"{os.getloadavg()[0]:.1f} after the tutorial's run",
                           "history": tutorial_history}, handle, indent=1)
    target = tutorial_history[-1][1]
    project_history = run_project(train_images, test_images, target, args.batch_size, args.learning_rate,
                                  args.steps_per_execution, args.max_epochs, args.seed, verbose=True,
                                  precision=chosen)
    tutorial_hit, project_hit = first_reaching(tutorial_history, target), first_reaching(project_history, target)

    def estimate(name, rate_name, epochs):  # seconds at part 1's alternating rates, so equally loaded
        return epochs * (len(train_images) / median[name]["wall"] + len(test_images) / eval_rate[rate_name])

    tutorial_estimate = estimate(tutorial.name, "tutorial", tutorial_hit[0])
    project_settings = f"{settings}, {chosen}; ELBO per 1000"
    lines = ["", f"| run | settings | epochs to ELBO {target:.2f} | seconds, measured | ratio | seconds at the "
             f"alternating rates | ratio |", "|---|---|---:|---:|---:|---:|---:|",
             f"| tutorial | batch 32, Adam 1e-4, 1 step/call, float32; ELBO eagerly per 32 | {tutorial_hit[0]} | "
             f"{tutorial_hit[2]:.0f}{' (recorded)' if args.tutorial_history else ''} | 1.00 | "
             f"{tutorial_estimate:.0f} | 1.00 |"]
    if project_hit:
        project_estimate = estimate(project.name, "project", project_hit[0])
        time_ratio, estimate_ratio = tutorial_hit[2] / project_hit[2], tutorial_estimate / project_estimate
        lines.append(f"| project | {project_settings} | {project_hit[0]} | {project_hit[2]:.0f} | "
                     f"{time_ratio:.2f} | {project_estimate:.0f} | {estimate_ratio:.2f} |")
    else:
        time_ratio, estimate_ratio = tutorial_hit[2] / project_history[-1][2], None
        lines.append(f"| project | {project_settings} | not in {len(project_history)} (best "
                     f"{max(row[1] for row in project_history):.2f}) | >{project_history[-1][2]:.0f} | "
                     f"<{time_ratio:.2f} | | |")
    print("\n".join(lines))
    print(f"\nTotal {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f} at the end. Part 2 "
          f"runs one path after the other, so other jobs on the machine can favour either in the measured "
          f"seconds; the last two columns price the same epochs at the alternating rates measured above.")

    # The speed targets, from the values measured above. Throughput: the fastest project row (any batch size and
    # precision, the same architecture), and the project's settings of part 2 in their fastest precision beside it.
    best = max(main_rows.values(), key=lambda trainer: paired_ratio(trainer.name, "wall"))
    fastest = max((t for t in trainers if isinstance(t, ProjectTrainer)), key=lambda t: paired_ratio(t.name, "wall"))
    throughput_ratio = paired_ratio(fastest.name, "wall")
    at_settings = (f"; at part 2's settings ({settings}, {best.precision}): "
                   f"{_ratio_text(paired_ratio(best.name, 'wall'))}" if fastest is not best else "")
    if project_hit:
        sooner = (f"{_ratio_text(time_ratio)} sooner measured, {_ratio_text(estimate_ratio)} at the alternating "
                  f"rates ({project_hit[0]} against {tutorial_hit[0]} epochs)")
    else:
        sooner = (f"not reached in {len(project_history)} epochs: less than {_ratio_text(time_ratio)} sooner "
                  f"measured")
    quick_note = " (--quick: synthetic data, the numbers mean nothing)" if args.quick else ""
    print(f"\nSpeed targets, measured in this run{quick_note}:\n"
          f"- throughput at equal architecture, fastest project row ({fastest.name}): "
          f"{_ratio_text(throughput_ratio)} the tutorial's images/s "
          f"({_ratio_text(paired_ratio(fastest.name, 'cpu'))} per CPU-second){at_settings}; target at least 1.50x, "
          f"ambition 2x\n"
          f"- time to the tutorial's {args.tutorial_epochs}-epoch test ELBO ({target:.2f}), {chosen}: {sooner}; "
          f"target at least 8x sooner", flush=True)
    return {"throughput": median, "evaluation": eval_rate, "flops_per_image": flops, "target_elbo": target,
            "precisions": precisions, "chosen_precision": chosen, "profile": profiles,
            "tutorial_history": tutorial_history, "project_history": project_history,
            "targets": {"throughput_ratio": throughput_ratio, "throughput_path": fastest.name,
                        "throughput_ratio_at_settings": paired_ratio(best.name, "wall"),
                        "time_ratio": time_ratio if project_hit else None,
                        "estimate_ratio": estimate_ratio if project_hit else None}}


if __name__ == "__main__":
    main()
