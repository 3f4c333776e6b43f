"""Where the project runs: the distribution strategy chosen on each kind of machine, the machine's description, and
the architecture diagrams degrading to a text summary without pydot or graphviz.

TPUs and GPUs are not needed: the TPU resolver, TPU start-up, the strategies and the device lists are replaced by
fakes, so each test runs in milliseconds on any CPU.
"""

import os
import shutil
import sys
import types

import pytest
import tensorflow as tf

import vae_utils


class FakeResolver:
    made = []

    def __init__(self, tpu=None, **_):
        self.tpu = tpu
        FakeResolver.made.append(tpu)


class FakeTPUStrategy:
    num_replicas_in_sync = 8

    def __init__(self, resolver):
        self.resolver = resolver


class FakeMirroredStrategy:
    num_replicas_in_sync = 2


@pytest.fixture
def machine(monkeypatch):
    """A machine whose TPU devices, GPUs and TPU start-up the test sets; by default: no TPU, no GPU."""
    FakeResolver.made = []
    state = types.SimpleNamespace(tpus=[], gpus=[], connect_error=None, initialize_error=None, resolver_error=None)
    real_physical, real_logical = tf.config.list_physical_devices, tf.config.list_logical_devices

    def list_physical_devices(device_type=None):
        return list(state.tpus) if device_type == "TPU" else real_physical(device_type)

    def list_logical_devices(device_type=None):
        return list(state.gpus) if device_type == "GPU" else real_logical(device_type)

    def resolver(tpu=None, **kwargs):
        if state.resolver_error:
            raise state.resolver_error
        return FakeResolver(tpu=tpu, **kwargs)

    def connect(resolver):
        if state.connect_error:
            raise state.connect_error

    def initialize(resolver):
        if state.initialize_error:
            raise state.initialize_error

    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    monkeypatch.setattr(tf.config, "list_physical_devices", list_physical_devices)
    monkeypatch.setattr(tf.config, "list_logical_devices", list_logical_devices)
    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", resolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", connect)
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", initialize)
    monkeypatch.setattr(tf.distribute, "TPUStrategy", FakeTPUStrategy)
    monkeypatch.setattr(tf.distribute, "MirroredStrategy", FakeMirroredStrategy)
    return state


def _device(kind, index=0):
    return types.SimpleNamespace(name=f"/physical_device:{kind}:{index}", device_type=kind)


def _output_lines(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_cpu_only_machine_gets_the_default_strategy_and_says_why(machine, capsys):
    strategy = vae_utils.get_strategy()
    assert strategy is tf.distribute.get_strategy()
    assert FakeResolver.made == []
    (line,) = _output_lines(capsys)
    assert line.startswith("Strategy: the default strategy with 1 replica(s)") and "the CPU" in line


def test_tpu_vm_where_tensorflow_sees_tpus_uses_the_local_resolver(machine, capsys):
    machine.tpus = [_device("TPU", i) for i in range(8)]
    strategy = vae_utils.get_strategy()
    assert isinstance(strategy, FakeTPUStrategy) and strategy.resolver.tpu == "local"
    (line,) = _output_lines(capsys)
    assert "FakeTPUStrategy with 8 replica(s)" in line and "tpu='local'" in line


def test_tpu_name_selects_a_named_tpu(machine, monkeypatch, capsys):
    monkeypatch.setenv("TPU_NAME", "my-tpu")
    strategy = vae_utils.get_strategy()
    assert isinstance(strategy, FakeTPUStrategy) and strategy.resolver.tpu == "my-tpu"
    assert "TPU_NAME" in capsys.readouterr().out


def test_the_retired_colab_tpu_address_is_ignored(machine, monkeypatch, capsys):
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")  # the TPU Node set-up Colab retired in 2024
    strategy = vae_utils.get_strategy()
    assert strategy is tf.distribute.get_strategy() and FakeResolver.made == []


@pytest.mark.parametrize("stage", ["resolver_error", "connect_error", "initialize_error"])
@pytest.mark.parametrize("error", [
    OSError("[Errno 101] Network is unreachable"),  # the resolver asking a metadata server
    ValueError("Please provide a TPU Name to connect to."),
    RuntimeError("Could not find any TPU devices"),
    tf.errors.NotFoundError(None, None, "TPU initialization failed:\nsecond line of detail"),
], ids=["OSError", "ValueError", "RuntimeError", "NotFoundError"])
def test_any_tpu_failure_gives_one_line_and_the_next_best_strategy(machine, capsys, stage, error):
    machine.tpus = [_device("TPU")]
    setattr(machine, stage, error)
    strategy = vae_utils.get_strategy()
    assert strategy is tf.distribute.get_strategy()
    failure, chosen = _output_lines(capsys)
    assert failure.startswith("TPU 'local' not used (") and type(error).__name__ in failure
    assert "second line" not in failure
    assert chosen.startswith("Strategy: the default strategy")


def test_tpu_failure_on_a_machine_with_two_gpus_falls_back_to_mirrored(machine, monkeypatch, capsys):
    monkeypatch.setenv("TPU_NAME", "unreachable-tpu")
    machine.resolver_error = OSError("Connection refused")
    machine.gpus = [_device("GPU", 0), _device("GPU", 1)]
    strategy = vae_utils.get_strategy()
    assert isinstance(strategy, FakeMirroredStrategy)
    failure, chosen = _output_lines(capsys)
    assert "'unreachable-tpu' not used (OSError: Connection refused)" in failure
    assert chosen.startswith("Strategy: FakeMirroredStrategy with 2 replica(s); 2 GPUs")


def test_one_gpu_gets_the_default_strategy(machine, capsys):
    machine.gpus = [_device("GPU")]
    assert vae_utils.get_strategy() is tf.distribute.get_strategy()
    assert "the GPU" in capsys.readouterr().out


def test_mirrored_failure_falls_back_to_one_device(machine, monkeypatch, capsys):
    machine.gpus = [_device("GPU", 0), _device("GPU", 1)]

    def broken():
        raise RuntimeError("NCCL is not available")

    monkeypatch.setattr(tf.distribute, "MirroredStrategy", broken)
    assert vae_utils.get_strategy() is tf.distribute.get_strategy()
    failure, chosen = _output_lines(capsys)
    assert failure.startswith("MirroredStrategy not used (RuntimeError") and "the GPU" in chosen


def test_tpu_chips_that_tensorflow_cannot_use_are_named_in_the_reason(machine, monkeypatch, capsys):
    real_listdir = os.listdir

    def listdir(path="."):
        if path == "/dev":
            return ["null", "accel0", "accel1"]
        if path == "/dev/vfio":
            raise FileNotFoundError(path)
        return real_listdir(path)

    monkeypatch.setattr(vae_utils.os, "listdir", listdir)
    assert vae_utils.get_strategy() is tf.distribute.get_strategy()
    (line,) = _output_lines(capsys)
    assert "/dev/accel0" in line and "TPU build" in line and FakeResolver.made == []


def test_quiet_get_strategy_prints_nothing_when_all_is_well(machine, capsys):
    vae_utils.get_strategy(verbose=False)
    assert capsys.readouterr().out == ""


def test_describe_machine_is_one_line_with_the_versions():
    line = vae_utils.describe_machine()
    assert "\n" not in line and f"TensorFlow {tf.__version__}" in line and "Keras " in line and "CPU cores" in line


# Architecture diagrams

@pytest.fixture
def small_model():
    return vae_utils.CVAE(vae_utils.VAEConfig(img_size=28, channels=1, latent_dim=2, filters=4, kernel_size=3,
                                              num_convolutions=2, strides=2))


def _assert_degraded(capsys, paths, figures_dir, reason):
    out = capsys.readouterr().out
    assert paths == []
    notes = [line for line in out.splitlines() if line.startswith("No architecture diagram:")]
    assert len(notes) == 1 and reason in notes[0]
    assert "encoder" in out and "decoder" in out and "Total params" in out  # both text summaries
    assert not list(figures_dir.glob("*.png")) if figures_dir.exists() else True


def test_draw_architecture_without_pydot_prints_a_note_and_the_text_summary(small_model, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setitem(sys.modules, "pydot", None)  # `import pydot` now raises ImportError
    paths = vae_utils.draw_architecture(small_model, "q", str(tmp_path / "figures"))
    _assert_degraded(capsys, paths, tmp_path / "figures", "pydot")


def test_draw_architecture_without_graphviz_prints_a_note_and_the_text_summary(small_model, tmp_path, monkeypatch,
                                                                               capsys):
    pytest.importorskip("pydot")
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` program on the PATH
    paths = vae_utils.draw_architecture(small_model, "q", str(tmp_path / "figures"))
    _assert_degraded(capsys, paths, tmp_path / "figures", "graphviz")


def test_draw_architecture_when_plot_model_returns_none_as_keras_does_in_ipython(small_model, tmp_path, monkeypatch,
                                                                                 capsys):
    # Keras 3 in IPython: "You must install pydot ..." printed, None returned, no file. Also what happens in a
    # session where pydot was installed after Keras had been imported.
    fake_pydot = types.ModuleType("pydot")
    fake_pydot.Dot = type("Dot", (), {"create": lambda self: b""})
    monkeypatch.setitem(sys.modules, "pydot", fake_pydot)
    monkeypatch.setattr(tf.keras.utils, "plot_model",
                        lambda *args, **kwargs: print("You must install pydot (`pip install pydot`) for `plot_model`"))
    paths = vae_utils.draw_architecture(small_model, "q", str(tmp_path / "figures"))
    _assert_degraded(capsys, paths, tmp_path / "figures", "wrote no file")


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's `dot` program is not installed")
def test_draw_architecture_writes_both_diagrams(small_model, tmp_path, capsys):
    pytest.importorskip("pydot")
    paths = vae_utils.draw_architecture(small_model, "q1_8", str(tmp_path))
    assert paths == [str(tmp_path / "q1_8_encoder.png"), str(tmp_path / "q1_8_decoder.png")]
    assert all(os.path.getsize(p) > 0 for p in paths)
    assert "No architecture diagram" not in capsys.readouterr().out
