"""A tiny Keras model + Adam for the CheckpointedRun tests, losses whose descriptions must not depend on the process,
and the child process of the lock test:

    python tests/_checkpoint_child.py CHECKPOINT_DIR READY_FILE

opens a CheckpointedRun on CHECKPOINT_DIR, saves one epoch, writes its process id to READY_FILE and sleeps, holding
the folder's lock, until it is killed.
"""

import dataclasses
import functools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import vae_utils  # noqa: E402

MODEL_CONFIG = vae_utils.VAEConfig(img_size=8, channels=1, latent_dim=2, num_convolutions=1, filters=2)
TRAIN_CONFIG = vae_utils.TrainConfig(epochs=3, batch_size=4, learning_rate=1e-2)
DATA = np.random.default_rng(0).random((8, 4)).astype(np.float32)


def squared_output(model, x):
    return tf.reduce_mean(tf.square(model(x) - 1.0))


def make(seed: int = 0, learning_rate: float = 1e-2, loss_scale: bool = False):
    """A built 4 -> 3 -> 1 Keras model and its built Adam (inside a LossScaleOptimizer with `loss_scale`)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(learning_rate)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def step(model, optimizer) -> float:
    with tf.GradientTape() as tape:
        loss = squared_output(model, DATA)
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    return float(loss)


def signature(model_config=MODEL_CONFIG, train_config=TRAIN_CONFIG, loss_fn=squared_output, data=DATA, **changes):
    """The run signature of the tiny run; `changes` replace fields of the training configuration."""
    if changes:
        train_config = dataclasses.replace(train_config, **changes)
    return vae_utils.run_signature(model_config, train_config, loss_fn, data)


# Losses whose descriptions the test compares with those a child process computes.

def plain(model, x):
    """A plain function."""
    return tf.reduce_mean(model(x))


def uses_a_set(model, x, kinds=("a",)):
    return tf.reduce_mean(model(x)) * float(any(kind in {"alpha", "beta", "gamma", "delta"} for kind in kinds))


def scaled(weight):
    return lambda model, x: weight * tf.reduce_mean(model(x))


class Weighted:
    def __init__(self, weight):
        self.weight = weight
        self.step = tf.Variable(0)

    def __call__(self, model, x):
        return self.weight * tf.reduce_mean(model(x))


LOSS_EXAMPLES = {
    "plain": plain,
    "set constant": uses_a_set,
    "lambda": lambda model, x: tf.reduce_mean(model(x)) ** 2,
    "closure": scaled(2.5),
    "partial": functools.partial(uses_a_set, kinds=("beta", "x")),
    "object": Weighted(3.0),
    "method": Weighted(4.0).__call__,
    "vae_utils.compute_loss": vae_utils.compute_loss,
    "vae_utils.MMDLoss": vae_utils.MMDLoss(10.0),
    "vae_utils.KLWarmup": vae_utils.KLWarmup(),
}


def describe_losses() -> str:
    return "\n".join(f"{name}\t{vae_utils.describe_loss(loss)}" for name, loss in LOSS_EXAMPLES.items())


def hold_lock(folder: str, ready: str) -> None:
    model, optimizer = make()
    with vae_utils.CheckpointedRun(folder, model, optimizer, signature(), verbose=False) as run:
        step(model, optimizer)
        run.save(run.completed_epochs + 1, {"epoch": run.completed_epochs + 1})
        with open(ready, "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(600)


if __name__ == "__main__":
    import _checkpoint_child  # this file as a module, so that its functions are described as the tests see them

    _checkpoint_child.hold_lock(sys.argv[1], sys.argv[2])
