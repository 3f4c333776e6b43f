"""The notebook: a QUICK run executes top to bottom, and the committed copy is a complete, full (non-QUICK) run."""

import json
import os
import pathlib
import sys

import nbformat
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import run_notebook  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "hw3_vae.ipynb"
RESULT_KEYS = {"name", "dataset", "loss", "epochs", "train_images", "train_seconds", "test_elbo", "test_elbo_analytic_kl",
               "iwae_images", "elbo_on_iwae_images", "iwae_nll_nats", "bits_per_dim", "psnr_db", "active_units",
               "probe_accuracy"}


def _data_dir():
    directory = os.environ.get("VAE_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    if not all(os.path.isfile(os.path.join(directory, f"{name}.npz")) for name in ("mnist", "cifar10")):
        pytest.skip("the MNIST and CIFAR-10 .npz files are not available (set VAE_DATA_DIR)")
    return directory


@pytest.mark.slow
def test_notebook_runs_in_quick_mode_and_a_rerun_shows_every_epoch_again(tmp_path):
    output = tmp_path / "executed.ipynb"
    run_notebook.run(NOTEBOOK, output, {"QUICK": True, "DATA_DIR": _data_dir(),
                                        "FIGURES_DIR": str(tmp_path / "figures"),
                                        "CHECKPOINT_DIR": str(tmp_path / "checkpoints")})
    executed = nbformat.read(output, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert not errors
    summary = json.loads((tmp_path / "figures" / "results.json").read_text())
    assert summary["quick"] is True
    assert all(RESULT_KEYS <= set(model) for model in summary["models"])
    assert (tmp_path / "figures" / "q1_1_mnist_one_per_class.png").is_file()
    training_output = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "\r" not in training_output, "progress-bar redraws were not merged into one line"

    # Run all again, as after a Colab disconnect: every model restores from its checkpoints, and each training cell
    # (1.9, 2.1, 3.1) shows every epoch's line and reconstructions as the first run did.
    rerun = tmp_path / "rerun.ipynb"
    run_notebook.run(NOTEBOOK, rerun, {"QUICK": True, "RUN_APPENDIX": False, "DATA_DIR": _data_dir(),
                                       "FIGURES_DIR": str(tmp_path / "figures_rerun"),
                                       "CHECKPOINT_DIR": str(tmp_path / "checkpoints")})
    first, again = training_cells(executed), training_cells(nbformat.read(rerun, as_version=4))
    assert len(first) >= 3 and again[:3] == first[:3]
    assert all(epoch_lines and images for epoch_lines, images in first[:3])


def training_cells(notebook):
    """Per cell that calls main_train_loop: its lines "Epoch ..." and its number of images shown."""
    cells = [cell for cell in notebook.cells if cell.cell_type == "code" and "main_train_loop(" in cell.source]
    return [([line for output in cell.outputs for line in output.get("text", "").splitlines()
              if line.startswith("Epoch ")],
             sum("image/png" in output.get("data", {}) for output in cell.outputs)) for cell in cells]


def test_committed_notebook_is_a_complete_full_run():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [c for c in notebook.cells if c.cell_type == "code" and c.source.strip()]
    assert code_cells, "the notebook has no code"
    assert all(c.execution_count is not None for c in code_cells), "some code cells were not executed"
    counts = [c.execution_count for c in code_cells]
    assert counts == sorted(counts), "cells were not executed top to bottom"
    assert not [o for c in code_cells for o in c.get("outputs", []) if o.output_type == "error"]
    parameter_sources = "\n".join(c.source for c in code_cells
                                  if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", [])))
    assert "QUICK = False" in parameter_sources and "QUICK = True" not in parameter_sources
    summary = json.loads((ROOT / "figures" / "results.json").read_text())
    assert summary["quick"] is False
    assert all(RESULT_KEYS <= set(model) for model in summary["models"])
    assert {"total_wall_time_s", "machine"} <= set(summary)
