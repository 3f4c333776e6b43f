"""Execute hw3_vae.ipynb top to bottom and save it with each run of consecutive stream outputs merged.

Usage: python scripts/run_notebook.py [NOTEBOOK] [--output PATH] [-p NAME VALUE ...]

The training loop redraws its progress bar with carriage returns; merging the stream outputs and keeping only the
text after the last carriage return of each line leaves one line per epoch in the saved notebook, as a live
notebook shows it. Parameters (-p QUICK True) are injected after the `parameters` cell, as papermill does.
"""

import argparse
import ast
import pathlib
import re
import sys

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERWRITTEN = re.compile(r".*\r(?=[^\n])")  # text that a later carriage return overwrote on the same line
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")  # the progress bar's colours: Colab renders them, other viewers print them
# TensorFlow's C++ start-up notices, written to stderr before its logging is configured, so that
# TF_CPP_MIN_LOG_LEVEL cannot silence them: device probing that says nothing about this run.
STARTUP_NOTICE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\).*"
                            r"|[IWE]0000 [0-9:. ]+ *\d+ (port|cudart_stub|cuda_platform|cpu_feature_guard)\.cc:.*"
                            r"|To enable the following instructions:.*)\n?", re.MULTILINE)


def merge_streams(notebook: nbformat.NotebookNode) -> None:
    """Merge consecutive stream outputs of the same name; drop text that carriage returns overwrote, colour codes and
    start-up notices."""
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for output in cell.outputs:
            previous = merged[-1] if merged else None
            if (output.output_type == "stream" and previous is not None and previous.output_type == "stream"
                    and previous.name == output.name):
                previous.text += output.text
            else:
                merged.append(output)
        for output in merged:
            if output.output_type == "stream":
                output.text = OVERWRITTEN.sub("", ANSI_CODES.sub("", output.text))
                if output.name == "stderr":
                    output.text = STARTUP_NOTICE.sub("", output.text)
        cell.outputs = [output for output in merged if output.output_type != "stream" or output.text]


def inject_parameters(notebook: nbformat.NotebookNode, parameters: dict) -> None:
    """Insert a cell assigning `parameters` right after the cell tagged `parameters`."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "# Parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, cell)


def run(path: pathlib.Path, output: pathlib.Path, parameters: dict, cwd: pathlib.Path = ROOT) -> nbformat.NotebookNode:
    """Execute the notebook at `path` with `parameters` and write it, streams merged, to `output`."""
    notebook = nbformat.read(path, as_version=4)
    if parameters:
        inject_parameters(notebook, parameters)
    NotebookClient(notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    merge_streams(notebook)
    nbformat.write(notebook, output)
    return notebook


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", default=str(ROOT / "hw3_vae.ipynb"))
    parser.add_argument("--output", help="where to write the executed notebook (default: in place)")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="set a parameter; VALUE is a Python literal or else a string")
    args = parser.parse_args(argv)
    parameters = {}
    for name, value in args.p:
        try:
            parameters[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parameters[name] = value
    run(pathlib.Path(args.notebook), pathlib.Path(args.output or args.notebook), parameters)


if __name__ == "__main__":
    sys.exit(main())
