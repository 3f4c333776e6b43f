"""Where the project runs: get_strategy on this CPU and with an unreachable TPU, describe_machine, and training with
MirroredStrategy over the two logical CPUs that conftest makes (the same losses as one device)."""

import platform

import numpy as np
import pytest
import tensorflow as tf

import vae_runtime
import vae_utils
from conftest import LOGICAL_CPUS, TINY_CONFIG, synthetic_images

needs_two_cpus = pytest.mark.skipif(LOGICAL_CPUS < 2, reason="the CPU could not be split into two logical devices")


def printed_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.fixture
def no_tpu_name(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)


@pytest.fixture
def unreachable_tpu(monkeypatch):
    """TPU_NAME names a TPU whose resolver fails (as it does, without network, for a name that does not exist)."""
    errors = [OSError("<urlopen error [Errno -2] Name or service not known>")]

    def resolver(tpu=None, **kwargs):
        assert tpu == "no-such-tpu"
        raise errors[0]

    monkeypatch.setenv("TPU_NAME", "no-such-tpu")
    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", resolver)
    return errors


def test_on_this_cpu_get_strategy_returns_the_default_strategy_and_says_so_in_one_line(no_tpu_name, capsys):
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    strategy = vae_runtime.get_strategy()
    assert strategy is tf.distribute.get_strategy() and strategy.num_replicas_in_sync == 1
    (line,) = printed_lines(capsys)
    assert line.startswith("Strategy: _DefaultDistributionStrategy with 1 replica(s)") and "the CPU" in line


def test_quiet_get_strategy_prints_nothing(no_tpu_name, capsys):
    vae_runtime.get_strategy(verbose=False)
    assert capsys.readouterr().out == ""


def test_an_unreachable_tpu_is_reported_in_one_line_and_the_next_best_strategy_is_used(unreachable_tpu, capsys):
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    strategy = vae_runtime.get_strategy()
    assert strategy is tf.distribute.get_strategy()
    failure, chosen = printed_lines(capsys)
    assert failure.startswith("TPU not used (OSError: <urlopen error") and "trying the GPUs and the CPU" in failure
    assert chosen.startswith("Strategy: _DefaultDistributionStrategy")


def test_a_tpu_error_of_several_lines_is_still_reported_in_one_line(unreachable_tpu, capsys):
    unreachable_tpu[0] = tf.errors.NotFoundError(None, None, "TPU initialization failed:\nsecond line of detail")
    assert vae_runtime.get_strategy() is tf.distribute.get_strategy()
    lines = printed_lines(capsys)
    assert len(lines) == 2 and lines[0].startswith("TPU not used (NotFoundError")


def test_describe_machine_is_one_line_naming_the_python_and_tensorflow_versions():
    line = vae_runtime.describe_machine()
    assert "\n" not in line
    assert f"Python {platform.python_version()}" in line and f"TensorFlow {tf.__version__}" in line
    assert "Keras " in line and "CPU cores" in line


# ---------------------------------------------------------------------------------------------------------------------
# MirroredStrategy over two logical CPUs
# ---------------------------------------------------------------------------------------------------------------------

def deterministic_elbo_loss(model, x):
    """The negative ELBO with z = mean and the KL in closed form: no sampling, so two runs can agree exactly."""
    mean, logvar = model.encode(x)
    return -tf.reduce_mean(vae_utils.bernoulli_log_prob(x, model.decode(mean))
                           - vae_utils.kl_divergence_to_standard_normal(mean, logvar))


def train(strategy, loss_fn, batch_size: int = 16):
    train_images, _ = synthetic_images(64, seed=1)
    test_images, _ = synthetic_images(16, seed=2)
    config = vae_utils.TrainConfig(epochs=2, batch_size=batch_size, precision="float32")
    model = vae_utils.build_model(TINY_CONFIG, config, strategy=strategy)
    history = vae_utils.main_train_loop(model, train_images, test_images, config, loss_fn, strategy=strategy,
                                        verbose=False)
    return model, np.array([[row["train_loss"], row["test_elbo"]] for row in history])


@needs_two_cpus
@pytest.mark.parametrize("loss_fn, rtol", [(deterministic_elbo_loss, 1e-5), (vae_utils.compute_loss, 1e-3)],
                         ids=["deterministic_elbo", "compute_loss"])
def test_two_replicas_train_with_the_loss_curve_of_one_device(loss_fn, rtol):
    """Each replica takes half of every batch; the summed gradients of loss / replicas are the whole batch's."""
    strategy = tf.distribute.MirroredStrategy(["/CPU:0", "/CPU:1"])
    assert strategy.num_replicas_in_sync == 2
    mirrored, curve = train(strategy, loss_fn)
    assert all(strategy.extended.variable_created_in_scope(getattr(v, "value", v)) for v in mirrored.trainable_variables)
    _, reference = train(None, loss_fn)
    assert np.isfinite(curve).all() and curve.shape == (2, 2)
    np.testing.assert_allclose(curve, reference, rtol=rtol)


@needs_two_cpus
def test_a_batch_size_the_replicas_do_not_divide_is_refused_before_training():
    strategy = tf.distribute.MirroredStrategy(["/CPU:0", "/CPU:1"])
    config = vae_utils.TrainConfig(epochs=1, batch_size=15, precision="float32")
    model = vae_utils.build_model(TINY_CONFIG, config, strategy=strategy)
    before = [v.numpy().copy() for v in model.trainable_variables]
    images, _ = synthetic_images(32)
    with pytest.raises(ValueError, match=r"batch_size=15 .* divisible by the 2 replica\(s\)"):
        vae_utils.main_train_loop(model, images, images, config, strategy=strategy, verbose=False)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
