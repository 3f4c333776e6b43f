"""The training-speed benchmark runs end to end in its quick mode (synthetic data); timings are never asserted."""

import importlib.util
import math
import os

import pytest

BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "benchmark.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vae_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_mode_runs_and_reports_every_part(bench, capsys):
    result = bench.main(["--quick"])
    printed = capsys.readouterr().out
    for heading in ("Machine:", "1. Training throughput", "2. Time to the tutorial", "3. Where the project's step"):
        assert heading in printed
    assert all(rates["wall"] > 0 and rates["cpu"] > 0 for rates in result["throughput"].values())
    assert math.isfinite(result["target_elbo"])
    assert len(result["tutorial_history"]) == 1 and 1 <= len(result["project_history"]) <= 1
    # Every CPU gets a measured bfloat16 row next to float32, with its own matmul peak and layer profile.
    assert {"float32", "mixed_bfloat16"} <= set(result["precisions"])
    for precision, peak in (("float32", "float32 matmul"), ("mixed_bfloat16", "bfloat16 matmul")):
        assert any(name.startswith("project (") and name.endswith(f", {precision})") for name in result["throughput"])
        assert peak in result["throughput"]
        assert [name.split("/")[0] for name, _, _ in result["profile"][precision]] == ["encoder"] * 3 + ["decoder"] * 4
    assert result["chosen_precision"] in result["precisions"]
    assert "Speed targets, measured" in printed and "at least 8x sooner" in printed
    assert result["targets"]["throughput_ratio"] > 0


def test_precision_rows_follow_the_machine(bench, monkeypatch):
    monkeypatch.setattr(bench.vr, "choose_precision", lambda requested="auto", **_: "float32")
    assert bench.precisions_to_measure("float32")[0] == "float32"
    assert bench.precisions_to_measure("mixed_float16")[-1] == "mixed_float16"  # part 2's precision always gets a row
    assert bench.PEAK_DTYPE == {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def test_flop_count_matches_the_tutorial_architecture_by_hand(bench):
    import vae_utils as vu

    model = vu.CVAE(vu.VAEConfig(encoder_padding="valid", latent_dim=2))
    # Forward multiply-adds per image: conv 13*13*32*9, conv 6*6*64*9*32, dense 2304*4; dense 2*1568,
    # transposed convs 7*7*32*9*64, 14*14*64*9*32 and 28*28*32*9; the first layer needs no input gradient.
    first = 13 * 13 * 32 * 9
    rest = 6 * 6 * 64 * 9 * 32 + 2304 * 4 + 2 * 1568 + 7 * 7 * 32 * 9 * 64 + 14 * 14 * 64 * 9 * 32 + 28 * 28 * 32 * 9
    assert bench.training_flops_per_image(model) == 2 * (2 * first + 3 * rest)


def test_tutorial_model_has_the_same_parameter_count_as_the_project_model(bench):
    import vae_utils as vu

    tutorial = bench.TutorialCVAE(2)
    project = vu.CVAE(vu.VAEConfig(encoder_padding="valid", latent_dim=2))
    assert tutorial.encoder.count_params() == project.encoder.count_params()
    assert tutorial.decoder.count_params() == project.decoder.count_params()
