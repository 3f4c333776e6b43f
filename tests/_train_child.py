"""A small checkpointed training run, started as a separate process by the SIGKILL test (and importable by tests).

    python tests/_train_child.py CHECKPOINT_DIR MARKER_DIR EPOCHS [STEP_SECONDS]

It trains a tiny CVAE on synthetic 28x28 images with `main_train_loop(..., checkpoint_dir=CHECKPOINT_DIR)` and the
homework's `compute_loss`, sampling included. At the start of every epoch it writes `MARKER_DIR/started_<epoch>` (one
line per process id) and the weights the epoch starts from to `MARKER_DIR/start_<epoch>_<pid>.npz`; at the end it
writes the returned history to `MARKER_DIR/final_history.json` and the final weights to `MARKER_DIR/final.npz`. STEP_SECONDS makes every training step last at least that long, so that a test
can kill the process while an epoch is in progress.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import vae_utils  # noqa: E402

CONFIG = vae_utils.VAEConfig(img_size=28, channels=1, latent_dim=2, num_convolutions=2, filters=4)


def images(count: int, seed: int) -> np.ndarray:
    """Random binary 28x28x1 images, float32."""
    return (np.random.default_rng(seed).random((count, 28, 28, 1)) < 0.3).astype(np.float32)


class EpochMarkers:
    """The ELBO loss (`compute_loss`) with a `start_epoch` hook, which `main_train_loop` calls before each epoch.

    The hook records which epochs this process trains and the weights each starts from, i.e. the weights after the
    previous epoch, or those restored from its checkpoint.
    """

    def __init__(self, model, marker_dir: str, step_seconds: float = 0.0):
        self.description = "compute_loss with epoch markers"  # the loss as the checkpoint's run record names it
        self.model, self.marker_dir, self.step_seconds = model, marker_dir, step_seconds
        os.makedirs(marker_dir, exist_ok=True)

    def start_epoch(self, epoch: int) -> None:
        weights = {f"w{i}": w for i, w in enumerate(self.model.get_weights())}
        np.savez(os.path.join(self.marker_dir, f"start_{epoch}_{os.getpid()}.npz"), **weights)
        with open(os.path.join(self.marker_dir, f"started_{epoch}"), "a") as handle:
            handle.write(f"{os.getpid()}\n")

    def _sleep(self):
        time.sleep(self.step_seconds)
        return np.float32(0.0)

    def __call__(self, model, x):
        loss = vae_utils.compute_loss(model, x)
        if self.step_seconds:
            loss += tf.py_function(self._sleep, [], tf.float32)  # adds 0, takes step_seconds
        return loss


def main(checkpoint_dir: str, marker_dir: str, epochs: int, step_seconds: float = 0.0) -> list:
    model = vae_utils.build_model(CONFIG, vae_utils.TrainConfig(precision="float32"))
    history = vae_utils.main_train_loop(
        model, images(256, seed=1), images(64, seed=2),
        vae_utils.TrainConfig(epochs=epochs, batch_size=32, precision="float32"),
        loss_fn=EpochMarkers(model, marker_dir, step_seconds), checkpoint_dir=checkpoint_dir, verbose=True)
    with open(os.path.join(marker_dir, "final_history.json"), "w") as handle:
        json.dump(history, handle)
    np.savez(os.path.join(marker_dir, "final.npz"), *model.get_weights())
    return history


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
